"""Looking into a batch without knowing its task: a Mapping (dict, transformers' BatchEncoding),
a tuple or list of tensors, or one tensor; and into what a loss_fn returns (split_loss)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def first_field(batch):
    """The first tensor (or list) of a batch."""
    if isinstance(batch, Mapping):
        return next(iter(batch.values()))
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def default_num_items(batch) -> int | torch.Tensor:
    """Examples in a batch: the length of its first tensor."""
    first = first_field(batch)
    return first.shape[0] if hasattr(first, "shape") else len(first)


def default_num_tokens(batch) -> int | torch.Tensor:
    """Non-padding input tokens, for throughput; 0 when the batch has no token ids."""
    if isinstance(batch, Mapping):
        if "attention_mask" in batch:
            return batch["attention_mask"].sum()
        if "input_ids" in batch:
            return batch["input_ids"].numel()
    return 0


def batch_shape(batch) -> tuple[int, int]:
    """(rows, sequence length) of a batch from its first tensor's shape; no device sync."""
    first = first_field(batch)
    shape = getattr(first, "shape", None)
    if shape is None:
        return (len(first) if hasattr(first, "__len__") else 0), 0
    return (int(shape[0]) if len(shape) else 1), (int(shape[1]) if len(shape) > 1 else 0)


def split_loss(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A loss_fn's return value -> (loss, extra scalars to log). A loss_fn returns the loss, or a
    dict {"loss": loss, "name": scalar, ...} whose other entries are logged beside train_loss
    (as Lightning's training_step may return), each a mean over the batch's items like the loss."""
    if isinstance(out, dict):
        if "loss" not in out:
            raise TypeError(f"loss_fn returned a dict without a 'loss' entry (keys: {', '.join(out)})")
        return out["loss"], {k: v for k, v in out.items() if k != "loss"}
    return out, {}

