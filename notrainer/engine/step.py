"""One optimizer step of the loop: a window of micro-batches in, the weights updated.

`train_step(loop, window)` is `Loop.train_step`: it reads the loop's callables (`loss_fn`,
`num_items_fn`, `num_tokens_fn`), its prepared model, optimizer and scheduler, and writes only
the step's sums into the loop's logging window and the guards' counters into its state.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate.utils import DistributedType

from notrainer.engine import guards
from notrainer.engine.batch import split_loss
from notrainer.engine.logging_window import on_device


def train_step(loop, window: list) -> None:
    """One optimizer step over a window of micro-batches.

    The loss is normalised by the number of items (target tokens) in the whole window on
    all ranks, so accumulating 4 batches of 2 gives the same gradient as 1 batch of 8,
    even when sequences have different lengths. Each micro-batch's mean loss is weighted
    by its share of the window's items; DDP averages gradients over ranks, hence the
    factor num_processes.
    """
    acc, model = loop.accelerator, loop.model
    counts = torch.stack([on_device(loop.num_items_fn(b), acc.device, torch.float32) for b in window])
    window_items = acc.reduce(counts.sum(), reduction="sum").clamp(min=1.0)
    # accelerator.backward divides by gradient_accumulation_steps (DeepSpeed does it
    # inside its engine unless told not to); our weights already do the averaging.
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    backward_kwargs, undo_ga = ({"scale_wrt_gas": False}, 1.0) if deepspeed else \
        ({}, float(loop.gradient_accumulation_steps))
    step_loss = torch.zeros((), device=acc.device)
    step_extras: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        acc.sync_gradients = last  # the optimizer and scheduler only step when True
        with acc.no_sync(model) if not last and not deepspeed else contextlib.nullcontext():
            loss, extras = split_loss(loop.loss_fn(model, batch))
            share = counts[i] * acc.num_processes / window_items  # this micro-batch's share of the window
            weighted = loss * share
            acc.backward(weighted * undo_ga, **backward_kwargs)
        step_loss += weighted.detach()
        for name, value in extras.items():  # logged like the loss: a mean over the window's items
            step_extras[name] = step_extras.get(name, 0.0) + torch.as_tensor(value, device=acc.device).detach().float() * share
        loop.window.add_micro_batch(batch, loop.num_tokens_fn(batch))
        del loss, weighted, extras  # keep nothing of this micro-batch alive into the next one

    grad_norm = None
    if loop.config.max_grad_norm > 0:
        grad_norm = acc.clip_grad_norm_(model.parameters(), loop.config.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, which the flag all-reduce cannot take
            grad_norm = grad_norm.full_tensor()
    # Decisions all ranks take together (one small all-reduce): a non-finite loss or
    # gradient norm skips this optimizer step; a stop signal or a due timed checkpoint is
    # acted on at this step's boundary.
    limit = loop.config.max_nonfinite_steps
    flags = guards.step_flags(acc, loop.state, step_loss, grad_norm, check_nonfinite=limit > 0,
                              stop_requested=loop.signals is not None and loop.signals.received is not None,
                              checkpointing_minutes=loop.config.checkpointing_minutes)
    loop.checkpoint_requested |= flags.checkpoint_due
    if flags.stop_signal:
        loop.stop_reason = "preempted"
    if not flags.nonfinite:
        loop.state.nonfinite_in_a_row = 0
    elif guards.skip_nonfinite_step(acc, loop.optimizer, loop.state, limit):  # raises after `limit` in a row
        return
    loop.optimizer.step()
    if loop.scheduler is not None and not acc.optimizer_step_was_skipped:
        loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    # Summed on device; the host only syncs when logging (and for the flags above).
    loop.window.add_step(step_loss, grad_norm, step_extras)

