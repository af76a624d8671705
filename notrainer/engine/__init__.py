"""The engine: the training loop and what it owns.

`loop.py` (the `Loop`; its helpers `accelerator.py` make_accelerator, `prepare.py`,
`batches.py`, `step.py`, `logging_window.py`, `evaluation.py`, `events.py`), `config.py` (`LoopConfig`), `state.py` (the counters a checkpoint
saves), `checkpoint.py` (atomic save, load, retention, export), `elastic.py` (resume on another
process count), `guards.py` (non-finite steps, divergence), `preemption.py` (SIGTERM/SIGUSR1),
`processes.py` (rank helpers, teardown), `batch.py` (batches as mappings).

May import: `notrainer.errors`, `notrainer.compat`, `notrainer.observability`. Never imports
a task, the CLI, the data pipeline or the model side: it trains any `nn.Module`.
"""
