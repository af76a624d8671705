"""Helpers for the tests that launch real multi-process runs of the CLI (DeepSpeed, FSDP2,
elastic resume): start, kill -9 the whole process tree, wait for a checkpoint, evaluate an
export in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import CPU_ENV, REPO, _free_port, launch_command, read_results

def slow_task_source(module: str, base: str, name: str) -> str:
    """The source of a task module with `name`, a subclass of `module.base` that sleeps in each
    micro-batch (SLOW_STEP_SECONDS) so that kill -9 lands between two checkpoints. With
    SLOW_STEP_MARKER=path each rank appends a line to path.<rank> as a micro-batch starts, which
    a test waits on (wait_for_batches, wait_past_checkpoint) instead of a sleep."""
    return f'''
import os, time
from {module} import {base}

class {name}({base}):
    def loss(self, model, batch):
        seconds = os.environ.get("SLOW_STEP_SECONDS", "0")
        if os.environ.get("SLOW_STEP_MARKER"):
            with open(os.environ["SLOW_STEP_MARKER"] + "." + os.environ.get("RANK", "0"), "a") as f:
                f.write(seconds + "\\n")
        time.sleep(float(seconds))
        return super().loss(model, batch)
'''


# task=clm, slowed (see slow_task_source)
SLOW_TASK = slow_task_source("notrainer.tasks.clm", "CLMTask", "SlowCLM")


def slow_task_arg(tmp_path: Path) -> str:
    path = tmp_path / "slow_task.py"
    path.write_text(SLOW_TASK)
    return f"task={path}:SlowCLM"


def start(launch_args: list[str], *args: str, env: dict) -> subprocess.Popen:
    """`accelerate launch <launch_args> -m notrainer.run <args>` in the background."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args,
           "--main_process_port", str(_free_port()), "-m", "notrainer.run", *args]
    return subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill9_tree(proc)
        raise AssertionError(f"the run did not exit within {timeout} s") from None
    assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-4000:]}"
    return out + err


def kill9_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and all its ranks at once, as a node failure would."""
    import psutil  # a dependency of accelerate

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.communicate()


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {path} appeared\n"
                                 f"{proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            kill9_tree(proc)
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def batches_started(marker: Path, rank: int = 0) -> list[str]:
    """The lines rank `rank` of a SLOW_TASK run wrote to its SLOW_STEP_MARKER file so far."""
    path = Path(f"{marker}.{rank}")
    return path.read_text().splitlines() if path.exists() else []


def wait_for_batches(marker: Path, proc: subprocess.Popen, count: int, timeout: float = 300, rank: int = 0) -> None:
    """Wait until rank `rank` of a SLOW_TASK run has started `count` micro-batches in all."""
    deadline = time.monotonic() + timeout
    while len(batches_started(marker, rank)) < count:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before its micro-batch {count}\n"
                                 f"{proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            kill9_tree(proc)
            raise AssertionError(f"the run did not reach micro-batch {count} in {timeout} s")
        time.sleep(0.05)


def wait_past_checkpoint(out: Path, step: int, marker: Path, proc: subprocess.Popen, batches: int = 2,
                         timeout: float = 300) -> None:
    """Wait until checkpoint `step` is complete and `batches` more micro-batches have started:
    a kill then lands between two checkpoints (whatever the machine's speed)."""
    wait_for(out / "checkpoints" / f"step_{step}" / "COMPLETE", proc, timeout=timeout)
    wait_for_batches(marker, proc, len(batches_started(marker)) + batches, timeout=timeout)


def fresh_eval_loss(model_dir: Path, tmp_path: Path) -> float:
    """The exported folder, evaluated by a new single process (from_pretrained, no engine)."""
    out = tmp_path / "fresh_eval"
    proc = subprocess.run([sys.executable, "-m", "notrainer.run", "task=clm", "mode=eval", "report_to=none",
                           "block_size=64", f"model_name_or_path={model_dir}", f"output_dir={out}"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=str(REPO), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(out)["eval_loss"]


def kill9_past_checkpoint(args: list[str], out: Path, step: int, marker: Path, seconds: str = "0.3",
                          timeout: float = 400) -> None:
    """Run `python -m notrainer.run <args> output_dir=<out>` (a slow_task_source task) in the
    background and SIGKILL it once checkpoint `step` is complete and two more micro-batches have
    started: a kill between two checkpoints, whatever the machine's speed."""
    env = {**os.environ, **CPU_ENV, "SLOW_STEP_SECONDS": seconds, "SLOW_STEP_MARKER": str(marker)}
    proc = subprocess.Popen(launch_command(["-m", "notrainer.run", *args, f"output_dir={out}"]), env=env,
                            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_past_checkpoint(out, step, marker, proc, timeout=timeout)
    kill9_tree(proc)
