"""Streaming data: read, tokenize and pack on the fly, with a checkpointable position.

    stream = build_stream("data/*.jsonl.zst", tokenizer, block_size=1024, rank=r, world_size=n,
                          seed=42, shuffle_buffer_size=1000)
    loader = stream_loader(stream, batch_size=8, collate_fn=default_data_collator, num_workers=2)
    ...
    state = loader.state_dict()          # into the checkpoint, at an optimizer-step boundary
    loader.load_state_dict(state)        # on resume: the next batch is the one after `state`

Reading goes through `datasets` (`load_dataset(..., streaming=True)`), so every format and
compression the map-style path reads streams too. Ranks get disjoint shards through
`split_dataset_by_node` (whole files when the file count divides by the number of ranks, else
every n-th example); inside a rank, `datasets` hands each DataLoader worker its own files.

Packing follows the map-style CLM path exactly: rows are taken `group_size` (1000, the
`datasets.map` batch) at a time, each document (not a .txt line) gets the end-of-text token,
the group is concatenated and cut into `block_size` blocks and its remainder dropped. With no
shuffle buffer the stream therefore yields the very blocks the map-style path builds, in the
same order (as int64 arrays rather than lists: the collator stacks those at memory speed).

Why our own position rather than `datasets`' shuffle: the `datasets` iterable state records the
position in the files but not the shuffle buffer (it is refilled on resume, so a resumed run
sees other examples). Here the state is (epoch, the source position where the current group
starts, how many outputs of that group were handed out, the shuffle buffer, the RNG state), so
a resumed stream continues with exactly the next item. `torchdata`'s StatefulDataLoader stores
that state per worker, which makes the position exact with DataLoader workers too.
"""

from __future__ import annotations

import random
from itertools import chain
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from notrainer.data.files import load_files, resolve_files, shard_error, split_format
from notrainer.data.sources import SOURCE_KEY, held_out_keep
from notrainer.errors import UsageError, check

Batch = dict[str, list]  # a `datasets.map`-style batch: column -> values


class ShardError(UsageError):
    """A shard that breaks in the middle of the stream. Each rank reads its own shards, so only
    the rank that hit it knows: the CLI prints this one on every rank (not only rank 0)."""

    every_rank = True
Step = Callable[[Batch], Batch]


