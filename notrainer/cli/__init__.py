"""The command line: plan a run once, then build and run it.

`main.py` (the `notrainer` command: sub-commands, else a run), `run.py` (the task registry,
`parse_args`, `plan`, `build`, the export policy; `python -m notrainer.run`), `launch.py`
(`notrainer launch`), `verify_resume.py` (`notrainer verify-resume`), `predict.py` (predictions
files), `hf_scripts.py` (the Hugging Face example scripts' arguments). The config itself
(`TrainConfig`, parsing, aliases, `--help`) is `notrainer/config/`.

The top layer: it may import everything below it (engine, data, modeling, observability,
metrics, tasks); nothing imports it.
"""
