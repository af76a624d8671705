"""The logging window: what the loop sums between two log lines, and the line it logs.

The sums stay on the device (no host sync per step); `flush` reduces them over ranks with one
all-reduce, turns them into the logged record (train loss, learning rate, grad norm, tokens/s,
samples/s, MFU, peak memory, epoch) and starts a new window. Time spent evaluating inside the
window is left out of its rates (`exclude`).
"""

from __future__ import annotations

import time

import torch

from notrainer.engine.batch import batch_shape


def on_device(x, device, dtype) -> torch.Tensor:
    """A count as a device scalar. A Python number is filled in on the device: torch.as_tensor
    would copy it from the host, which on CUDA waits for all queued work (a sync per step)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.full((), x, device=device, dtype=dtype)


class LoggingWindow:
    """Running sums of the optimizer steps since the last log line."""

    def __init__(self, device):
        self.device = device
        self.seq_len = 0
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)
        self.extras: dict[str, torch.Tensor] = {}  # a loss_fn's extra scalars (engine/batch.py: split_loss)
        self.tokens = torch.zeros((), device=self.device, dtype=torch.float64)
        self.samples = 0
        self.steps = 0
        self.started = time.perf_counter()

    def add_micro_batch(self, batch, num_tokens) -> None:
        self.tokens += on_device(num_tokens, self.device, torch.float64)
        rows, self.seq_len = batch_shape(batch)  # shapes only: no device sync
        self.samples += rows

    def add_step(self, step_loss: torch.Tensor, grad_norm, extras: dict | None = None) -> None:
        self.loss += step_loss
        for name, value in (extras or {}).items():
            self.extras[name] = self.extras.get(name, 0.0) + value
        if grad_norm is not None:
            self.grad_norm += torch.as_tensor(grad_norm, device=self.device, dtype=torch.float32)
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation) out of this window's rates."""
        self.started += seconds

    def flush(self, acc, state, *, learning_rate: float, epoch: float, meter, clipping: bool) -> dict:
        """Reduce over ranks, add the window to the run's counters, return the record, reset."""
        steps = max(self.steps, 1)
        # One all-reduce and one host sync for everything. Each rank's step loss is its share of
        # the window's loss; the sum over ranks / ranks is the loss of the whole window.
        # The extras are summed like the loss (every rank logs the same names, in sorted order).
        names = sorted(self.extras)
        sums = torch.stack([self.loss.double(), self.grad_norm.double(), self.tokens.double(),
                            torch.full((), float(self.samples), device=self.device, dtype=torch.float64),
                            *(torch.as_tensor(self.extras[n], device=self.device).double() for n in names)])
        loss_sum, grad_norm_sum, tokens, samples, *extra_sums = acc.reduce(sums, reduction="sum").tolist()
        loss = loss_sum / acc.num_processes / steps
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        state.tokens_seen += int(tokens)
        state.train_loss_sum += loss * self.steps
        logs = {"train_loss": loss, "learning_rate": learning_rate, "tokens_per_second": tokens / elapsed,
                "epoch": epoch}
        # samples_per_second, mfu (when the GPU's peak is known), peak_memory_gib (CUDA)
        logs.update(meter.report(tokens, samples, elapsed, self.seq_len, acc.num_processes))
        logs.update({n: v / acc.num_processes / steps for n, v in zip(names, extra_sums)})
        if clipping:
            logs["grad_norm"] = grad_norm_sum / acc.num_processes / steps
        self.reset()
        return logs


def postfix(logs: dict) -> dict[str, str]:
    """The progress bar's postfix for a logged record."""
    out = {"loss": f"{logs['train_loss']:.4f}", "tok/s": f"{logs['tokens_per_second']:,.0f}"}
    if "mfu" in logs:
        out["mfu"] = f"{logs['mfu']:.1%}"
    if "peak_memory_gib" in logs:
        out["mem"] = f"{logs['peak_memory_gib']:.1f}G"
    return out


def training_results(loop, runtime: float, start_step: int, start_tokens: int) -> dict:
    # Rates are over training time: the evaluations run inside training are timed apart
    # (train_eval_runtime), as they would otherwise read as 15-20% less throughput.
    state, results = loop.state, {}
    results.update(
        train_loss=state.train_loss_sum / max(state.global_step - state.skipped_steps, 1),
        train_runtime=round(runtime, 3),
        train_eval_runtime=round(loop.eval_seconds, 3),
        train_steps_per_second=round((state.global_step - start_step) / max(runtime, 1e-9), 3),
        train_tokens_per_second=round((state.tokens_seen - start_tokens) / max(runtime, 1e-9), 1),
        global_step=state.global_step,
        epoch=round(loop.epoch_float(), 4),
    )
    # train_samples_per_second, train_mfu (when the peak is known), train_peak_memory_gib (CUDA)
    results.update(loop.meter.summary(runtime, results["train_tokens_per_second"],
                                           loop.accelerator.num_processes))
    results.update(loop.loader_counters())
    return results
