"""The Accelerator the loop runs on, and the engine settings it is built with.

`make_accelerator(config, **settings)` turns the loop's settings (`LoopConfig`) into one
`accelerate.Accelerator`: mixed precision, the accumulation window (the loop decides when
gradients sync), the seeded sampler, the trackers, torch.compile, and the launch set-ups that
need a hand (FSDP2 on CPU processes, DeepSpeed's clipping from max_grad_norm, gloo for DeepSpeed
on CPU). The CLI builds it early (it needs the process layout for data preparation) and hands it
to `Loop`; `Loop` builds one itself when given none.
"""

from __future__ import annotations

import dataclasses
import difflib
import os

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
)

import notrainer.compat as compat
from notrainer.engine.config import LoopConfig
from notrainer.errors import UsageError
from notrainer.observability import trackers


def make_accelerator(config: LoopConfig | None = None, **settings) -> Accelerator:
    """The Accelerator the loop runs on, from the loop's settings."""
    cfg = loop_config(config, settings)
    compat.cache_lomo_check()
    # Any tracker accelerate supports, comma-separated; MLflow's store defaults into output_dir/logs.
    log_with = trackers.resolve_report_to(cfg.report_to)
    for name, value in trackers.default_tracker_env(log_with, cfg.output_dir).items():
        os.environ.setdefault(name, value)
    kwargs = {}
    if cfg.torch_compile:
        from accelerate.utils import TorchDynamoPlugin

        kwargs["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor", mode=cfg.torch_compile_mode or "default")
    if _env_true("ACCELERATE_USE_FSDP") and _env_true("ACCELERATE_USE_CPU") and os.environ.get("FSDP_VERSION", "1") != "2":
        # (checked first: accelerate's FSDP1 plugin fails on CPU with a traceback about devices)
        raise UsageError("FSDP1 does not run on CPU processes; use fsdp_version: 2 (launch/fsdp2.yaml) or a GPU machine")
    if _env_true("ACCELERATE_USE_DEEPSPEED") and not torch.cuda.is_available():
        # DeepSpeed on CPU processes (DS_ACCELERATOR=cpu) builds a gloo group, but accelerate
        # picks no backend without CUDA and then counts one process. Only here: a plain
        # multi-process launch on CPU with gloo forced would run N unsynchronised trainings.
        from accelerate.utils import InitProcessGroupKwargs

        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    acc = Accelerator(
        mixed_precision=None if cfg.mixed_precision in (None, "no") else cfg.mixed_precision,
        # We decide when gradients sync (the last micro-batch of each window), so accelerate's
        # dataloader-driven counter is switched off; num_steps still tells DeepSpeed the window.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False, adjust_scheduler=False
        ),
        # Same permutation on every rank and every resume: the sampler is seeded by (seed, epoch).
        # non_blocking: batches (pinned by the CLI's DataLoader on CUDA) are copied to the GPU
        # without making the host wait for the queued work, so the GPU never idles between steps.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=_data_seed(cfg),
                                                  non_blocking=torch.cuda.is_available()),
        # The scheduler steps once per optimizer step, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=os.path.join(cfg.output_dir, "logs")),
        **kwargs,
    )
    _fsdp2_on_cpu(acc)
    _fill_deepspeed_clipping(acc, cfg.max_grad_norm)
    return acc


def loop_config(config: LoopConfig | None, settings: dict) -> LoopConfig:
    """`config` (default LoopConfig()) with keyword settings on top; unknown names refused.
    A config given without settings is used as it is (a frozen CLI config stays frozen)."""
    names = {f.name for f in dataclasses.fields(LoopConfig)}
    for name in settings:
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            raise TypeError(f"Loop got an unknown setting {name!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    if config is not None and not settings:
        cfg = config
    else:
        cfg = dataclasses.replace(config, **settings) if config is not None else LoopConfig(**settings)
    LoopConfig.validate(cfg)
    return cfg


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1")


def _fsdp2_on_cpu(acc: Accelerator) -> None:
    """An FSDP2 launch on CPU processes (ACCELERATE_USE_CPU=1) runs fully_shard on gloo.

    accelerate 1.15 only turns an FSDP launch into DistributedType.FSDP on accelerator devices;
    on CPU it silently runs plain DDP. torch's fully_shard works on gloo, so the accelerator is
    switched to what an FSDP launch on GPUs gets (compat.run_as_fsdp: accelerate's own state)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    if not (_env_true("ACCELERATE_USE_FSDP") and acc.distributed_type == DistributedType.MULTI_CPU):
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launch file's FSDP_* variables
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    compat.run_as_fsdp(acc, plugin)


def _fill_deepspeed_clipping(acc: Accelerator, max_grad_norm: float) -> None:
    """max_grad_norm is the one clipping setting: it fills DeepSpeed's gradient_clipping (which
    accelerate would otherwise fill with a fixed 1.0). Written into the config directly: the
    plugin drops a 0.0 (no clipping) as falsy."""
    ds = getattr(acc.state, "deepspeed_plugin", None)
    if ds is None:
        return
    given = ds.deepspeed_config.get("gradient_clipping", "auto")
    if given not in ("auto", None) and float(given) != float(max_grad_norm):
        raise UsageError(f"the DeepSpeed config sets gradient_clipping={given} but max_grad_norm={max_grad_norm}; "
                         "drop gradient_clipping from it (notrainer fills it from max_grad_norm)")
    ds.deepspeed_config["gradient_clipping"] = float(max_grad_norm)


def _data_seed(cfg: LoopConfig) -> int | None:
    """The sampler's seed: data_seed (the Trainer's name) when given, else seed."""
    return cfg.data_seed if cfg.data_seed is not None else cfg.seed


__all__ = ["make_accelerator", "loop_config"]
