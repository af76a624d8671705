"""Elastic resume: a checkpoint written by N processes continues on M.

What must not change is the optimisation: the global batch (per-device batch x processes x
accumulation) and the order in which samples are consumed. accelerate's seedable sampler draws
the same permutation whatever the process count, and each micro-step takes the next
per-device x processes samples of it, so the position in the data is one number, the samples
consumed in the current epoch. A checkpoint records the layout it was written with
(`RunState.layout`); on resume with another one:

- `plan` (before the accelerator is built, as accumulation is fixed there) keeps the global
  batch by choosing the accumulation, with a printed note, or refuses in one line;
- `convert_position` (after the counters are loaded) turns the saved micro-batch position into
  this layout's.

Model, optimizer and scheduler files of plain (DDP / one process) checkpoints hold full tensors
and load on any process count. Formats sharded per rank (DeepSpeed ZeRO partitions, FSDP's
distributed checkpoint) are refused: they are not verified to reshard here. A rank that did not
exist keeps a fresh RNG state (accelerate skips a missing random_states_<rank>.pkl).
"""

from __future__ import annotations

import glob
import json
import os

from notrainer.errors import UsageError


def layout(processes: int, per_device_batch_size: int | None, accumulation: int) -> dict:
    return {"processes": processes, "per_device_batch_size": per_device_batch_size,
            "gradient_accumulation_steps": accumulation}


def saved_layout(checkpoint: str) -> dict | None:
    """The layout a checkpoint was written with (None: an older checkpoint, or no loop_state.json)."""
    try:
        with open(os.path.join(checkpoint, "loop_state.json")) as f:
            return json.load(f).get("layout")
    except (OSError, ValueError):
        return None


def plan(cfg, checkpoint: str | None, processes: int, *, saved: dict | None | str = "read") -> str | None:
    """Adjust cfg.gradient_accumulation_steps so that resuming `checkpoint` on `processes`
    keeps its global batch. Returns the note to print, or None when nothing changes.
    `saved`: the checkpoint's layout when the caller already read it (else it is read here)."""
    if saved == "read":
        saved = saved_layout(checkpoint) if checkpoint else None
    if not saved or saved.get("processes") == processes or not saved.get("per_device_batch_size"):
        return None  # (no batch size: convert_position refuses, after the load)
    if glob.glob(os.path.join(checkpoint, "**", "*optim_states.pt"), recursive=True) or \
            glob.glob(os.path.join(checkpoint, "*_fsdp_*")) or glob.glob(os.path.join(checkpoint, "optimizer_*")):
        raise UsageError(f"resume_from_checkpoint: {checkpoint} was written by {saved['processes']} processes in a "
                         f"sharded format (DeepSpeed ZeRO / FSDP), which cannot resume on {processes}; resume it with "
                         f"{saved['processes']}")
    want = saved["per_device_batch_size"] * saved["processes"] * saved["gradient_accumulation_steps"]
    micro = cfg.per_device_train_batch_size * processes
    have = micro * cfg.gradient_accumulation_steps
    if have == want:
        return None
    if want % micro:
        raise UsageError(f"resume_from_checkpoint: the checkpoint's global batch is {want} samples "
                         f"({saved['per_device_batch_size']} x {saved['processes']} processes x "
                         f"{saved['gradient_accumulation_steps']}); with per_device_train_batch_size="
                         f"{cfg.per_device_train_batch_size} on {processes} processes no accumulation gives it: "
                         "choose per_device_train_batch_size so that it divides")
    old = cfg.gradient_accumulation_steps
    cfg.gradient_accumulation_steps = want // micro
    return (f"notrainer: note: resuming a {saved['processes']}-process checkpoint on {processes}: "
            f"gradient_accumulation_steps {old} -> {cfg.gradient_accumulation_steps} keeps the global batch of {want}")


def convert_position(state, current: dict) -> None:
    """The loaded micro-batch position (state.step_in_epoch, in the saved layout) in `current`'s."""
    saved = state.layout
    state.layout = current
    if not saved or saved == current:
        return
    if not saved.get("per_device_batch_size") or not current.get("per_device_batch_size"):
        raise UsageError("resume_from_checkpoint: the train loader has no fixed batch size, so its position cannot "
                         f"move from {saved['processes']} to {current['processes']} processes; resume as it was run")
    per_micro_saved = saved["per_device_batch_size"] * saved["processes"]
    per_micro = current["per_device_batch_size"] * current["processes"]
    samples = state.step_in_epoch * per_micro_saved
    if samples % per_micro:
        raise UsageError(f"resume_from_checkpoint: the checkpoint stopped after {samples} samples of the epoch, "
                         f"not a whole number of this run's micro-batches of {per_micro}; resume with its layout "
                         f"({saved['per_device_batch_size']} per device on {saved['processes']} processes)")
    state.step_in_epoch = samples // per_micro
