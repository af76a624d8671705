"""task=mlm: the default learns, eval masking is seeded, whole-word masking, line_by_line, bad input."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from notrainer.data import builtin
from notrainer.cli.run import parse_args
from notrainer.errors import UsageError

# each test here trains a model (or shares one a module fixture trains): the quick check
# (-m "not slow") leaves them to the full suite
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlm") / "run"
    results = run_cli("task=mlm", "max_train_steps=30", "logging_steps=100", output_dir=out)
    return out, results


def test_embedded_default_beats_chance_and_exports_a_masked_lm(trained):
    out, results = trained
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    # a uniform guess has perplexity = vocab size and accuracy 1/vocab
    assert results["eval_perplexity"] < vocab / 4, (results, vocab)
    assert results["eval_accuracy"] > 10 / vocab, (results, vocab)

    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(out))
    assert len(fill("the cat sees the [MASK] .")) == 5


def test_eval_perplexity_is_the_same_on_every_run(trained, tmp_path):
    """Eval masks are drawn once per row from (seed, row): batch size does not change them."""
    out, _ = trained
    val = tmp_path / "val.txt"
    from notrainer.tasks.clm import builtin_corpus

    val.write_text("\n".join(builtin_corpus(30, seed=5)) + "\n")
    args = ["task=mlm", f"model_name_or_path={out}", f"validation_file={val}", "do_train=false", "max_seq_length=32"]
    a = run_cli(*args, "per_device_eval_batch_size=3", output_dir=tmp_path / "a")
    b = run_cli(*args, "per_device_eval_batch_size=16", output_dir=tmp_path / "b")
    assert a["eval_perplexity"] == pytest.approx(b["eval_perplexity"], rel=1e-6)
    assert a["eval_accuracy"] == b["eval_accuracy"]
    c = run_cli(*args, "seed=7", output_dir=tmp_path / "c")
    assert c["eval_perplexity"] != pytest.approx(a["eval_perplexity"], rel=1e-6)  # other seed, other masks


def _prepared(tmp_path, texts, *args):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(texts) + "\n")
    cfg, cls = parse_args(["task=mlm", f"train_file={path}", f"validation_file={path}", *args])
    task = cls(cfg)
    raw = task.load_raw_datasets()
    tok = builtin.train_tokenizer(["went home went home went to the shop"] * 20 + ["z q x v"], vocab_size=60)
    task._max_len = cfg.max_seq_length or 64
    return task, tok, task.prepare_datasets(raw, tok)


def test_whole_word_masking_masks_every_piece_of_a_word(tmp_path):
    texts = ["zqxv went home zqxv went to the shop zqxv", "the shop zqxv home went"] * 10
    task, tok, ds = _prepared(tmp_path, texts, "whole_word_masking=true", "line_by_line=true",
                              "mlm_probability=0.5", "max_seq_length=32")
    val = ds["validation"]
    masked_words = 0
    for i in range(len(val)):
        enc = tok(texts[i])
        words = enc.word_ids()
        labels = val[i]["labels"]
        for w in set(x for x in words if x is not None):
            flags = {labels[j] != -100 for j, x in enumerate(words) if x == w}
            assert len(flags) == 1, (texts[i], labels)  # all pieces of a word masked, or none
            masked_words += flags == {True}
    assert masked_words > 10
    # training batches: the collator masks afresh, whole words too
    batch = task.collator(tok)([{k: v for k, v in ds["train"][i].items()} for i in range(4)])
    assert batch["labels"].shape == batch["input_ids"].shape and (batch["labels"] != -100).any()


def test_concatenate_and_chunk_and_line_by_line(tmp_path):
    texts = ["went home went to the shop"] * 30
    _, tok, chunked = _prepared(tmp_path, texts, "max_seq_length=16")
    assert {len(x) for x in chunked["train"]["input_ids"]} == {16}
    _, tok, lines = _prepared(tmp_path, texts, "line_by_line=true", "max_seq_length=16")
    assert len(lines["train"]) == 30 and len(lines["train"][0]["input_ids"]) == len(tok(texts[0])["input_ids"])


def test_num_items_counts_masked_tokens(tmp_path):
    import torch

    from notrainer.tasks.mlm import MLMTask

    cfg, _ = parse_args(["task=mlm"])
    labels = torch.tensor([[-100, 5, -100, 7], [3, -100, -100, -100]])
    assert int(MLMTask(cfg).num_items({"labels": labels})) == 3


def test_bad_input(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("a few words\n")
    with pytest.raises(UsageError, match="mlm_probability must be in"):
        run_cli("task=mlm", f"train_file={path}", "mlm_probability=1.5", output_dir=tmp_path / "o")
    with pytest.raises(UsageError, match="shorter than one block of 64 tokens"):
        run_cli("task=mlm", f"train_file={path}", "validation_split_percentage=0", "max_seq_length=64",
                output_dir=tmp_path / "o")
    js = tmp_path / "train.json"
    js.write_text('{"body": "some text"}\n')
    with pytest.raises(UsageError, match="text_column='content': no such column"):
        run_cli("task=mlm", f"train_file={js}", "text_column=content", "validation_split_percentage=0", output_dir=tmp_path / "o")


def test_no_prediction_mode(tmp_path):
    test = tmp_path / "test.txt"
    test.write_text("the cat sees the dog .\n")
    with pytest.raises(UsageError, match="task=mlm has no prediction mode"):
        run_cli("task=mlm", "do_predict=true", f"test_file={test}", output_dir=tmp_path / "o")
    assert not (tmp_path / "o" / "all_results.json").exists()
