"""Runs that die and come back: kill -9 and SIGTERM between checkpoints, then
resume_from_checkpoint=auto. The resumed run must end with model weights bitwise equal to the
uninterrupted run's (CPU, fp32, gradient accumulation 2, GPT-2 dropout 0.1 on), with the same
all_results.json counters, on one process and on 2-process DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CPU_ENV, REPO, launch_command, one_thread, read_results, run_cli
from dist_helpers import batches_started, kill9_tree, wait_for, wait_for_batches, wait_past_checkpoint

# The task sleeps in each micro-batch (SLOW_STEP_SECONDS) so that a test can hit the run between
# two checkpoints; the numbers are those of task=clm. Each rank appends a line (the seconds it is
# about to sleep) to SLOW_STEP_MARKER.<rank> as a micro-batch starts: tests wait on that file
# (dist_helpers.wait_for_batches), never on a sleep, before they kill or signal the run.
SLOW_TASK = '''
import os, time
from notrainer.tasks.clm import CLMTask

class SlowCLM(CLMTask):
    def loss(self, model, batch):
        seconds = os.environ.get("SLOW_STEP_SECONDS", "0")
        if os.path.isfile(os.environ.get("SLOW_STEP_FILE", "")):  # lets a test slow a running process down
            seconds = open(os.environ["SLOW_STEP_FILE"]).read()
        if os.environ.get("SLOW_STEP_MARKER"):
            with open(os.environ["SLOW_STEP_MARKER"] + "." + os.environ.get("RANK", "0"), "a") as f:
                f.write(seconds.strip() + "\\n")
        time.sleep(float(seconds))
        return super().loss(model, batch)
'''

STEPS, EVERY = 12, 4
ARGS = ["report_to=none", f"max_train_steps={STEPS}", f"checkpointing_steps={EVERY}", "gradient_accumulation_steps=2",
        "per_device_train_batch_size=4", "logging_steps=3", "eval_steps=6"]
COUNTERS = ("global_step", "epoch", "train_loss", "eval_loss", "eval_perplexity")


@pytest.fixture(scope="module")
def slow_task(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("task") / "slow_task.py"
    path.write_text(SLOW_TASK)
    return f"task={path}:SlowCLM"


@pytest.fixture(scope="module")
def reference(slow_task, tmp_path_factory) -> Path:
    """The uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference")
    with one_thread():
        run_cli(slow_task, *ARGS, output_dir=out)
    return out


def _marker(args: list[str]) -> Path | None:
    """The SLOW_STEP_MARKER file of a run: beside its output_dir."""
    out = next((a.split("=", 1)[1] for a in args if a.startswith("output_dir=")), None)
    return Path(f"{out}.batches") if out else None


def _start(args: list[str], num_processes: int, slow: float, **env_extra: str) -> subprocess.Popen:
    marker = _marker(args)
    env = {**os.environ, **CPU_ENV, "SLOW_STEP_SECONDS": str(slow), **({"SLOW_STEP_MARKER": str(marker)} if marker else {}),
           **env_extra}
    cmd = launch_command(["-m", "notrainer.run", *args], num_processes)
    return subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in root.iterdir() if p.name.startswith("step_")) if root.exists() else []


def _kill9_between_checkpoints(args: list[str], out: Path, num_processes: int) -> None:
    proc = _start(args, num_processes, slow=0.15)
    wait_past_checkpoint(out, EVERY, _marker(args), proc, batches=3)  # into the next checkpoint interval
    kill9_tree(proc)  # drains its output too
    assert _steps(out) == [EVERY], "the kill must land between two checkpoints"
    assert not (out / "model.safetensors").exists()


def _same_run(out: Path, ref: Path, exact_loss: bool = True) -> None:
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    got, want = read_results(out), read_results(ref)
    assert {k: got[k] for k in COUNTERS if k != "train_loss"} == {k: want[k] for k in COUNTERS if k != "train_loss"}
    # A checkpoint closes the logging window; one taken off the schedule (a signal) sums the
    # same step losses in another grouping, which may move the last float digits.
    assert got["train_loss"] == (want["train_loss"] if exact_loss else pytest.approx(want["train_loss"], rel=1e-6))


@pytest.mark.slow
def test_kill9_then_auto_resume_is_bitwise_equal(slow_task, reference, tmp_path, capsys):
    out = tmp_path / "run"
    _kill9_between_checkpoints([slow_task, *ARGS, f"output_dir={out}"], out, num_processes=1)
    with one_thread():
        run_cli(slow_task, *ARGS, "resume_from_checkpoint=auto", output_dir=out)
    assert f"resumed from {out / 'checkpoints' / f'step_{EVERY}'}" in capsys.readouterr().out
    _same_run(out, reference)


