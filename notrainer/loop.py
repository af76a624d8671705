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
import functools
import math
import os
import time
from collections import defaultdict
from typing import Any, Callable, Iterable

import accelerate.optimizer as _accelerate_optimizer
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
)
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import throughput
from . import guards, preemption
from .errors import UsageError

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]

# accelerate's optimizer wrapper asks the file system twice per optimizer step whether the
# optional lomo_optim package is installed (40-90 us each on our CPU); the answer cannot change.
_accelerate_optimizer.is_lomo_available = functools.cache(_accelerate_optimizer.is_lomo_available)


def default_loss_fn(model, batch):
    # Return only the loss: the output object (and its logits) goes out of scope here, so
    # nothing from this step outlives it.
    return model(**batch).loss


def default_num_items(batch) -> int | torch.Tensor:
    """Examples in a batch: the length of its first tensor."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return first.shape[0] if hasattr(first, "shape") else len(first)


def default_num_tokens(batch) -> int | torch.Tensor:
    """Non-padding input tokens, for throughput; 0 when the batch has no token ids."""
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return batch["attention_mask"].sum()
        if "input_ids" in batch:
            return batch["input_ids"].numel()
    return 0


def make_accelerator(
    output_dir: str,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str | None = None,
    report_to: str = "none",
    seed: int | None = None,
    torch_compile: bool = False,
    torch_compile_mode: str | None = None,
) -> Accelerator:
    """The Accelerator the loop runs on. The CLI builds it early (it needs the process
    layout for data preparation) and hands it to `Loop`."""
    log_with = {"none": None, "all": "all"}.get(report_to, report_to)
    kwargs = {}
    if torch_compile:
        from accelerate.utils import TorchDynamoPlugin

        kwargs["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor", mode=torch_compile_mode or "default")
    return Accelerator(
        mixed_precision=None if mixed_precision in (None, "no") else mixed_precision,
        # We decide when gradients sync (the last micro-batch of each window), so accelerate's
        # dataloader-driven counter is switched off; num_steps still tells DeepSpeed the window.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False, adjust_scheduler=False
        ),
        # Same permutation on every rank and every resume: the sampler is seeded by (seed, epoch).
        # non_blocking: batches (pinned by the CLI's DataLoader on CUDA) are copied to the GPU
        # without making the host wait for the queued work, so the GPU never idles between steps.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed,
                                                  non_blocking=torch.cuda.is_available()),
        # The scheduler steps once per optimizer step, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, "logs")),
        **kwargs,
    )


class Loop:
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: Iterable,
        *,
        loss_fn: LossFn | None = None,
        eval_loader: Iterable | None = None,
        predict_loader: Iterable | None = None,
        scheduler: Any = None,
        max_train_steps: int | None = None,
        num_train_epochs: float = 1.0,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float = 1.0,
        eval_steps: int | None = None,
        logging_steps: int = 10,
        checkpointing_steps: int | str | None = None,
        save_total_limit: int | None = None,
        resume_from_checkpoint: str | None = None,
        checkpointing_minutes: float | None = None,
        metric_for_best_model: str | None = None,
        greater_is_better: bool | None = None,
        load_best_model_at_end: bool = False,
        early_stopping_patience: int | None = None,
        early_stopping_threshold: float = 0.0,
        max_nonfinite_steps: int = 10,
        output_dir: str = "runs/loop",
        mixed_precision: str = "no",
        report_to: str = "none",
        seed: int | None = None,
        num_items_fn: Callable | None = None,
        num_tokens_fn: Callable | None = None,
        eval_fn: Callable | None = None,
        metrics_fn: Callable | None = None,
        tokenizer: Any = None,
        config: dict | None = None,
        accelerator: Accelerator | None = None,
        export: bool = True,
        progress: bool = True,
        peak_tflops: float | None = None,
    ):
        self.output_dir = output_dir
        self.accelerator = accelerator or make_accelerator(
            output_dir, gradient_accumulation_steps, mixed_precision, report_to, seed
        )
        acc = self.accelerator
        self.gradient_accumulation_steps = acc.gradient_accumulation_steps
        self.report_to = report_to
        self.loss_fn = loss_fn or default_loss_fn
        self.num_items_fn = num_items_fn or default_num_items
        self.num_tokens_fn = num_tokens_fn or default_num_tokens
        self.eval_fn = eval_fn
        self.metrics_fn = metrics_fn
        self.tokenizer = tokenizer
        self.config = config or {}
        self.max_grad_norm = max_grad_norm
        self.eval_steps = eval_steps
        self.logging_steps = logging_steps
        self.checkpointing_steps = checkpointing_steps
        self.save_total_limit = save_total_limit
        self.resume_from_checkpoint = resume_from_checkpoint
        self.checkpointing_minutes = checkpointing_minutes
        self.max_nonfinite_steps = max_nonfinite_steps
        self.seed = seed
        # The best model: tracked when a metric is named (load_best and early stopping default
        # to eval_loss, as in TrainingArguments).
        if (load_best_model_at_end or early_stopping_patience) and not metric_for_best_model:
            metric_for_best_model = "eval_loss"
        self.metric_for_best_model, self.greater_is_better = ckpt.resolve_metric(metric_for_best_model, greater_is_better)
        self.load_best_model_at_end = load_best_model_at_end
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = early_stopping_threshold
        if self.metric_for_best_model and eval_loader is None:
            raise UsageError(f"metric_for_best_model={self.metric_for_best_model} (or load_best_model_at_end / "
                             "early_stopping_patience) needs evaluation data: do_eval=true and a validation set")
        self.export_model = export
        self.progress = progress

        # FLOPs per token are counted on the unwrapped model, before FSDP/DeepSpeed shard it.
        self.meter = throughput.Meter(model, peak_tflops, acc.device)
        self._log_seq_len = 0

        # prepare: wrap for DDP/FSDP/DeepSpeed, move to device, shard the dataloaders.
        if eval_loader is not None:
            model, optimizer, train_loader, eval_loader = acc.prepare(model, optimizer, train_loader, eval_loader)
        else:
            model, optimizer, train_loader = acc.prepare(model, optimizer, train_loader)
        self.model, self.optimizer, self.train_loader, self.eval_loader = model, optimizer, train_loader, eval_loader
        self.predict_loader = predict_loader  # prepared when predict() runs
        if eval_loader is not None:  # evaluating must not move the RNG that training draws from
            ckpt.seed_loader(eval_loader, seed, 0)

        # Optimizer steps per epoch count the last, shorter accumulation window too.
        try:
            self.steps_per_epoch = math.ceil(len(train_loader) / self.gradient_accumulation_steps)
        except TypeError:  # an IterableDataset has no length
            self.steps_per_epoch = None
        if max_train_steps is None:
            if self.steps_per_epoch is None:
                raise ValueError("max_train_steps is required when the train loader has no length")
            max_train_steps = max(1, math.ceil(num_train_epochs * self.steps_per_epoch))
        self.max_train_steps = max_train_steps

        # A scheduler may come as a factory of (optimizer, total optimizer steps): the total
        # is only known now, after the dataloader was sharded across processes.
        if callable(scheduler) and not hasattr(scheduler, "step"):
            scheduler = scheduler(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, max_train_steps)
        self.scheduler = acc.prepare(scheduler) if scheduler is not None else None

        # Counters: everything needed to continue exactly where a checkpoint left off.
        self.state = ckpt.LoopState()
        self.results: dict[str, float] = {}
        # Why training stops before max_train_steps ("preempted", "early stopping"), and the
        # step-boundary requests that lead to a checkpoint.
        self._stop: str | None = None
        self._signals: preemption.StopSignal | None = None
        self._last_checkpoint_time = time.monotonic()
        self._timed_checkpoint_due = self._best_needs_checkpoint = False
        self._data_rng = ckpt.DataRNG(seed, acc.process_index)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        acc, state = self.accelerator, self.state
        if self.resume_from_checkpoint:
            self.load_checkpoint(self.resume_from_checkpoint)
        if self.report_to != "none":
            acc.init_trackers("notrainer", config=_scalars(self.config))
        acc.print(f"training on {acc.num_processes} process(es) ({acc.distributed_type.value}): "
                  f"{self.max_train_steps} optimizer steps of {self.gradient_accumulation_steps} micro-batch(es)")

        self._bar = bar = tqdm(total=self.max_train_steps, initial=state.global_step, desc="train",
                               disable=not (self.progress and acc.is_local_main_process), dynamic_ncols=True)
        self.model.train()
        start, start_step, start_tokens = time.perf_counter(), state.global_step, state.tokens_seen
        self._log_reset()
        # SIGTERM, SIGINT and SIGUSR1 only raise a flag: the loop checkpoints at the next step
        # boundary and exits with preemption.EXIT_PREEMPTED (see docs/checkpointing.md).
        self._signals = preemption.StopSignal().install()
        self._last_checkpoint_time = time.monotonic()

        while state.global_step < self.max_train_steps and not self._stop:
            # The sampler is seeded by (seed, epoch); on resume, skip the batches this epoch
            # already consumed (without drawing from any RNG) and continue from there. The
            # loader's worker seed comes from its own generator, not from dropout's RNG.
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(state.epoch)
            ckpt.seed_loader(self.train_loader, self.seed, state.epoch)
            loader = self.train_loader
            if state.step_in_epoch:
                loader = acc.skip_first_batches(self.train_loader, state.step_in_epoch)
            # Collators draw (e.g. MLM masks) from a CPU RNG stream of their own, saved in checkpoints.
            batches = self._data_rng.iterate(iter(loader))

            while state.global_step < self.max_train_steps:
                window = _take(batches, self.gradient_accumulation_steps)
                if not window:
                    break
                self.train_step(window)
                state.step_in_epoch += len(window)
                state.global_step += 1
                bar.update(1)

                if state.global_step % self.logging_steps == 0:
                    bar.set_postfix(self._log_flush(), refresh=False)
                if self.eval_steps and state.global_step % self.eval_steps == 0:
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
            if self.eval_loader is not None and not self.eval_steps:
                self.evaluate()
            if self._checkpoint_due(epoch_end=True):
                self.save_checkpoint()

        if self._stop == "preempted":
            # Checkpoint (a no-op when this step was just saved) and exit for a requeue.
            path = self.save_checkpoint()
            bar.close()
            acc.end_training()
            self._signals.restore()
            raise preemption.Preempted(f"stopped by {self._signals.received} at step {state.global_step}; "
                                       f"checkpoint {path}; resume_from_checkpoint=auto continues")
        self._signals.restore()
        if self._log_steps:
            bar.set_postfix(self._log_flush(), refresh=False)
        bar.close()

        runtime = time.perf_counter() - start
        self.results.update(
            train_loss=state.train_loss_sum / max(state.global_step - state.skipped_steps, 1),
            train_runtime=round(runtime, 3),
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
        if self.load_best_model_at_end and ckpt.restore_best(self):
            self.evaluate()
        if self.export_model:
            self.export()
        self.write_results()
        acc.end_training()
        return self.results

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
            rows, self._log_seq_len = throughput.batch_shape(batch)  # shapes only: no device sync
            self._log_samples += rows
            del loss, weighted  # keep nothing of this micro-batch alive into the next one

        grad_norm = None
        if self.max_grad_norm and self.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(model.parameters(), self.max_grad_norm)
        # Decisions all ranks take together (one small all-reduce): a non-finite loss or
        # gradient norm skips this optimizer step; a stop signal or a due timed checkpoint is
        # acted on at this step's boundary.
        flags = guards.step_flags(self, step_loss, grad_norm)
        self._timed_checkpoint_due = flags.checkpoint_due
        if flags.stop_signal:
            self._stop = "preempted"
        if not flags.nonfinite:
            self.state.nonfinite_in_a_row = 0
        elif guards.skip_nonfinite_step(self):  # counts it; raises after max_nonfinite_steps in a row
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
        model.eval()
        outputs = self._gather_outputs(self.eval_loader, self._eval_step)
        loss_sum = float(sum(x.astype("float64").sum() for x in outputs.pop("loss", [])))
        item_sum = float(sum(x.astype("float64").sum() for x in outputs.pop("num_items", [])))
        metrics: dict[str, float] = {}
        if item_sum > 0:
            metrics["eval_loss"] = loss_sum / item_sum
        if self.metrics_fn is not None:
            extra = self.metrics_fn(dict(outputs), metrics.get("eval_loss"))
            metrics.update({k if k.startswith("eval_") else f"eval_{k}": _plain(v) for k, v in extra.items()})
        model.train()
        self.state.last_eval_step = self.state.global_step
        self.results.update(metrics)
        if self.metric_for_best_model:
            self._track_best(metrics)
        if self.report_to != "none":
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
        if self.max_grad_norm:
            logs["grad_norm"] = grad_norm_sum / acc.num_processes / steps
        if self.report_to != "none":
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
        self._last_checkpoint_time = time.monotonic()
        self._timed_checkpoint_due = self._best_needs_checkpoint = False
        return ckpt.save(self)

    def _checkpoint_due(self, epoch_end: bool = False) -> bool:
        if self.state.nonfinite_in_a_row:
            return False  # keep the last good checkpoint the newest while steps are being skipped
        every = self.checkpointing_steps
        if epoch_end:
            on_schedule = every == "epoch"
        else:
            on_schedule = every not in (None, "epoch") and self.state.global_step % int(every) == 0
        return on_schedule or self._timed_checkpoint_due or self._best_needs_checkpoint

    def _track_best(self, metrics: dict) -> None:
        improved = ckpt.update_best(self, metrics)
        # A new best is checkpointed at once (when checkpoints are on at all), so retention can
        # keep it and load_best_model_at_end can export it.
        checkpoints_on = self.checkpointing_steps or self.checkpointing_minutes or self.load_best_model_at_end
        self._best_needs_checkpoint = bool(improved and checkpoints_on)
        patience = self.early_stopping_patience
        if patience and self.state.evals_without_improvement >= patience:
            self._stop = self._stop or "early stopping"
            self.accelerator.print(f"early stopping: {self.metric_for_best_model} did not improve in {patience} "
                                   f"evaluations (best {self.state.best_metric:.6g} at step {self.state.best_step})")

    def load_checkpoint(self, path_or_auto: str) -> None:
        ckpt.load(self, path_or_auto)

    def export(self) -> None:
        """Write the final model in Hugging Face format at the top of output_dir."""
        ckpt.export_model(self)

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
