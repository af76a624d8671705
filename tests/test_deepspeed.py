"""DeepSpeed ZeRO on 2 CPU processes, through `accelerate launch` and the real CLI.

DeepSpeed runs on CPUs with DS_ACCELERATOR=cpu (gloo when oneCCL is absent). ACCELERATE_USE_CPU
must NOT be set: with it accelerate silently runs the DeepSpeed recipe as plain CPU DDP. For every
ZeRO stage: train with checkpoints, kill -9 between two of them, resume_from_checkpoint=auto,
finish; the result equals the uninterrupted run, and the exported folder (ZeRO-3: the weights
gathered from the shards) loads in a fresh process with the eval loss of the last in-training
evaluation."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, _free_port, read_results

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (the test extra)"),
]

# The task sleeps in each micro-batch (SLOW_STEP_SECONDS) so that kill -9 lands between two
# checkpoints; otherwise it is task=clm.
SLOW_TASK = '''
import os, time
from notrainer.tasks.clm import CLMTask

class SlowCLM(CLMTask):
    def loss(self, model, batch):
        time.sleep(float(os.environ.get("SLOW_STEP_SECONDS", "0")))
        return super().loss(model, batch)
'''

STEPS, EVERY = 6, 3  # the fewest steps that put a kill -9 between two checkpoints
ARGS = ["report_to=none", f"max_train_steps={STEPS}", f"checkpointing_steps={EVERY}",
        f"eval_steps={STEPS}", "per_device_train_batch_size=4"]

RECIPE = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
main_training_function: main
rdzv_backend: static
same_network: true
use_cpu: false
deepspeed_config:
  zero_stage: {stage}
  offload_optimizer_device: none
  offload_param_device: none
  zero3_save_16bit_model: true
  zero3_init_flag: false
"""


@pytest.fixture
def slow_task(tmp_path) -> str:
    path = tmp_path / "slow_task.py"
    path.write_text(SLOW_TASK)
    return f"task={path}:SlowCLM"


def _recipe(tmp_path: Path, stage: int) -> Path:
    path = tmp_path / f"zero{stage}.yaml"
    path.write_text(RECIPE.format(stage=stage))
    return path


def _env(**extra: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn the DeepSpeed recipe into plain CPU DDP
    return env


def _start(recipe: Path, *args: str, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(recipe),
           "--main_process_port", str(_free_port()), "-m", "notrainer.run", *args]
    return subprocess.Popen(cmd, env=_env(**env), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-4000:]}"
    return out + err


def _kill9_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and all its ranks at once, as a node failure would."""
    import psutil  # a dependency of accelerate

    root = psutil.Process(proc.pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.communicate()


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {path} appeared\n"
                                 f"{proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


def _fresh_eval_loss(model_dir: Path, tmp_path: Path) -> float:
    """The exported folder, evaluated by a new single process (from_pretrained, no DeepSpeed)."""
    out = tmp_path / "fresh_eval"
    proc = subprocess.run([sys.executable, "-m", "notrainer.run", "task=clm", "mode=eval", "report_to=none",
                           "block_size=64", f"model_name_or_path={model_dir}", f"output_dir={out}"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=str(REPO), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(out)["eval_loss"]


def test_zero1_trains_and_exports(tmp_path):
    """ZeRO-1 shares ZeRO-2's checkpoint format (tested below with kill -9): train + export only."""
    ref = tmp_path / "ref"
    log = _finish(_start(_recipe(tmp_path, 1), "task=clm", *ARGS, "checkpointing_steps=null", f"output_dir={ref}"))
    assert "training on 2 process(es) (DEEPSPEED)" in log
    assert _fresh_eval_loss(ref, tmp_path) == pytest.approx(read_results(ref)["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_trains_resumes_after_kill9_and_exports(stage, slow_task, tmp_path):
    recipe = _recipe(tmp_path, stage)
    args = [slow_task, *ARGS]
    ref = tmp_path / "ref"
    log = _finish(_start(recipe, *args, f"output_dir={ref}"))
    assert "training on 2 process(es) (DEEPSPEED)" in log
    shards = list((ref / "checkpoints" / f"step_{EVERY}").rglob("*optim_states.pt"))
    assert len(shards) == 2, "one optimizer partition per rank"
    # The schedule is part of the checkpoint (registered by the loop; accelerate would not save it).
    assert list((ref / "checkpoints" / f"step_{EVERY}").glob("custom_checkpoint_*.pkl"))

    out = tmp_path / "run"
    proc = _start(recipe, *args, f"output_dir={out}", SLOW_STEP_SECONDS="0.5")
    _wait_for(out / "checkpoints" / f"step_{EVERY}" / "COMPLETE", proc)
    time.sleep(0.5)
    _kill9_tree(proc)
    assert not (out / "all_results.json").exists()
    log = _finish(_start(recipe, *args, f"output_dir={out}", "resume_from_checkpoint=auto"))
    assert "resumed from" in log

    got, want = read_results(out), read_results(ref)
    for key in ("global_step", "train_loss", "eval_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    # ZeRO-3: the export holds the full weights gathered from the shards, not a rank's partition.
    assert _fresh_eval_loss(out, tmp_path) == pytest.approx(got["eval_loss"], rel=1e-5)


def test_deepspeed_recipe_with_accelerate_use_cpu_is_refused(tmp_path):
    """ACCELERATE_USE_CPU=1 makes accelerate run a DeepSpeed recipe as plain CPU DDP: refused, never silent."""
    proc = _start(_recipe(tmp_path, 2), "task=clm", *ARGS, "max_train_steps=2", f"output_dir={tmp_path / 'o'}",
                  ACCELERATE_USE_CPU="1")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "notrainer: error:" in err, err[-2000:]
