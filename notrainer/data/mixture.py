"""Data mixtures: several sources, each with a weight, sampled seeded, with an exact resume.

    train_file:                       # config YAML
      - {path: "web/*.jsonl.zst", weight: 0.7}
      - {path: code/, weight: 0.2}
      - {path: books.jsonl, weight: 0.1}

    train_file='[{path: web/*.jsonl.zst, weight: 0.7}, {path: code/, weight: 0.3}]'   # command line

A source is any form `train_file` takes (a file, a glob, a folder, compressed shards). Weights
that do not sum to 1 are normalised (one note); a weight <= 0, a source that matches no file
and a source whose columns differ from the others' are one-line errors before training.

Map-style data (`streaming=false`) is mixed with `datasets.interleave_datasets` (rows, by
weight, seeded, `mixture_stop`). With `streaming=true`, `MixtureStream` draws the source of each
item with a seeded RNG and takes the item from that source's own `PackedStream` (each source is
packed on its own: a CLM block never mixes two sources). Its state is the RNG, each source's
position, how many passes each source has made and the shuffle buffer, so a resumed mixture
continues with exactly the next item and re-reads at most one read group per source.

`mixture_stop` (the `interleave_datasets` names) says when a round of the mixture ends:
`first_exhausted` when the first source has been read through, `all_exhausted` when every
source has been read through at least once (a small source is then upsampled: it starts its
next pass, its per-source epoch, while the others continue). A new round starts every source
from its beginning; a training stream runs round after round until max_train_steps.

Each item carries its source index (`SOURCE_KEY`); the stream loader takes it off before the
collator and counts examples and tokens per source (`notrainer.data.streaming.stream_loader`),
exactly, in the loader's own checkpointed state.

The evaluation split of a stream (no `validation_file`): the first `validation_rows` rows of
each source, read from the start of the source in file order; the training stream skips every
row equal to a held-out one (`held_out_keep`), on every rank, worker and pass.
"""

from __future__ import annotations

import bisect
import json
import random
from typing import Any, Callable, Optional

import torch

from notrainer.data.files import (STREAM_SAMPLE_ROWS, keeps_linebreaks, load_files, open_train_stream, resolve_files,
                                  shard_error, split_format)
from notrainer.data.streaming import array_row, dict_row, plain_row, tuple_row
from notrainer.data.sources import (SOURCE_KEY, STOPS, Source, held_out_keep, is_mixture,  # noqa: F401 (re-exported)
                                    normalized_weights, parse_mixture, row_key, rows_key)
from notrainer.errors import UsageError, check

# ---------------------------------------------------------------------- the spec


def check_data_spec(spec, key: str) -> None:
    """`TrainConfig.validate`'s check of a data key: every source matches files, one format per
    source (a mixture's sources may differ in format)."""

    sources = parse_mixture(spec, key)
    for source in sources or [Source(spec, 1.0, 0)]:
        name = f"{key}[{source.index}]" if sources else key
        split_format(resolve_files(source.path, name), name)


def check_columns(columns: list[list[str]], sources: list[Source]) -> None:
    """Every source must have the first one's columns (the task reads one set of columns)."""
    first = sorted(columns[0])
    for source, cols in zip(sources[1:], columns[1:]):
        check(sorted(cols) == first, f"{source.name} has columns {', '.join(sorted(cols))} where "
                                     f"{sources[0].name} has {', '.join(first)}; every source needs the same columns")


def note(message: Optional[str]) -> None:
    """A one-line note on stderr, from the main process only."""
    import os
    import sys

    if message and os.environ.get("RANK", "0") == "0":
        print(f"notrainer: {message}", file=sys.stderr)


# ---------------------------------------------------------------------- map-style


def interleave_map_style(parts: list, sources: list[Source], seed: int, stop: str):
    """Map-style sources (`datasets.Dataset`s, one per source) mixed row by row."""
    import datasets

    check_columns([p.column_names for p in parts], sources)
    weights, message = normalized_weights(sources)
    note(message)
    # one schema for all (a json source may infer int64 where another infers a string)
    parts = [p.cast(parts[0].features) if p.features != parts[0].features else p for p in parts]
    return datasets.interleave_datasets(parts, probabilities=weights, seed=seed, stopping_strategy=stop)


def load_map_style(cfg):
    """train_file as a mixture, map-style: each source loaded as train_file loads one, then
    interleaved by weight (seeded, `mixture_stop`)."""

    sources = parse_mixture(cfg.train_file)
    parts = [load_files({"train": s.path}, keep_linebreaks=keeps_linebreaks(cfg))["train"] for s in sources]
    return interleave_map_style(parts, sources, cfg.seed, cfg.mixture_stop)


