"""DeepSpeed's optimizers on 2 CPU processes, through `accelerate launch` and the real CLI
(DS_ACCELERATOR=cpu, ACCELERATE_USE_CPU unset: see tests/test_deepspeed.py).

- ZeRO-3 with the optimizer offloaded to the CPU: `optim` resolves to deepspeed_cpu_adam, the
  optimizer DeepSpeed steps is notrainer's (AdamW mode, weight decay on the matrices only; not
  the copy accelerate would otherwise make), the run trains, and a kill -9 between two
  checkpoints then resume_from_checkpoint=auto ends equal to the uninterrupted run.
- A DeepSpeed config file with its own `optimizer` and `scheduler` sections (`auto` values):
  DeepSpeed builds both from notrainer's keys, the learning rate the loop logs is the DeepSpeed
  schedule's, and a kill -9 resume is exact.
- optim=deepspeed_cpu_adam beside a config's own optimizer: refused in one line, before anything
  is written."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

from conftest import read_results
from dist_helpers import fresh_eval_loss, finish, kill9_tree, slow_task_arg, start, wait_past_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (the test extra)"),
]

STEPS, EVERY, LR, WARMUP = 6, 3, 2e-3, 2
ARGS = ["report_to=none", f"max_train_steps={STEPS}", f"checkpointing_steps={EVERY}", f"eval_steps={STEPS}",
        "per_device_train_batch_size=4", "logging_steps=1", f"learning_rate={LR}"]

HEAD = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
rdzv_backend: static
same_network: true
use_cpu: false
"""
# ZeRO-3, optimizer state (and its update) on the CPU, through accelerate's own keys
OFFLOAD = HEAD + """mixed_precision: 'no'
deepspeed_config:
  zero_stage: 3
  offload_optimizer_device: cpu
  offload_param_device: none
  zero3_save_16bit_model: true
  zero3_init_flag: false
"""
# A DeepSpeed config file (accelerate refuses mixed_precision beside it)
FILE = HEAD + """deepspeed_config:
  deepspeed_config_file: {path}
  zero3_init_flag: false
"""
DS_CONFIG = {
    "zero_optimization": {"stage": 2},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": [0.9, 0.999],
                                              "eps": 1e-8}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto",
                                                      "warmup_type": "linear"}},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
}


def _offload_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "zero3_offload.yaml"
    path.write_text(OFFLOAD)
    return path


def _file_recipe(tmp_path: Path) -> Path:
    ds = tmp_path / "ds_config.json"
    ds.write_text(json.dumps(DS_CONFIG, indent=2))
    path = tmp_path / "zero2_ds_optimizer.yaml"
    path.write_text(FILE.format(path=ds))
    return path


def _start(recipe: Path, *args: str, **env: str):
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env}
    full_env.pop("ACCELERATE_USE_CPU", None)  # it would turn the DeepSpeed recipe into plain CPU DDP
    return start(["--config_file", str(recipe)], *args, env=full_env)


