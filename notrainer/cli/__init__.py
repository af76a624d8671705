"""The command line: plan a run once, then build and run it.

`run.py` (the task registry, `parse_args`, `build`, the export policy; `python -m notrainer.run`),
`config.py` (`TrainConfig`, parsing and `--help`), `aliases.py` (the Trainer's and the scripts'
key names), `launch.py` (`notrainer launch`), `predict.py` (predictions files).

The top layer: it may import everything below it (engine, data, modeling, observability,
metrics, tasks); nothing imports it.
"""
