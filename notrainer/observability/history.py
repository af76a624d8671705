"""The run's log history: `output_dir/log_history.jsonl`, one JSON object per line.

Why JSON lines and not a `trainer_state.json`-like file: the Trainer rewrites its whole
`trainer_state.json` (with `log_history` inside) at every checkpoint, so the history of a killed
run ends at its last checkpoint, and a rewrite costs O(records). Here each record is appended
the moment it exists, with one `write` + `flush` + `fsync`, so

- a run in progress (or killed with -9) has its history up to the last logging step, which is
  what `python -m notrainer.observability.report runs/x` draws;
- a kill can tear at most the last line; `read` drops a torn last line and `append` cuts it off
  before writing, so the file never holds a half record in the middle;
- `jq`, `pandas.read_json(lines=True)` and a plain `tail -f` read it as it grows.

Records (a dict each; `step` is the optimizer step, the same number the trackers get):

    {"kind": "train", "step": 20, "epoch": 0.4, "loss": 2.31, "learning_rate": 1e-4,
     "grad_norm": 0.9, "tokens_per_second": 5120.0, ...}
    {"kind": "eval", "step": 20, "epoch": 0.4, "eval_loss": 2.2, "eval_accuracy": 0.61,
     "best_metric": 0.61, ...}

Only the main process writes (the caller checks `accelerator.is_main_process`). On resume from
`step_N` the caller runs `truncate_after(output_dir, N)` before anything new is appended:
records after N were logged by the killed run and are logged again by the resumed one, so the
history has each step exactly once. A fresh run in a reused `output_dir` calls `reset`.

Values: tensors and numpy scalars become Python numbers; a non-finite float is written as
JSON's `NaN`/`Infinity` extension, which Python's `json` (and pandas) read back.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from typing import Any, Iterable, Mapping

HISTORY_FILE = "log_history.jsonl"


def history_path(output_dir: str) -> str:
    return os.path.join(output_dir, HISTORY_FILE)


def _plain(value: Any) -> Any:
    """A JSON-ready value: tensors / numpy scalars to Python numbers, containers recursively."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _encode(record: Mapping[str, Any]) -> bytes:
    line = json.dumps(_plain(record), ensure_ascii=False, separators=(",", ":"))
    assert "\n" not in line  # json.dumps escapes newlines inside strings; one record = one line
    return (line + "\n").encode("utf-8")


def _cut_torn_tail(fd: int) -> None:
    """If the file does not end with a newline (a killed writer), drop the partial last line."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    # Scan back in blocks for the last newline; a history line is short, so this reads little.
    pos, keep = size, 0
    while pos > 0:
        start = max(0, pos - 4096)
        block = os.pread(fd, pos - start, start)
        i = block.rfind(b"\n")
        if i >= 0:
            keep = start + i + 1
            break
        pos = start
    os.ftruncate(fd, keep)


def append(output_dir: str, record: Mapping[str, Any]) -> None:
    """Append one record as one line, durable when this returns. Main process only."""
    os.makedirs(output_dir, exist_ok=True)
    data = _encode(record)
    fd = os.open(history_path(output_dir), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        _cut_torn_tail(fd)
        # One write of the whole line: with O_APPEND a reader never sees it interleaved.
        written = os.write(fd, data)
        if written != len(data):  # a short write (disk full): leave no half line behind
            os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise OSError(f"could not append to {history_path(output_dir)}: disk full?")
        os.fsync(fd)
    finally:
        os.close(fd)


def read(output_dir_or_file: str) -> list[dict[str, Any]]:
    """All complete records, in order. A torn last line is dropped; a missing file gives []."""
    path = output_dir_or_file
    if os.path.isdir(path):
        path = history_path(path)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            # The last line may be torn by a kill; anything else is damage worth a warning.
            if i < len(lines) - 1:
                warnings.warn(f"{path}: line {i + 1} is not valid JSON; skipped", stacklevel=2)
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _rewrite(output_dir: str, records: Iterable[Mapping[str, Any]]) -> None:
    """Replace the file atomically: a temp file in the same folder, fsync, os.replace."""
    path = history_path(output_dir)
    fd, tmp = tempfile.mkstemp(prefix=".log_history.", suffix=".tmp", dir=output_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            for rec in records:
                f.write(_encode(rec))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def truncate_after(output_dir: str, step: int) -> int:
    """Keep records with `step <= step` (the resumed checkpoint's step); return how many were dropped.

    Call on resume, on the main process, before the first new `append`.
    """
    if not os.path.exists(history_path(output_dir)):
        return 0
    records = read(output_dir)
    kept = [r for r in records if _step(r) <= step]
    # Rewrite even when nothing is dropped: it also removes a torn last line.
    _rewrite(output_dir, kept)
    return len(records) - len(kept)


def reset(output_dir: str) -> None:
    """Forget the history (a fresh run in a reused output_dir). Main process only."""
    try:
        os.remove(history_path(output_dir))
    except FileNotFoundError:
        pass


def _step(record: Mapping[str, Any]) -> float:
    s = record.get("step")
    return s if isinstance(s, (int, float)) and not (isinstance(s, float) and math.isnan(s)) else -1


def train_record(step: int, epoch: float, **values: Any) -> dict[str, Any]:
    """A logging-step record: `loss`, `learning_rate`, `grad_norm`, `tokens_per_second`, ...

    Takes the dict the trackers get as is (`train_record(step, **logs)`, `epoch` included);
    its `train_loss` is stored under the Trainer's history name `loss`.
    """
    if "train_loss" in values and "loss" not in values:
        values = {("loss" if k == "train_loss" else k): v for k, v in values.items()}
    return {"kind": "train", "step": int(step), "epoch": round(float(epoch), 4), **values}


def eval_record(step: int, epoch: float, metrics: Mapping[str, Any], best_metric: Any = None) -> dict[str, Any]:
    """An evaluation record; metric names get the `eval_` prefix if they lack it."""
    rec: dict[str, Any] = {"kind": "eval", "step": int(step), "epoch": round(float(epoch), 4)}
    for k, v in metrics.items():
        rec[k if k.startswith("eval_") else f"eval_{k}"] = v
    if best_metric is not None:
        rec["best_metric"] = best_metric
    return rec
