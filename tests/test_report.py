"""The report: valid, non-blank PNGs, an HTML page that shows them all, works mid-run."""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys

import pytest

from notrainer.observability import history
from notrainer.observability import report
from notrainer.errors import UsageError

pytest.importorskip("matplotlib")


def _fake_run(out, steps=40, eval_every=10, finished=True):
    """A run folder as the loop leaves it: history, config.yaml, a checkpoint, maybe results."""
    os.makedirs(out / "checkpoints" / "step_20", exist_ok=True)
    (out / "config.yaml").write_text("task: clm\nlearning_rate: 0.0003\nseed: 42\n")
    for s in range(1, steps + 1):
        history.append(str(out), history.train_record(
            s, s / steps, loss=3.0 * math.exp(-s / 15) + 0.1 * math.sin(s), learning_rate=3e-4 * (1 - s / steps),
            grad_norm=1.0 + 0.5 * math.cos(s), tokens_per_second=1000.0 + 10 * s))
        if s % eval_every == 0:
            history.append(str(out), history.eval_record(
                s, s / steps, {"eval_loss": 2.5 - s / 40, "eval_accuracy": s / 50, "eval_runtime": 1.2}, best_metric=s / 50))
    if finished:
        (out / "all_results.json").write_text(json.dumps({"train_loss": 0.9, "eval_accuracy": 0.8}))


def _check_png(path):
    from PIL import Image
    import numpy as np

    with Image.open(path) as im:
        im.verify()  # a valid PNG
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 1.0, f"{path} is blank"


def test_report_writes_every_plot_and_an_html_that_shows_them(tmp_path):
    _fake_run(tmp_path)
    out = report.write_report(str(tmp_path))
    names = sorted(os.path.basename(p) for p in out["plots"])
    assert names == ["eval_metrics.png", "grad_norm.png", "learning_rate.png", "tokens_per_second.png", "train_loss.png"]
    page = (tmp_path / "report.html").read_text()
    for path in out["plots"]:
        _check_png(path)
        rel = os.path.relpath(path, tmp_path)
        assert f"href='{rel}'" in page  # linked
        with open(path, "rb") as f:  # and embedded: the page alone shows the picture
            assert base64.b64encode(f.read()).decode() in page
    assert "learning_rate: 0.0003" in page  # the config
    assert "train_loss" in page and "finished" in page  # the final results


def test_on_demand_command_on_a_run_in_progress(tmp_path):
    _fake_run(tmp_path, steps=25, finished=False)
    with open(tmp_path / history.HISTORY_FILE, "ab") as f:
        f.write(b'{"kind":"train","st')  # the writer is mid-line right now
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "notrainer.observability.report", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "report.html").read_text()
    assert "in progress" in page and "step 25" in page
    for name in ("train_loss", "eval_metrics", "learning_rate", "grad_norm", "tokens_per_second"):
        _check_png(tmp_path / "plots" / f"{name}.png")
        assert f"plots/{name}.png" in page


def test_eval_runtime_is_not_plotted_as_a_metric(tmp_path):
    _fake_run(tmp_path)
    recs = history.read(str(tmp_path))
    assert report._eval_metric_names(recs) == ["eval_loss", "eval_accuracy"]


def test_smoothing_is_debiased():
    assert report.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    s = report.smooth([0.0, 10.0] * 20)
    assert 3 < s[-1] < 7


def test_without_matplotlib_one_line_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    _fake_run(tmp_path, steps=3, finished=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UsageError, match=r"pip install 'notrainer\[report\]'"):
        report.write_report(str(tmp_path))
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "notrainer: error: plots need matplotlib: pip install 'notrainer[report]'"
    assert report.maybe_write_report(str(tmp_path), log=lambda m: None) is None


def test_not_a_run_directory(tmp_path):
    with pytest.raises(UsageError, match="no log_history.jsonl"):
        report.write_report(str(tmp_path))
    with pytest.raises(UsageError, match="no such run directory"):
        report.write_report(str(tmp_path / "nope"))
