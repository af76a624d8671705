"""A data mixture resumes exactly: the position in the checkpoint (the draw RNG, each source's
position and passes, the shuffle buffer, the per-source counts) continues with the very next
item, reading at most one read group per source again; and a kill -9 between checkpoints then
resume_from_checkpoint=auto ends bitwise equal to the uninterrupted run (1 and 2 processes,
DataLoader workers 0 and 2, gradient accumulation 2)."""

from __future__ import annotations

import copy
import json
from itertools import islice
from pathlib import Path

import pytest

from test_mixture import _encode, _id_source, _spec
from test_resume import EVERY, SLOW_TASK, _kill9_between_checkpoints, _start

from notrainer.data.mixture import MixtureStream
from notrainer.data.streaming import build_example_stream, stream_loader

GROUP = 100  # rows per read group


def take(iterable, n: int) -> list:
    """Exactly n items (the position afterwards is right after the n-th)."""
    return list(islice(iter(iterable), n))


def _parts(paths):
    return [build_example_stream(p, _encode, seed=1, epochs=1, group_size=GROUP) for p in paths]


def _stream(paths, **kw) -> MixtureStream:
    return MixtureStream(_parts(paths), [0.5, 0.3, 0.2], [str(p) for p in paths], seed=1, **kw)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("ids")
    return [_id_source(root / "a", 0, 3000, 4), _id_source(root / "b", 10_000, 1500, 2),
            _id_source(root / "c", 20_000, 200, 1)]


@pytest.mark.parametrize("buffer", [0, 32])
def test_the_next_item_after_a_resume_is_the_uninterrupted_one_and_little_is_reread(sources, buffer):
    reference = take(_stream(sources, shuffle_buffer_size=buffer), 4000)
    stream = _stream(sources, shuffle_buffer_size=buffer)
    first = take(stream, 2500)
    state = stream.state_dict()
    read_before = sum(p.rows_read for p in stream.parts)
    resumed = _stream(sources, shuffle_buffer_size=buffer)
    resumed.load_state_dict(copy.deepcopy(state))
    rest = take(resumed, 1500)
    assert [int(x["input_ids"][0]) for x in first + rest] == [int(x["input_ids"][0]) for x in reference]
    # the resume went straight to its position: at most one read group per source was read again
    # before the first new item, where the interrupted stream had read thousands of rows
    resumed = _stream(sources, shuffle_buffer_size=buffer)
    resumed.load_state_dict(state)
    take(resumed, 1)
    assert read_before > 2400
    assert sum(p.rows_read for p in resumed.parts) <= 3 * GROUP


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_state_resumes_batches_and_per_source_counts(sources, workers):
    from torch.utils.data import default_collate

    def loader():
        return stream_loader(_stream(sources), batch_size=8, collate_fn=default_collate, num_workers=workers)

    want = take(loader(), 30)
    first = loader()
    it = iter(first)
    got = [next(it) for _ in range(12)]
    state = first.state_dict()
    counts = first.counters()
    assert sum(counts[f"source_{i}_examples"] for i in range(3)) == 12 * 8
    second = loader()
    second.load_state_dict(state)
    got += take(second, 18)
    assert all((a["input_ids"][0] == b["input_ids"][0]).all() for a, b in zip(got, want))
    assert sum(second.counters()[f"source_{i}_examples"] for i in range(3)) == 30 * 8


STEPS = 12


@pytest.fixture(scope="module")
def slow_task(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("task") / "slow_task.py"
    path.write_text(SLOW_TASK)
    return f"task={path}:SlowCLM"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Two gzip shard sets (4 and 2 files) and one plain file: with 2 processes x 2 workers the
    last two are split by rows, the first by files."""
    from test_mixture import _rows_file

    from notrainer.tasks.clm import builtin_corpus

    root = tmp_path_factory.mktemp("mix")
    docs = builtin_corpus(480, seed=13)
    for s in range(4):
        _rows_file(root / "web" / f"part-{s}.jsonl.gz", [{"text": d} for d in docs[s * 60:(s + 1) * 60]], True)
    for s in range(2):
        _rows_file(root / "code" / f"part-{s}.jsonl.gz", [{"text": d} for d in docs[240 + s * 60:300 + s * 60]], True)
    _rows_file(root / "books.jsonl", [{"text": d} for d in docs[360:]])
    return _spec((root / "web", 0.5), (root / "code", 0.3), (root / "books.jsonl", 0.2))


def _finish(args: list[str], processes: int) -> None:
    proc = _start(args, processes, slow=0)
    try:
        _, err = proc.communicate(timeout=400)
    except Exception:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("processes, workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_mixture_kill9_then_auto_resume_is_bitwise_equal(slow_task, corpus, tmp_path, processes, workers):
    args = [slow_task, corpus, "streaming=true", "shuffle_buffer_size=16", f"dataloader_num_workers={workers}",
            "report_to=none", "progress=false", f"max_train_steps={STEPS}", f"checkpointing_steps={EVERY}",
            "gradient_accumulation_steps=2", "per_device_train_batch_size=4", "block_size=32", "logging_steps=3",
            "validation_rows=20"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    _finish([*args, f"output_dir={ref}"], processes)
    _kill9_between_checkpoints([*args, f"output_dir={out}"], out, num_processes=processes)
    _finish([*args, f"output_dir={out}", "resume_from_checkpoint=auto"], processes)
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    got, want = (json.loads((p / "all_results.json").read_text()) for p in (out, ref))
    keys = ["global_step", "train_loss", "eval_loss"] + [f"train_source_{i}_{k}" for i in range(3)
                                                         for k in ("examples", "tokens")]
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
    assert sum(got[f"train_source_{i}_examples"] for i in range(3)) == STEPS * 2 * 4 * processes
    # the step losses, step by step
    from notrainer.observability import history

    def losses(run: Path):
        return [(r["step"], r["loss"]) for r in history.read(str(run)) if r["kind"] == "train"]

    assert losses(out) == losses(ref)
