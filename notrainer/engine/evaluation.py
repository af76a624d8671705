"""The evaluation pass (and prediction) of the loop.

`evaluate(loop)` is `Loop.evaluate`: it runs the loop's eval_loader through `eval_fn` (default:
the loss spread over each batch's examples), gathers per-example outputs from every rank with
`gather_for_metrics` (so an uneven last batch counts once), computes the metrics and returns
them. It changes no training state: `record(loop, metrics)` is what the loop does with them.
`should_stop()`, asked before each batch, abandons the pass with `EvaluationAbandoned` (a stop
signal during a long evaluation: the run checkpoints and exits within seconds).
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from typing import Callable, Iterable

import torch

from notrainer.engine import events as loop_events
from notrainer.engine.batch import default_num_items, split_loss
from notrainer.observability import history


class EvaluationAbandoned(Exception):
    """A stop signal arrived during an evaluation inside training: it is rerun after the resume."""


@torch.no_grad()
def evaluate(loop, should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Evaluate on eval_loader and return the metrics; every example counts exactly once
    under any number of ranks. Changes no training state (the caller records the result).
    `should_stop()`, asked before each batch, abandons the pass (EvaluationAbandoned)."""
    if loop.eval_loader is None:
        return {}
    started = time.perf_counter()
    loop.model.eval()
    try:
        outputs = gather_outputs(loop, loop.eval_loader, functools.partial(eval_step, loop), should_stop)
        # Examples evaluated (each once, over all ranks): the rows of any gathered output.
        rows = sum(len(x) for x in next(iter(outputs.values()), []))
        loss_sum = float(sum(x.astype("float64").sum() for x in outputs.pop("loss", [])))
        item_sum = float(sum(x.astype("float64").sum() for x in outputs.pop("num_items", [])))
        metrics: dict[str, float] = {"eval_loss": loss_sum / item_sum} if item_sum > 0 else {}
        if loop.metrics_fn is not None:
            extra = loop.metrics_fn(dict(outputs), metrics.get("eval_loss"))
            metrics.update({k if k.startswith("eval_") else f"eval_{k}": _plain(v) for k, v in extra.items()})
    finally:
        loop.model.train()
    metrics.setdefault("eval_samples", rows)  # a task's own count (e.g. examples, not windows) wins
    metrics["eval_runtime"] = round(time.perf_counter() - started, 3)
    loop.accelerator.print(f"step {loop.state.global_step}: " + ", ".join(
        f"{k}={_fmt(v)}" for k, v in metrics.items() if isinstance(v, (int, float))))
    return metrics

@torch.no_grad()
def predict(loop, loader: Iterable | None = None, predict_fn: Callable | None = None) -> dict[str, list]:
    """Run `predict_fn(model, batch)` (default: eval_fn) over a loader not yet prepared
    (default: predict_loader); returns its per-example outputs gathered from every rank, in
    dataset order, as lists of per-batch numpy arrays (2-D ones padded with -100)."""
    loader = loop.accelerator.prepare(loader if loader is not None else loop.predict_loader)
    loop.model.eval()
    outputs = gather_outputs(loop, loader, predict_fn or functools.partial(eval_step, loop))
    loop.model.train()
    return outputs

def gather_outputs(loop, loader: Iterable, step_fn: Callable, should_stop=None) -> dict[str, list]:
    acc = loop.accelerator
    outputs: dict[str, list] = defaultdict(list)
    for batch in loader:
        if should_stop is not None and should_stop():
            raise EvaluationAbandoned
        out = step_fn(loop.model, batch)
        # Sequences can have another length on each rank: pad before gathering. Gather per
        # example (not a reduced scalar) so the duplicated tail of an uneven last batch is
        # dropped by gather_for_metrics.
        out = {k: acc.pad_across_processes(v, dim=1, pad_index=-100) if v.ndim > 1 else v for k, v in out.items()}
        for k, v in acc.gather_for_metrics(out).items():
            outputs[k].append(v.cpu().numpy())
    return dict(outputs)

def eval_step(loop, model, batch) -> dict[str, torch.Tensor]:
    # A task's eval_fn may return None to mean "loss only". Without a per-example eval_fn,
    # the batch's loss is spread over its examples so that the gathered rows can still be
    # de-duplicated.
    out = loop.eval_fn(model, batch) if loop.eval_fn else None
    if out is not None:
        return out
    loss = split_loss(loop.loss_fn(model, batch))[0].float()
    n = torch.as_tensor(loop.num_items_fn(batch), device=loss.device, dtype=torch.float32)
    rows = int(default_num_items(batch))
    return {"loss": (loss * n / rows).expand(rows).contiguous(), "num_items": (n / rows).expand(rows).contiguous()}


def evaluate_in_training(loop) -> None:
    """Evaluate, abandoning the pass when a stop signal arrives (all ranks agree at each
    batch): the checkpoint then marks it pending, and the resumed run evaluates first."""
    try:
        metrics = evaluate(loop, should_stop=functools.partial(signal_seen, loop))
    except EvaluationAbandoned:
        loop.state.eval_pending, loop.stop_reason = True, "preempted"
        loop.accelerator.print(f"step {loop.state.global_step}: evaluation abandoned for {loop.signals.received}; "
                               "the resumed run evaluates this step first")
        return
    loop.state.eval_pending = False
    record(loop, metrics)


def signal_seen(loop) -> bool:
    seen = loop.signals is not None and loop.signals.received is not None
    acc = loop.accelerator
    if acc.num_processes == 1:
        return seen
    return acc.reduce(torch.tensor(float(seen), device=acc.device), reduction="sum").item() > 0


def record(loop, metrics: dict) -> None:
    """What an evaluation inside a run changes: the rates leave it out, the results, the best
    model and the stop decision, the history and the trackers, the events."""
    state = loop.state
    loop.eval_seconds += metrics["eval_runtime"]
    loop.window.exclude(metrics["eval_runtime"])
    state.last_eval_step = state.global_step
    loop.results.update(metrics)
    if loop.metric_for_best_model:
        loop.track_best(metrics)
    if loop.write_history:
        best = state.best_metric if loop.metric_for_best_model else None
        history.append(loop.output_dir, history.eval_record(state.global_step, loop.epoch_float(),
                                                            metrics, best_metric=best))
    if loop.accelerator.trackers:
        loop.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                             step=state.global_step)
    loop_events.emit(loop.events, "on_evaluate", loop, metrics)


def _plain(v):
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    return v


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
