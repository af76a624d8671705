"""The process layout as the launcher set it, and the end of a launched process.

`is_rank0()` answers before accelerate exists (usage errors raised while parsing arguments must
be printed once, not once per rank). `teardown()` is the last thing the CLI does on every exit
path: a process group left for the interpreter to destroy at exit can hang a finished rank
(gloo's destructor joins a worker thread that waits for the GIL), so it is destroyed here, after
every object that holds it (the DDP-wrapped model, the optimizer) is gone.
"""

from __future__ import annotations

import gc
import os


def is_rank0() -> bool:
    """True on the global main process (RANK, else LOCAL_RANK, else a single process)."""
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    return rank.strip() == "0"


def teardown(all_ranks_done: bool) -> None:
    """Finish outstanding collectives (only when every rank got here the same way), free what
    holds the process group, then destroy it."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if not (dist.is_available() and dist.is_initialized()):
        return
    if all_ranks_done:
        dist.barrier()
        # A second barrier: gloo's worker drops the first barrier's work (and the tensors of the
        # collectives before it, whose release may need the GIL) before it can queue this one,
        # whose own work holds no Python tensor. After it, nothing in the worker needs the GIL,
        # so the destructor's join cannot deadlock.
        dist.barrier()
    # The wrapped model / engine / optimizer hold the group: freed before it is destroyed (the
    # caller has dropped its references; reference cycles go here), so the destructor runs now
    # with idle workers, not at interpreter exit.
    gc.collect()
    dist.destroy_process_group()
