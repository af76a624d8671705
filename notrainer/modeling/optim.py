"""Optimizer and learning-rate schedule from the config.

`optim=` takes the Trainer's names (see OPTIMIZERS) and DeepSpeed's two Adams; `optim_args="k=v,k=v"`
passes extra keyword arguments to the optimizer, as the Trainer's `optim_args` does. Every
optimizer gets the usual split: no weight decay on biases and normalisation weights. The
schedule is built as a factory because its length is only known once the dataloader has been
sharded (see Loop).

Without `optim=`, the optimizer is torch's AdamW, or DeepSpeed's CPU Adam when the DeepSpeed
config offloads the optimizer state to the CPU (ZeRO-Offload: the update then runs on the CPU,
where DeepSpeedCPUAdam's vectorised kernel is a few times faster than torch's default AdamW;
bench/ds_cpu_adam.py). A DeepSpeed config with its own `optimizer` / `scheduler` sections is
honoured: the optimizer becomes accelerate's `DummyOptim` and the schedule its `DummyScheduler`,
so DeepSpeed builds what the recipe says (docs/distributed.md).
"""

from __future__ import annotations

import ast
import inspect
import sys

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
    "deepspeed_cpu_adam": "deepspeed.ops.adam.DeepSpeedCPUAdam (AdamW on CPU parameters; the default under ZeRO "
                          "optimizer offload; its C++ op builds on first use)",
    "deepspeed_fused_adam": "deepspeed.ops.adam.FusedAdam (AdamW in one CUDA kernel; GPU only)",
}
DEEPSPEED_ADAMS = {"deepspeed_cpu_adam": "DeepSpeedCPUAdam", "deepspeed_fused_adam": "FusedAdam"}
DEFAULT = "adamw_torch"
BITSANDBYTES = {"adamw_8bit": "AdamW8bit", "adamw_bnb_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # 1-d tensors are biases and norm weights: decaying them hurts and no anchor does it. A
        # parameter ZeRO-3 partitioned at creation (deepspeed.zero.Init) is an empty 1-d tensor
        # here; its real shape is ds_shape (without it every weight went undecayed).
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or name.endswith(".bias") else decay).append(p)
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
    if name in DEEPSPEED_ADAMS:
        try:
            from deepspeed.ops import adam
        except ImportError:
            raise UsageError(f"optim={name} needs deepspeed: pip install deepspeed") from None
        return getattr(adam, DEEPSPEED_ADAMS[name])
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
    if name.startswith(("adamw", "paged_adamw")) or name in DEEPSPEED_ADAMS:
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
    name = getattr(cfg, "optim", None) or DEFAULT
    if name not in OPTIMIZERS:
        import difflib

        close = difflib.get_close_matches(name, list(OPTIMIZERS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"optim {name!r} is unknown{hint}; choose one of {', '.join(OPTIMIZERS)}")
    if name == "deepspeed_fused_adam":
        check(torch.cuda.is_available(), "optim=deepspeed_fused_adam is a CUDA kernel and this machine has no CUDA GPU; "
                                         "use adamw_torch (or deepspeed_cpu_adam for CPU parameters)")
    extra = parse_optim_args(getattr(cfg, "optim_args", None))
    if extra and name not in BITSANDBYTES:  # bitsandbytes is imported only when the optimizer is built
        accepted = inspect.signature(optimizer_class(name)).parameters
        unknown = [k for k in extra if k not in accepted]
        check(not unknown, f"optim_args: {', '.join(unknown)} is not an argument of optim={name} "
                           f"(it takes {', '.join(k for k in accepted if k != 'params')})")


def deepspeed_config(accelerator) -> dict | None:
    """The DeepSpeed config of the run (accelerate's plugin, `auto` values not yet filled), or None."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None) if accelerator is not None else None
    return plugin.deepspeed_config if plugin is not None else None


def _offloads_optimizer(ds: dict | None) -> bool:
    device = ((ds or {}).get("zero_optimization") or {}).get("offload_optimizer", {}) or {}
    return str(device.get("device", "none")).lower() in ("cpu", "nvme")


def resolve_optim(cfg, accelerator=None) -> None:
    """Settle `cfg.optim` once the engine is known (before config.yaml is written): the default
    is deepspeed_cpu_adam under ZeRO optimizer offload, else adamw_torch; a DeepSpeed config
    with its own optimizer section and an `optim=` key contradict each other (UsageError)."""
    ds = deepspeed_config(accelerator)
    if ds is not None and "optimizer" in ds:
        check(cfg.optim is None, f"optim={cfg.optim} but the DeepSpeed config defines its own optimizer "
                                 f"({ds['optimizer'].get('type')}); drop one of them")
        return
    if cfg.optim is None:
        cfg.optim = "deepspeed_cpu_adam" if _offloads_optimizer(ds) else DEFAULT
    device = getattr(accelerator, "device", None)
    if cfg.optim == "deepspeed_cpu_adam" and device is not None and device.type != "cpu":
        check(_offloads_optimizer(ds), "optim=deepspeed_cpu_adam updates CPU parameters: use it with a DeepSpeed "
                                       "recipe that offloads the optimizer (launch/deepspeed_zero3_offload.yaml) or "
                                       "on CPU, not on " + device.type)
    if cfg.optim == "deepspeed_fused_adam":
        check(ds is None or not _offloads_optimizer(ds), "optim=deepspeed_fused_adam runs on GPU parameters, but the "
                                                         "DeepSpeed config offloads the optimizer to the CPU; use "
                                                         "deepspeed_cpu_adam")
    if _offloads_optimizer(ds):
        _keep_client_optimizer(cfg.optim, ds, accelerator)


def _keep_client_optimizer(name: str, ds: dict, accelerator) -> None:
    """Under ZeRO optimizer offload accelerate swaps the client optimizer for a DeepSpeedCPUAdam of
    its own making unless the DeepSpeed config says `zero_force_ds_cpu_optimizer: false`
    (`accelerate.utils.map_pytorch_optim_to_deepspeed`, accelerate 1.15): only lr and weight_decay
    carry over, optim_args are lost, and anything but torch's AdamW, DeepSpeedCPUAdam included,
    becomes Adam with L2 decay (`adamw_mode=False`). The scheduler, built on notrainer's optimizer,
    keeps driving that one, which never steps: the copy shares its param groups only until a
    resume loads the checkpoint's (a kill -9 resume then ended elsewhere than the uninterrupted
    run). So notrainer sets the key false and the optimizer that `optim=` names is the one
    DeepSpeed steps. DeepSpeed's own use of the key (refuse
    a client optimizer that is not a DeepSpeed CPU one) is met by deepspeed_cpu_adam; another
    `optim=` then runs its torch update on the CPU, as the user asked, unless the config set the
    key true itself, which contradicts it."""
    if name != "deepspeed_cpu_adam":
        check(ds.get("zero_force_ds_cpu_optimizer") is not True,
              f"optim={name} under ZeRO optimizer offload, but the DeepSpeed config says zero_force_ds_cpu_optimizer: "
              f"true (DeepSpeed's CPU Adam only); drop optim= (deepspeed_cpu_adam is the default there) or that key")
        if getattr(accelerator, "is_main_process", True):
            print(f"notrainer: note: optim={name} under ZeRO optimizer offload: its torch update runs on the CPU "
                  f"(deepspeed_cpu_adam, the default there, is faster than adamw_torch; bench/ds_cpu_adam.py)",
                  file=sys.stderr)
    ds["zero_force_ds_cpu_optimizer"] = False


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device | None = None, accelerator=None):
    """The optimizer for `model`'s trainable parameters; accelerate's DummyOptim when the
    DeepSpeed config defines its own optimizer (DeepSpeed then builds it from that section,
    with `auto` lr / weight_decay filled from learning_rate / weight_decay)."""
    ds = deepspeed_config(accelerator)
    if ds is not None and "optimizer" in ds:
        from accelerate.utils import DummyOptim

        if accelerator.is_main_process:
            print(f"notrainer: note: the DeepSpeed config's optimizer ({ds['optimizer'].get('type')}) is used",
                  file=sys.stderr)
        return DummyOptim(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    unsettled = _offloads_optimizer(ds) and ds.get("zero_force_ds_cpu_optimizer") is not False
    if getattr(cfg, "optim", None) is None or unsettled:
        resolve_optim(cfg, accelerator)  # the CLI did it in plan(); a Loop-API caller may not have
    name = cfg.optim
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    cls = optimizer_class(name)
    kwargs = optimizer_kwargs(cfg, name, device)
    try:
        return cls(param_groups(model, cfg.weight_decay), **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:  # a bad optim_args value, an unsupported device
        raise UsageError(f"optim={name} could not be built with {kwargs}: {first_line(e)}") from None


def scheduler_factory(cfg, accelerator=None):
    """A callable (optimizer, total_steps) -> LR scheduler, for `Loop(scheduler=...)`.

    Under a DeepSpeed config with its own `scheduler` section, or its own `optimizer` (which
    only exists inside the engine), the schedule is accelerate's DummyScheduler: DeepSpeed
    builds it (from the section, `auto` warmup / total steps filled from the config keys; or
    from notrainer's schedule, applied to the engine's optimizer). Such a factory says
    `with_model = True`: the Loop builds it before prepare and prepares it with the model."""
    ds = deepspeed_config(accelerator)

    def warmup_of(total_steps: int) -> int:
        return cfg.num_warmup_steps or int(round(cfg.warmup_ratio * total_steps))

    def make(optimizer, total_steps: int):
        return get_scheduler(cfg.lr_scheduler_type, optimizer=optimizer,
                             num_warmup_steps=warmup_of(total_steps), num_training_steps=total_steps)

    if ds is None or not ({"optimizer", "scheduler"} & ds.keys()):
        return make

    from accelerate.utils import DummyScheduler

    def make_dummy(optimizer, total_steps: int):
        if "scheduler" in ds:
            if accelerator.is_main_process:
                print(f"notrainer: note: the DeepSpeed config's scheduler ({ds['scheduler'].get('type')}) is used",
                      file=sys.stderr)
            # accelerate divides total_num_steps by the process count (it expects unsharded steps)
            return DummyScheduler(optimizer, total_num_steps=total_steps * accelerator.num_processes,
                                  warmup_num_steps=warmup_of(total_steps))
        return DummyScheduler(optimizer, lr_scheduler_callable=lambda opt: make(opt, total_steps))

    make_dummy.with_model = True
    return make_dummy
