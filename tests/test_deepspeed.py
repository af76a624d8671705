"""DeepSpeed ZeRO on 2 CPU processes, through `accelerate launch` and the real CLI.

DeepSpeed runs on CPUs with DS_ACCELERATOR=cpu (gloo when oneCCL is absent). ACCELERATE_USE_CPU
must NOT be set: with it accelerate would run the DeepSpeed recipe as plain CPU DDP (refused).
ZeRO-2 and ZeRO-3: train with checkpoints, kill -9 between two of them, resume_from_checkpoint=auto,
finish; the result equals the uninterrupted run, and the exported folder (ZeRO-3: the weights
gathered from the shards) loads in a fresh process with the eval loss of the last in-training
evaluation. ZeRO-1 (ZeRO-2's checkpoint format): train and export."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from conftest import read_results
from dist_helpers import fresh_eval_loss, finish, kill9_tree, slow_task_arg, start, wait_past_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (the test extra)"),
]

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


def _recipe(tmp_path: Path, stage: int) -> Path:
    path = tmp_path / f"zero{stage}.yaml"
    path.write_text(RECIPE.format(stage=stage))
    return path


def _start(recipe: Path, *args: str, **env: str):
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env}
    if "ACCELERATE_USE_CPU" not in env:
        full_env.pop("ACCELERATE_USE_CPU", None)  # it would turn the DeepSpeed recipe into plain CPU DDP
    return start(["--config_file", str(recipe)], *args, env=full_env)


def test_zero1_trains_and_exports(tmp_path):
    ref = tmp_path / "ref"
    log = finish(_start(_recipe(tmp_path, 1), "task=clm", *ARGS, "checkpointing_steps=null", f"output_dir={ref}"))
    assert "training on 2 process(es) (DEEPSPEED)" in log
    assert fresh_eval_loss(ref, tmp_path) == pytest.approx(read_results(ref)["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_trains_resumes_after_kill9_and_exports(stage, tmp_path):
    recipe = _recipe(tmp_path, stage)
    args = [slow_task_arg(tmp_path), *ARGS]
    ref = tmp_path / "ref"
    log = finish(_start(recipe, *args, f"output_dir={ref}"))
    assert "training on 2 process(es) (DEEPSPEED)" in log
    shards = list((ref / "checkpoints" / f"step_{EVERY}").rglob("*optim_states.pt"))
    assert len(shards) == 2, "one optimizer partition per rank"
    # The schedule is part of the checkpoint (registered by the loop; accelerate would not save it).
    assert list((ref / "checkpoints" / f"step_{EVERY}").glob("custom_checkpoint_*.pkl"))

    out = tmp_path / "run"
    marker = tmp_path / "batches"
    proc = _start(recipe, *args, f"output_dir={out}", SLOW_STEP_SECONDS="0.5", SLOW_STEP_MARKER=str(marker))
    wait_past_checkpoint(out, EVERY, marker, proc, batches=1)
    kill9_tree(proc)
    assert not (out / "all_results.json").exists()
    log = finish(_start(recipe, *args, f"output_dir={out}", "resume_from_checkpoint=auto"))
    assert "resumed from" in log

    got, want = read_results(out), read_results(ref)
    for key in ("global_step", "train_loss", "eval_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    # ZeRO-3: the export holds the full weights gathered from the shards, not a rank's partition.
    assert fresh_eval_loss(out, tmp_path) == pytest.approx(got["eval_loss"], rel=1e-5)


def test_deepspeed_recipe_with_accelerate_use_cpu_is_refused(tmp_path):
    """ACCELERATE_USE_CPU=1 makes accelerate run a DeepSpeed recipe as plain CPU DDP: refused, never silent."""
    proc = _start(_recipe(tmp_path, 2), "task=clm", *ARGS, "max_train_steps=2", f"output_dir={tmp_path / 'o'}",
                  ACCELERATE_USE_CPU="1")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "notrainer: error: a DEEPSPEED launch file but accelerate runs MULTI_CPU" in err, \
        err[-2000:]
    assert not (tmp_path / "o" / "all_results.json").exists()
