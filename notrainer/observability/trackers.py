"""`report_to`: which experiment trackers the run logs to, checked before training.

Any tracker accelerate supports is accepted (`accelerate.utils.LoggerType`: tensorboard, wandb,
mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio), plus `all` (every one installed),
`none`, and comma-separated lists (`report_to=tensorboard,mlflow`). The result goes to
`Accelerator(log_with=...)` as a list, or `None` for no tracker.

A name accelerate does not know fails with a did-you-mean; a known tracker whose package is
missing fails with the pip command, both as one line before anything heavy runs (accelerate
itself would only fail later, inside `Accelerator(...)`, with a longer message).
"""

from __future__ import annotations

import difflib
import os
from typing import Iterable, Optional, Union

from notrainer.errors import UsageError

# tracker name -> (accelerate's availability check, the PyPI package that provides it)
_PIP_NAME = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}

# Spellings people use for the same trackers (Trainer docs, the trackers' own names).
_ALIASES = {"comet": "comet_ml", "comet-ml": "comet_ml", "tb": "tensorboard", "tensorboardx": "tensorboard"}


def supported_trackers() -> list[str]:
    """Tracker names accelerate supports, in accelerate's order (without `all`)."""
    from accelerate.utils import LoggerType

    return [t.value for t in LoggerType if t.value != "all"]


def is_installed(name: str) -> bool:
    import accelerate.utils as au

    check = getattr(au, f"is_{name}_available", None)
    return bool(check and check())


def installed_trackers() -> list[str]:
    return [t for t in supported_trackers() if is_installed(t)]


def _split(value: Union[str, Iterable[str], None]) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        parts = value.split(",")
    else:
        parts = [p for v in value for p in str(v).split(",")]
    return [p.strip().lower() for p in parts if p.strip()]


def resolve_report_to(value: Union[str, Iterable[str], None]) -> Optional[list[str]]:
    """The trackers to pass as `Accelerator(log_with=...)`; None means no tracker.

    Raises UsageError (one line) for an unknown name or a tracker whose package is missing.
    """
    names = _split(value)
    if not names or names == ["none"]:
        return None
    known = supported_trackers()
    choices = known + ["all", "none"]
    out: list[str] = []
    for raw in names:
        name = _ALIASES.get(raw, raw)
        if name == "none":
            raise UsageError(f"report_to={value!r}: 'none' cannot be combined with other trackers")
        if name == "all":
            # Like the Trainer and accelerate: every supported tracker that is installed.
            out.extend(t for t in installed_trackers() if t not in out)
            continue
        if name not in known:
            close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UsageError(f"report_to: unknown tracker {raw!r}{hint} (choose from {', '.join(choices)}, "
                             "or a comma-separated list)")
        if not is_installed(name):
            raise UsageError(f"report_to={name} needs the {name} package: pip install {_PIP_NAME.get(name, name)}")
        if name not in out:
            out.append(name)
    return out or None


def default_tracker_env(trackers: Optional[list[str]], output_dir: str) -> dict[str, str]:
    """Environment defaults that keep a tracker's data inside the run directory.

    MLflow: without `MLFLOW_TRACKING_URI` it would write `mlflow.db` / `mlruns/` in the current
    folder; we point it at `output_dir/logs/mlflow.db` (a local SQLite store, which MLflow 3
    prefers to its file store). A URI the user set is kept. The caller applies the result to
    `os.environ` on every process before `Accelerator(log_with=...)`.
    """
    env: dict[str, str] = {}
    if trackers and "mlflow" in trackers and not os.environ.get("MLFLOW_TRACKING_URI"):
        logs = os.path.abspath(os.path.join(output_dir, "logs"))
        os.makedirs(logs, exist_ok=True)
        # sqlite:/// + an absolute path (which starts with "/") = SQLAlchemy's absolute form.
        env["MLFLOW_TRACKING_URI"] = "sqlite:///" + os.path.join(logs, "mlflow.db")
    return env
