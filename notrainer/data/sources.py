"""What a data key names: one source or a weighted mixture of sources, and the row digests
that keep a stream's held-out rows out of training. The lowest module of the data path
(imports nothing else of notrainer.data): `files`, `streaming` and `mixture` build on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

from notrainer.errors import UsageError, check

#: the column each mixture item carries: the index of its source (taken off before collation)
SOURCE_KEY = "_notrainer_source"
STOPS = ("first_exhausted", "all_exhausted")


@dataclass
class Source:
    path: Any  # anything train_file takes: a path, glob, folder or list
    weight: float
    index: int

    @property
    def name(self) -> str:
        return f"train_file[{self.index}] ({self.path})"


# ---------------------------------------------------------------------- the spec


def is_mixture(spec) -> bool:
    """A list of `{path: ..., weight: ...}` mappings (a plain list of paths is one source)."""
    return isinstance(spec, (list, tuple)) and any(isinstance(s, dict) for s in spec)


def parse_mixture(spec, key: str = "train_file") -> Optional[list[Source]]:
    """The sources of a mixture spec, or None when `spec` is one source."""
    if not is_mixture(spec):
        return None
    check(key == "train_file", f"{key}: a weighted list of sources works for train_file only; give {key} one source")
    sources = []
    for i, entry in enumerate(spec):
        check(isinstance(entry, dict), f"{key}[{i}]={entry!r}: in a mixture every source is a mapping "
                                       "{path: ..., weight: ...}")
        unknown = sorted(set(entry) - {"path", "weight"})
        check(not unknown, f"{key}[{i}]: unknown field(s) {', '.join(unknown)}; a source has path and weight")
        check(entry.get("path") not in (None, ""), f"{key}[{i}]: a source needs path: ...")
        weight = entry.get("weight", 1.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise UsageError(f"{key}[{i}] ({entry['path']}): weight must be a number, got {weight!r}") from None
        check(weight > 0, f"{key}[{i}] ({entry['path']}): weight must be > 0, got {weight:g}")
        sources.append(Source(entry["path"], weight, i))
    return sources


def normalized_weights(sources: list[Source]) -> tuple[list[float], Optional[str]]:
    """(the weights summing to 1, the one-line note when they had to be normalised)."""
    total = sum(s.weight for s in sources)
    weights = [s.weight / total for s in sources]
    if abs(total - 1.0) > 1e-9:
        shown = ", ".join(f"{w:.4g}" for w in weights)
        return weights, f"train_file: the mixture weights sum to {total:g}; normalised to {shown}"
    return weights, None


# ---------------------------------------------------------------------- held-out rows


def row_key(batch: dict, i: int) -> bytes:
    """A stable digest of row `i` of a column batch (the same in every process)."""
    row = [[k, batch[k][i]] for k in sorted(batch)]
    return hashlib.blake2b(json.dumps(row, default=str, ensure_ascii=False).encode(), digest_size=12).digest()


def rows_key(row: dict) -> bytes:
    return row_key({k: [v] for k, v in row.items()}, 0)


def held_out_keep(held_out: frozenset, keep: Optional[Callable] = None) -> Optional[Callable]:
    """A `PackedStream` keep function that also drops every held-out row."""
    if not held_out:
        return keep

    def fn(batch):
        n = len(next(iter(batch.values()))) if batch else 0
        base = keep(batch) if keep is not None else [True] * n
        return [b and row_key(batch, i) not in held_out for i, b in enumerate(base)]

    return fn
