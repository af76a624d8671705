"""Decisions every rank must take together at an optimizer step, and the non-finite guard.

`step_flags` settles, with one small all-reduce per step (none at all on one process unless
the non-finite check is on), three questions: did any rank see a non-finite loss or gradient
norm (skip the optimizer step), did any rank get a stop signal (checkpoint and exit), and is a
timed checkpoint due (rank 0's clock decides, so ranks never disagree).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType

from notrainer.engine.state import RunState

#: Exit status of the CLI when the run stopped on non-finite losses (0 done, 2 bad input,
#: 75 preempted: see preemption.EXIT_PREEMPTED).
EXIT_DIVERGED = 3


class TrainingDiverged(RuntimeError):
    """max_nonfinite_steps optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass
class StepFlags:
    nonfinite: bool = False
    stop_signal: bool = False
    checkpoint_due: bool = False


def step_flags(acc, state: RunState, step_loss: torch.Tensor, grad_norm, *, check_nonfinite: bool,
               stop_requested: bool, checkpointing_minutes: float | None) -> StepFlags:
    due = (bool(checkpointing_minutes) and acc.is_main_process
           and time.monotonic() - state.last_checkpoint_time >= checkpointing_minutes * 60)
    if acc.num_processes == 1 and not check_nonfinite:
        return StepFlags(False, stop_requested, due)
    nonfinite = torch.zeros((), device=acc.device)
    if check_nonfinite:
        bad = ~torch.isfinite(step_loss.detach().float())
        # With fp16 the grad scaler skips steps with inf/nan gradients itself (and they are
        # expected early on); DeepSpeed's engine does the same. Otherwise check the norm too.
        if grad_norm is not None and not scaler_handles_overflow(acc):
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=acc.device).float())
        nonfinite = bad.float()
    flags = torch.stack([nonfinite, torch.tensor(float(stop_requested), device=acc.device),
                         torch.tensor(float(due), device=acc.device)])
    if acc.num_processes > 1:
        flags = acc.reduce(flags, reduction="sum")
    n, s, d = flags.tolist()
    return StepFlags(n > 0, s > 0, d > 0)


def scaler_handles_overflow(acc) -> bool:
    return acc.scaler is not None or acc.distributed_type == DistributedType.DEEPSPEED


def skip_nonfinite_step(acc, optimizer, state: RunState, limit: int) -> bool:
    """Count a non-finite step and, unless a grad scaler or DeepSpeed skips it already, drop
    its gradients. Raises TrainingDiverged after `limit` in a row. Returns True when the caller
    must not step the optimizer."""
    state.nonfinite_in_a_row += 1
    state.skipped_steps += 1
    step, n = state.global_step + 1, state.nonfinite_in_a_row
    acc.print(f"step {step}: non-finite loss or gradient norm, optimizer step skipped ({n} in a row, "
              f"the run stops at {limit})")
    if n >= limit:
        raise TrainingDiverged(
            f"training stopped at step {step}: {n} optimizer steps in a row had a non-finite loss or gradient norm "
            f"(max_nonfinite_steps={limit}); the last checkpoint is kept: lower learning_rate or check the data, "
            "then resume_from_checkpoint=auto")
    if scaler_handles_overflow(acc):
        return False
    optimizer.zero_grad(set_to_none=True)
    return True
