"""Optimizer and learning-rate schedule from the config.

`optim=` takes the Trainer's names (see OPTIMIZERS); `optim_args="k=v,k=v"` passes extra
keyword arguments to the optimizer, as the Trainer's `optim_args` does. Every optimizer gets the
usual split: no weight decay on biases and normalisation weights. The schedule is built as a
factory because its length is only known once the dataloader has been sharded (see Loop).
"""

from __future__ import annotations

import ast
import inspect

import torch
from transformers import get_scheduler

from notrainer.errors import UsageError, check, first_line

#: optim= value -> what it builds (the Trainer's names; adamw_bnb_8bit is its older 8-bit name)
OPTIMIZERS = {
    "adamw_torch": "torch.optim.AdamW; its fused kernel on CUDA (the same update, one kernel)",
    "adamw_torch_fused": "torch.optim.AdamW(fused=True) on any device (CPU too: last bits differ from adamw_torch)",
    "adafactor": "transformers.optimization.Adafactor with learning_rate (relative_step=False, scale_parameter=False)",
    "sgd": "torch.optim.SGD (momentum etc. through optim_args)",
    "adamw_8bit": "bitsandbytes.optim.AdamW8bit (8-bit optimizer state)",
    "adamw_bnb_8bit": "bitsandbytes.optim.AdamW8bit (the Trainer's older name of adamw_8bit)",
    "paged_adamw_8bit": "bitsandbytes.optim.PagedAdamW8bit (8-bit state in paged CUDA memory)",
}
BITSANDBYTES = {"adamw_8bit": "AdamW8bit", "adamw_bnb_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # 1-d tensors are biases and norm weights: decaying them hurts and no anchor does it.
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def parse_optim_args(text: str | None) -> dict:
    """"betas=(0.9,0.95),momentum=0.9,nesterov=true" -> {"betas": (0.9, 0.95), ...}. Values are
    Python literals (numbers, tuples), true/false/none in any case, else strings."""
    out: dict = {}
    for item in _split_top_level(text or ""):
        key, sep, value = item.partition("=")
        key = key.strip()
        check(sep and key.isidentifier(), f"optim_args: {item.strip()!r} is not key=value (write optim_args=\"k=v,k=v\")")
        out[key] = _literal(value.strip())
    return out


def _split_top_level(text: str) -> list[str]:
    # commas inside brackets belong to the value: betas=(0.9,0.95)
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def _literal(value: str):
    lowered = value.lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def optimizer_class(name: str):
    """The optimizer class behind an `optim=` name; UsageError when it is unknown or its library
    is missing."""
    if name in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW
    if name == "sgd":
        return torch.optim.SGD
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    if name in BITSANDBYTES:
        try:
            import bitsandbytes
        except ImportError:
            raise UsageError(f"optim={name} needs bitsandbytes: pip install bitsandbytes") from None
        return getattr(bitsandbytes.optim, BITSANDBYTES[name])
    raise UsageError(f"optim={name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")


def optimizer_kwargs(cfg, name: str, device: torch.device) -> dict:
    """The keyword arguments for `name`'s class: the config's learning rate (and AdamW betas and
    epsilon where the optimizer has them), then optim_args on top."""
    kwargs: dict = {"lr": cfg.learning_rate}
    if name.startswith(("adamw", "paged_adamw")):
        kwargs.update(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    if name == "adamw_torch" and device.type == "cuda":
        kwargs["fused"] = True  # one kernel for the whole update instead of a loop over tensors
    elif name == "adamw_torch_fused":
        kwargs["fused"] = True
    elif name == "adafactor":
        # The Trainer's setting: a fixed learning rate driven by the schedule, not Adafactor's own.
        kwargs.update(scale_parameter=False, relative_step=False, warmup_init=False)
    kwargs.update(parse_optim_args(getattr(cfg, "optim_args", None)))
    return kwargs


def check_optim(cfg) -> None:
    """Config-time checks (TrainConfig.validate): the name, the optim_args syntax and keys."""
    name = getattr(cfg, "optim", "adamw_torch")
    if name not in OPTIMIZERS:
        import difflib

        close = difflib.get_close_matches(name, list(OPTIMIZERS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"optim {name!r} is unknown{hint}; choose one of {', '.join(OPTIMIZERS)}")
    extra = parse_optim_args(getattr(cfg, "optim_args", None))
    if extra and name not in BITSANDBYTES:  # bitsandbytes is imported only when the optimizer is built
        accepted = inspect.signature(optimizer_class(name)).parameters
        unknown = [k for k in extra if k not in accepted]
        check(not unknown, f"optim_args: {', '.join(unknown)} is not an argument of optim={name} "
                           f"(it takes {', '.join(k for k in accepted if k != 'params')})")


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device | None = None) -> torch.optim.Optimizer:
    name = getattr(cfg, "optim", "adamw_torch")
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    cls = optimizer_class(name)
    kwargs = optimizer_kwargs(cfg, name, device)
    try:
        return cls(param_groups(model, cfg.weight_decay), **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:  # a bad optim_args value, an unsupported device
        raise UsageError(f"optim={name} could not be built with {kwargs}: {first_line(e)}") from None


def scheduler_factory(cfg):
    """A callable (optimizer, total_steps) -> LR scheduler, for `Loop(scheduler=...)`."""

    def make(optimizer, total_steps: int):
        warmup = cfg.num_warmup_steps or int(round(cfg.warmup_ratio * total_steps))
        return get_scheduler(cfg.lr_scheduler_type, optimizer=optimizer,
                             num_warmup_steps=warmup, num_training_steps=total_steps)

    return make
