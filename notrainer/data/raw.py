"""The raw splits a task starts from (lifecycle step 2): a Hub dataset, data files (one source
or a mixture), a stream's first rows, or the task's built-in data; text and label columns
checked row by row, a validation split held out, sample limits applied. The top of the data
path: it builds on `files`, `mixture` and `streaming`.
"""

from __future__ import annotations

import math
from typing import Callable

from notrainer.data import mixture
from notrainer.data.files import (STREAM_SAMPLE_ROWS, check_column_values, keeps_linebreaks, load_files,
                                  load_hub_dataset, text_and_label_columns)
from notrainer.errors import check


def load_streaming_raw(cfg):
    """streaming=true: the raw splits without reading the corpus. "train" is only the first
    STREAM_SAMPLE_ROWS rows of the stream (of each source of a mixture: the built-in tokenizer
    is trained on them, columns and formats are checked on them; training reads the stream
    itself); validation and test files are small and loaded whole. Without validation_file,
    the first rows of each source are held out for evaluation and never trained on
    (`notrainer.data.mixture.validation_rows`)."""
    import datasets

    sources = mixture.parse_mixture(cfg.train_file)
    paths = [s.path for s in sources] if sources else [cfg.train_file]
    samples = []
    held = mixture.validation_rows(cfg)
    for stream, path in zip(mixture.source_streams(cfg), paths):
        # enough rows for the held-out split too (the training stream skips all of them)
        rows = mixture.first_rows(stream, max(STREAM_SAMPLE_ROWS, held), path)
        check(bool(rows), f"the training stream is empty{f' (train_file={path})' if sources else ''}")
        samples.append(rows)
    if sources:
        mixture.check_columns([list(rows[0]) for rows in samples], sources)
        mixture.note(mixture.normalized_weights(sources)[1])
    rows = [r for part in samples for r in part]
    raw = {"train": datasets.Dataset.from_list(rows)}
    mixture.remember_held_out(cfg, samples)  # the training stream skips these rows: read once
    if held:  # the first rows of each source (never trained on: the stream skips them)
        raw["validation"] = datasets.Dataset.from_list([r for part in samples for r in part[:held]])
    files = {k: v for k, v in (("validation", cfg.validation_file if cfg.do_eval else None),
                               ("test", cfg.test_file)) if v}
    if files:
        raw.update(load_files(files, keep_linebreaks=keeps_linebreaks(cfg)))
    if cfg.max_eval_samples and "validation" in raw:
        raw["validation"] = raw["validation"].select(range(min(cfg.max_eval_samples, len(raw["validation"]))))
    return datasets.DatasetDict(raw)


def _where(cfg, split: str, from_files: bool) -> str:
    if not from_files:
        return f"dataset_name={cfg.dataset_name} ({split} split)" if cfg.dataset_name else f"the built-in {split} data"
    key_name = {"train": "train_file", "validation": "validation_file", "test": "test_file"}.get(split, split)
    value = getattr(cfg, key_name, None)
    return f"{key_name}={value if isinstance(value, str) else ','.join(map(str, value or []))}"


def load_raw_datasets(cfg, builtin: Callable[[], "object"] | None = None, field: str | None = None,
                      check_rows: Callable | None = None):
    """Train/validation (and test) splits as a `datasets.DatasetDict`.

    Order of precedence: `dataset_name` (hub), then `train_file`/`validation_file`/`test_file`,
    then the task's built-in data. Text and label columns are checked (`check_column_values`). Without validation data, `validation_split_percentage` of
    the training set is held out (seeded, so every run and every rank holds out the same rows).
    With streaming=true, see `load_streaming_raw`.
    """
    import datasets

    if getattr(cfg, "streaming", False) and cfg.do_train:
        return load_streaming_raw(cfg)
    if cfg.dataset_name:
        raw = load_hub_dataset(cfg)
    elif cfg.train_file or cfg.validation_file or cfg.test_file:
        files = {k: v for k, v in (("train", cfg.train_file), ("validation", cfg.validation_file),
                                   ("test", cfg.test_file)) if v}
        mixed = mixture.is_mixture(cfg.train_file)
        raw = load_files({k: v for k, v in files.items() if not (mixed and k == "train")},
                         keep_linebreaks=keeps_linebreaks(cfg)) if len(files) > mixed else {}
        if mixed:  # several weighted sources, interleaved row by row (datasets.interleave_datasets)
            raw = {"train": mixture.load_map_style(cfg), **raw}
    else:
        check(builtin is not None, "no data: give train_file=... (or dataset_name=...)")
        raw = builtin()

    raw = datasets.DatasetDict(raw)
    # Column values are checked in file order, before a validation split is held out, so the
    # rows named are the file's; `check_rows(ds, where)` adds a task's own checks (chat roles).
    texts, labels = text_and_label_columns(cfg)
    from_files = not cfg.dataset_name and bool(cfg.train_file or cfg.validation_file or cfg.test_file)
    for name, ds in raw.items():
        where = _where(cfg, name, from_files)
        check_column_values(ds, where, texts=texts, labels=labels)
        if check_rows is not None:
            check_rows(ds, where)
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
    if getattr(cfg, "max_predict_samples", None) and "test" in raw:
        raw["test"] = raw["test"].select(range(min(cfg.max_predict_samples, len(raw["test"]))))
    return raw
