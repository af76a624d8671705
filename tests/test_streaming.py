"""The streaming pipeline on its own: the same blocks as the map-style path, exact resume."""

import gzip
import json

import pytest
import torch
from transformers import default_data_collator

from notrainer.streaming import build_example_stream, build_stream, stream_loader, take


def _docs(n, seed=0, nulls=False):
    """n documents; with nulls, every 7th is null (dropped by CLM, so groups span reads)."""
    import random

    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(n)]
    return [None if nulls and i % 7 == 3 else d for i, d in enumerate(docs)]


def _write_shards(folder, docs, n_shards, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // n_shards)
    for s in range(n_shards):
        data = "".join(json.dumps({"text": d}) + "\n" for d in docs[s * per:(s + 1) * per]).encode()
        if compress:
            (folder / f"part-{s:03d}.jsonl.gz").write_bytes(gzip.compress(data))
        else:
            (folder / f"part-{s:03d}.jsonl").write_bytes(data)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def test_stream_blocks_equal_map_style_blocks(tmp_path, tokenizer):
    from notrainer.run import parse_args
    from notrainer.tasks.clm import CLMTask

    docs = _docs(2500, nulls=True)
    shards = _write_shards(tmp_path / "shards", docs, 3)  # 3 files, groups of 1000 rows span files
    cfg, _ = parse_args(["task=clm", f"train_file={shards}", "validation_split_percentage=0", "block_size=32"])
    task = CLMTask(cfg)
    raw = task.load_raw_datasets()
    task._block_size = 32
    expected = task.prepare_datasets(raw, tokenizer)["train"]["input_ids"]

    stream = build_stream(shards, tokenizer, block_size=32)
    got = [row["input_ids"] for row in take(stream, len(expected))]
    assert got == expected and len(expected) > 100
    one_pass = [row["input_ids"] for row in build_stream(shards, tokenizer, block_size=32, epochs=1)]
    assert one_pass == expected  # a finite pass (evaluation) ends after the data
    row = next(iter(stream))
    assert row["labels"] == row["input_ids"] and "attention_mask" not in row


def _batches(loader, n):
    return [b["input_ids"].clone() for b in take(loader, n)]


@pytest.mark.parametrize("num_workers, rank, world_size", [(0, 0, 1), (2, 0, 1), (2, 1, 2)])
def test_state_after_k_batches_resumes_with_batch_k_plus_1(tmp_path, tokenizer, num_workers, rank, world_size):
    shards = _write_shards(tmp_path / "shards", _docs(400, seed=1, nulls=True), 4)

    def loader():
        # small groups and a shuffle buffer: resume lands mid-group with a full buffer
        stream = build_stream(shards, tokenizer, block_size=16, rank=rank, world_size=world_size, seed=7,
                              shuffle_buffer_size=8, group_size=20)
        return stream_loader(stream, batch_size=4, collate_fn=default_data_collator, num_workers=num_workers)

    first = loader()
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    expected = [next(it)["input_ids"].clone() for _ in range(6)]
    del it

    fresh = loader()
    fresh.load_state_dict(state)
    got = _batches(fresh, 6)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == 6


def test_the_stream_runs_past_the_end_of_an_epoch_and_resumes_there(tmp_path, tokenizer):
    shards = _write_shards(tmp_path / "shards", _docs(60, seed=2), 2, compress=False)

    def stream():
        return build_stream(shards, tokenizer, block_size=16, seed=3, shuffle_buffer_size=4, group_size=25)

    s = stream()
    it = iter(s)
    while s.state_dict()["epoch"] == 0:
        next(it)
    for _ in range(3):  # a few blocks into the second epoch
        next(it)
    state = s.state_dict()
    expected = [next(it) for _ in range(5)]
    t = stream()
    t.load_state_dict(state)
    assert take(t, 5) == expected and state["epoch"] == 1


def test_example_stream_keeps_the_task_encoding(tmp_path):
    folder = tmp_path / "sft"
    folder.mkdir()
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def encode(batch):  # stands in for the SFT task's encode: prompt masked out of the labels
        ids = [[1, 2, 3, 4] for _ in batch["prompt"]]
        return {"input_ids": ids, "labels": [[-100, -100, 3, 4] for _ in ids]}

    items = take(build_example_stream(str(folder), encode), 10)
    assert len(items) == 10 and items[0] == {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}


def test_ranks_read_disjoint_shards(tmp_path, tokenizer):
    docs = _docs(200, seed=4)
    shards = _write_shards(tmp_path / "shards", docs, 4)
    seen = []
    for rank in range(2):
        stream = build_example_stream(shards, lambda b: {"text": b["text"]}, rank=rank, world_size=2)
        seen.append([r["text"] for r in take(stream, 100)])
    assert sorted(seen[0] + seen[1]) == sorted(docs) and not set(seen[0]) & set(seen[1])


def test_a_broken_shard_mid_stream_is_named(tmp_path, tokenizer):
    from notrainer import UsageError

    shards = _write_shards(tmp_path / "shards", _docs(40, seed=5), 2)
    broken = tmp_path / "shards" / "part-001.jsonl.gz"
    broken.write_bytes(broken.read_bytes()[:-20])  # cut off: the gzip stream ends early
    with pytest.raises(UsageError, match=r"streaming: .*part-001.jsonl.gz cannot be decompressed"):
        take(build_stream(shards, tokenizer, block_size=16, group_size=5), 10_000)
