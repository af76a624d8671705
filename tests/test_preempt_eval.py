"""SIGTERM during a long evaluation pass: the pass is abandoned, a checkpoint is written and the
run exits 75 within seconds; the resumed run evaluates that step first and ends with the same
weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import CPU_ENV, REPO, cli_subprocess, launch_command, read_results
from dist_helpers import kill9_tree, wait_for

# Each evaluation batch sleeps SLOW_EVAL_SECONDS (and marks that the evaluation has started):
# 202 batches of 0.5 s, so finishing the pass would take over 100 s more.
SLOW_EVAL_TASK = '''
import os, pathlib, time
from notrainer.tasks.clm import CLMTask

class SlowEvalCLM(CLMTask):
    def eval_step(self, model, batch):
        marker = os.environ.get("EVAL_MARKER")
        if marker:
            pathlib.Path(marker).touch()
            time.sleep(float(os.environ.get("SLOW_EVAL_SECONDS", "0")))
        return super().eval_step(model, batch)
'''

SLOW_SECONDS = 0.5


@pytest.mark.slow
def test_sigterm_during_a_long_evaluation_exits_75_within_seconds_then_resumes_exactly(tmp_path):
    task = tmp_path / "slow_eval.py"
    task.write_text(SLOW_EVAL_TASK)
    args = [f"task={task}:SlowEvalCLM", "report_to=none", "progress=false", "block_size=8",
            "per_device_train_batch_size=8", "per_device_eval_batch_size=1", "max_train_steps=6", "eval_steps=3",
            "logging_steps=1"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    cli_subprocess(*args, f"output_dir={ref}", timeout=600)
    assert read_results(ref)["eval_samples"] * SLOW_SECONDS > 60  # the slowed pass would take > 60 s

    marker = tmp_path / "eval_started"
    env = {**os.environ, **CPU_ENV, "EVAL_MARKER": str(marker), "SLOW_EVAL_SECONDS": str(SLOW_SECONDS)}
    proc = subprocess.Popen(launch_command(["-m", "notrainer.run", *args, f"output_dir={out}"]), env=env,
                            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(marker, proc)  # the evaluation of step 3 has started
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        kill9_tree(proc)
        raise AssertionError("the run did not exit within 60 s of SIGTERM") from None
    took = time.monotonic() - sent
    print(f"SIGTERM to exit: {took:.1f} s (finishing the pass would take > 60 s)")
    assert proc.returncode == 75, stderr[-3000:]
    assert took < 10, f"exit {took:.1f} s after SIGTERM"
    assert "evaluation abandoned for SIGTERM" in stdout + stderr
    state = json.loads((out / "checkpoints" / "step_3" / "loop_state.json").read_text())
    assert state["global_step"] == 3 and state["eval_pending"] is True
    assert not (out / "all_results.json").exists()

    cli_subprocess(*args, f"output_dir={out}", "resume_from_checkpoint=auto", timeout=600)
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    evals = [json.loads(line)["step"] for line in (out / "log_history.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert evals == [3, 6]  # step 3's evaluation ran again after the resume, once
    assert read_results(out)["eval_loss"] == read_results(ref)["eval_loss"]
