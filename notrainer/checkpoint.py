"""Checkpoints, resume and the final export.

Layout under output_dir:

    checkpoints/step_<N>/       accelerate save_state (model, optimizer, scheduler, scaler,
                                RNG of every rank, sampler) + loop_state.json + COMPLETE
    checkpoints/.tmp-step_<N>/  a checkpoint being written; never resumed
    config.json, model.safetensors, tokenizer files   the final model (from_pretrained)
    all_results.json

A checkpoint is written into a temporary folder and renamed to step_<N> only after every rank
has finished and the COMPLETE mark is in it, so a crash mid-save leaves the previous
checkpoints as they were.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    from .loop import Loop

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "loop_state.json"
COMPLETE_MARK = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")


@dataclass
class LoopState:
    """The loop's own counters, saved beside accelerate's state."""

    global_step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # micro-batches consumed in the current epoch
    tokens_seen: int = 0
    train_loss_sum: float = 0.0  # sum of logged per-step train losses (for the run's mean)
    last_eval_step: int = -1


def write_json(path: str, data: dict) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINT_DIR)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARK)) and os.path.isfile(os.path.join(path, STATE_FILE))


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (by step number, not by name or mtime)."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def save(loop: "Loop") -> str:
    acc = loop.accelerator
    step = loop.state.global_step
    root = checkpoint_root(loop.output_dir)
    final = os.path.join(root, f"step_{step}")
    tmp = os.path.join(root, f".tmp-step_{step}")
    if acc.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was interrupted
    acc.wait_for_everyone()
    acc.save_state(tmp)
    acc.wait_for_everyone()  # every rank has written its part
    if acc.is_main_process:
        write_json(os.path.join(tmp, STATE_FILE), dataclasses.asdict(loop.state))
        with open(os.path.join(tmp, COMPLETE_MARK), "w") as f:
            f.write(f"step {step}\n")
        if os.path.exists(final):  # same step saved twice (e.g. steps and epoch coincide)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _apply_retention(loop)
    acc.wait_for_everyone()
    acc.print(f"checkpoint saved: {final}")
    return final


def _apply_retention(loop: "Loop") -> None:
    limit = loop.save_total_limit
    if not limit:
        return
    complete = list_checkpoints(loop.output_dir)
    for path in complete[:-limit]:
        shutil.rmtree(path, ignore_errors=True)


def resolve(output_dir: str, path_or_auto: str) -> str | None:
    """The checkpoint folder to resume from: the newest complete one for 'auto' (None when
    there is none), else the given folder, which must be a complete checkpoint."""
    if path_or_auto == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = path_or_auto
    if not os.path.isdir(path):
        raise UsageError(f"resume_from_checkpoint={path}: no such folder")
    if not is_complete(path):
        raise UsageError(f"resume_from_checkpoint={path}: not a complete notrainer checkpoint "
                         f"(no {COMPLETE_MARK} mark); pick a checkpoints/step_<N> folder")
    return path


def load(loop: "Loop", path_or_auto: str) -> None:
    acc = loop.accelerator
    path = resolve(loop.output_dir, path_or_auto)
    if path is None:
        acc.print(f"resume_from_checkpoint=auto: no checkpoint in {checkpoint_root(loop.output_dir)}, starting fresh")
        return
    acc.load_state(path)
    with open(os.path.join(path, STATE_FILE)) as f:
        saved = json.load(f)
    known = {f.name for f in dataclasses.fields(LoopState)}
    loop.state = LoopState(**{k: v for k, v in saved.items() if k in known})
    acc.print(f"resumed from {path} (step {loop.state.global_step}, epoch {loop.state.epoch})")


def export_model(loop: "Loop") -> None:
    """Save the final model (and tokenizer) in Hugging Face format at the top of output_dir.

    Written into a temporary folder first, then moved into place file by file, so an
    interrupted export never leaves a half-written model.safetensors behind.
    """
    acc = loop.accelerator
    acc.wait_for_everyone()
    # Every rank takes part: under ZeRO-3 / FSDP the full weights are gathered here.
    state_dict = acc.get_state_dict(loop.model)
    if acc.is_main_process:
        model = acc.unwrap_model(loop.model)
        tmp = os.path.join(loop.output_dir, ".tmp-export")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp, state_dict=state_dict)
        else:
            from safetensors.torch import save_model

            save_model(model, os.path.join(tmp, "model.safetensors"))
        if loop.tokenizer is not None and hasattr(loop.tokenizer, "save_pretrained"):
            loop.tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            dest = os.path.join(loop.output_dir, name)
            if os.path.isdir(dest) and not os.path.islink(dest):
                shutil.rmtree(dest)
            os.replace(os.path.join(tmp, name), dest)
        os.rmdir(tmp)
    acc.wait_for_everyone()