# ---------------------------------------------------------------------- held-out rows


# ---------------------------------------------------------------------- streaming


def _fresh_part() -> dict:
    return {"epoch": 0, "source": None, "offset": 0, "done": 0, "buffer": [], "rng": None}


class MixtureStream(torch.utils.data.IterableDataset):
    """Items from several `PackedStream`s (one pass each, no buffer of their own), the source of
    each drawn by weight with a seeded RNG (one stream of draws per rank and worker). Endless
    (round after round) unless `rounds` is given."""

    def __init__(self, parts: list, weights: list[float], names: list[str], seed: int = 42, rank: int = 0,
                 stop: str = "all_exhausted", shuffle_buffer_size: int = 0, rounds: Optional[int] = None):
        check(stop in STOPS, f"mixture_stop must be one of {', '.join(STOPS)}, got {stop!r}")
        check(len(parts) == len(weights) == len(names) and parts, "a mixture needs at least one source")
        self.parts, self.weights, self.source_names = parts, list(weights), list(names)
        self.seed, self.rank, self.stop, self.rounds = seed, rank, stop, rounds
        self.buffer_size = shuffle_buffer_size  # stream_loader reads it (how often workers send their state)
        self._resume: Optional[dict] = None
        self._live: Optional[dict] = None

    # --------------------------------------------------------------- checkpointable position

    def _fresh(self) -> dict:
        n = len(self.parts)
        return {"round": 0, "parts": [None] * n, "passes": [0] * n, "finished": [False] * n,
                "started": [False] * n, "empty": [False] * n, "buffer": [], "rng": None}

    def state_dict(self) -> dict:

        live = self._live
        if live is None:
            return dict(self._resume) if self._resume is not None else self._fresh()
        return {"round": live["round"],
                "parts": [p.state_dict() if live["open"][i] else None for i, p in enumerate(self.parts)],
                "passes": list(live["passes"]), "finished": list(live["finished"]), "started": list(live["started"]),
                "empty": list(live["empty"]), "buffer": [plain_row(r) for r in live["buffer"]],
                "rng": live["rng"].getstate()}

    def load_state_dict(self, state: dict) -> None:
        self._resume, self._live = dict(state), None

    # --------------------------------------------------------------- iteration

    def _rng(self) -> random.Random:
        info = torch.utils.data.get_worker_info()
        return random.Random(f"mixture/{self.seed}/{self.rank}/{info.id if info else 0}")

    def __iter__(self):

        st = self._resume or self._fresh()
        self._resume = None
        rng = self._rng()
        if st["rng"] is not None:
            version, internal, gauss = st["rng"]
            rng.setstate((version, tuple(internal), gauss))
        n = len(self.parts)
        live = {"round": st["round"], "passes": list(st["passes"]), "finished": list(st["finished"]),
                "started": list(st["started"]), "empty": list(st["empty"]), "open": [False] * n,
                "buffer": [array_row(r) for r in st["buffer"]], "rng": rng}
        self._live = live
        iters: list = [None] * n
        saved = list(st["parts"])

        def open_part(i: int) -> None:
            self.parts[i].load_state_dict(saved[i] if saved[i] is not None else _fresh_part())
            saved[i] = None
            iters[i] = iter(self.parts[i])
            live["open"][i] = True

        def restart(i: int) -> None:
            iters[i], live["open"][i], live["started"][i], saved[i] = None, False, False, None

        buffer = live["buffer"]
        while True:
            active = [i for i in range(n) if not live["empty"][i]]
            if not active:
                break  # no source has data for this worker
            cum, total = [], 0.0
            for i in active:
                total += self.weights[i]
                cum.append(total)
            i = active[min(bisect.bisect_right(cum, rng.random() * total), len(active) - 1)]
            if iters[i] is None:
                open_part(i)
            try:
                item = next(iters[i])
            except StopIteration:
                if not live["started"][i]:
                    live["empty"][i] = True  # nothing for this rank and worker in this source
                    restart(i)
                    continue
                live["passes"][i] += 1
                live["finished"][i] = True
                if self.stop == "first_exhausted" or all(live["finished"][j] or live["empty"][j] for j in range(n)):
                    live["round"] += 1
                    for j in range(n):
                        restart(j)
                        live["finished"][j] = False
                    if self.rounds is not None and live["round"] >= self.rounds:
                        break
                else:
                    restart(i)  # upsampled: this source starts its next pass, the others go on
                continue
            live["started"][i] = True
            item = {**item, SOURCE_KEY: i}
            if not self.buffer_size:
                yield item
                continue
            item = tuple_row(item)
            if len(buffer) < self.buffer_size:
                buffer.append(item)
                continue
            k = rng.randrange(self.buffer_size)
            out, buffer[k] = buffer[k], item
            yield dict_row(out)
        while buffer:
            yield dict_row(buffer.pop(rng.randrange(len(buffer))))


