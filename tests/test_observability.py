"""Issue 13's acceptance on real runs: log_history.jsonl across kill -9 and resume, the report
on a run in progress, MLflow against the history, push_to_hub offline, and every task's
samples/s and tokens/s against a hand count."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import CPU_ENV, REPO, cli_subprocess, one_thread, read_results, run_cli
from notrainer.observability import history

# -------------------------------------------------------------------- log history


def _steps(records, kind):
    return [r["step"] for r in records if r["kind"] == kind]


def test_short_run_leaves_one_record_per_logging_step_and_evaluation(tmp_path):
    out = tmp_path / "run"
    with one_thread():
        res = run_cli("task=clm", "max_train_steps=6", "logging_steps=2", "eval_steps=3", "progress=false",
                      output_dir=out)
    records = history.read(str(out))
    assert _steps(records, "train") == [2, 4, 6]
    assert _steps(records, "eval") == [3, 6]
    train = [r for r in records if r["kind"] == "train"]
    assert all(r["loss"] > 0 and r["learning_rate"] >= 0 and r["grad_norm"] > 0 and r["tokens_per_second"] > 0
               for r in train)
    last_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert last_eval["eval_loss"] == pytest.approx(res["eval_loss"])
    # The run's other artefacts: report, model card; evaluation time reported apart.
    if importlib.util.find_spec("matplotlib") is not None:
        _check_report(out, ["train_loss.png", "eval_metrics.png", "learning_rate.png", "grad_norm.png",
                            "tokens_per_second.png"])
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "notrainer" in card and "eval_loss" in card
    assert res["train_eval_runtime"] > 0 and res["eval_runtime"] > 0 and res["eval_samples"] > 0


def _check_report(out, expected):
    """Valid, non-blank PNGs, each referenced by report.html."""
    import numpy as np
    from PIL import Image

    pngs = sorted(os.listdir(out / "plots"))
    assert set(expected) <= set(pngs) and pngs
    page = (out / "report.html").read_text()
    for name in pngs:
        with Image.open(out / "plots" / name) as im:
            im.verify()
        with Image.open(out / "plots" / name) as im:
            assert np.asarray(im.convert("L"), dtype=float).std() > 1.0, f"{name} is blank"
        assert f"plots/{name}" in page


SLOW_TASK = '''
import os, time
from notrainer.tasks.clm import CLMTask

class SlowCLM(CLMTask):
    def loss(self, model, batch):
        time.sleep(float(os.environ.get("SLOW_STEP_SECONDS", "0")))
        return super().loss(model, batch)
'''


@pytest.mark.slow
def test_kill9_and_resume_leave_each_step_once_and_the_report_works_mid_run(tmp_path):
    import psutil

    task = tmp_path / "slow_task.py"
    task.write_text(SLOW_TASK)
    out = tmp_path / "run"
    args = [f"task={task}:SlowCLM", "max_train_steps=12", "checkpointing_steps=4", "logging_steps=2", "eval_steps=6",
            "per_device_train_batch_size=4", "report_to=none", "progress=false", f"output_dir={out}"]
    proc = subprocess.Popen([sys.executable, "-m", "notrainer.run", *args], cwd=str(REPO),
                            env={**os.environ, **CPU_ENV, "SLOW_STEP_SECONDS": "0.2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Wait until the killed run has logged past its last checkpoint (step 4): those records
        # are the ones the resumed run must replace, not duplicate.
        import time

        deadline = time.monotonic() + 300
        while not any(r["step"] > 4 for r in history.read(str(out))) or not (
                out / "checkpoints" / "step_4" / "COMPLETE").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run did not reach step 6"
            time.sleep(0.05)
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            p.kill()
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert not (out / "all_results.json").exists()
    killed = history.read(str(out))
    assert max(r["step"] for r in killed) > 4

    # The on-demand report on the run in progress (a checkpointed folder, no results yet).
    if importlib.util.find_spec("matplotlib") is not None:
        rep = subprocess.run([sys.executable, "-m", "notrainer.observability.report", str(out)], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert rep.returncode == 0, rep.stderr[-2000:]
        _check_report(out, ["train_loss.png", "learning_rate.png", "grad_norm.png", "tokens_per_second.png"])
        assert "in progress (or stopped): history up to step" in (out / "report.html").read_text()

    with one_thread():
        run_cli(*args[:-1], "resume_from_checkpoint=auto", output_dir=out)
    records = history.read(str(out))
    assert _steps(records, "train") == [2, 4, 6, 8, 10, 12]
    assert _steps(records, "eval") == [6, 12]


# -------------------------------------------------------------------- trackers and the Hub


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed (pip install mlflow)")
@pytest.mark.slow
def test_mlflow_run_records_the_same_losses_as_log_history(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    with one_thread():
        run_cli("task=clm", "max_train_steps=6", "logging_steps=2", "report_to=mlflow", "progress=false",
                output_dir=out)
    uri = os.environ["MLFLOW_TRACKING_URI"]  # the loop's default: a SQLite store inside the run directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert uri == "sqlite:///" + str(out.resolve() / "logs" / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    got = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "train_loss")}
    want = {r["step"]: r["loss"] for r in history.read(str(out)) if r["kind"] == "train"}
    assert sorted(got) == [2, 4, 6]
    assert got == pytest.approx(want, rel=1e-6)  # MLflow stores float64 values


def test_unknown_or_missing_tracker_fails_in_one_line_before_training(tmp_path):
    proc = cli_subprocess("task=clm", "report_to=tensorboard,mlfow", f"output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("notrainer: error: report_to: unknown tracker 'mlfow'")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_push_to_hub_offline_fails_in_one_line_before_training(tmp_path):
    out = tmp_path / "run"
    proc = cli_subprocess("task=clm", "push_to_hub=true", "hub_model_id=me/tiny", f"output_dir={out}", check=False,
                          env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_dummy"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == ["notrainer: error: push_to_hub=true needs the network, but HF_HUB_OFFLINE is set; unset it, "
                     "or drop push_to_hub and upload later with `hf upload`"]
    assert "training on" not in proc.stdout and not out.exists()


# -------------------------------------------------------------------- throughput figures

def _rate_of(count: float, runtime: float, got: float) -> bool:
    """`got` is count / the true runtime, of which train_runtime is the rounding to 1 ms."""
    lo, hi = count / (runtime + 5e-4), count / max(runtime - 5e-4, 1e-9)
    return lo * (1 - 1e-4) - 0.05 <= got <= hi * (1 + 1e-4) + 0.05  # got itself is rounded too


TASKS = ["clm", "sft", "mlm", "classification", "token_classification", "seq2seq", "qa"]
STEPS, BATCH = 3, 4


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.slow
def test_samples_and_tokens_per_second_equal_a_hand_count(task, tmp_path, monkeypatch):
    """Every training micro-batch the loop consumed is counted here by hand (rows, and
    attention-mask tokens: the documented tokens/s), then divided by train_runtime, which
    leaves out the evaluations run inside training (timed as train_eval_runtime)."""
    from notrainer.imports import import_object
    from notrainer.cli.run import BUILTIN_TASKS

    cls = import_object(BUILTIN_TASKS[task], "task")
    seen = {"rows": 0, "tokens": 0}
    original = cls.loss

    def counting_loss(self, model, batch):
        if model.training:  # train micro-batches only (an eval without eval_step also calls loss)
            seen["rows"] += int(batch["input_ids"].shape[0])
            mask = batch.get("attention_mask")
            seen["tokens"] += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return original(self, model, batch)

    monkeypatch.setattr(cls, "loss", counting_loss)
    prepare = cls.prepare_datasets

    def counting_prepare(self, raw, tokenizer):
        ds = prepare(self, raw, tokenizer)
        seen["train_rows"] = len(ds["train"])
        return ds

    monkeypatch.setattr(cls, "prepare_datasets", counting_prepare)
    with one_thread():
        res = run_cli(f"task={task}", f"max_train_steps={STEPS}", f"per_device_train_batch_size={BATCH}",
                      "eval_steps=2", "logging_steps=2", "progress=false", output_dir=tmp_path / "run")
    assert seen["rows"] == STEPS * BATCH  # the batch shape the task collates, whatever its keys
    runtime = res["train_runtime"]
    assert res["train_eval_runtime"] > 0  # one evaluation ran inside training (step 2)...
    assert _rate_of(seen["rows"], runtime, res["train_samples_per_second"]), res  # ...and is not in here
    assert _rate_of(seen["tokens"], runtime, res["train_tokens_per_second"]), res
    assert res["eval_samples"] > 0 and res["eval_runtime"] > 0
    batches_per_epoch = -(-seen["train_rows"] // BATCH)
    assert res["epoch"] == round(STEPS / batches_per_epoch, 4)
    assert read_results(tmp_path / "run")["train_samples_per_second"] == res["train_samples_per_second"]
    assert json.loads((tmp_path / "run" / "log_history.jsonl").read_text().splitlines()[0])["kind"] == "train"


@pytest.mark.parametrize("strategy", ["end", "checkpoint", "all_checkpoints"])
def test_push_to_hub_uploads_the_run_and_its_checkpoints_by_strategy(strategy, tmp_path, monkeypatch):
    """The Hub faked in-process (no network here): which folders go up, when, and what is left out."""
    import types

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from notrainer.observability import hub

    uploads = []

    def fake_upload_folder(*, repo_id, folder_path, path_in_repo=None, ignore_patterns=None, delete_patterns=None,
                           run_as_future=False, **_):
        files = [os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs]
        kept = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        uploads.append({"repo": repo_id, "in_repo": path_in_repo or "", "files": kept, "delete": delete_patterns,
                        "model_exported": (out / "model.safetensors").exists()})
        return types.SimpleNamespace(commit_url=f"https://hf.co/{repo_id}/commit/{len(uploads)}")

    out = tmp_path / "run"
    monkeypatch.setattr(hub, "is_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "whoami", lambda token=None: {"name": "me"})
    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, **_: types.SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    with one_thread():
        run_cli("task=clm", "max_train_steps=4", "checkpointing_steps=2", "push_to_hub=true", "hub_model_id=tiny",
                f"hub_strategy={strategy}", "hub_token=hf_fake", "progress=false", output_dir=out)
    final = uploads[-1]
    assert final["repo"] == "me/tiny" and final["in_repo"] == "" and final["model_exported"]
    assert {"README.md", "model.safetensors", "config.yaml", "log_history.jsonl", "all_results.json"} <= set(final["files"])
    assert not any(f.startswith("checkpoints/") for f in final["files"])
    assert "hf_fake" not in (out / "config.yaml").read_text()
    during = uploads[:-1]
    if strategy == "end":
        assert during == []
    else:  # one upload per checkpoint, as it was saved (before the export existed)
        assert [u["model_exported"] for u in during] == [False, False]
        where = [u["in_repo"] for u in during]
        assert where == (["last-checkpoint"] * 2 if strategy == "checkpoint" else
                         ["checkpoints/step_2", "checkpoints/step_4"])
        assert all("model.safetensors" in u["files"] and "COMPLETE" in u["files"] for u in during)


def test_mfu_equals_a_hand_count_for_the_builtin_gpt2(tmp_path, monkeypatch):
    """train_mfu = tokens/s x FLOPs per token / peak, with the GPT-2 parameters counted by hand
    from its config (not with the code under test)."""
    from notrainer.tasks.clm import CLMTask

    seen = {"tokens": 0}
    original = CLMTask.loss

    def counting_loss(self, model, batch):
        if model.training:
            assert "attention_mask" not in batch  # packed blocks: every position is a token
            seen["tokens"] += int(batch["input_ids"].numel())
            seen["seq"] = int(batch["input_ids"].shape[1])
        return original(self, model, batch)

    monkeypatch.setattr(CLMTask, "loss", counting_loss)
    out = tmp_path / "run"
    with one_thread():
        res = run_cli("task=clm", f"max_train_steps={STEPS}", "peak_tflops=0.01", "do_eval=false", "progress=false",
                      output_dir=out)
    c = json.loads((out / "config.json").read_text())
    assert c["model_type"] == "gpt2" and c["tie_word_embeddings"] and c["n_inner"] is None
    d, layers, vocab = c["n_embd"], c["n_layer"], c["vocab_size"]
    # per block: c_attn d x 3d (+3d bias), c_proj d x d (+d), c_fc d x 4d (+4d), mlp c_proj 4d x d (+d), 2 layer norms
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    # + final layer norm + the tied lm_head (a matmul); token and position lookups are not matmuls
    n = layers * block + 2 * d + vocab * d
    flops_per_token = 6 * n + 12 * layers * seen["seq"] * d
    # train_mfu comes from train_tokens_per_second (checked against the hand count above for
    # every task); here the FLOPs: the same rate times the hand-counted FLOPs per token
    assert _rate_of(seen["tokens"], res["train_runtime"], res["train_tokens_per_second"])
    hand = res["train_tokens_per_second"] * flops_per_token / 0.01e12
    assert res["train_mfu"] == pytest.approx(hand, rel=1e-5)


@pytest.mark.slow
def test_two_process_run_writes_the_history_once_and_counts_both_ranks(tmp_path):
    out = tmp_path / "run"
    cli_subprocess("task=classification", "--max_steps", "4", "--logging_steps", "2", "--eval_steps", "2",
                   "per_device_train_batch_size=8", "report_to=none", "progress=false", f"output_dir={out}",
                   num_processes=2)
    records = history.read(str(out))
    assert _steps(records, "train") == [2, 4] and _steps(records, "eval") == [2, 4]
    res = read_results(out)
    # 4 steps x 8 rows x 2 processes, over training time without the two evaluations
    assert _rate_of(4 * 8 * 2, res["train_runtime"], res["train_samples_per_second"]), res
    assert res["eval_samples"] == [r for r in records if r["kind"] == "eval"][-1]["eval_samples"] > 0