@pytest.mark.slow
def test_kill9_then_auto_resume_is_bitwise_equal_ddp(slow_task, tmp_path):
    ref = tmp_path / "ref"
    proc = _start([slow_task, *ARGS, f"output_dir={ref}"], num_processes=2, slow=0)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    out = tmp_path / "run"
    args = [slow_task, *ARGS, f"output_dir={out}"]
    _kill9_between_checkpoints(args, out, num_processes=2)
    resumed = _start([*args, "resume_from_checkpoint=auto"], num_processes=2, slow=0)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    _same_run(out, ref)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_75_then_resume_finishes(slow_task, reference, tmp_path):
    out = tmp_path / "run"
    proc = _start([slow_task, *ARGS, f"output_dir={out}"], num_processes=1, slow=0.15)
    wait_past_checkpoint(out, EVERY, _marker([f"output_dir={out}"]), proc, batches=1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    assert "SIGTERM received" in stderr and "resume_from_checkpoint=auto continues" in stderr
    assert "Traceback" not in stderr
    stopped_at = _steps(out)[-1]
    assert EVERY < stopped_at < STEPS
    from notrainer.engine.checkpoint import verify

    assert verify(str(out / "checkpoints" / f"step_{stopped_at}")) is None
    state = json.loads((out / "checkpoints" / f"step_{stopped_at}" / "loop_state.json").read_text())
    assert state["global_step"] == stopped_at
    assert not (out / "all_results.json").exists() and not (out / "model.safetensors").exists()

    with one_thread():
        results = run_cli(slow_task, *ARGS, "resume_from_checkpoint=auto", output_dir=out)
    assert results["global_step"] == STEPS
    _same_run(out, reference, exact_loss=False)


@pytest.mark.slow
def test_second_signal_stops_at_once_and_keeps_the_checkpoints(slow_task, tmp_path):
    out, slow_file = tmp_path / "run", tmp_path / "slow"
    proc = _start([slow_task, *ARGS, f"output_dir={out}"], num_processes=1, slow=0.05, SLOW_STEP_FILE=str(slow_file))
    wait_for(out / "checkpoints" / f"step_{EVERY}" / "COMPLETE", proc)
    slow_file.write_text("30")  # from now on a micro-batch takes 30 s: the first signal cannot finish the step
    marker = _marker([f"output_dir={out}"])
    wait_for_batches(marker, proc, len(batches_started(marker)) + 1)
    while batches_started(marker)[-1] != "30":  # a micro-batch that started before the file was written
        wait_for_batches(marker, proc, len(batches_started(marker)) + 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)  # a second signal counts only after preemption.REPEAT_GRACE_S: a rule of time, not a race
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert proc.returncode == -signal.SIGINT, stderr[-2000:]
    assert "second SIGINT: stopping now" in stderr
    from notrainer.engine.checkpoint import list_checkpoints, verify

    assert [Path(p).name for p in list_checkpoints(str(out))] == [f"step_{EVERY}"]
    assert verify(str(out / "checkpoints" / f"step_{EVERY}")) is None


def test_resume_from_a_step_checkpoint_on_the_last_window_of_an_epoch(tmp_path, capsys):
    """The checkpoint at step 30 is taken after the last micro-batch of epoch 0 but before the
    epoch-end bookkeeping: resume must skip the whole epoch, close it, and go on into epoch 1."""
    args = ["task=clm", "report_to=none", "gradient_accumulation_steps=2", "per_device_train_batch_size=4",
            "max_train_steps=32", "checkpointing_steps=30", "logging_steps=7"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    with one_thread():
        run_cli(*args, output_dir=ref)
        state = json.loads((ref / "checkpoints" / "step_30" / "loop_state.json").read_text())
        assert state["epoch"] == 0 and state["step_in_epoch"] > 0  # 30 steps = epoch 0 exactly
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(ref / "checkpoints" / "step_30", out / "checkpoints" / "step_30")
        capsys.readouterr()
        run_cli(*args, "resume_from_checkpoint=auto", output_dir=out)
    assert "(step 30, epoch 0)" in capsys.readouterr().out
    assert read_results(ref)["epoch"] > 1.0
    _same_run(out, ref)


RANDOM_COLLATOR_TASK = '''
import torch
from transformers import default_data_collator
from notrainer.tasks.clm import CLMTask

class MaskingCLM(CLMTask):
    """Draws from the global torch RNG while collating, like MLM masking does."""
    def collator(self, tokenizer):
        def collate(examples):
            batch = default_data_collator(examples)
            drop = torch.rand(batch["labels"].shape) < 0.3
            batch["labels"] = batch["labels"].masked_fill(drop, -100)
            return batch
        return collate
'''


def test_resume_mid_epoch_with_a_collator_that_draws_random_numbers(tmp_path):
    """accelerate collates one batch ahead, so at a checkpoint the next batch's random draws are
    already made; the loop's data RNG stream (checkpoint.DataRNG) makes the resumed run draw
    them again identically."""
    task = tmp_path / "masking_task.py"
    task.write_text(RANDOM_COLLATOR_TASK)
    args = [f"task={task}:MaskingCLM", *ARGS[:1], "max_train_steps=8", "checkpointing_steps=3",
            "gradient_accumulation_steps=2", "per_device_train_batch_size=4", "do_eval=false"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    with one_thread():
        run_cli(*args, output_dir=ref)
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(ref / "checkpoints" / "step_3", out / "checkpoints" / "step_3")
        run_cli(*args, "resume_from_checkpoint=auto", output_dir=out)
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert read_results(out)["train_loss"] == read_results(ref)["train_loss"]
