"""The loop's events: the one way run-level features attach to a `Loop`.

    Loop(model, optimizer, loader, ..., events=[obj, ...])

An event object has any of these methods (the others are simply not called); each gets the
loop first, and runs on every rank (check `loop.accelerator.is_main_process` for work that
only one process does):

    on_step_end(loop)                 after each optimizer step (loop.state.global_step counts it)
    on_evaluate(loop, metrics)        after each evaluation during or after training
    on_checkpoint_saved(loop, path)   after each complete checkpoint (every rank has written it)
    on_train_end(loop, results)       after a finished run: model exported, all_results.json written

An event may ask the loop to stop at the next step boundary with `loop.request_stop(reason)`.
Return values are ignored. The CLI attaches the Hub upload of checkpoints and the run's
outputs (model card, report, final push) this way (notrainer/cli/run.py).
"""

from __future__ import annotations

NAMES = ("on_step_end", "on_evaluate", "on_checkpoint_saved", "on_train_end")


def check(events) -> list:
    """The event objects as a list; each must have at least one of NAMES."""
    events = list(events or [])
    for obj in events:
        if not any(callable(getattr(obj, name, None)) for name in NAMES):
            raise TypeError(f"Loop event {obj!r} has none of the methods {', '.join(NAMES)}")
    return events


def emit(events: list, name: str, loop, *args) -> None:
    for obj in events:
        method = getattr(obj, name, None)
        if method is not None:
            method(loop, *args)
