"""The batches of training, as the loop consumes them: windows of micro-batches, epoch after epoch.

`Batches(...)` is iterated once per run. Each item is either a window (a list of
`gradient_accumulation_steps` micro-batches, shorter at the end of an epoch: one optimizer step)
or `EPOCH_END`. It does what starting an epoch takes: the sampler is seeded by (seed, epoch), a
resumed epoch skips the micro-batches it already consumed (without drawing from any RNG), and
collators draw from the run's own data RNG stream (`RunState.data_rng`). A stateful loader
(streaming) keeps its own position: no seeding, no skipping.

The loop advances `state.step_in_epoch` and `state.epoch`; this object reads them when an epoch
starts, so the generator must be advanced by the loop alone.
"""

from __future__ import annotations

from notrainer.engine import checkpoint as ckpt

#: the item that marks the end of an epoch (after its last window)
EPOCH_END = "epoch end"


class Batches:
    def __init__(self, loader, acc, state, accumulation: int, *, seed, stateful: bool, to_device):
        self.loader, self.acc, self.state, self.accumulation = loader, acc, state, accumulation
        self.seed, self.stateful, self.to_device = seed, stateful, to_device

    def __iter__(self):
        empty_in_a_row = 0
        while empty_in_a_row < 2:  # an empty loader ends the run instead of spinning
            batches = self.state.data_rng.iterate(iter(self._epoch_loader()))
            n = 0
            while window := _take(batches, self.accumulation):
                n += 1
                yield window
            empty_in_a_row = 0 if n else empty_in_a_row + 1
            yield EPOCH_END

    @property
    def epoch_complete(self) -> bool:
        """Every micro-batch of this epoch was consumed (known for loaders with a length)."""
        try:
            return not self.stateful and self.state.step_in_epoch >= len(self.loader) > 0
        except TypeError:
            return False

    def _epoch_loader(self):
        if self.stateful:  # its position is its own (restored by the loop on resume)
            return map(self.to_device, self.loader)
        # The loader's worker seed comes from its own generator, not from dropout's RNG.
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.state.epoch)
        ckpt.seed_loader(self.loader, self.seed, self.state.epoch)
        if self.state.step_in_epoch:
            return self.acc.skip_first_batches(self.loader, self.state.step_in_epoch)
        return self.loader


def _take(iterator, n: int) -> list:
    out = []
    for batch in iterator:
        out.append(batch)
        if len(out) == n:
            break
    return out
