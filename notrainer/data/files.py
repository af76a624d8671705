"""Loading raw data: local files, hub datasets, or a task's built-in data.

Everything goes through `datasets`, which caches what `map` computes for file-backed data, so
a second run with the same files and settings skips tokenization.
"""

from __future__ import annotations

import glob
import json
import os

from notrainer.data.sources import parse_mixture
from notrainer.errors import UsageError, check, first_line

# file extension -> datasets builder name
BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
            ".tsv": "csv", ".parquet": "parquet"}
# compression suffixes `datasets` opens transparently (zstd and lz4 need the zstandard / lz4 packages)
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".lz4": "lz4"}
_GLOB_CHARS = set("*?[")


def inner_extension(path: str) -> str:
    """`corpus.jsonl.gz` -> `.jsonl`: a compressed file is judged by the extension inside."""
    root, ext = os.path.splitext(path)
    if ext.lower() in COMPRESSIONS:
        ext = os.path.splitext(root)[1]
    return ext.lower()


def builder_for(path: str) -> tuple[str, dict]:
    ext = inner_extension(path)
    check(ext in BUILDERS, f"{path}: unsupported file type {ext or '(none)'}; use one of {', '.join(sorted(BUILDERS))} "
                           f"(optionally compressed: {', '.join(COMPRESSIONS)})")
    # TSV as GLUE ships it: no quoting, so a field that starts with " (MRPC has them) stays one field.
    kwargs = {"delimiter": "\t", "quoting": 3} if ext == ".tsv" else {}  # 3 = csv.QUOTE_NONE
    return BUILDERS[ext], kwargs


def split_spec(spec) -> list[str]:
    """A data-file value as a list of patterns: a YAML list, or a string split on commas
    (unless the whole string names an existing path, which may contain a comma)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        if os.path.exists(spec):
            return [spec]
        return [p.strip() for p in spec.split(",") if p.strip()]
    return [str(p) for p in spec]


def _is_data_file(path: str) -> bool:
    name = os.path.basename(path)
    return os.path.isfile(path) and not name.startswith((".", "_")) and inner_extension(path) in BUILDERS


def resolve_files(spec, key: str = "train_file") -> list[str]:
    """Every file a `train_file`-style value names, in a stable (sorted) order.

    Each entry is a file, a folder (its data files, recursively; hidden files and names
    starting with `_` such as `_SUCCESS` are skipped) or a glob (`data/*.jsonl.gz`, `**` allowed).
    A name that matches nothing is a usage error naming it."""
    files: list[str] = []
    for pattern in split_spec(spec):
        expanded = os.path.expanduser(pattern)
        if _GLOB_CHARS & set(expanded) and not os.path.exists(expanded):
            found = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            check(bool(found), f"{key}={pattern}: the pattern matches no file")
        elif os.path.isdir(expanded):
            found = sorted(os.path.join(d, n) for d, _, names in os.walk(expanded) for n in names
                           if _is_data_file(os.path.join(d, n)))
            check(bool(found), f"{key}={pattern}: the folder holds no data file "
                               f"({', '.join(sorted(BUILDERS))}, optionally compressed)")
        else:
            check(os.path.exists(expanded), f"{key}={pattern}: no such file")
            found = [expanded]
        for path in found:
            check(os.path.getsize(path) > 0, f"{key}={path}: the file is empty")
        files += [p for p in found if p not in files]
    return files


def split_format(files: list[str], key: str = "train_file") -> tuple[str, dict]:
    """The one builder (and its options) that reads all of a split's files."""
    formats: dict[str, tuple[tuple[str, dict], str]] = {}  # inner extension -> (builder, first file)
    for path in files:
        ext = ".json" if inner_extension(path) == ".jsonl" else inner_extension(path)
        formats.setdefault(ext, (builder_for(path), path))
    if len(formats) > 1:
        examples = ", ".join(os.path.basename(p) for _, p in formats.values())
        raise UsageError(f"{key}: files of different formats in one split ({examples}); give one format per split")
    return next(iter(formats.values()))[0]


