"""The one place that touches library internals.

Every use of a private or undocumented API of accelerate, transformers, peft, deepspeed,
torchdata or torch lives here, as one small function. Each says the upstream version it was
written against, why no public API serves, and what would replace it; tests/test_compat.py
has a test per function that fails with a clear message when upstream changes what it relies
on. Nothing outside this module reads or writes a library object's `_private` attribute.
"""

from __future__ import annotations

from typing import NamedTuple


# ---------------------------------------------------------------------- models (transformers, peft)


def model_from_config(cls, config, **kwargs):
    """A new, randomly initialised model of the concrete class `cls` from `config`, under the
    same init contexts `AutoModel*.from_config` uses (dtype=, attn_implementation=, DeepSpeed
    ZeRO-3's partitioned init).

    Written against transformers 5.24 (`PreTrainedModel._from_config`). The public
    `AutoModel*.from_config` only builds the class its mapping names for the config; for a
    user's own class (`model_class=pkg.module:MyModel`) no public classmethod applies the dtype
    and ZeRO-3 contexts (`cls(config)` ignores them). Replaced by a public
    `PreTrainedModel.from_config` should transformers add one."""
    return cls._from_config(config, **kwargs)


def attn_implementation(config) -> str | None:
    """The attention kernel a model's config resolved to ("sdpa", "flash_attention_2", ...).

    Written against transformers 5.24 (`PretrainedConfig._attn_implementation`, a property).
    transformers has a public setter (`model.set_attn_implementation`) but no public getter;
    its own docs read this attribute. Replaced by a public getter when there is one."""
    return getattr(config, "_attn_implementation", None)


class LoraLayerInfo(NamedTuple):
    """One LoRA-adapted layer (see lora_layers)."""

    name: str
    base_kind: str
    scaling: float
    fan_in_fan_out: bool


def lora_layers(model, adapter: str = "default") -> list[LoraLayerInfo]:
    """Every LoRA layer of a peft model that carries `adapter`: its module name, the class name
    of the layer it adapts, its scaling (alpha / r) and whether the base weight is stored
    transposed (GPT-2's Conv1D).

    Written against peft 0.21 (`peft.tuners.lora.LoraLayer`, its `lora_A`, `scaling`,
    `fan_in_fan_out` and `get_base_layer()`). peft's public merge (`merge_and_unload`) merges
    the live model in place; notrainer merges a gathered state dict (FSDP, ZeRO-3) into a
    separate export, which needs these per-layer values. Replaced by a public per-layer
    delta of a state dict, should peft offer one."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        # Linear/Conv1D layers keep their weights in lora_A, embeddings in lora_embedding_A.
        if isinstance(module, LoraLayer) and (adapter in module.lora_A or adapter in module.lora_embedding_A):
            out.append(LoraLayerInfo(name, type(module.get_base_layer()).__name__, float(module.scaling[adapter]),
                                     bool(getattr(module, "fan_in_fan_out", False))))
    return out


# ---------------------------------------------------------------------- accelerate's launcher


def accelerate_launch(launcher_args: list[str], module: str, module_args: list[str]) -> None:
    """Run `accelerate launch [launcher_args] --module module [module_args]` inside this process.

    Written against accelerate 1.15 (`accelerate.commands.launch.launch_command_parser` and
    `launch_command`, the functions behind the `accelerate launch` command; not documented as a
    library API). Running the `accelerate` command in a subprocess instead would print its own
    traceback over the child's one-line error. Raises what `launch_command` raises
    (`subprocess.CalledProcessError` for one process, torch's `ChildFailedError` for several).
    Replaced by a documented programmatic launcher, should accelerate publish one."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_command(launch_command_parser().parse_args([*launcher_args, "--module", module, *module_args]))


# ---------------------------------------------------------------------- the loop's seams (accelerate)


def cache_lomo_check() -> None:
    """Cache accelerate's `is_lomo_available` as seen by its optimizer wrapper.

    Written against accelerate 1.15. `AcceleratedOptimizer.step`/`zero_grad` ask the file system
    twice per optimizer step whether the optional lomo_optim package is installed (40-90 us each
    on a CPU, bench/overhead.py); the answer cannot change within a process. No public switch
    exists; replaced by nothing once accelerate caches the check itself (then this is a no-op)."""
    import functools

    import accelerate.optimizer

    check = accelerate.optimizer.is_lomo_available
    if not hasattr(check, "cache_info"):
        accelerate.optimizer.is_lomo_available = functools.cache(check)


def run_as_fsdp(acc, plugin) -> None:
    """Switch a prepared-to-be Accelerator on CPU processes to DistributedType.FSDP with `plugin`.

    Written against accelerate 1.15: an FSDP launch (ACCELERATE_USE_FSDP) on CPU processes is
    silently run as MULTI_CPU (plain DDP), although torch's fully_shard works on gloo. No public
    API sets the distributed type after the state exists; this sets accelerate's shared state
    fields (PartialState is re-read by prepare()). Replaced by accelerate accepting FSDP on CPU."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState().distributed_type = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin


def finish_trackers(acc) -> None:
    """Finish the accelerator's trackers and forget them, leaving the process group alone.

    Written against accelerate 1.15: the public `Accelerator.end_training()` finishes the
    trackers and also destroys the process group, which belongs to whoever launched the processes
    (the CLI tears it down last). `tracker.finish()` is public; emptying the undocumented
    `trackers` list keeps a second fit() on the same accelerator from logging into finished runs.
    Replaced by an end_training(destroy_process_group=False) if accelerate grows one."""
    for tracker in acc.trackers:
        tracker.finish()
    acc.trackers = []


def is_prepared_loader(loader) -> bool:
    """Whether `loader` is one of accelerate's prepared dataloader wrappers.

    Written against accelerate 1.15 (`accelerate.data_loader.DataLoaderShard`,
    `DataLoaderAdapter`: importable but not documented). The loop uses a loader that saves its
    own position (torchdata's StatefulDataLoader) as it is, unprepared; accelerate's wrappers have
    `state_dict` too and must not count as such. Replaced by the loop preparing stateful loaders
    through DataLoaderConfiguration(use_stateful_dataloader=True) once that keeps per-rank
    streams unsharded."""
    from accelerate.data_loader import DataLoaderAdapter, DataLoaderShard

    return isinstance(loader, (DataLoaderAdapter, DataLoaderShard))