def training_stream(cfg, make_part: Callable[..., Any], rank: int, world_size: int,
                    sample_columns: Optional[list[str]] = None):
    """The task's training stream: one `PackedStream` (one source) or a `MixtureStream`.

    `make_part(files, rank=, world_size=, seed=, shuffle_buffer_size=, epochs=, held_out=, dataset=)`
    builds the task's own stream of one source (clm: packed blocks; sft: examples)."""

    sources = parse_mixture(cfg.train_file)
    held = held_out_keys(cfg)
    if sources is None:
        return make_part(cfg.train_file, rank=rank, world_size=world_size, seed=cfg.seed,
                         shuffle_buffer_size=cfg.shuffle_buffer_size, epochs=None, held_out=held[0] if held else None,
                         dataset=open_train_stream(cfg) if cfg.dataset_name else None)
    weights, _ = normalized_weights(sources)
    parts = []
    for s in sources:
        part = make_part(s.path, rank=rank, world_size=world_size, seed=cfg.seed, shuffle_buffer_size=0, epochs=1,
                         held_out=held[s.index] if held else None, dataset=None)
        part.worker_split = "rows"  # a source with fewer files than workers is split by rows
        parts.append(part)
    return MixtureStream(parts, weights, [str(s.path) for s in sources], seed=cfg.seed, rank=rank,
                         stop=cfg.mixture_stop, shuffle_buffer_size=cfg.shuffle_buffer_size)


# ---------------------------------------------------------------------- the held-out split of a stream


def validation_rows(cfg) -> int:
    """Rows held out from the start of each source (0: none): `validation_rows`, else
    validation_split_percentage percent of the stream's first STREAM_SAMPLE_ROWS rows."""

    if not cfg.do_eval or cfg.validation_file or getattr(cfg, "validation_split_percentage", 0) <= 0 \
            and getattr(cfg, "validation_rows", None) is None:
        return 0
    given = getattr(cfg, "validation_rows", None)
    return int(given) if given is not None else STREAM_SAMPLE_ROWS * cfg.validation_split_percentage // 100


def source_streams(cfg) -> list:
    """One unsplit `datasets.IterableDataset` per source (one for a plain train_file)."""

    sources = parse_mixture(cfg.train_file)
    if sources is None:
        return [open_train_stream(cfg)]
    return [load_files({"train": s.path}, keep_linebreaks=keeps_linebreaks(cfg), streaming=True)["train"]
            for s in sources]


def first_rows(stream, n: int, files) -> list[dict]:
    from itertools import islice


    try:
        return list(islice(iter(stream), n))
    except Exception as e:  # a first shard that cannot be read: named, before anything is built
        raise UsageError(shard_error(resolve_files(files) if files else [], e)) from None


_HELD: dict = {}


def _held_spec(cfg, n: int) -> str:
    return json.dumps([cfg.train_file, cfg.dataset_name, n, cfg.seed], default=str)


def remember_held_out(cfg, samples: list[list[dict]]) -> None:
    """The first rows of each source, as `load_streaming_raw` read them: their digests are the
    held-out keys, so building the training stream does not read those rows again."""
    n = validation_rows(cfg)
    if n:
        _HELD[_held_spec(cfg, n)] = [frozenset(rows_key(r) for r in rows[:n]) for rows in samples]


def held_out_keys(cfg) -> Optional[list[frozenset]]:
    """Per source, the digests of its held-out rows (None when nothing is held out)."""
    n = validation_rows(cfg)
    if not n:
        return None
    spec = _held_spec(cfg, n)
    if spec not in _HELD:
        sources = parse_mixture(cfg.train_file)
        paths = [s.path for s in sources] if sources else [cfg.train_file]
        _HELD[spec] = [frozenset(rows_key(r) for r in first_rows(ds, n, p))
                       for ds, p in zip(source_streams(cfg), paths)]
    return _HELD[spec]