def data_files(cfg) -> dict[str, list[str]]:
    """{split: [files]} from train_file / validation_file / test_file (only those given)."""
    out = {}
    for split, key_name in (("train", "train_file"), ("validation", "validation_file"), ("test", "test_file")):
        value = getattr(cfg, key_name, None)
        if value:
            out[split] = resolve_files(value, key_name)
    return out


def load_files(files: dict, keep_linebreaks: bool = True, streaming: bool = False):
    """Load {split: path, a list of paths, a glob or a folder}; each split is read with the builder
    its extension needs (one format per split). Errors name the file and the line or byte offset."""
    import datasets

    out = {}
    for split, spec in files.items():
        key_name = f"{split}_file" if split != "validation" else "validation_file"
        paths = resolve_files(spec, key_name)
        builder, kwargs = split_format(paths, key_name)
        if builder == "text":
            kwargs = {**kwargs, "keep_linebreaks": keep_linebreaks}
        if builder == "csv" and not streaming:
            for path in paths:
                check_csv_rows(path, kwargs)
        try:
            out[split] = datasets.load_dataset(builder, data_files={split: paths}, split=split,
                                               streaming=streaming, **kwargs)
        except Exception as e:  # malformed json/text: one line naming the file and the place
            raise UsageError(explain_read_error(paths, builder, e)) from None
    return out if streaming else datasets.DatasetDict(out)


# ---------------------------------------------------------------------- bad input, explained


def open_maybe_compressed(path: str, mode: str = "rb"):
    """Open a data file, decompressing by its suffix as `datasets` does."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".gz":
        import gzip
        return gzip.open(path, mode)
    if ext == ".bz2":
        import bz2
        return bz2.open(path, mode)
    if ext == ".xz":
        import lzma
        return lzma.open(path, mode)
    if ext in (".zst", ".lz4"):
        import fsspec
        return fsspec.open(path, mode, compression=COMPRESSIONS[ext]).open()
    return open(path, mode)


def check_compressed(path: str) -> str | None:
    """Why a compressed file is unreadable (cut off mid-file, corrupt), or None. zstd and lz4
    readers return what they decoded so far at a cut without complaint; their end-of-stream
    mark is checked here. gzip, bz2 and xz readers raise at a cut (EOFError) on their own."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".zst", ".lz4"):
        return None
    try:
        if ext == ".zst":
            import zstandard

            def new_stream():
                return zstandard.ZstdDecompressor().decompressobj()
        else:
            import lz4.frame

            new_stream = lz4.frame.LZ4FrameDecompressor
        stream = new_stream()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                while chunk:
                    if stream.eof:  # zstd and lz4 allow several frames one after the other
                        stream = new_stream()
                    stream.decompress(chunk)
                    chunk = stream.unused_data if stream.eof else b""
    except ImportError:
        return None  # datasets reports the missing package
    except Exception as e:  # noqa: BLE001 - any decoder error means a corrupt file
        return f"is corrupt: the {COMPRESSIONS[ext]} data cannot be decoded ({first_line(e)}); re-create or re-download it"
    if not stream.eof:
        return (f"is truncated: the {COMPRESSIONS[ext]} stream ends before its end mark (the file was cut off "
                "mid-write or mid-download); re-create or re-download it")
    return None


def check_csv_rows(path: str, kwargs: dict) -> None:
    """A row with fewer fields than the header becomes None cells that fail far away (in a
    float() of the label); name the file and line here instead."""
    import csv
    import io

    delimiter = kwargs.get("delimiter", ",")
    quoting = kwargs.get("quoting", csv.QUOTE_MINIMAL)
    with open_maybe_compressed(path) as raw:
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline=""),
                            delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if not header:
            return
        for row in reader:
            if row and len(row) < len(header):
                raise UsageError(f"{path} line {reader.line_num}: {len(row)} field(s) where the header has "
                                 f"{len(header)} ({', '.join(header)})")


def explain_read_error(paths: list[str], builder: str, error: Exception) -> str:
    """One line for a file `datasets` could not read: find the first bad place ourselves (the
    library's message names neither the line nor the offset)."""
    for path in paths:
        where = find_bad_place(path, builder)
        if where:
            return f"{path} {where}"
    cause = error.__cause__ or error
    return f"could not read {', '.join(paths)} as {builder}: {first_line(cause)}"


