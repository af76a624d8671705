"""The training loop: one readable loop over accelerate, for any nn.Module.

    Loop(model, optimizer, train_loader, loss_fn=..., eval_loader=..., max_train_steps=1000,
         output_dir="runs/x").fit()

Read `fit()` top to bottom: it is the whole algorithm. Everything task-specific comes in
through a handful of plain callables:

    loss_fn(model, batch)       -> scalar loss, a *mean* over the batch's items
                                   (default: model(**batch).loss)
    num_items_fn(batch)         -> how many items that mean is over (target tokens for a
                                   language model; default: the batch size)
    num_tokens_fn(batch)        -> input tokens, for tokens/s (default: attention_mask.sum())
    eval_fn(model, batch)       -> dict of per-example tensors to gather; the keys "loss"
                                   (summed loss per example) and "num_items" feed eval_loss
    metrics_fn(outputs, loss)   -> dict of metrics from the gathered outputs

The loop never sees a task, a tokenizer's internals or a dataset format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
import os
import time
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    send_to_device,
)
from tqdm.auto import tqdm

from notrainer.engine import checkpoint as ckpt
from notrainer.engine import elastic
from notrainer.engine import guards
from notrainer.observability import history
from notrainer.engine import preemption
from notrainer.observability import throughput
from notrainer.observability import trackers
from notrainer.engine.batch import batch_shape, default_num_items, default_num_tokens
from notrainer.engine.config import LoopConfig
from notrainer.errors import UsageError
from notrainer.engine.state import RunState

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def default_loss_fn(model, batch):
    # Return only the loss: the output object (and its logits) goes out of scope here, so
    # nothing from this step outlives it.
    return model(**batch).loss


def make_accelerator(config: LoopConfig | None = None, **settings) -> Accelerator:
    """The Accelerator the loop runs on, from the loop's settings. The CLI builds it early (it
    needs the process layout for data preparation) and hands it to `Loop`."""
    cfg = _loop_config(config, settings)
    _cache_lomo_check()
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


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1")


def _fsdp2_on_cpu(acc: Accelerator) -> None:
    """An FSDP2 launch on CPU processes (ACCELERATE_USE_CPU=1) runs fully_shard on gloo.

    accelerate 1.15 only turns an FSDP launch into DistributedType.FSDP on accelerator devices;
    on CPU it silently runs plain DDP. torch's fully_shard works on gloo, so this sets
    accelerate's own state fields (private: hence isolated here) to what an FSDP launch on GPUs
    gets: both PartialState and AcceleratorState, as prepare() re-reads the former."""
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    if not (_env_true("ACCELERATE_USE_FSDP") and acc.distributed_type == DistributedType.MULTI_CPU):
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launch file's FSDP_* variables
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    PartialState().distributed_type = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin


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


@functools.cache
def _cache_lomo_check() -> None:
    """accelerate's optimizer wrapper asks the file system twice per optimizer step whether the
    optional lomo_optim package is installed (40-90 us each on our CPU, measured with
    bench/overhead.py); the answer cannot change within a process, so it is cached once."""
    import accelerate.optimizer

    accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


def _loop_config(config: LoopConfig | None, settings: dict) -> LoopConfig:
    """`config` (default LoopConfig()) with keyword settings on top; unknown names refused."""
    names = {f.name for f in dataclasses.fields(LoopConfig)}
    for name in settings:
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            raise TypeError(f"Loop got an unknown setting {name!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    cfg = dataclasses.replace(config, **settings) if config is not None else LoopConfig(**settings)
    LoopConfig.validate(cfg)
    return cfg


class Loop:
    """Train `model` with `optimizer` on `train_loader`; settings as a `LoopConfig` (`config=`)
    and/or keyword arguments named as its fields (`max_train_steps=1000, output_dir="runs/x"`).

    `export`: how the final model is written (`write(model, state_dict, folder)`, default
    `checkpoint.write_model`), or False for none. `run_config`: a dict recorded with every
    checkpoint (config.yaml) and sent to the trackers."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_loader: Iterable, *,
                 loss_fn: LossFn | None = None, eval_loader: Iterable | None = None,
                 predict_loader: Iterable | None = None, scheduler: Any = None,
                 num_items_fn: Callable | None = None, num_tokens_fn: Callable | None = None,
                 eval_fn: Callable | None = None, metrics_fn: Callable | None = None,
                 accelerator: Accelerator | None = None, config: LoopConfig | None = None,
                 export: Callable | bool = True, run_config: dict | None = None, **settings):
        self.config = cfg = _loop_config(config, settings)
        self.output_dir, self.run_config = cfg.output_dir, run_config or {}
        self.accelerator = acc = accelerator or make_accelerator(cfg)
        self.gradient_accumulation_steps = acc.gradient_accumulation_steps
        self.loss_fn = loss_fn or default_loss_fn
        self.num_items_fn = num_items_fn or default_num_items
        self.num_tokens_fn = num_tokens_fn or default_num_tokens
        self.eval_fn, self.metrics_fn = eval_fn, metrics_fn
        self.write_model = ckpt.write_model if export is True else export or None
        # The best model is tracked when a metric is named (load_best and early stopping default
        # to eval_loss, as in TrainingArguments).
        metric = cfg.metric_for_best_model or (
            "eval_loss" if cfg.load_best_model_at_end or cfg.early_stopping_patience else None)
        self.metric_for_best_model, self.greater_is_better = ckpt.resolve_metric(metric, cfg.greater_is_better)
        if self.metric_for_best_model and eval_loader is None:
            raise UsageError(f"metric_for_best_model={self.metric_for_best_model} (or load_best_model_at_end / "
                             "early_stopping_patience) needs evaluation data: do_eval=true and a validation set")

        # FLOPs per token are counted on the unwrapped model, before FSDP/DeepSpeed shard it.
        self.meter = throughput.Meter(model, cfg.peak_tflops, acc.device)
        # A stateful train loader (streaming: torchdata's StatefulDataLoader) knows its exact data
        # position and already reads this rank's part of the data. accelerate's wrapper would
        # hide its state_dict and shard it again, so it is used as it is: the loop moves its
        # batches to the device, restores its position on resume and saves it in checkpoints.
        self.stateful_loader = _is_stateful_loader(train_loader)
        # prepare: wrap for DDP/FSDP/DeepSpeed, move to device, shard the dataloaders.
        loaders = ([] if self.stateful_loader else [train_loader]) + ([eval_loader] if eval_loader is not None else [])
        # The scheduler is built on the torch optimizer from before prepare: DeepSpeed wraps it
        # in a ZeRO optimizer that LambdaLR refuses, but keeps its param_groups (the lr it drives).
        torch_optimizer = optimizer
        prepared = list(acc.prepare(model, optimizer, *loaders))
        self.model, self.optimizer = prepared[:2]
        self.train_loader = train_loader if self.stateful_loader else prepared[2]
        self.eval_loader = prepared[-1] if eval_loader is not None else None
        self.predict_loader = predict_loader  # prepared when predict() runs
        if self.eval_loader is not None:  # evaluating must not move the RNG that training draws from
            ckpt.seed_loader(self.eval_loader, cfg.seed, 0)
        if self.stateful_loader:  # nor does starting the stream again on resume (its worker seed)
            ckpt.seed_loader(self.train_loader, cfg.seed, 0)

        # Optimizer steps per epoch count the last, shorter accumulation window too.
        try:
            self.steps_per_epoch = math.ceil(len(self.train_loader) / self.gradient_accumulation_steps)
        except TypeError:  # an IterableDataset has no length
            self.steps_per_epoch = None
        if cfg.max_train_steps is None and self.steps_per_epoch is None:
            raise UsageError("max_train_steps is required when the train loader has no length")
        self.max_train_steps = cfg.max_train_steps or max(1, math.ceil(cfg.num_train_epochs * self.steps_per_epoch))
        # A scheduler may come as a factory of (optimizer, total optimizer steps): the total
        # is only known now, after the dataloader was sharded across processes.
        if callable(scheduler) and not hasattr(scheduler, "step"):
            scheduler = scheduler(torch_optimizer, self.max_train_steps)
        self.scheduler = acc.prepare(scheduler) if scheduler is not None else None
        # accelerate only wraps (and checkpoints) a DeepSpeed scheduler given with the model; this one
        # comes later, so register it, or a resume restarts the schedule from step 0.
        if self.scheduler is not None and acc.distributed_type == DistributedType.DEEPSPEED:
            acc.register_for_checkpointing(self.scheduler)

        # Everything needed to continue exactly where a checkpoint left off, in one object.
        self.state = RunState.fresh(cfg.seed, acc.process_index)
        self.state.layout = elastic.layout(acc.num_processes, getattr(train_loader, "batch_size", None),
                                           self.gradient_accumulation_steps)
        self.results: dict[str, float] = {}
        self._stop: str | None = None  # why training stops early: "preempted", "early stopping"
        self._checkpoint_requested = False  # a timed checkpoint or a new best, due at this step's end
        self._signals: preemption.StopSignal | None = None
        self._history = False  # log_history.jsonl is written by fit() on the main process
        self._eval_seconds = 0.0  # time spent evaluating inside training, kept out of the rates
        self._log_time = time.perf_counter()  # start of the logging window (reset by _log_reset)
        self._log_seq_len = 0

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        acc, state, cfg = self.accelerator, self.state, self.config
        if cfg.resume_from_checkpoint:
            self.load_checkpoint(cfg.resume_from_checkpoint)
        if self.stateful_loader and state.global_step and state.loader_state is None:
            raise UsageError(f"resume_from_checkpoint: the checkpoint of step {state.global_step} has no data position "
                             f"for rank {acc.process_index} (saved by a run that was not streaming, or with another "
                             "number of processes); resume it as it was run")
        self._start_history()
        if acc.log_with:  # the trackers report_to named (make_accelerator resolved them)
            acc.init_trackers("notrainer", config=_scalars(self.run_config))
        acc.print(f"training on {acc.num_processes} process(es) ({acc.distributed_type.value}): "
                  f"{self.max_train_steps} optimizer steps of {self.gradient_accumulation_steps} micro-batch(es)")
        bar = tqdm(total=self.max_train_steps, initial=state.global_step, desc="train",
                   disable=not (cfg.progress and acc.is_local_main_process), dynamic_ncols=True)
        # SIGTERM, SIGINT and SIGUSR1 only raise a flag: the loop checkpoints at the next step
        # boundary and exits with preemption.EXIT_PREEMPTED (see docs/checkpointing.md).
        self._signals = preemption.StopSignal().install()
        # Every way out of training (done, preempted, diverged, an error in a metric) passes
        # here: the user's signal handlers come back, the bar and the trackers are closed.
        try:
            self._train(bar)
        finally:
            self._signals.restore()
            bar.close()
            # Trackers only: accelerator.end_training() would also destroy the process group,
            # which belongs to whoever launched the processes (the CLI tears it down last).
            for tracker in acc.trackers:
                tracker.finish()
            acc.trackers = []
        return self.results

    def _start_history(self) -> None:
        """log_history.jsonl (notrainer/observability/history.py): a resumed run drops the records after its
        checkpoint's step (the killed run logged them; they are logged again), a fresh run
        starts an empty one."""
        self._history = self.accelerator.is_main_process
        if not self._history:
            return
        if self.state.global_step:
            history.truncate_after(self.output_dir, self.state.global_step)
        else:
            history.reset(self.output_dir)

    def _train(self, bar) -> None:
        acc, state, cfg = self.accelerator, self.state, self.config
        self.model.train()
        start, start_step, start_tokens = time.perf_counter(), state.global_step, state.tokens_seen
        self._eval_seconds = 0.0
        self._log_reset()
        state.last_checkpoint_time = time.monotonic()
        if self.stateful_loader and state.loader_state is not None:
            # Resumed: the stream continues right after the last micro-batch the checkpoint saw.
            self.train_loader.load_state_dict(state.loader_state)

        while state.global_step < self.max_train_steps and not self._stop:
            if self.stateful_loader:
                # Its position is its own (restored above): no epoch seeding, no skipping.
                loader = map(self._to_device, self.train_loader)
            else:
                # The sampler is seeded by (seed, epoch); on resume, skip the batches this epoch
                # already consumed (without drawing from any RNG) and continue from there. The
                # loader's worker seed comes from its own generator, not from dropout's RNG.
                if hasattr(self.train_loader, "set_epoch"):
                    self.train_loader.set_epoch(state.epoch)
                ckpt.seed_loader(self.train_loader, cfg.seed, state.epoch)
                loader = self.train_loader
                if state.step_in_epoch:
                    loader = acc.skip_first_batches(self.train_loader, state.step_in_epoch)
            # Collators draw (e.g. MLM masks) from a CPU RNG stream of their own, saved in checkpoints.
            batches = state.data_rng.iterate(iter(loader))

            while state.global_step < self.max_train_steps:
                window = _take(batches, self.gradient_accumulation_steps)
                if not window:
                    break
                self.train_step(window)
                state.step_in_epoch += len(window)
                state.global_step += 1
                bar.update(1)

                if state.global_step % cfg.logging_steps == 0:
                    bar.set_postfix(self._log_flush(), refresh=False)
                if cfg.eval_steps and state.global_step % cfg.eval_steps == 0:
                    self.evaluate()
                if self._checkpoint_due():
                    self.save_checkpoint()
                if self._stop:
                    break
            else:
                break  # max_train_steps reached inside the epoch
            if self._stop:
                break

            # The epoch is over.
            state.epoch += 1
            state.step_in_epoch = 0
            if self.eval_loader is not None and not cfg.eval_steps:
                self.evaluate()
            if self._checkpoint_due(epoch_end=True):
                self.save_checkpoint()

        if self._stop == "preempted":
            # Checkpoint (a no-op when this step was just saved) and exit for a requeue.
            path = self.save_checkpoint()
            raise preemption.Preempted(f"stopped by {self._signals.received} at step {state.global_step}; "
                                       f"checkpoint {path}; resume_from_checkpoint=auto continues")
        if self._log_steps:
            bar.set_postfix(self._log_flush(), refresh=False)
        bar.close()

        # Rates are over training time: the evaluations run inside training are timed apart
        # (train_eval_runtime), as they would otherwise read as 15-20% less throughput.
        runtime = time.perf_counter() - start - self._eval_seconds
        self.results.update(
            train_loss=state.train_loss_sum / max(state.global_step - state.skipped_steps, 1),
            train_runtime=round(runtime, 3),
            train_eval_runtime=round(self._eval_seconds, 3),
            train_steps_per_second=round((state.global_step - start_step) / max(runtime, 1e-9), 3),
            train_tokens_per_second=round((state.tokens_seen - start_tokens) / max(runtime, 1e-9), 1),
            global_step=state.global_step,
            epoch=round(self._epoch_float(), 4),
        )
        # train_samples_per_second, train_mfu (when the peak is known), train_peak_memory_gib (CUDA)
        self.results.update(self.meter.summary(runtime, self.results["train_tokens_per_second"], acc.num_processes))
        # Evaluate the final weights unless that exact step was just evaluated.
        if self.eval_loader is not None and state.last_eval_step != state.global_step:
            self.evaluate()
        if self.metric_for_best_model:
            self.results.update(best_metric=state.best_metric, best_step=state.best_step)
            if self._stop:
                self.results["stopped_early_at_step"] = state.global_step
        # The exported model is the best one; its metrics are the ones reported.
        if cfg.load_best_model_at_end and ckpt.restore_best(acc, state, self.output_dir, self.metric_for_best_model):
            self.evaluate()
        if self.write_model is not None:
            self.export()
        self.write_results()

    def train_step(self, window: list) -> None:
        """One optimizer step over a window of micro-batches.

        The loss is normalised by the number of items (target tokens) in the whole window on
        all ranks, so accumulating 4 batches of 2 gives the same gradient as 1 batch of 8,
        even when sequences have different lengths. Each micro-batch's mean loss is weighted
        by its share of the window's items; DDP averages gradients over ranks, hence the
        factor num_processes.
        """
        acc, model = self.accelerator, self.model
        counts = torch.stack([_on_device(self.num_items_fn(b), acc.device, torch.float32) for b in window])
        window_items = acc.reduce(counts.sum(), reduction="sum").clamp(min=1.0)
        # accelerator.backward divides by gradient_accumulation_steps (DeepSpeed does it
        # inside its engine unless told not to); our weights already do the averaging.
        if acc.distributed_type == DistributedType.DEEPSPEED:
            backward_kwargs, undo_ga = {"scale_wrt_gas": False}, 1.0
        else:
            backward_kwargs, undo_ga = {}, float(self.gradient_accumulation_steps)

        step_loss = torch.zeros((), device=acc.device)
        for i, batch in enumerate(window):
            last = i == len(window) - 1
            acc.sync_gradients = last  # the optimizer and scheduler only step when True
            no_sync = not last and acc.distributed_type != DistributedType.DEEPSPEED
            with acc.no_sync(model) if no_sync else contextlib.nullcontext():
                loss = self.loss_fn(model, batch)
                weighted = loss * (counts[i] * acc.num_processes / window_items)
                acc.backward(weighted * undo_ga, **backward_kwargs)
            step_loss += weighted.detach()
            self._log_tokens += _on_device(self.num_tokens_fn(batch), acc.device, torch.float64)
            rows, self._log_seq_len = batch_shape(batch)  # shapes only: no device sync
            self._log_samples += rows
            del loss, weighted  # keep nothing of this micro-batch alive into the next one

        grad_norm = None
        if self.config.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(model.parameters(), self.config.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, which the flag all-reduce cannot take
                grad_norm = grad_norm.full_tensor()
        # Decisions all ranks take together (one small all-reduce): a non-finite loss or
        # gradient norm skips this optimizer step; a stop signal or a due timed checkpoint is
        # acted on at this step's boundary.
        limit = self.config.max_nonfinite_steps
        flags = guards.step_flags(acc, self.state, step_loss, grad_norm, check_nonfinite=limit > 0,
                                  stop_requested=self._signals is not None and self._signals.received is not None,
                                  checkpointing_minutes=self.config.checkpointing_minutes)
        self._checkpoint_requested |= flags.checkpoint_due
        if flags.stop_signal:
            self._stop = "preempted"
        if not flags.nonfinite:
            self.state.nonfinite_in_a_row = 0
        elif guards.skip_nonfinite_step(acc, self.optimizer, self.state, limit):  # raises after `limit` in a row
            return
        self.optimizer.step()
        if self.scheduler is not None and not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        # Accumulate on device; the host only syncs when logging (and for the flags above,
        # unless max_nonfinite_steps=0 on one process).
        self._log_loss += step_loss
        if grad_norm is not None:
            self._log_grad_norm += torch.as_tensor(grad_norm, device=acc.device, dtype=torch.float32)
        self._log_steps += 1

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Evaluate on eval_loader; every example counts exactly once under any number of ranks."""
        acc, model = self.accelerator, self.model
        if self.eval_loader is None:
            return {}
        started = time.perf_counter()
        model.eval()
        outputs = self._gather_outputs(self.eval_loader, self._eval_step)
        # Examples evaluated (each once, over all ranks): the rows of any gathered output.
        rows = sum(len(x) for x in next(iter(outputs.values()), []))
        loss_sum = float(sum(x.astype("float64").sum() for x in outputs.pop("loss", [])))
        item_sum = float(sum(x.astype("float64").sum() for x in outputs.pop("num_items", [])))
        metrics: dict[str, float] = {}
        if item_sum > 0:
            metrics["eval_loss"] = loss_sum / item_sum
        if self.metrics_fn is not None:
            extra = self.metrics_fn(dict(outputs), metrics.get("eval_loss"))
            metrics.update({k if k.startswith("eval_") else f"eval_{k}": _plain(v) for k, v in extra.items()})
        model.train()
        metrics.setdefault("eval_samples", rows)  # a task's own count (e.g. examples, not windows) wins
        seconds = time.perf_counter() - started
        metrics["eval_runtime"] = round(seconds, 3)
        # Training rates leave the evaluations out: this logging window and train_runtime.
        self._eval_seconds += seconds
        self._log_time += seconds
        self.state.last_eval_step = self.state.global_step
        self.results.update(metrics)
        if self.metric_for_best_model:
            self._track_best(metrics)
        if self._history:
            best = self.state.best_metric if self.metric_for_best_model else None
            history.append(self.output_dir, history.eval_record(self.state.global_step, self._epoch_float(),
                                                                metrics, best_metric=best))
        if acc.trackers:
            acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=self.state.global_step)
        acc.print(f"step {self.state.global_step}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()
                                                               if isinstance(v, (int, float))))
        return metrics

    @torch.no_grad()
    def predict(self, loader: Iterable | None = None, predict_fn: Callable | None = None) -> dict[str, list]:
        """Run `predict_fn(model, batch)` (default: eval_fn) over a loader not yet prepared
        (default: predict_loader); returns its per-example outputs gathered from every rank, in
        dataset order, as lists of per-batch numpy arrays (2-D ones padded with -100)."""
        loader = self.accelerator.prepare(loader if loader is not None else self.predict_loader)
        self.model.eval()
        outputs = self._gather_outputs(loader, predict_fn or self._eval_step)
        self.model.train()
        return outputs

    def _gather_outputs(self, loader: Iterable, step_fn: Callable) -> dict[str, list]:
        acc = self.accelerator
        outputs: dict[str, list] = defaultdict(list)
        for batch in loader:
            out = step_fn(self.model, batch)
            # Sequences can have another length on each rank: pad before gathering. Gather per
            # example (not a reduced scalar) so the duplicated tail of an uneven last batch is
            # dropped by gather_for_metrics.
            out = {k: acc.pad_across_processes(v, dim=1, pad_index=-100) if v.ndim > 1 else v for k, v in out.items()}
            for k, v in acc.gather_for_metrics(out).items():
                outputs[k].append(v.cpu().numpy())
        return dict(outputs)

    def _eval_step(self, model, batch) -> dict[str, torch.Tensor]:
        # A task's eval_fn may return None to mean "loss only".
        out = self.eval_fn(model, batch) if self.eval_fn else None
        return out if out is not None else self._default_eval(model, batch)

    def _default_eval(self, model, batch) -> dict[str, torch.Tensor]:
        # Without a per-example eval_fn, spread the batch's loss over its examples so that the
        # gathered rows can still be de-duplicated.
        loss = self.loss_fn(model, batch).float()
        n = torch.as_tensor(self.num_items_fn(batch), device=loss.device, dtype=torch.float32)
        rows = int(default_num_items(batch))
        return {"loss": (loss * n / rows).expand(rows).contiguous(), "num_items": (n / rows).expand(rows).contiguous()}

    # ------------------------------------------------------------------ logging

    def _log_reset(self) -> None:
        dev = self.accelerator.device
        self._log_loss = torch.zeros((), device=dev)
        self._log_grad_norm = torch.zeros((), device=dev)
        self._log_tokens = torch.zeros((), device=dev, dtype=torch.float64)
        self._log_samples = 0
        self._log_steps = 0
        self._log_time = time.perf_counter()

    def _log_flush(self) -> dict[str, str]:
        """Reduce the running sums over ranks, log them, and reset. Returns the bar's postfix."""
        acc, state = self.accelerator, self.state
        steps = max(self._log_steps, 1)
        # Each rank's step loss is its share of the window's loss; the mean over ranks is the
        # loss of the whole window (all micro-batches, all ranks).
        # One all-reduce and one host sync for everything: the loss sum over ranks / ranks is the mean.
        sums = torch.stack([self._log_loss.double(), self._log_grad_norm.double(), self._log_tokens.double(),
                            torch.full((), float(self._log_samples), device=acc.device, dtype=torch.float64)])
        loss_sum, grad_norm_sum, tokens, samples = acc.reduce(sums, reduction="sum").tolist()
        loss = loss_sum / acc.num_processes / steps
        elapsed = max(time.perf_counter() - self._log_time, 1e-9)
        state.tokens_seen += int(tokens)
        state.train_loss_sum += loss * self._log_steps
        logs = {
            "train_loss": loss,
            "learning_rate": self.scheduler.get_last_lr()[0] if self.scheduler is not None
            else self.optimizer.param_groups[0]["lr"],
            "tokens_per_second": tokens / elapsed,
            "epoch": self._epoch_float(),
        }
        # samples_per_second, mfu (when the GPU's peak is known), peak_memory_gib (CUDA)
        logs.update(self.meter.report(tokens, samples, elapsed, self._log_seq_len, acc.num_processes))
        if self.config.max_grad_norm > 0:
            logs["grad_norm"] = grad_norm_sum / acc.num_processes / steps
        if self._history:
            history.append(self.output_dir, history.train_record(state.global_step, **logs))
        if acc.trackers:
            acc.log(logs, step=state.global_step)
        self._log_reset()
        postfix = {"loss": f"{loss:.4f}", "tok/s": f"{tokens / elapsed:,.0f}"}
        if "mfu" in logs:
            postfix["mfu"] = f"{logs['mfu']:.1%}"
        if "peak_memory_gib" in logs:
            postfix["mem"] = f"{logs['peak_memory_gib']:.1f}G"
        return postfix

    def _epoch_float(self) -> float:
        batches = len(self.train_loader) if self.steps_per_epoch else 0
        return self.state.epoch + (self.state.step_in_epoch / batches if batches else 0.0)

    # ------------------------------------------------------------------ checkpoints and export

    def save_checkpoint(self) -> str:
        # The pending logging window goes into the counters first, so that the checkpoint's
        # tokens_seen and train_loss_sum are exact and a resumed run reports the same results.
        if self._log_steps:
            self._log_flush()
        self._checkpoint_requested = False
        if self.stateful_loader:  # checkpoints are taken between steps: the position after this one
            self.state.loader_state = self.train_loader.state_dict()
        return ckpt.save(self.accelerator, self.state, self.output_dir,
                         save_total_limit=self.config.save_total_limit, run_config=self.run_config)

    def _to_device(self, batch):
        acc = self.accelerator
        return send_to_device(batch, acc.device, non_blocking=acc.non_blocking)

    def _checkpoint_due(self, epoch_end: bool = False) -> bool:
        if self.state.nonfinite_in_a_row:
            return False  # keep the last good checkpoint the newest while steps are being skipped
        every = self.config.checkpointing_steps
        if epoch_end:
            on_schedule = every == "epoch"
        else:
            on_schedule = every not in (None, "epoch") and self.state.global_step % int(every) == 0
        return on_schedule or self._checkpoint_requested

    def _track_best(self, metrics: dict) -> None:
        cfg, state = self.config, self.state
        improved = ckpt.update_best(state, metrics, self.metric_for_best_model, self.greater_is_better,
                                    cfg.early_stopping_threshold)
        # A new best is checkpointed at once (when checkpoints are on at all), so retention can
        # keep it and load_best_model_at_end can export it.
        checkpoints_on = cfg.checkpointing_steps or cfg.checkpointing_minutes or cfg.load_best_model_at_end
        self._checkpoint_requested |= bool(improved and checkpoints_on)
        patience = cfg.early_stopping_patience
        if patience and state.evals_without_improvement >= patience:
            self._stop = self._stop or "early stopping"
            self.accelerator.print(f"early stopping: {self.metric_for_best_model} did not improve in {patience} "
                                   f"evaluations (best {state.best_metric:.6g} at step {state.best_step})")

    def load_checkpoint(self, path_or_auto: str) -> None:
        current = self.state.layout
        ckpt.load(self.accelerator, self.model, self.state, self.output_dir, path_or_auto)
        if self.stateful_loader:  # a stream's position is per rank (refused on another count)
            self.state.layout = current
        else:
            elastic.convert_position(self.state, current)

    def export(self) -> None:
        """Write the final model at the top of output_dir (see `export=`)."""
        ckpt.export_model(self.accelerator, self.model, self.output_dir, self.write_model or ckpt.write_model)

    def write_results(self) -> None:
        if self.accelerator.is_main_process:
            os.makedirs(self.output_dir, exist_ok=True)
            ckpt.write_json(os.path.join(self.output_dir, "all_results.json"), self.results)


# ---------------------------------------------------------------------- helpers


def _on_device(x, device, dtype) -> torch.Tensor:
    """A count as a device scalar. A Python number is filled in on the device: torch.as_tensor
    would copy it from the host, which on CUDA waits for all queued work (a sync per step)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.full((), x, device=device, dtype=dtype)


def _is_stateful_loader(loader) -> bool:
    """A loader that saves and restores its own position (not one accelerate already prepared:
    its wrappers have state_dict too, and are handled by skip_first_batches)."""
    from accelerate.data_loader import DataLoaderAdapter, DataLoaderShard

    return (hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")
            and not isinstance(loader, (DataLoaderAdapter, DataLoaderShard)))


def _take(iterator, n: int) -> list:
    out = []
    for batch in iterator:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _scalars(config: dict, prefix: str = "") -> dict:
    """Flatten a config for trackers, which only take scalars."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def _plain(v):
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    return v


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


__all__ = ["Loop", "make_accelerator", "default_loss_fn", "default_num_items", "default_num_tokens"]
