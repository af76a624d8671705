"""Loading raw data: local files, hub datasets, or a task's built-in data.

Everything goes through `datasets`, which caches what `map` computes for file-backed data, so
a second run with the same files and settings skips tokenization.
"""

from __future__ import annotations

import math
import os
from typing import Callable

from .errors import UsageError, check

# file extension -> datasets builder name
BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
            ".tsv": "csv", ".parquet": "parquet"}


def builder_for(path: str) -> tuple[str, dict]:
    ext = os.path.splitext(path)[1].lower()
    check(ext in BUILDERS, f"{path}: unsupported file type {ext or '(none)'}; use one of {', '.join(sorted(BUILDERS))}")
    # TSV as GLUE ships it: no quoting, so a field that starts with " (MRPC has them) stays one field.
    kwargs = {"delimiter": "\t", "quoting": 3} if ext == ".tsv" else {}  # 3 = csv.QUOTE_NONE
    return BUILDERS[ext], kwargs


def load_files(files: dict[str, str]):
    """Load {split: path} with the builder each extension needs (all splits must share it)."""
    import datasets

    builders = [builder_for(p) for p in files.values()]
    check(all(b == builders[0] for b in builders), "train_file, validation_file and test_file must have the same "
          f"format (got {', '.join(sorted(os.path.basename(p) for p in files.values()))})")
    builder, kwargs = builders[0]
    for split, path in files.items():
        check(os.path.exists(path), f"{split} file {path}: no such file")
        check(os.path.isdir(path) or os.path.getsize(path) > 0, f"{split} file {path}: the file is empty")
    try:
        return datasets.load_dataset(builder, data_files=files, **kwargs)
    except Exception as e:  # malformed json/csv: one line naming the file, not a deep traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"could not read {', '.join(files.values())} as {builder}: {first}") from None


def load_raw_datasets(cfg, builtin: Callable[[], "object"] | None = None, field: str | None = None):
    """Train/validation (and test) splits as a `datasets.DatasetDict`.

    Order of precedence: `dataset_name` (hub), then `train_file`/`validation_file`/`test_file`,
    then the task's built-in data. Without validation data, `validation_split_percentage` of
    the training set is held out (seeded, so every run and every rank holds out the same rows).
    """
    import datasets

    if cfg.dataset_name:
        try:
            raw = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"dataset_name={cfg.dataset_name}: could not load ({first})") from None
    elif cfg.train_file or cfg.validation_file or cfg.test_file:
        files = {k: v for k, v in (("train", cfg.train_file), ("validation", cfg.validation_file),
                                   ("test", cfg.test_file)) if v}
        raw = load_files(files)
    else:
        check(builtin is not None, "no data: give train_file=... (or dataset_name=...)")
        raw = builtin()

    raw = datasets.DatasetDict(raw)
    if "train" in raw and "validation" not in raw and cfg.do_eval and cfg.validation_split_percentage > 0:
        n = len(raw["train"])
        check(n - math.ceil(n * cfg.validation_split_percentage / 100) >= 1,
              f"the training data has {n} row(s): too few to hold out validation_split_percentage="
              f"{cfg.validation_split_percentage}; give validation_file=... or validation_split_percentage=0")
        split = raw["train"].train_test_split(test_size=cfg.validation_split_percentage / 100, seed=cfg.seed)
        raw["train"], raw["validation"] = split["train"], split["test"]
    for name, ds in raw.items():
        check(len(ds) > 0, f"the {name} split is empty")
    if cfg.max_train_samples and "train" in raw:
        raw["train"] = raw["train"].select(range(min(cfg.max_train_samples, len(raw["train"]))))
    if cfg.max_eval_samples and "validation" in raw:
        raw["validation"] = raw["validation"].select(range(min(cfg.max_eval_samples, len(raw["validation"]))))
    return raw


def require_columns(ds, columns: dict[str, str | None]) -> None:
    """`columns` maps a config key to the column it names; a missing one is a usage error."""
    for key_name, column in columns.items():
        if column is None:
            continue
        check(column in ds.column_names,
              f"{key_name}={column!r}: no such column; the data has {', '.join(ds.column_names)}")


def pick_text_column(ds, configured: str | None) -> str:
    """The column holding the text: `configured` (which must exist), else "text", else the first
    string column."""
    if configured:
        require_columns(ds, {"text_column": configured})
        return configured
    if "text" in ds.column_names:
        return "text"
    strings = [n for n, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    check(bool(strings), f"no text column found (columns: {', '.join(ds.column_names)}); set text_column=...")
    return strings[0]
