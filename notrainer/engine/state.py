"""The run's state: one object that `Loop` owns and hands to checkpointing and the guards.

    RunState   the counters saved in every checkpoint (loop_state.json), the data pipeline's
               RNG stream (data_rng_<rank>.safetensors) and what the run needs to know about
               its own checkpoints (the last saved state, when the last one was written)

Nothing else in notrainer keeps run state: `checkpoint.save(acc, state, ...)` writes it,
`checkpoint.load(acc, model, state, ...)` fills it in place, the guards read and count in it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import torch

#: fields written to loop_state.json are the ones without metadata {"saved": False}
_NOT_SAVED = {"saved": False}


class DataRNG:
    """The CPU RNG stream the data pipeline draws from, apart from the one the model draws from.

    A collator that draws random numbers (MLM masking) runs inside `next(iterator)`, and
    accelerate's loader collates one batch ahead: when a checkpoint is taken after batch k, the
    masks of batch k+1 are already drawn. So each `next` runs on this stream (swapped in and out
    of torch's global CPU RNG), and a checkpoint saves the stream as it was *before* the last
    `next`: the resumed run, whose first `next` collates batch k+1 again, draws the same masks.
    Worker processes (dataloader_num_workers>0) collate with their own RNGs instead."""

    FILE = "data_rng_{}.safetensors"

    def __init__(self, seed: int | None = None, rank: int = 0):
        g = torch.Generator()
        g.manual_seed(((seed or 0) * 1_000_003 + 7_919 * rank + 17) % 2**63)
        self.state = self.before_last = g.get_state()

    def iterate(self, iterator):
        while True:
            self.before_last = self.state
            model_state = torch.get_rng_state()
            torch.set_rng_state(self.state)
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.state = torch.get_rng_state()
                torch.set_rng_state(model_state)
            yield batch

    def save(self, folder: str, rank: int) -> None:
        from safetensors.torch import save_file

        save_file({"cpu": self.before_last}, os.path.join(folder, self.FILE.format(rank)))

    def load(self, folder: str, rank: int) -> None:
        from safetensors.torch import load_file

        file = os.path.join(folder, self.FILE.format(rank))
        if os.path.isfile(file):
            self.state = self.before_last = load_file(file)["cpu"]


@dataclass
class RunState:
    """Counters (saved), the data RNG stream (saved per rank) and checkpoint bookkeeping (not saved)."""

    global_step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # micro-batches consumed in the current epoch
    tokens_seen: int = 0
    train_loss_sum: float = 0.0  # sum of logged per-step train losses (for the run's mean)
    last_eval_step: int = -1
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm
    nonfinite_in_a_row: int = 0
    best_metric: float | None = None  # best value of metric_for_best_model so far
    best_step: int = -1  # the step it was measured at; its checkpoint is never deleted
    evals_without_improvement: int = 0  # for early_stopping_patience
    #: a stop signal abandoned the evaluation of this step: the resumed run evaluates it first
    eval_pending: bool = False
    #: processes, per-device batch and accumulation the counters were taken with: resuming on
    #: another process count converts step_in_epoch through it (notrainer/engine/elastic.py)
    layout: dict | None = None

    data_rng: DataRNG = field(default_factory=DataRNG, repr=False, metadata=_NOT_SAVED)
    #: a stateful train loader's position (streaming): its state_dict() at the last step boundary
    #: that was saved, or loaded from a checkpoint (loader_state_<rank>.pt, one per rank)
    loader_state: dict | None = field(default=None, repr=False, metadata=_NOT_SAVED)
    #: the counters as of the last checkpoint: saving the same state again writes nothing
    last_saved: dict | None = field(default=None, repr=False, metadata=_NOT_SAVED)
    #: time.monotonic() of the last checkpoint, for checkpointing_minutes
    last_checkpoint_time: float = field(default_factory=time.monotonic, repr=False, metadata=_NOT_SAVED)

    @classmethod
    def fresh(cls, seed: int | None, rank: int) -> "RunState":
        return cls(data_rng=DataRNG(seed, rank))

    def counters(self) -> dict:
        """What loop_state.json holds."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("saved", True)}

    def restore_counters(self, saved: dict) -> None:
        """In place: the loop holds a reference to this object."""
        names = set(self.counters())
        for k, v in saved.items():
            if k in names:
                setattr(self, k, v)


__all__ = ["DataRNG", "RunState"]