def _history(run: Path) -> list[dict]:
    lines = (run / "log_history.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def _optimizer_groups(run: Path, step: int) -> list[dict]:
    """The param groups (less their params) of rank 0's optimizer in checkpoint `step`."""
    import torch

    path = run / "checkpoints" / f"step_{step}" / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    inner = saved.get("base_optimizer_state") or saved["optimizer_state_dict"]  # ZeRO-2 / ZeRO-3 layout
    return [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]


def _ref_then_kill9_resume(recipe: Path, args: list[str], tmp_path: Path) -> tuple[Path, Path, str]:
    """The uninterrupted run (ref), then the same run killed -9 between two checkpoints and
    resumed with resume_from_checkpoint=auto (run); returns both folders and ref's log."""
    ref, out, marker = tmp_path / "ref", tmp_path / "run", tmp_path / "batches"
    log = finish(_start(recipe, *args, f"output_dir={ref}"))
    proc = _start(recipe, *args, f"output_dir={out}", SLOW_STEP_SECONDS="0.5", SLOW_STEP_MARKER=str(marker))
    wait_past_checkpoint(out, EVERY, marker, proc, batches=1)
    kill9_tree(proc)
    assert not (out / "all_results.json").exists()
    assert "resumed from" in finish(_start(recipe, *args, f"output_dir={out}", "resume_from_checkpoint=auto"))
    got, want = read_results(out), read_results(ref)
    for key in ("global_step", "train_loss", "eval_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    return ref, out, log


def test_zero3_offload_steps_deepspeed_cpu_adam_and_resumes_after_kill9(tmp_path):
    ref, out, log = _ref_then_kill9_resume(_offload_recipe(tmp_path), [slow_task_arg(tmp_path), *ARGS], tmp_path)
    assert "training on 2 process(es) (DEEPSPEED)" in log
    assert "optim: deepspeed_cpu_adam" in (ref / "config.yaml").read_text().splitlines()
    # The schedule drives the optimizer DeepSpeed steps: accelerate did not swap in a copy of its
    # own (torch warns when the optimizer a scheduler holds never stepped).
    assert "lr_scheduler.step()` before `optimizer.step()`" not in log
    # notrainer's two groups (decay on matrices, none on biases and norms: ZeRO-3's partitioned
    # parameters are 1-d here; their shape is ds_shape), AdamW's betas, the schedule's lr.
    groups = _optimizer_groups(ref, EVERY)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    history = _history(ref)
    assert [g["lr"] for g in groups] == [history[EVERY - 1]["learning_rate"]] * 2
    # It trains: the last eval loss is well below the first batch's loss (before any update).
    results = read_results(ref)
    assert results["eval_loss"] < history[0]["loss"] - 0.5
    # The export holds the full weights gathered from the shards.
    assert fresh_eval_loss(out, tmp_path) == pytest.approx(read_results(out)["eval_loss"], rel=1e-5)


def _warmup_decay_lrs(steps: int) -> list[float]:
    """DeepSpeed's WarmupDecayLR, as filled from the config keys (warmup_min_lr 0, warmup_max_lr
    learning_rate, warmup_num_steps num_warmup_steps, total_num_steps max_train_steps), after
    each of `steps` steps: the learning rate the loop logs."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    schedule = WarmupDecayLR(opt, total_num_steps=STEPS, warmup_min_lr=0, warmup_max_lr=LR,
                             warmup_num_steps=WARMUP, warmup_type="linear")
    lrs = []
    for _ in range(steps):
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    return lrs


def test_deepspeed_config_optimizer_and_scheduler_train_and_resume_after_kill9(tmp_path):
    args = [slow_task_arg(tmp_path), *ARGS, f"num_warmup_steps={WARMUP}"]
    ref, out, log = _ref_then_kill9_resume(_file_recipe(tmp_path), args, tmp_path)
    assert "training on 2 process(es) (DEEPSPEED)" in log
    assert "notrainer: note: the DeepSpeed config's optimizer (AdamW) is used" in log
    assert "notrainer: note: the DeepSpeed config's scheduler (WarmupDecayLR) is used" in log
    # The logged learning rate is DeepSpeed's schedule: linear warmup from 0 over 2 steps (its
    # first two steps both run at warmup_min_lr), then linear decay to 0 at step 6.
    logged = [r["learning_rate"] for r in _history(ref)]
    assert logged == pytest.approx(_warmup_decay_lrs(STEPS), abs=1e-12)
    assert logged == pytest.approx([0.0, LR / 2, LR, 0.75 * LR, 0.5 * LR, 0.25 * LR], abs=1e-12)
    # DeepSpeed built the optimizer on notrainer's groups: `auto` lr and weight_decay were filled.
    groups = _optimizer_groups(ref, EVERY)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and [g["lr"] for g in groups] == [LR, LR]
    history = _history(ref)
    assert read_results(ref)["eval_loss"] < history[0]["loss"] - 0.5
    assert fresh_eval_loss(out, tmp_path) == pytest.approx(read_results(out)["eval_loss"], rel=1e-5)


def test_optim_beside_a_deepspeed_config_optimizer_is_refused_before_training(tmp_path):
    out = tmp_path / "o"
    proc = _start(_file_recipe(tmp_path), "task=clm", *ARGS, "optim=deepspeed_cpu_adam", f"output_dir={out}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert ("notrainer: error: optim=deepspeed_cpu_adam but the DeepSpeed config defines its own optimizer "
            "(AdamW); drop one of them") in err, err[-3000:]
    # one line, no traceback through notrainer's code (the launcher's own report of the exit follows)
    assert not re.search(r'File ".*notrainer', err), err[-3000:]
    assert not out.exists()