def find_bad_place(path: str, builder: str) -> str | None:
    """'line N: what is wrong' / 'byte N (line M): ...' for the first problem in `path`, or None."""
    import json

    broken = check_compressed(path)
    if broken:
        return broken
    try:
        with open_maybe_compressed(path) as f:
            data = f.read()
    except Exception as e:  # a shard that cannot be decompressed
        return f"cannot be decompressed ({first_line(e)})"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return f"byte {e.start} (line {line}): not valid UTF-8 (byte 0x{data[e.start]:02x})"
    if builder != "json":
        return None
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and "\n{" not in stripped.rstrip()):
        try:  # one JSON document
            json.loads(text)
            return None
        except json.JSONDecodeError as e:
            return f"line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})"
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n}: not valid JSON ({e.msg}, column {e.colno})"
            if not isinstance(value, dict):
                return f"line {n}: expected a JSON object per line, got {type(value).__name__}"
    return None


def check_local_model_path(value: str | None, key_name: str = "model_name_or_path") -> None:
    """A value that can only be a local path (./x, ../x, /x, ~/x, a/b/c) but does not exist is a
    misspelled folder, not a hub id: say so instead of the hub's 'Repo id must use ...'."""
    if not value or os.path.exists(os.path.expanduser(value)):
        return
    looks_local = (value.startswith((".", "/", "~")) or os.sep != "/" and os.sep in value
                   or value.count("/") > 1)
    check(not looks_local, f"{key_name}={value}: no such folder")


# ---------------------------------------------------------------------- splits


def keeps_linebreaks(cfg) -> bool:
    """Text files keep each line's break (run_clm_no_trainer.py) unless every line is its own
    example (`line_by_line=true`, as run_mlm_no_trainer.py reads it): then the break is dropped."""
    return bool(getattr(cfg, "keep_linebreaks", True)) and not getattr(cfg, "line_by_line", False)


def load_hub_dataset(cfg, streaming: bool = False):
    """`dataset_name` with `dataset_config_name`, `dataset_revision` and `dataset_split`
    (a split or slice such as `train[:10%]`, loaded as the training split)."""
    import datasets

    kwargs = {"revision": cfg.dataset_revision} if getattr(cfg, "dataset_revision", None) else {}
    split = getattr(cfg, "dataset_split", None)
    try:
        loaded = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, split=split,
                                       streaming=streaming, **kwargs)
    except Exception as e:
        raise UsageError(f"dataset_name={cfg.dataset_name}: could not load ({first_line(e)})") from None
    return {"train": loaded} if split else loaded


def reads_text_files(cfg) -> bool:
    """True when the training data (else the validation data) are text files (.txt): the CLM
    path then reads them as run_clm_no_trainer.py does, lines with their breaks and no
    end-of-text token per line (a line is not a document)."""
    if getattr(cfg, "dataset_name", None):
        return False
    spec = getattr(cfg, "train_file", None) or getattr(cfg, "validation_file", None)
    sources = parse_mixture(spec)
    if sources:  # a mixture: each source is judged on its own (CLM: per source, see tasks/clm.py)
        spec = sources[0].path
    return bool(spec) and split_format(resolve_files(spec))[0] == "text"


#: rows of the training stream read up front with streaming=true (see load_streaming_raw)
STREAM_SAMPLE_ROWS = 1000


def open_train_stream(cfg):
    """The raw training rows as a `datasets.IterableDataset` (files or a hub dataset)."""
    if cfg.dataset_name:
        loaded = load_hub_dataset(cfg, streaming=True)
        check("train" in loaded, f"dataset_name={cfg.dataset_name}: no train split; pick one with dataset_split=...")
        return loaded["train"]
    check(bool(cfg.train_file), "streaming=true needs train_file=... (or dataset_name=...)")
    return load_files({"train": cfg.train_file}, keep_linebreaks=keeps_linebreaks(cfg), streaming=True)["train"]


# ---------------------------------------------------------------------- column values

#: config keys that name a column of text: every row of it must be a string. A key left unset
#: (None) stands for the column named in the second element when the data has it.
TEXT_COLUMN_KEYS = (("text_column", "text"), ("text_pair_column", None), ("question_column", None),
                    ("context_column", None), ("summary_column", None), ("prompt_column", None),
                    ("response_column", None))
