"""The streaming pipeline on its own: the same blocks as the map-style path, exact resume."""

import gzip
import json
import math

import pytest
import torch
from transformers import default_data_collator

from notrainer.data.streaming import build_example_stream, build_stream, stream_loader, take


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
    from notrainer.cli.run import parse_args
    from notrainer.tasks.clm import CLMTask

    docs = _docs(2500, nulls=True)
    shards = _write_shards(tmp_path / "shards", docs, 3)  # 3 files, groups of 1000 rows span files
    # map-style refuses a null text before training; a stream cannot look ahead, so it skips
    # them: the stream equals map-style on the same shards without the null rows
    filled = _write_shards(tmp_path / "filled", [d for d in docs if d is not None], 3)
    cfg, _ = parse_args(["task=clm", f"train_file={filled}", "validation_split_percentage=0", "block_size=32"])
    task = CLMTask(cfg)
    raw = task.load_raw_datasets()
    task._block_size = 32
    expected = task.prepare_datasets(raw, tokenizer)["train"]["input_ids"]

    stream = build_stream(shards, tokenizer, block_size=32)
    got = [row["input_ids"].tolist() for row in take(stream, len(expected))]
    assert got == expected and len(expected) > 100
    one_pass = [row["input_ids"].tolist() for row in build_stream(shards, tokenizer, block_size=32, epochs=1)]
    assert one_pass == expected  # a finite pass (evaluation) ends after the data
    row = next(iter(stream))
    assert (row["labels"] == row["input_ids"]).all() and "attention_mask" not in row


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
    assert [r["input_ids"].tolist() for r in take(t, 5)] == [r["input_ids"].tolist() for r in expected]
    assert state["epoch"] == 1


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


# ---------------------------------------------------------------------- through the CLI (streaming=true)


def _jsonl_shards(folder, rows, n_shards):
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // n_shards)
    for s in range(n_shards):
        data = "".join(json.dumps(r) + "\n" for r in rows[s * per:(s + 1) * per]).encode()
        (folder / f"part-{s:03d}.jsonl.gz").write_bytes(gzip.compress(data))
    return str(folder)


def _task_data(tmp_path, task):
    """(train shards, validation file) of the task's built-in kind of data, under 1000 training
    rows so that the built-in tokenizer (trained on the stream's first 1000 rows when streaming)
    is the same in both runs."""
    if task == "clm":
        from notrainer.tasks.clm import builtin_corpus

        docs = [{"text": d} for d in builtin_corpus(440, seed=3)]
        train, val = docs[:400], docs[400:]
    else:
        from notrainer.tasks.sft import builtin_instructions

        train, val = builtin_instructions(n_train=800, n_eval=64, seed=3)
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    return _jsonl_shards(tmp_path / "train", train, 4), str(tmp_path / "val.jsonl")


@pytest.mark.parametrize("task, steps", [("clm", 60), ("sft", 120)])
@pytest.mark.slow
def test_streaming_trains_like_the_map_style_path(tmp_path, task, steps):
    from conftest import one_thread, reset_accelerate_state, run_cli

    train, val = _task_data(tmp_path, task)
    # With a train_file clm takes the model's 512 positions as block_size; 128 makes the same
    # comparison (streamed/map-style eval loss 0.983 here) at a sixth of the test's time.
    common = [f"task={task}", f"train_file={train}", f"validation_file={val}", f"max_train_steps={steps}",
              "logging_steps=1000", "progress=false", *(["block_size=128"] if task == "clm" else [])]
    with one_thread():
        mapped = run_cli(*common, output_dir=tmp_path / "map")
        reset_accelerate_state()
        streamed = run_cli(*common, "streaming=true", "shuffle_buffer_size=64", output_dir=tmp_path / "stream")
    vocab = json.loads((tmp_path / "stream" / "config.json").read_text())["vocab_size"]
    # learnt: far below a uniform guess over the vocabulary, and within 5% of the map-style run
    assert streamed["eval_loss"] < 0.5 * math.log(vocab)
    assert streamed["eval_loss"] == pytest.approx(mapped["eval_loss"], rel=0.05)
    assert streamed["global_step"] == steps


def _cli_error(argv, capsys):
    from notrainer.cli.run import main

    status = main([*argv, "report_to=none", "progress=false"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notrainer: error:")]
    assert len(errors) == 1, errors
    return status, errors[0]


@pytest.mark.parametrize("args, message", [
    (["task=clm"], "streaming=true needs max_train_steps=N"),
    (["task=classification", "max_train_steps=5"],
     "streaming=true: task=classification cannot stream (clm, sft and mlm can)"),
    (["task=clm", "max_train_steps=5", "line_by_line=true"], "line_by_line=true cannot stream"),
])
def test_streaming_settings_that_cannot_work_are_one_line(tmp_path, capsys, args, message):
    train, _ = _task_data(tmp_path, "clm")
    status, err = _cli_error([*args, "streaming=true", f"train_file={train}", f"output_dir={tmp_path / 'run'}"], capsys)
    assert status == 2 and message in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.slow
def test_a_shard_that_breaks_mid_stream_stops_the_run_at_a_step_boundary(tmp_path, capsys, workers):
    from notrainer.engine.checkpoint import list_checkpoints, verify

    # Four good shards of 900 short documents (a read group each: ~8 steps), then a cut-off one
    # (with 2 workers, worker 0 reads part-000, -002, then the broken -004).
    docs = [{"text": d} for d in _docs(4500, seed=6)]
    train = _jsonl_shards(tmp_path / "train", docs, 5)
    broken = tmp_path / "train" / "part-004.jsonl.gz"
    broken.write_bytes(broken.read_bytes()[:-30])
    out = tmp_path / "run"
    status, err = _cli_error(["task=clm", "streaming=true", f"train_file={train}", "max_train_steps=500",
                              "checkpointing_steps=2", "block_size=64", "per_device_train_batch_size=16",
                              # no held-out rows: dropping them makes a worker read its next 1000
                              # rows (into the broken shard) before its first batch
                              "validation_split_percentage=0",
                              f"dataloader_num_workers={workers}", f"output_dir={out}"], capsys)
    assert status == 2 and err.startswith(f"notrainer: error: streaming: {broken} cannot be decompressed")
    saved = list_checkpoints(out)
    assert len(saved) >= 3 and all(verify(p) is None for p in saved)  # everything saved is intact
    assert not (out / "model.safetensors").exists()


def test_a_streaming_checkpoint_resumes_only_with_its_number_of_processes(tmp_path):
    from notrainer import UsageError
    from notrainer.engine.checkpoint import load_loader_state, save_loader_state

    for rank in range(2):
        save_loader_state(str(tmp_path), rank, {"rank": rank, "rng": (3, (1, 2), None)})
    assert load_loader_state(str(tmp_path), 1, 2) == {"rank": 1, "rng": (3, (1, 2), None)}
    with pytest.raises(UsageError, match="data positions of 2 process"):
        load_loader_state(str(tmp_path), 0, 1)
