"""What `Loop.__init__` hands to accelerate: the model, optimizer and dataloaders prepared
(DDP/FSDP/DeepSpeed wrapping, device placement, dataloader sharding), the run's length in
optimizer steps, and the LR schedule built on it."""

from __future__ import annotations

import math

from accelerate.utils import DistributedType

import notrainer.compat as compat
from notrainer.engine import checkpoint as ckpt
from notrainer.errors import UsageError


def prepare(loop, model, optimizer, train_loader, eval_loader, scheduler) -> None:
    """Wrap for DDP/FSDP/DeepSpeed, move to device, shard the dataloaders; then the schedule."""
    acc, cfg = loop.accelerator, loop.config
    # A stateful train loader (streaming: torchdata's StatefulDataLoader) knows its exact data
    # position and already reads this rank's part of the data. accelerate's wrapper would
    # hide its state_dict and shard it again, so it is used as it is: the loop moves its
    # batches to the device, restores its position on resume and saves it in checkpoints.
    loop.stateful_loader = (hasattr(train_loader, "state_dict") and hasattr(train_loader, "load_state_dict")
                            and not compat.is_prepared_loader(train_loader))
    loaders = ([] if loop.stateful_loader else [train_loader]) + ([eval_loader] if eval_loader is not None else [])
    # The scheduler is built on the torch optimizer from before prepare: DeepSpeed wraps it
    # in a ZeRO optimizer that LambdaLR refuses, but keeps its param_groups (the lr it drives).
    # A schedule that DeepSpeed builds (a factory marked `with_model`: accelerate's DummyScheduler for
    # a recipe's own optimizer/scheduler sections) is prepared with the model, so its length is
    # counted before prepare, from the loader as it will be sharded.
    early = scheduler(optimizer, _planned_steps(loop, train_loader)) if getattr(scheduler, "with_model", False) else None
    prepared = list(acc.prepare(model, optimizer, *loaders, *([early] if early is not None else [])))
    early = prepared.pop() if early is not None else None
    loop.model, loop.optimizer = prepared[:2]
    loop.train_loader = train_loader if loop.stateful_loader else prepared[2]
    loop.eval_loader = prepared[-1] if eval_loader is not None else None
    if loop.eval_loader is not None:  # evaluating must not move the RNG that training draws from
        ckpt.seed_loader(loop.eval_loader, cfg.seed, 0)
    if loop.stateful_loader:  # nor does starting the stream again on resume (its worker seed)
        ckpt.seed_loader(loop.train_loader, cfg.seed, 0)
    # Optimizer steps per epoch count the last, shorter accumulation window too.
    try:
        loop.steps_per_epoch = math.ceil(len(loop.train_loader) / loop.gradient_accumulation_steps)
    except TypeError:  # an IterableDataset has no length
        loop.steps_per_epoch = None
    if cfg.max_train_steps is None and loop.steps_per_epoch is None:
        raise UsageError("max_train_steps is required when the train loader has no length")
    loop.max_train_steps = cfg.max_train_steps or max(1, math.ceil(cfg.num_train_epochs * loop.steps_per_epoch))
    # A scheduler may come as a factory of (optimizer, total optimizer steps): the total
    # is only known now, after the dataloader was sharded across processes.
    if early is not None:  # DeepSpeed's engine steps it and saves it in its checkpoints
        loop.scheduler = early
        return
    if callable(scheduler) and not hasattr(scheduler, "step"):
        scheduler = scheduler(optimizer, loop.max_train_steps)
    loop.scheduler = acc.prepare(scheduler) if scheduler is not None else None
    # accelerate only wraps (and checkpoints) a DeepSpeed scheduler given with the model; this one
    # comes later, so register it, or a resume restarts the schedule from step 0.
    if loop.scheduler is not None and acc.distributed_type == DistributedType.DEEPSPEED:
        acc.register_for_checkpointing(loop.scheduler)

def _planned_steps(loop, train_loader) -> int:
    """max_train_steps as it will come out after prepare (accelerate shards a loader of n batches
    into ceil(n / processes) per process), for a schedule that must exist before prepare."""
    cfg = loop.config
    if cfg.max_train_steps:
        return cfg.max_train_steps
    per_process = math.ceil(len(train_loader) / loop.accelerator.num_processes)
    return max(1, math.ceil(cfg.num_train_epochs * math.ceil(per_process / loop.gradient_accumulation_steps)))


def prepare_frozen(acc, model):
    """A model that runs but never trains (a task's frozen reference), placed for the engine in use:
    sharded like the policy under DeepSpeed ZeRO-3 (an inference-only DeepSpeed engine) and FSDP2
    (fully_shard with the recipe's wrap policy), so no process holds a full copy; on the device
    otherwise (DDP, ZeRO-1/2, one process: those keep full weights on every process anyway). It is
    not registered with accelerate, so checkpoints hold the trained model only."""
    placed = _place_frozen(acc, model.eval().requires_grad_(False))
    placed.placed_by_engine = True  # the task must not move it again (ZeRO-3 may keep it offloaded on the CPU)
    return placed


def local_share(model) -> float:
    """The fraction of a model's weights this process holds (1.0 unsharded; about 1/processes
    under ZeRO-3 or FSDP2)."""
    held = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):  # ZeRO-3: the partition is p.ds_tensor
            held, total = held + p.ds_tensor.numel(), total + p.ds_numel
        elif hasattr(p, "to_local"):  # FSDP2: a DTensor
            held, total = held + p.to_local().numel(), total + p.numel()
        else:
            held, total = held + p.numel(), total + p.numel()
    return held / max(total, 1)


def _place_frozen(acc, model):
    if acc.distributed_type == DistributedType.DEEPSPEED:
        import copy

        import deepspeed

        ds = copy.deepcopy(acc.state.deepspeed_plugin.deepspeed_config)  # `auto` values already filled by prepare
        zero = ds.setdefault("zero_optimization", {})
        if int(zero.get("stage", 0)) != 3:
            return model.to(acc.device)
        for section in ("optimizer", "scheduler"):  # nothing to update: no optimizer, no schedule
            ds.pop(section, None)
        zero.pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=model, config=ds)
        engine.eval()  # DeepSpeedEngine.eval returns None
        return engine
    if acc.distributed_type == DistributedType.FSDP:
        from accelerate.utils import fsdp2_prepare_model

        sharded = fsdp2_prepare_model(acc, model.to(acc.device))
        sharded.eval()
        return sharded
    return model.to(acc.device)


def full_weights(model):
    """A context in which `model` has its full weights on every process: a model that DeepSpeed
    ZeRO-3 partitioned as it was built (deepspeed.zero.Init: each parameter an empty placeholder
    until gathered) is gathered for the duration; any other model is used as it is."""
    import contextlib

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def frozen_copy(model):
    """A frozen copy of `model` (eval mode, no gradients) with its current weights, also when ZeRO-3
    partitioned them at build time (the copy is then full on each process until `prepare_frozen`
    shards it)."""
    import copy

    with full_weights(model):
        return copy.deepcopy(model).eval().requires_grad_(False)
