"""Every 2-process run ends: the explicit teardown (barriers on success, trackers closed, wrapped
objects released, process group destroyed; no barrier after an error) leaves no rank alive in
gloo's destructor. The 2-process CLI runs 10 times in a row under a tight per-run timeout -
successes, a usage error raised after the process group exists, and a preempted run - and each
exits with its expected status."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import CPU_ENV, REPO, _free_port

pytestmark = pytest.mark.slow
PER_RUN_TIMEOUT = 120  # a run takes ~15-30 s on a busy 2-core machine; a hang takes forever
TINY = ["report_to=none", "max_train_steps=2", "do_eval=false", "per_device_train_batch_size=2"]

# Each rank asks itself to stop (as a scheduler's SIGTERM would) during its first micro-batch.
PREEMPTED_TASK = '''
import os, signal
from notrainer.tasks.clm import CLMTask

class SelfPreemptingCLM(CLMTask):
    sent = False

    def loss(self, model, batch):
        if not SelfPreemptingCLM.sent:
            SelfPreemptingCLM.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return super().loss(model, batch)
'''


def _run(*args: str, precision: str = "no") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "notrainer.run", *args]
    proc = subprocess.Popen(cmd, env={**os.environ, **CPU_ENV}, cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=PER_RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        from dist_helpers import kill9_tree  # the launcher and its ranks (a hung rank outlives the launcher)

        kill9_tree(proc)
        raise AssertionError(f"a 2-process run did not exit within {PER_RUN_TIMEOUT} s: {' '.join(cmd)}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_ten_two_process_runs_in_a_row_all_exit(tmp_path):
    task_file = tmp_path / "preempt.py"
    task_file.write_text(PREEMPTED_TASK)
    for i in range(10):
        out = tmp_path / f"run{i}"
        if i == 3:  # a usage error after the process group exists (the key contradicts the launch file)
            proc = _run("task=clm", *TINY, "mixed_precision=fp16", f"output_dir={out}", precision="bf16")
            assert proc.returncode != 0 and "notrainer: error: mixed_precision=fp16" in proc.stderr, proc.stderr[-3000:]
        elif i == 6:  # preempted: a checkpoint, no results, the preempted status
            proc = _run(f"task={task_file}:SelfPreemptingCLM", *TINY, f"output_dir={out}")
            assert proc.returncode != 0, proc.stderr[-3000:]
            assert "exitcode  : 75" in proc.stderr or "exit status 75" in proc.stderr, proc.stderr[-3000:]
            assert list((out / "checkpoints").glob("step_*/COMPLETE")) and not (out / "all_results.json").exists()
        else:
            proc = _run("task=clm", *TINY, f"output_dir={out}")
            assert proc.returncode == 0, f"run {i}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
            assert (out / "all_results.json").is_file()