def clm_steps(tokenizer, block_size: int, text_column: str = "text", add_eos: bool = True) -> list[Step]:
    """The map-style CLM functions: tokenize each document (+ eos), then concatenate and cut
    into blocks, dropping the group's remainder; labels are the inputs (the model shifts)."""
    eos = tokenizer.eos_token if add_eos and tokenizer.eos_token else ""

    def tokenize(batch: Batch) -> Batch:
        # no attention_mask: packed blocks have no padding (see tasks/clm.py)
        texts = [t + eos for t in batch[text_column] if t is not None]
        return {"input_ids": tokenizer(texts, return_attention_mask=False)["input_ids"]}

    def group(batch: Batch) -> Batch:
        # One int64 array per group, cut into blocks: the collator stacks arrays at memory
        # speed, where it converts lists element by element (measured: a third of the
        # pipeline's time with lists). Labels are the same array: the model shifts them.
        ids = batch["input_ids"]
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=sum(map(len, ids)))
        blocks = list(flat[:len(flat) // block_size * block_size].reshape(-1, block_size))
        return {"input_ids": blocks, "labels": blocks}

    return [tokenize, group]


class PackedStream(torch.utils.data.IterableDataset):
    """An endless (epoch after epoch) iterable of dict rows with `state_dict`/`load_state_dict`.

    `make_source()` returns a fresh `datasets.IterableDataset` (already split for this rank);
    `steps` are batched functions applied to each group of `group_size` source rows, in order,
    as `datasets.map(batched=True)` would apply them. `keep(batch)` (one bool per row) drops
    source rows first (the map-style CLM path drops rows whose text is None before grouping)."""

    def __init__(self, make_source: Callable[[], Any], steps: list[Step], seed: int = 42,
                 shuffle_buffer_size: int = 0, group_size: int = 1000, rank: int = 0,
                 keep: Optional[Callable[[Batch], list]] = None, epochs: Optional[int] = None):
        check(shuffle_buffer_size >= 0, "shuffle_buffer_size must be >= 0")
        check(group_size >= 1, "group_size must be >= 1")
        self.make_source, self.steps, self.seed = make_source, steps, seed
        self.buffer_size, self.group_size, self.rank, self.keep = shuffle_buffer_size, group_size, rank, keep
        self.epochs = epochs  # None: endless (training); 1: one pass (evaluation on a validation stream)
        # how DataLoader workers share the source: "files" (whole files; a worker beyond the file
        # count gets none) or "rows" (whole files when they divide evenly, else every n-th row)
        self.worker_split = "files"
        self.rows_read = 0  # source rows read by this object (a resume re-reads at most one group)
        self._resume: Optional[dict] = None
        self._state: Optional[dict] = None

    # --------------------------------------------------------------- checkpointable position

    def state_dict(self) -> dict:
        """The position after the last item handed out (before the first one: the start, or
        the state that was loaded)."""
        if self._state is None:
            return dict(self._resume) if self._resume is not None else {"epoch": 0, "source": None, "offset": 0,
                                                                         "done": 0, "buffer": [], "rng": None}
        s = self._state
        return {"epoch": s["epoch"], "source": s["source"], "offset": s["offset"], "done": s["done"],
                "buffer": [plain_row(row) for row in s["buffer"]],
                "rng": s["rng"].getstate() if s["rng"] is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self._resume, self._state = dict(state), None

    # --------------------------------------------------------------- iteration

    def _rng(self) -> random.Random:
        info = torch.utils.data.get_worker_info()
        # one stream of shuffle choices per rank and worker, the same in every run
        return random.Random(f"{self.seed}/{self.rank}/{info.id if info else 0}")

    def _worker_source(self):
        """A fresh source; inside a DataLoader worker, only this worker's files (round robin, as
        `datasets` itself splits them; a worker beyond the file count gets none)."""
        source = self.make_source()
        info = torch.utils.data.get_worker_info()
        if info is None or info.num_workers == 1:
            return source
        if self.worker_split == "rows":
            from datasets.distributed import split_dataset_by_node

            return split_dataset_by_node(source, rank=info.id, world_size=info.num_workers)
        n = min(info.num_workers, source.num_shards)
        return source.shard(num_shards=n, index=info.id, contiguous=False) if info.id < n else None

    def _groups(self, state: dict):
        """(source position where the group starts, the group's outputs as rows), from `state` on.

        The source is read in batches of `group_size` rows (`datasets` then hands out whole
        arrow slices, much faster than row by row) and its position is taken at batch
        boundaries; a position is (the source state before a batch, rows to skip in it). Rows
        that `keep` drops make groups span batches, as map-style groups span map batches."""
        while True:
            source = self._worker_source()
            if source is None:
                return  # more workers than files: this one has nothing (not a busy loop)
            if state["source"] is not None:
                source.load_state_dict(state["source"])
            batches = iter(source.iter(batch_size=self.group_size))
            after, skip = state["source"], state["offset"]
            pending: Batch = {}
            origin = None
            produced = False
            while True:
                try:
                    batch = next(batches, None)
                except Exception as e:  # a shard that cannot be decompressed or parsed mid-stream
                    raise ShardError(shard_error(getattr(self.make_source, "files", []), e)) from None
                if batch is None:
                    break
                # a generator's state is live once it runs: after this batch, before the next
                before, after = after, source.state_dict()
                n = len(next(iter(batch.values()))) if batch else 0
                self.rows_read += n
                kept = self.keep(batch) if self.keep is not None else None
                rows = [i for i in range(skip, n) if kept is None or kept[i]]
                skip = 0
                while rows:
                    if origin is None:
                        origin = (before, rows[0])
                    take, rows = rows[:self.group_size - _length(pending)], rows[self.group_size - _length(pending):]
                    whole = len(take) == n and not pending
                    for k, v in batch.items():
                        pending.setdefault(k, []).extend(v if whole else [v[i] for i in take])
                    if _length(pending) == self.group_size:
                        produced = True
                        yield origin, self._apply(pending)
                        pending, origin = {}, None
            if pending:
                produced = True
                yield origin, self._apply(pending)
            if not produced and state["source"] is None:
                return  # no data at all for this worker
            state["epoch"] += 1
            state["source"], state["offset"] = None, 0
            if self.epochs is not None and state["epoch"] >= self.epochs:
                return

    def _apply(self, batch: Batch) -> list[dict]:
        for step in self.steps:
            batch = step(batch)
        n = _length(batch)
        return [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __iter__(self):
        resume = self._resume or {"epoch": 0, "source": None, "offset": 0, "done": 0, "buffer": [], "rng": None}
        self._resume = None
        rng = self._rng()
        if resume["rng"] is not None:
            rng.setstate(resume["rng"])
        buffer = [array_row(row) for row in resume["buffer"]]
        cursor = {"epoch": resume["epoch"], "source": resume["source"], "offset": resume.get("offset", 0)}
        skip = resume["done"]
        for (start, offset), outputs in self._groups(cursor):
            for done, item in enumerate(outputs[skip:], start=skip + 1):
                state = {"epoch": cursor["epoch"], "source": start, "offset": offset, "done": done, "buffer": buffer,
                         "rng": rng}
                if not self.buffer_size:
                    self._state = state
                    yield item
                    continue
                # seeded shuffle buffer: once full, hand out a random element and put the new one there
                item = tuple_row(item)
                if len(buffer) < self.buffer_size:
                    buffer.append(item)
                    self._state = state
                    continue
                i = rng.randrange(self.buffer_size)
                out, buffer[i] = buffer[i], item
                self._state = state
                yield dict_row(out)
            skip = 0
        while buffer:  # only a finite stream ends: empty the buffer in random order
            out = buffer.pop(rng.randrange(len(buffer)))
            yield dict_row(out)


def _length(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def tuple_row(row: dict) -> tuple:
    """Rows in the buffer are immutable, so a state_dict can share them instead of copying."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in row.items())


def dict_row(row: tuple) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in row}


def plain_row(row: tuple) -> tuple:
    """A buffered row for the checkpoint: arrays as lists (the safe torch.load reads them)."""
    return tuple((k, ("array", v.tolist()) if isinstance(v, np.ndarray) else v) for k, v in row)


def array_row(row) -> tuple:
    return tuple((k, np.asarray(v[1], dtype=np.int64) if isinstance(v, (list, tuple)) and len(v) == 2
                  and v[0] == "array" else v) for k, v in row)


def stream_source(files=None, *, dataset=None, rank: int = 0, world_size: int = 1,
                  keep_linebreaks: bool = True) -> Callable[[], Any]:
    """A factory of fresh `datasets.IterableDataset`s for this rank: from files (a path, glob,
    folder or list, as train_file takes them) or an already streaming hub `dataset`."""
    if dataset is None:
        check(files is not None, "streaming needs train_file=... (or dataset_name=...)")
        paths = resolve_files(files)
        split_format(paths)  # one format per split, checked now rather than in a worker

    def make():
        from datasets.distributed import split_dataset_by_node

        ds = dataset if dataset is not None else load_files({"train": paths}, keep_linebreaks=keep_linebreaks,
                                                             streaming=True)["train"]
        return split_dataset_by_node(ds, rank=rank, world_size=world_size) if world_size > 1 else ds

    make.files = paths if dataset is None else []
    return make


def build_stream(files, tokenizer, block_size: int, rank: int = 0, world_size: int = 1, seed: int = 42,
                 shuffle_buffer_size: int = 0, *, text_column: str = "text", add_eos: bool = True,
                 keep_linebreaks: bool = True, dataset=None, group_size: int = 1000,
                 epochs: Optional[int] = None, held_out: Optional[frozenset] = None) -> PackedStream:
    """CLM blocks from `files` (or a streaming hub `dataset`), packed as the map-style path packs.
    Endless by default (training runs for max_train_steps); `epochs=1` for an evaluation pass."""
    source = stream_source(files, dataset=dataset, rank=rank, world_size=world_size, keep_linebreaks=keep_linebreaks)
    return PackedStream(source, clm_steps(tokenizer, block_size, text_column, add_eos), seed=seed,
                        shuffle_buffer_size=shuffle_buffer_size, group_size=group_size, rank=rank,
                        keep=held_out_keep(held_out, lambda batch: [t is not None for t in batch[text_column]]),
                        epochs=epochs)


def build_example_stream(files, encode: Step, rank: int = 0, world_size: int = 1, seed: int = 42,
                         shuffle_buffer_size: int = 0, *, dataset=None, keep_linebreaks: bool = True,
                         group_size: int = 1000, epochs: Optional[int] = None,
                         held_out: Optional[frozenset] = None) -> PackedStream:
    """One tokenized example per item, through the task's own batched `encode` (SFT: input_ids
    and labels with the prompt masked). Packing is the collator's job, as in the map-style path:
    DataCollatorWithFlattening restarts position_ids at each example, so packed examples never
    attend to each other."""
    source = stream_source(files, dataset=dataset, rank=rank, world_size=world_size, keep_linebreaks=keep_linebreaks)
    return PackedStream(source, [encode], seed=seed, shuffle_buffer_size=shuffle_buffer_size,
                        group_size=group_size, rank=rank, epochs=epochs, keep=held_out_keep(held_out))


def stream_loader(stream: PackedStream, batch_size: int, collate_fn=None, num_workers: int = 0, **kwargs):
    """A DataLoader whose `state_dict()` is the exact data position (torchdata's
    StatefulDataLoader keeps one stream state per worker, and which worker is next)."""
    names = getattr(stream, "source_names", None)  # a mixture: examples and tokens counted per source
    if names:
        collate_fn = _counting_collate(collate_fn, len(names))
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        if num_workers:
            raise UsageError("streaming with dataloader_num_workers>0 needs torchdata for an exact resume position "
                             "(pip install torchdata), or set dataloader_num_workers=0") from None
        loader = _PlainStatefulLoader(stream, batch_size, collate_fn)
        loader._source_counts = [0] * (2 * len(names)) if names else None
        return loader

    class StreamLoader(_SourceCounts, StatefulDataLoader):
        def __iter__(self):
            return self._count(_one_line_errors(super().__iter__()))

    # Workers send their stream's state with every n-th batch; the state holds the shuffle
    # buffer, so with one it is sent every 64 batches (a resume replays at most 63 batches
    # from it: the position stays exact).
    kwargs.setdefault("snapshot_every_n_steps", 64 if stream.buffer_size else 1)
    loader = StreamLoader(stream, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers, **kwargs)
    loader._source_counts = [0] * (2 * len(names)) if names else None
    return loader


#: the batch key the counting collator adds: (2, sources) int64, examples and tokens per source
COUNTS_KEY = "_notrainer_source_counts"


def _counting_collate(collate_fn, n_sources: int):
    """Takes each row's source index off before `collate_fn` and adds the batch's examples and
    tokens per source as one small tensor (taken off again by the loader, in the main process)."""
    from torch.utils.data import default_collate

    inner = collate_fn or default_collate

    def collate(rows):
        counts = torch.zeros(2, n_sources, dtype=torch.int64)
        plain = []
        for row in rows:
            row = dict(row)
            i = row.pop(SOURCE_KEY)
            counts[0, i] += 1
            counts[1, i] += len(row["input_ids"]) if "input_ids" in row else 0
            plain.append(row)
        batch = inner(plain)
        batch[COUNTS_KEY] = counts
        return batch

    return collate


class _SourceCounts:
    """Examples and tokens per source of a mixture, counted from the batches handed out; part
    of the loader's state (a resumed run continues the counts)."""

    _source_counts: Optional[list] = None

    def _count(self, iterator):
        for batch in iterator:
            counts = batch.pop(COUNTS_KEY, None) if isinstance(batch, Mapping) else None
            if counts is not None and self._source_counts is not None:
                for j, v in enumerate(counts.flatten().tolist()):
                    self._source_counts[j] += v
            yield batch

    def counters(self) -> dict:
        """{"source_<i>_examples": n, "source_<i>_tokens": n}, this process's (the loop sums ranks)."""
        c = self._source_counts
        if not c:
            return {}
        n = len(c) // 2
        return {**{f"source_{i}_examples": c[i] for i in range(n)}, **{f"source_{i}_tokens": c[n + i] for i in range(n)}}

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self._source_counts is not None:
            state = {**state, "source_counts": list(self._source_counts)}
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        counts = state.pop("source_counts", None)
        if counts is not None and self._source_counts is not None:
            self._source_counts = list(counts)
        super().load_state_dict(state)


def _one_line_errors(iterator):
    """A UsageError raised in a DataLoader worker (a broken shard) comes back as torch's
    multi-line 'Caught UsageError in DataLoader worker process 0 ... Original Traceback';
    hand on our one line."""
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except UsageError as e:
            lines = [line for line in str(e).splitlines() if line.strip()]
            if "Original Traceback" not in str(e):
                raise
            raise type(e)(lines[-1].split("Error: ", 1)[-1]) from None
        yield batch


class _PlainStatefulBase(torch.utils.data.DataLoader):
    """Without torchdata and without workers the stream's own state is the loader's position."""

    def __init__(self, stream, batch_size, collate_fn):
        super().__init__(stream, batch_size=batch_size, collate_fn=collate_fn, num_workers=0)

    def state_dict(self) -> dict:
        return {"stream": self.dataset.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["stream"])


class _PlainStatefulLoader(_SourceCounts, _PlainStatefulBase):
    def __iter__(self):
        return self._count(super().__iter__())


def take(iterable: Iterable, n: int) -> list:
    out = []
    for x in iterable:
        if len(out) == n:
            break
        out.append(x)
    return out
