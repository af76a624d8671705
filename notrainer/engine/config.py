"""The loop's own settings (`LoopConfig`) and the `key()` field helper every config uses.

`Loop` takes one `LoopConfig` (or keyword arguments named as its fields). The CLI's
`TrainConfig` (notrainer/config/keys.py) extends it, so its flat keys are these same fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from notrainer.errors import check


def key(default: Any, help: str, group: str = "") -> Any:  # noqa: A002 - mirrors argparse
    """A config field with its one-line doc (shown by `--help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, "group": group})
    return field(default=default, metadata={"help": help, "group": group})


class Freezable:
    """A config that can be frozen once a run is planned: assigning to a field afterwards raises
    `dataclasses.FrozenInstanceError` (nested config groups are frozen with it)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(
                f"cannot assign to {name}: the config is frozen once the run is planned (notrainer.cli.run.plan); "
                "make a changed copy with dataclasses.replace(cfg, ...) instead")
        object.__setattr__(self, name, value)

    def freeze(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Freezable):
                value.freeze()
        object.__setattr__(self, "_frozen", True)
        return self

    @property
    def frozen(self) -> bool:
        return bool(self.__dict__.get("_frozen"))


@dataclass
class LoopConfig(Freezable):
    """The loop's own settings, handed to `Loop` whole (or given to it as keyword arguments).

    `TrainConfig` extends this class, so the CLI's flat keys (`max_train_steps=...`) are the
    same fields; a task's config reaches the loop without a copy of each key."""

    output_dir: Optional[str] = key("runs/loop", "run directory", "run")
    seed: Optional[int] = key(None, "seed for model init, data order, dropout", "run")
    data_seed: Optional[int] = key(None, "seed for the data order (the sampler) alone; default: seed", "run")
    num_train_epochs: float = key(1.0, "epochs (ignored when max_train_steps is set)", "optim")
    max_train_steps: Optional[int] = key(None, "optimizer steps in total (overrides num_train_epochs)", "optim")
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step", "optim")
    max_grad_norm: float = key(1.0, "clip the gradient norm to this; 0 disables clipping", "optim")
    # Unset: accelerate's (the launch file or `accelerate config`), else no; the CLI writes the
    # effective value back (run.build), so tasks and config.yaml see what actually runs.
    mixed_precision: Optional[str] = key(None, "no, fp16 or bf16 (default: the launch file's, else no)", "speed")
    torch_compile: bool = key(False, "compile the model with torch.compile", "speed")
    torch_compile_mode: Optional[str] = key(None, "torch.compile mode (default, reduce-overhead, max-autotune)", "speed")
    peak_tflops: Optional[float] = key(None, "the accelerator's peak TFLOP/s for the logged MFU (default: from a table of "
                                             "common GPUs by name, bf16 dense; see docs/performance.md)", "speed")
    eval_steps: Optional[int] = key(None, "evaluate every N optimizer steps (default: once per epoch)", "loop")
    checkpointing_steps: Optional[str] = key(None, "checkpoint every N optimizer steps, or 'epoch'", "loop")
    resume_from_checkpoint: Optional[str] = key(None, "'auto' (newest complete checkpoint in output_dir) or a checkpoint folder", "loop")
    save_total_limit: Optional[int] = key(None, "keep only the newest N checkpoints (and always the best one)", "loop")
    checkpointing_minutes: Optional[float] = key(None, "also checkpoint when this many minutes passed since the last checkpoint", "loop")
    metric_for_best_model: Optional[str] = key(None, "eval metric that picks the best checkpoint, e.g. eval_loss or eval_accuracy", "loop")
    greater_is_better: Optional[bool] = key(None, "whether a higher metric_for_best_model is better (default: false for losses, else true)", "loop")
    load_best_model_at_end: bool = key(False, "export the best checkpoint's weights as the final model (metric default: eval_loss)", "loop")
    early_stopping_patience: Optional[int] = key(None, "stop after this many evaluations without improving metric_for_best_model", "loop")
    early_stopping_threshold: float = key(0.0, "how much metric_for_best_model must improve to count as better", "loop")
    max_nonfinite_steps: int = key(10, "skip optimizer steps with a NaN/inf loss or gradient norm; stop after this many in a row (0: no check)", "loop")
    logging_steps: int = key(10, "log train loss, lr, grad norm, tokens/s every N optimizer steps", "loop")
    report_to: str = key("none", "trackers, comma-separated: any accelerate supports (tensorboard, wandb, mlflow, "
                                 "comet_ml, aim, clearml, dvclive, swanlab, trackio), all or none", "loop")
    progress: bool = key(True, "show the progress bar (on the local main process)", "loop")

    def validate(self) -> None:
        """Checks of the loop's settings; raise UsageError."""
        check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
        check(self.max_train_steps is None or self.max_train_steps >= 1, "max_train_steps must be >= 1")
        check(self.num_train_epochs > 0, "num_train_epochs must be > 0")
        check(self.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0 disables clipping)")
        check(self.logging_steps >= 1, "logging_steps must be >= 1")
        check(self.peak_tflops is None or self.peak_tflops > 0, f"peak_tflops must be > 0, got {self.peak_tflops}")
        check(self.eval_steps is None or self.eval_steps >= 1, "eval_steps must be >= 1")
        check(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit must be >= 1")
        check(self.checkpointing_minutes is None or self.checkpointing_minutes > 0, "checkpointing_minutes must be > 0")
        check(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
              "early_stopping_patience must be >= 1")
        check(self.early_stopping_threshold >= 0, "early_stopping_threshold must be >= 0")
        check(self.max_nonfinite_steps >= 0, "max_nonfinite_steps must be >= 0 (0 turns the check off)")
        check(self.mixed_precision in (None, "no", "fp16", "bf16"),
              f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        from notrainer.observability.trackers import resolve_report_to

        resolve_report_to(self.report_to)  # unknown name or package not installed: one line, now
        if self.checkpointing_steps is not None:
            c = str(self.checkpointing_steps)
            check(c == "epoch" or (c.isdigit() and int(c) > 0),
                  f"checkpointing_steps must be a positive number of steps or 'epoch', got {c!r}")
