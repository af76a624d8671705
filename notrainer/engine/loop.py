"""The training loop: one readable loop over accelerate, for any nn.Module.

    Loop(model, optimizer, train_loader, loss_fn=..., eval_loader=..., max_train_steps=1000,
         output_dir="runs/x").fit()

Read `Loop._train()` top to bottom: it is the whole algorithm. Everything task-specific comes
in through a handful of plain callables:

    loss_fn(model, batch)       -> scalar loss, a *mean* over the batch's items
                                   (default: model(**batch).loss); or a dict {"loss": ...,
                                   "name": scalar}, whose other scalars are logged beside it
    num_items_fn(batch)         -> how many items that mean is over (target tokens for a
                                   language model; default: the batch size)
    num_tokens_fn(batch)        -> input tokens, for tokens/s (default: attention_mask.sum())
    eval_fn(model, batch)       -> dict of per-example tensors to gather; the keys "loss"
                                   (summed loss per example) and "num_items" feed eval_loss
    metrics_fn(outputs, loss)   -> dict of metrics from the gathered outputs

and run-level features attach through `events=[...]` (notrainer/engine/events.py). The helpers
it names live beside it: `accelerator.py` (make_accelerator), `batches.py` (windows of
micro-batches over epochs, resume skipping), `logging_window.py` (what is summed between two
log lines). The loop never sees a task, a tokenizer's internals or a dataset format.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from tqdm.auto import tqdm

import notrainer.compat as compat
from notrainer.engine import checkpoint as ckpt
from notrainer.engine import elastic, evaluation, preemption, step
from notrainer.engine import events as loop_events
from notrainer.engine.accelerator import _fill_deepspeed_clipping, _fsdp2_on_cpu, loop_config, make_accelerator  # noqa: F401
from notrainer.engine.batch import default_num_items, default_num_tokens
from notrainer.engine.batches import EPOCH_END, Batches
from notrainer.engine.config import LoopConfig
from notrainer.engine.evaluation import EvaluationAbandoned  # noqa: F401 (re-exported)
from notrainer.engine.logging_window import LoggingWindow, postfix, training_results
from notrainer.engine.prepare import prepare
from notrainer.engine.state import RunState
from notrainer.errors import UsageError
from notrainer.observability import history, throughput

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def default_loss_fn(model, batch):
    # Return only the loss: the output object (and its logits) goes out of scope here, so
    # nothing from this step outlives it.
    return model(**batch).loss


class Loop:
    """Train `model` with `optimizer` on `train_loader`; settings as a `LoopConfig` (`config=`)
    and/or keyword arguments named as its fields (`max_train_steps=1000, output_dir="runs/x"`).

    `export`: how the final model is written (`write(model, state_dict, folder)`, default
    `checkpoint.write_model`), or False for none. `run_config`: a dict recorded with every
    checkpoint (config.yaml) and sent to the trackers. `events`: objects with any of
    `on_step_end`, `on_evaluate`, `on_checkpoint_saved`, `on_train_end` (notrainer/engine/events.py).
    `resume`: a checkpoint the caller already resolved (`checkpoint.find_resume`), used instead
    of resolving `resume_from_checkpoint` again."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_loader: Iterable, *,
                 loss_fn: LossFn | None = None, eval_loader: Iterable | None = None,
                 predict_loader: Iterable | None = None, scheduler: Any = None,
                 num_items_fn: Callable | None = None, num_tokens_fn: Callable | None = None,
                 eval_fn: Callable | None = None, metrics_fn: Callable | None = None,
                 accelerator: Accelerator | None = None, config: LoopConfig | None = None,
                 export: Callable | bool = True, run_config: dict | None = None, events: Iterable = (),
                 resume: ckpt.ResumePoint | None = None, **settings):
        self.config = cfg = loop_config(config, settings)
        self.output_dir, self.run_config, self.resume = cfg.output_dir, run_config or {}, resume
        self.events = loop_events.check(events)
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
        prepare(self, model, optimizer, train_loader, eval_loader, scheduler)
        self.predict_loader = predict_loader  # prepared when predict() runs
        # Everything needed to continue exactly where a checkpoint left off, in one object.
        self.state = RunState.fresh(cfg.seed, acc.process_index)
        self.state.layout = elastic.layout(acc.num_processes, getattr(train_loader, "batch_size", None),
                                           self.gradient_accumulation_steps)
        self.results: dict[str, float] = {}
        self.stop_reason: str | None = None  # why training stops early: "preempted", "early stopping"
        self.checkpoint_requested = False  # a timed checkpoint or a new best, due at this step's end
        self.signals: preemption.StopSignal | None = None
        self.write_history = False  # log_history.jsonl is written by fit() on the main process
        self._bar = None
        self.eval_seconds = 0.0  # time spent evaluating inside training, kept out of the rates
        self.window = LoggingWindow(acc.device)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        acc, state, cfg = self.accelerator, self.state, self.config
        if self.resume is not None or cfg.resume_from_checkpoint:
            self.load_checkpoint(self.resume or cfg.resume_from_checkpoint)
        if self.stateful_loader and state.global_step and state.loader_state is None:
            raise UsageError(f"resume_from_checkpoint: the checkpoint of step {state.global_step} has no data position "
                             f"for rank {acc.process_index} (saved by a run that was not streaming, or with another "
                             "number of processes); resume it as it was run")
        self._start_history()
        if acc.log_with:  # the trackers report_to named (make_accelerator resolved them)
            acc.init_trackers("notrainer", config=_scalars(self.run_config))
        acc.print(f"training on {acc.num_processes} process(es) ({acc.distributed_type.value}): "
                  f"{self.max_train_steps} optimizer steps of {self.gradient_accumulation_steps} micro-batch(es)")
        self._bar = tqdm(total=self.max_train_steps, initial=state.global_step, desc="train",
                         disable=not (cfg.progress and acc.is_local_main_process), dynamic_ncols=True)
        # SIGTERM, SIGINT and SIGUSR1 only raise a flag: the loop checkpoints at the next step
        # boundary (or abandons an evaluation) and exits with preemption.EXIT_PREEMPTED.
        self.signals = preemption.StopSignal().install()
        # Every way out of training (done, preempted, diverged, an error in a metric) passes
        # here: the user's signal handlers come back, the bar and the trackers are closed.
        try:
            self._train()
        finally:
            self.signals.restore()
            self._bar.close()
            compat.finish_trackers(acc)  # not end_training(): the process group is the launcher's
        loop_events.emit(self.events, "on_train_end", self, self.results)  # a finished run only
        return self.results

    def _start_history(self) -> None:
        """log_history.jsonl: a resumed run drops the records after its checkpoint's step (the
        killed run logged them; they are logged again), a fresh run starts an empty one."""
        self.write_history = self.accelerator.is_main_process
        if self.write_history and self.state.global_step:
            history.truncate_after(self.output_dir, self.state.global_step)
        elif self.write_history:
            history.reset(self.output_dir)

    def _train(self) -> None:
        acc, state, cfg = self.accelerator, self.state, self.config
        self.model.train()
        started, start_step, start_tokens = time.perf_counter(), state.global_step, state.tokens_seen
        self.eval_seconds = 0.0
        self.window.reset()
        state.last_checkpoint_time = time.monotonic()
        if self.stateful_loader and state.loader_state is not None:
            # Resumed: the stream continues right after the last micro-batch the checkpoint saw.
            self.train_loader.load_state_dict(state.loader_state)
        if state.eval_pending:  # a signal abandoned this step's evaluation: it runs first
            evaluation.evaluate_in_training(self)
            self._checkpoint_if_due()

        # Windows of micro-batches, epoch after epoch (sampler seeded by (seed, epoch); a
        # resumed epoch skips what it consumed); each window is one optimizer step.
        batches = Batches(self.train_loader, acc, state, self.gradient_accumulation_steps, seed=cfg.seed,
                          stateful=self.stateful_loader, to_device=self._to_device)
        for window in batches if not self._done() else ():
            if window is EPOCH_END:
                self._end_epoch()
            else:
                self.train_step(window)
                state.step_in_epoch += len(window)
                state.global_step += 1
                self._bar.update(1)
                loop_events.emit(self.events, "on_step_end", self)
                if state.global_step % cfg.logging_steps == 0:
                    self._log()
                if cfg.eval_steps and state.global_step % cfg.eval_steps == 0:
                    evaluation.evaluate_in_training(self)
                self._checkpoint_if_due()
            if self._done():
                break
        if not self.stop_reason and batches.epoch_complete:  # the last step ended an epoch: it ends too
            self._end_epoch()

        if self.stop_reason == "preempted":
            # Checkpoint (a no-op when this step was just saved) and exit for a requeue.
            path = self.save_checkpoint()
            raise preemption.Preempted(f"stopped by {self.signals.received} at step {state.global_step}; "
                                       f"checkpoint {path}; resume_from_checkpoint=auto continues")
        if self.window.steps:
            self._log()
        self._bar.close()
        self.results.update(training_results(self, time.perf_counter() - started - self.eval_seconds, start_step, start_tokens))
        # Evaluate the final weights unless that exact step was just evaluated.
        if self.eval_loader is not None and state.last_eval_step != state.global_step:
            evaluation.record(self, self.evaluate())
        if self.metric_for_best_model:
            self.results.update(best_metric=state.best_metric, best_step=state.best_step)
            if self.stop_reason:
                self.results["stopped_early_at_step"] = state.global_step
        # The exported model is the best one; its metrics are the ones reported.
        if cfg.load_best_model_at_end and ckpt.restore_best(acc, state, self.output_dir, self.metric_for_best_model):
            evaluation.record(self, self.evaluate())
        if self.write_model is not None:
            self.export()
        self.write_results()

    def train_step(self, window: list) -> None:
        """One optimizer step over a window of micro-batches (notrainer/engine/step.py)."""
        step.train_step(self, window)

    def _done(self) -> bool:
        return bool(self.stop_reason) or self.state.global_step >= self.max_train_steps

    def request_stop(self, reason: str) -> None:
        """Stop training at the next step boundary (for events; a finished run, not a preemption)."""
        self.stop_reason = self.stop_reason or reason

    def _end_epoch(self) -> None:
        state = self.state
        state.epoch += 1
        state.step_in_epoch = 0
        if self.eval_loader is not None and not self.config.eval_steps:
            evaluation.evaluate_in_training(self)
        if self._checkpoint_due(epoch_end=True):
            self.save_checkpoint()

    def _log(self) -> None:
        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.optimizer.param_groups[0]["lr"]
        logs = self.window.flush(self.accelerator, self.state, learning_rate=lr, epoch=self.epoch_float(),
                                 meter=self.meter, clipping=self.config.max_grad_norm > 0)
        logs.update(self.loader_counters())  # a data mixture: examples and tokens per source
        if self.write_history:
            history.append(self.output_dir, history.train_record(self.state.global_step, **logs))
        if self.accelerator.trackers:
            self.accelerator.log(logs, step=self.state.global_step)
        if self._bar is not None:
            self._bar.set_postfix(postfix(logs), refresh=False)

    def loader_counters(self) -> dict[str, int]:
        """Counters a train loader keeps itself (`counters()`: a data mixture's examples and
        tokens per source, see notrainer/data/mixture.py), summed over ranks, as `train_<name>`."""
        counters = getattr(self.train_loader, "counters", None)
        local = counters() if callable(counters) else {}
        if not local:
            return {}
        names = sorted(local)
        acc = self.accelerator
        total = acc.reduce(torch.tensor([float(local[n]) for n in names], device=acc.device, dtype=torch.float64),
                           reduction="sum")
        return {f"train_{n}": int(v) for n, v in zip(names, total.tolist())}

    def epoch_float(self) -> float:
        batches = len(self.train_loader) if self.steps_per_epoch else 0
        return self.state.epoch + (self.state.step_in_epoch / batches if batches else 0.0)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
        """Evaluate on eval_loader and return the metrics (notrainer/engine/evaluation.py);
        changes no training state. `should_stop()` before each batch may abandon the pass."""
        return evaluation.evaluate(self, should_stop)

    def predict(self, loader: Iterable | None = None, predict_fn: Callable | None = None) -> dict[str, list]:
        """Run `predict_fn(model, batch)` (default: eval_fn) over a loader not yet prepared
        (default: predict_loader); returns its per-example outputs gathered from every rank, in
        dataset order, as lists of per-batch numpy arrays (2-D ones padded with -100)."""
        return evaluation.predict(self, loader, predict_fn)

    # ------------------------------------------------------------------ checkpoints and export

    def save_checkpoint(self) -> str:
        # The pending logging window goes into the counters first, so that the checkpoint's
        # tokens_seen and train_loss_sum are exact and a resumed run reports the same results.
        if self.window.steps:
            self._log()
        self.checkpoint_requested = False
        if self.stateful_loader:  # checkpoints are taken between steps: the position after this one
            self.state.loader_state = self.train_loader.state_dict()
        before = self.state.last_saved
        path = ckpt.save(self.accelerator, self.state, self.output_dir,
                         save_total_limit=self.config.save_total_limit, run_config=self.run_config)
        if self.state.last_saved is not before:  # written now (not the same state saved again)
            loop_events.emit(self.events, "on_checkpoint_saved", self, path)
        return path

    def _checkpoint_if_due(self) -> None:
        if self._checkpoint_due():
            self.save_checkpoint()

    def _checkpoint_due(self, epoch_end: bool = False) -> bool:
        if self.state.nonfinite_in_a_row:
            return False  # keep the last good checkpoint the newest while steps are being skipped
        every = self.config.checkpointing_steps
        if epoch_end:
            on_schedule = every == "epoch"
        else:
            on_schedule = every not in (None, "epoch") and self.state.global_step % int(every) == 0
        return on_schedule or self.checkpoint_requested

    def track_best(self, metrics: dict) -> None:
        cfg, state = self.config, self.state
        improved = ckpt.update_best(state, metrics, self.metric_for_best_model, self.greater_is_better,
                                    cfg.early_stopping_threshold)
        # A new best is checkpointed at once (when checkpoints are on at all), so retention can
        # keep it and load_best_model_at_end can export it.
        checkpoints_on = cfg.checkpointing_steps or cfg.checkpointing_minutes or cfg.load_best_model_at_end
        self.checkpoint_requested |= bool(improved and checkpoints_on)
        patience = cfg.early_stopping_patience
        if patience and state.evals_without_improvement >= patience:
            self.stop_reason = self.stop_reason or "early stopping"
            self.accelerator.print(f"early stopping: {self.metric_for_best_model} did not improve in {patience} "
                                   f"evaluations (best {state.best_metric:.6g} at step {state.best_step})")

    def load_checkpoint(self, path_or_point: str | ckpt.ResumePoint) -> None:
        current = self.state.layout
        ckpt.load(self.accelerator, self.model, self.state, self.output_dir, path_or_point)
        if self.stateful_loader:  # a stream's position is per rank (refused on another count)
            self.state.layout = current
        else:
            elastic.convert_position(self.state, current)

    def _to_device(self, batch):
        acc = self.accelerator
        return send_to_device(batch, acc.device, non_blocking=acc.non_blocking)

    def export(self) -> None:
        """Write the final model at the top of output_dir (see `export=`)."""
        ckpt.export_model(self.accelerator, self.model, self.output_dir, self.write_model or ckpt.write_model)

    def write_results(self) -> None:
        if self.accelerator.is_main_process:
            os.makedirs(self.output_dir, exist_ok=True)
            ckpt.write_json(os.path.join(self.output_dir, "all_results.json"), self.results)


# ---------------------------------------------------------------------- helpers

def _scalars(config: dict, prefix: str = "") -> dict:
    """Flatten a config for trackers, which only take scalars."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


__all__ = ["Loop", "make_accelerator", "default_loss_fn", "default_num_items", "default_num_tokens",
           "EvaluationAbandoned"]
