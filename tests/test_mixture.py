"""Data mixtures (train_file as weighted sources): realised proportions, one-line errors before
training, the evaluation split held out from the stream, per-source counters, map-style
mixtures and MLM streaming."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from conftest import one_thread, read_results, reset_accelerate_state, run_cli
from notrainer.data.mixture import MixtureStream, normalized_weights, parse_mixture
from notrainer.data.streaming import build_example_stream

# A realised proportion p^ of n draws with weight w lies within Z standard deviations
# (sqrt(w (1 - w) / n)) of w; Z = 4 fails by chance about once in 16,000 runs per source.
Z = 4.0


def _rows_file(path: Path, rows: list[dict], compress: bool = False) -> str:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return str(path)


def _id_source(folder: Path, first: int, n: int, shards: int) -> str:
    """n rows {"id", "text"} with ids first..first+n-1, in `shards` gzip files (a folder)."""
    per = -(-n // shards)
    for s in range(shards):
        ids = range(first + s * per, min(first + (s + 1) * per, first + n))
        _rows_file(folder / f"part-{s}.jsonl.gz", [{"id": i, "text": f"row {i}"} for i in ids], compress=True)
    return str(folder)


def _encode(batch):
    return {"input_ids": [[int(i)] for i in batch["id"]]}


def _mixture(paths, weights, seed=0, **kw) -> MixtureStream:
    parts = [build_example_stream(p, _encode, seed=seed, epochs=1, group_size=100) for p in paths]
    total = sum(weights)
    return MixtureStream(parts, [w / total for w in weights], [str(p) for p in paths], seed=seed, **kw)


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2]])
def test_realised_proportions_match_the_weights(tmp_path, weights):
    # sources of different sizes (a small one is upsampled: all_exhausted, several passes)
    sizes = [900, 250, 120][:len(weights)]
    paths = [_id_source(tmp_path / f"s{i}", 10_000 * i, n, shards=2) for i, n in enumerate(sizes)]
    n = 4000
    items = []
    for item in _mixture(paths, weights, seed=3):
        items.append(item)
        if len(items) == n:
            break
    from notrainer.data.mixture import SOURCE_KEY

    for i, w in enumerate(weights):
        got = sum(1 for it in items if it[SOURCE_KEY] == i) / n
        assert abs(got - w) <= Z * math.sqrt(w * (1 - w) / n), (i, got, w)
        # the item really comes from that source (ids of source i are 10000*i + ...)
        assert all(int(it["input_ids"][0]) // 10_000 == it[SOURCE_KEY] for it in items)


def test_all_exhausted_upsamples_and_first_exhausted_stops_at_the_first_source(tmp_path):
    paths = [_id_source(tmp_path / "big", 0, 300, 1), _id_source(tmp_path / "small", 10_000, 30, 1)]
    one_round = list(_mixture(paths, [0.5, 0.5], rounds=1, stop="all_exhausted"))
    big = [int(it["input_ids"][0]) for it in one_round if it["input_ids"][0] < 10_000]
    small = [int(it["input_ids"][0]) for it in one_round if it["input_ids"][0] >= 10_000]
    assert sorted(big) == list(range(300))  # every row of the big source once
    assert len(small) > 5 * 30  # the small one several passes (its per-source epochs)
    first = list(_mixture(paths, [0.5, 0.5], rounds=1, stop="first_exhausted"))
    small = [it for it in first if it["input_ids"][0] >= 10_000]
    assert len(small) == 30 and len(first) < 120  # the round ended with the small source's pass


def test_weights_are_normalised_with_a_note():
    sources = parse_mixture([{"path": "a", "weight": 2}, {"path": "b", "weight": 6}])
    weights, note = normalized_weights(sources)
    assert weights == [0.25, 0.75]
    assert note == "train_file: the mixture weights sum to 8; normalised to 0.25, 0.75"
    assert normalized_weights(parse_mixture([{"path": "a", "weight": 0.4}, {"path": "b", "weight": 0.6}]))[1] is None
    assert parse_mixture("a.jsonl,b.jsonl") is None and parse_mixture(["a.jsonl", "b.jsonl"]) is None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """Three sources, as the acceptance asks: two gzip shard sets and one plain file."""
    from notrainer.tasks.clm import builtin_corpus

    root = tmp_path_factory.mktemp("mix")
    docs = builtin_corpus(700, seed=11)
    web = [_rows_file(root / "web" / f"part-{s}.jsonl.gz", [{"text": d} for d in docs[s * 100:(s + 1) * 100]], True)
           for s in range(4)]
    code = [_rows_file(root / "code" / f"part-{s}.jsonl.gz", [{"text": d} for d in docs[400 + s * 100:500 + s * 100]],
                       True) for s in range(2)]
    books = _rows_file(root / "books.jsonl", [{"text": d} for d in docs[600:]])
    other = _rows_file(root / "other.jsonl", [{"body": d} for d in docs[:50]])
    return {"web": str(root / "web"), "code": str(root / "code"), "books": books, "other": other,
            "n_web": len(web), "n_code": len(code)}


def _spec(*pairs) -> str:
    return "train_file=[" + ", ".join(f"{{path: {p}, weight: {w}}}" for p, w in pairs) + "]"


def _cli_error(argv, capsys):
    from notrainer.cli.run import main

    status = main([*argv, "report_to=none", "progress=false"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notrainer: error:")]
    assert len(errors) == 1, errors
    return status, errors[0]


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("second, message", [
    (("web", 0), "train_file[1] ({web}): weight must be > 0, got 0"),
    (("web", -1), "train_file[1] ({web}): weight must be > 0, got -1"),
    (("nothing", 1), "train_file[1]={nothing}: the pattern matches no file"),
    (("other", 1), "train_file[1] ({other}) has columns body where train_file[0] ({books}) has text; "
     "every source needs the same columns"),
])
def test_bad_sources_are_one_line_before_training(corpus, tmp_path, capsys, streaming, second, message):
    paths = {**corpus, "nothing": str(tmp_path / "none-*.jsonl")}
    argv = ["task=clm", _spec((paths["books"], 1), (paths[second[0]], second[1])), "max_train_steps=3",
            "block_size=32", f"output_dir={tmp_path / 'run'}", f"streaming={str(streaming).lower()}"]
    status, err = _cli_error(argv, capsys)
    assert status == 2 and err == "notrainer: error: " + message.format(**paths), err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_held_out_split_of_a_stream_is_never_trained_on(corpus):
    """The first validation_rows rows of each source are the evaluation split; the training
    stream (every rank, every pass) skips them, and nothing else."""
    from notrainer.cli.run import parse_args
    from notrainer.data.raw import load_streaming_raw
    from notrainer.data.mixture import SOURCE_KEY, training_stream

    spec = _spec((corpus["web"], 0.5), (corpus["code"], 0.3), (corpus["books"], 0.2))
    cfg, _ = parse_args(["task=clm", spec, "streaming=true", "max_train_steps=5", "validation_rows=30"])
    raw = load_streaming_raw(cfg)
    held = set(raw["validation"]["text"])
    assert len(raw["validation"]) == 90 and len(held) == 90

    def part(files, **kw):  # items are the raw texts, so overlap is checked on the text itself
        return build_example_stream(files, lambda b: {"text": b["text"]}, **kw)

    seen: dict[int, set] = {0: set(), 1: set(), 2: set()}
    for world in (1, 2):
        for rank in range(world):
            stream = training_stream(cfg, part, rank, world)
            stream.rounds = 2
            for item in stream:
                seen[item[SOURCE_KEY]].add(item["text"])
    trained = set().union(*seen.values())
    assert not trained & held
    docs = {json.loads(line)["text"] for p in [corpus["books"]] for line in open(p)}
    assert seen[2] == docs - held  # everything but the held-out rows is trained on


def test_a_held_out_split_larger_than_the_sample_is_read_whole(tmp_path):
    """validation_rows above the 1000 rows sampled up front: the evaluation split is still
    exactly the rows the training stream skips."""
    from notrainer.cli.run import parse_args
    from notrainer.data.raw import load_streaming_raw

    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(1500)))
    cfg, _ = parse_args(["task=clm", f"train_file={path}", "streaming=true", "max_train_steps=5",
                         "validation_rows=1200"])
    raw = load_streaming_raw(cfg)
    assert raw["validation"]["text"] == [f"row {i}" for i in range(1200)]


def test_a_three_source_mixture_trains_with_per_source_counts(corpus, tmp_path, one_thread_per_module):
    spec = _spec((corpus["web"], 5), (corpus["code"], 3), (corpus["books"], 2))
    steps, batch, block = 60, 8, 32
    res = run_cli("task=clm", spec, "streaming=true", f"max_train_steps={steps}", f"block_size={block}",
                  f"per_device_train_batch_size={batch}", "logging_steps=20", "progress=false",
                  "learning_rate=3e-3", output_dir=tmp_path / "run")
    examples = [res[f"train_source_{i}_examples"] for i in range(3)]
    assert sum(examples) == steps * batch
    assert [res[f"train_source_{i}_tokens"] for i in range(3)] == [e * block for e in examples]
    for e, w in zip(examples, (0.5, 0.3, 0.2)):  # 480 draws (blocks, seeded): within Z sigma
        assert abs(e / (steps * batch) - w) <= Z * math.sqrt(w * (1 - w) / (steps * batch))
    assert res["eval_loss"] < 0.6 * math.log(json.loads((tmp_path / "run" / "config.json").read_text())["vocab_size"])
    # logged at each logging step too
    from notrainer.observability import history

    logged = [r for r in history.read(str(tmp_path / "run")) if r["kind"] == "train"]
    assert logged[-1]["train_source_0_examples"] == examples[0]


def test_a_map_style_mixture_interleaves_by_weight(corpus, tmp_path, one_thread_per_module):
    reset_accelerate_state()
    spec = _spec((corpus["books"], 1), (corpus["web"] + "/part-0.jsonl.gz", 1))
    res = run_cli("task=clm", spec, "max_train_steps=20", "block_size=32", "per_device_train_batch_size=8",
                  "progress=false", "mixture_stop=first_exhausted", output_dir=tmp_path / "map")
    assert res["global_step"] == 20 and math.isfinite(res["eval_loss"])


@pytest.mark.slow
def test_mlm_streams(corpus, tmp_path, one_thread_per_module):
    reset_accelerate_state()
    res = run_cli("task=mlm", "streaming=true", f"train_file={corpus['web']}", "max_train_steps=80",
                  "max_seq_length=32", "per_device_train_batch_size=16", "progress=false", "validation_rows=40",
                  output_dir=tmp_path / "mlm")
    vocab = json.loads((tmp_path / "mlm" / "config.json").read_text())["vocab_size"]
    assert res["global_step"] == 80 and res["eval_loss"] < 0.75 * math.log(vocab)
