"""What a run shows and leaves behind.

`history.py` (the log history), `report.py` (plots and report.html), `trackers.py` (accelerate
trackers by name), `model_card.py` (README.md of the export), `hub.py` (Hub upload),
`throughput.py` (tokens/s, FLOPs and MFU).

May import: `notrainer.errors`, `notrainer.compat`. Never imports the engine, a task or the CLI.
"""
