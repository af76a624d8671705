"""notrainer: one readable training loop for Hugging Face models on Accelerate.

The package is laid out by concern (docs/architecture.md); imports only go down this list:

    cli/            plan a run once, then build and run it (top; nothing imports it)
    tasks           notrainer.tasks, the task modules (the repository's top-level tasks/ folder)
    engine/         the Loop and what it owns: state, checkpoints, elastic resume, guards, preemption
    data/  modeling/  observability/  metrics/
                    the data path, the model side, what a run shows, offline metrics
    errors, imports, compat
                    one-line usage errors, `pkg.module:Name` specs, the one seam to library internals
"""

from notrainer.engine.loop import Loop, make_accelerator
from notrainer.errors import UsageError

__all__ = ["Loop", "make_accelerator", "UsageError"]
__version__ = "0.1.0"
