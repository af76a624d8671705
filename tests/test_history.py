"""log_history.jsonl: one line per record, durable, torn tails dropped, resume truncation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from notrainer.observability import history


def test_append_and_read_round_trip(tmp_path):
    import numpy as np
    import torch

    history.append(str(tmp_path), history.train_record(1, 0.02, loss=torch.tensor(2.5), grad_norm=np.float32(0.5),
                                                       learning_rate=1e-4, tokens_per_second=100.0))
    history.append(str(tmp_path), history.eval_record(1, 0.02, {"loss": 2.0, "eval_accuracy": 0.5}, best_metric=0.5))
    recs = history.read(str(tmp_path))
    assert recs == [
        {"kind": "train", "step": 1, "epoch": 0.02, "loss": 2.5, "grad_norm": 0.5, "learning_rate": 1e-4,
         "tokens_per_second": 100.0},
        {"kind": "eval", "step": 1, "epoch": 0.02, "eval_loss": 2.0, "eval_accuracy": 0.5, "best_metric": 0.5},
    ]
    lines = (tmp_path / history.HISTORY_FILE).read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)


def test_train_record_takes_the_trackers_dict():
    logs = {"train_loss": 1.5, "learning_rate": 1e-3, "tokens_per_second": 10.0, "epoch": 0.123456}
    assert history.train_record(7, **logs) == {"kind": "train", "step": 7, "epoch": 0.1235, "loss": 1.5,
                                               "learning_rate": 1e-3, "tokens_per_second": 10.0}


def test_missing_history_reads_empty(tmp_path):
    assert history.read(str(tmp_path)) == []
    assert history.truncate_after(str(tmp_path), 5) == 0


def test_torn_last_line_is_dropped_on_read_and_cut_on_append(tmp_path):
    for s in (1, 2):
        history.append(str(tmp_path), {"kind": "train", "step": s, "loss": 1.0 / s})
    path = tmp_path / history.HISTORY_FILE
    with open(path, "ab") as f:  # what a kill -9 in the middle of a write leaves
        f.write(b'{"kind":"train","step":3,"lo')
    assert [r["step"] for r in history.read(str(tmp_path))] == [1, 2]
    history.append(str(tmp_path), {"kind": "train", "step": 3, "loss": 0.3})
    assert [r["step"] for r in history.read(str(tmp_path))] == [1, 2, 3]
    assert path.read_bytes().count(b"\n") == 3 and path.read_bytes().endswith(b"\n")


def test_truncate_after_drops_later_records_atomically(tmp_path):
    for s in range(1, 7):
        history.append(str(tmp_path), history.train_record(s, s / 10, loss=float(s)))
        if s % 2 == 0:
            history.append(str(tmp_path), history.eval_record(s, s / 10, {"eval_loss": float(s)}))
    assert history.truncate_after(str(tmp_path), 4) == 3  # train 5, train 6, eval 6
    recs = history.read(str(tmp_path))
    assert [(r["kind"], r["step"]) for r in recs] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temp file left
    # The resumed run logs 5 and 6 again: each step exactly once.
    for s in (5, 6):
        history.append(str(tmp_path), history.train_record(s, s / 10, loss=float(s)))
    steps = [r["step"] for r in history.read(str(tmp_path)) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_reset_forgets_the_history(tmp_path):
    history.append(str(tmp_path), {"kind": "train", "step": 1})
    history.reset(str(tmp_path))
    history.reset(str(tmp_path))  # twice is fine
    assert history.read(str(tmp_path)) == []


_WRITER = """
import sys
from notrainer.observability import history
out = sys.argv[1]
for s in range(1, 1_000_000):
    history.append(out, history.train_record(s, s / 100, loss=1.0 / s, note="x" * 200))
    if s == 20:
        print("ready", flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "kill"), reason="needs kill")
def test_kill_9_while_appending_leaves_a_readable_history(tmp_path):
    """A writer killed with SIGKILL mid-stream: every complete line reads back, steps are 1..N."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"ready"
    finally:
        proc.kill()
        proc.wait(timeout=60)
    steps = [r["step"] for r in history.read(str(tmp_path))]
    assert len(steps) >= 20 and steps == list(range(1, len(steps) + 1))
    # Resume from step 10: the history continues with no duplicate and no gap.
    history.truncate_after(str(tmp_path), 10)
    for s in range(11, 15):
        history.append(str(tmp_path), history.train_record(s, s / 100, loss=1.0 / s))
    assert [r["step"] for r in history.read(str(tmp_path))] == list(range(1, 15))