#: the label column when `label_column` is unset (the classification task's candidates)
LABEL_COLUMNS = ("label", "labels")


def _kind(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def text_and_label_columns(cfg) -> tuple[list[str], list[str]]:
    """The columns a task reads as text and as labels, from its config keys."""
    texts = [getattr(cfg, k) or default for k, default in TEXT_COLUMN_KEYS if hasattr(cfg, k)]
    labels = []
    if hasattr(cfg, "label_column"):
        labels = [cfg.label_column] if cfg.label_column else list(LABEL_COLUMNS)
    return [c for c in texts if c], labels


def check_column_values(ds, where: str, texts=(), labels=()) -> None:
    """Refuse, in one line naming `where` (the file), the row and the value: a text column with
    a row that is not a string (null, a number, a list), and a label column that mixes types
    (`"pos"` and `1`: `datasets` keeps them apart as a `Json` column, which would silently
    make "1" and 1 two classes). Rows are counted from 1 in file order (a JSON-lines file's
    line numbers when it has no blank lines). Costs a null count per text column unless a
    value is wrong."""
    from datasets import Json

    for column in texts:
        if column not in ds.column_names:
            continue
        if getattr(ds.features[column], "dtype", None) in ("string", "large_string"):
            import pyarrow.compute as pc

            values = ds.with_format("arrow")[column]
            if values.null_count == 0:
                continue
            i = pc.index(pc.is_null(values), True).as_py()
            raise UsageError(f"{where} row {i + 1}: {column!r} is null; every row needs a text in it "
                             "(fill the row or drop it)")
        for i, value in enumerate(ds[column]):
            if not isinstance(value, str):
                what = "null" if value is None else f"{_show(value)} (a {_kind(value)}), not a text"
                raise UsageError(f"{where} row {i + 1}: {column!r} is {what}; every row needs a string in it "
                                 "(quote it, or fill or drop the row)")
    for column in labels:
        if column not in ds.column_names or not isinstance(ds.features[column], Json):
            continue  # one arrow type: the column is consistent
        first: dict[str, tuple[int, object]] = {}
        for i, value in enumerate(ds[column]):
            if value is None:
                continue
            first.setdefault(_kind(value), (i, value))
            if len(first) > 1:
                (ka, (ia, va)), (kb, (ib, vb)) = first.items()
                raise UsageError(f"{where}: {column!r} mixes {ka}s and {kb}s (row {ia + 1}: {_show(va)}, row {ib + 1}: "
                                 f"{_show(vb)}); write every label the same way (e.g. all as strings)")


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


def map_splits(raw, fn, cfg, desc: str, remove_columns: bool = True, split_kwargs=None, **map_kwargs):
    """`fn` mapped over every split of `raw` (batched), as one `DatasetDict`, with the user's
    `preprocessing_num_workers` (num_proc) and `overwrite_cache` (load_from_cache_file=false)
    applied the same way by every task.

    `remove_columns`: drop the split's own columns (the usual raw -> tokenized step);
    `split_kwargs(name)`: extra keyword arguments for `fn` on that split (e.g. no labels on test).
    """
    import datasets

    return datasets.DatasetDict({
        name: split.map(fn, batched=True, num_proc=cfg.preprocessing_num_workers,
                        load_from_cache_file=not cfg.overwrite_cache,
                        remove_columns=split.column_names if remove_columns else None,
                        fn_kwargs=split_kwargs(name) if split_kwargs else None,
                        desc=f"{desc} {name}", **map_kwargs)
        for name, split in raw.items()
    })


def shard_error(files: list[str], error: Exception) -> str:
    """One line naming the shard (and the place in it) that broke the stream."""
    text = f"{error} {error.__cause__ or ''}"
    named = [p for p in files if p in text or os.path.basename(p) in text]
    for path in named or files:
        builder = split_format([path])[0]
        where = find_bad_place(path, builder)
        if where:
            return f"streaming: {path} {where}"
    return f"streaming: could not read {named[0] if named else 'a data file'}: {first_line(error.__cause__ or error)}"


def write_jsonl(path: str, records: list[dict]) -> None:
    """Write records atomically, one JSON object per line."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
