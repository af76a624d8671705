"""Optimizer and learning-rate schedule from the config.

AdamW with the usual split: no weight decay on biases and normalisation weights. The fused
CUDA kernel is used when the parameters live on a GPU. The schedule is built as a factory
because its length is only known once the dataloader has been sharded (see Loop).
"""

from __future__ import annotations

import inspect

import torch
from transformers import get_scheduler


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # 1-d tensors are biases and norm weights: decaying them hurts and no anchor does it.
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device | None = None) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True  # one kernel for the whole update instead of a loop over tensors
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)


def scheduler_factory(cfg):
    """A callable (optimizer, total_steps) -> LR scheduler, for `Loop(scheduler=...)`."""

    def make(optimizer, total_steps: int):
        warmup = cfg.num_warmup_steps or int(round(cfg.warmup_ratio * total_steps))
        return get_scheduler(cfg.lr_scheduler_type, optimizer=optimizer,
                             num_warmup_steps=warmup, num_training_steps=total_steps)

    return make
