"""task=multiple_choice: the embedded default learns, the SWAG csv of the HF examples and the
general layout run, the collator's shape, prediction mode, bad input, kill -9 exact resume."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys

import pytest
from conftest import CPU_ENV, REPO, one_thread, read_results, run_cli
from dist_helpers import kill9_past_checkpoint, slow_task_source

from notrainer.errors import UsageError
from notrainer.tasks.multiple_choice import KINDS, builtin_questions

# each test here trains a model (or shares one a module fixture trains): the quick check
# (-m "not slow") leaves them to the full suite
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The embedded default as it runs with no keys (generated questions, a tiny BERT)."""
    out = tmp_path_factory.mktemp("mc") / "run"
    with one_thread():
        results = run_cli("task=multiple_choice", "logging_steps=100", output_dir=out)
    return out, results


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def swag_rows(n: int, seed: int) -> list[dict]:
    """Rows in the column layout of the HF examples' swag csv; the right ending repeats the
    noun of sent1, the others do not (a rule a tiny model picks up)."""
    rng = random.Random(seed)
    nouns = [w for words in KINDS.values() for w in words]
    rows = []
    for i in range(n):
        noun, *others = rng.sample(nouns, 4)
        label = rng.randrange(4)
        endings = [f"looks at the {o} again ." for o in others]
        endings.insert(label, f"looks at the {noun} again .")
        rows.append({"": i, "video-id": f"anetv_{i:05d}", "fold-ind": str(1000 + i),
                     "startphrase": f"someone holds a {noun} . the person", "sent1": f"someone holds a {noun} .",
                     "sent2": "the person", "gold-source": "gold", **{f"ending{j}": e for j, e in enumerate(endings)},
                     "label": label})
    return rows


def write_swag_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_embedded_default_learns_the_rule(trained):
    out, results = trained
    # 4 choices: chance is 0.25
    assert results["eval_accuracy"] >= 0.8, results
    assert results["eval_samples"] == 200
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForMultipleChoice"]

    import torch
    from transformers import AutoModelForMultipleChoice, AutoTokenizer

    model = AutoModelForMultipleChoice.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    choices = ["hammer", "banana", "tiger", "purple"]
    enc = tok(["which of these is a fruit ?"] * 4, choices, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**{k: v.unsqueeze(0) for k, v in enc.items()}).logits
    assert logits.shape == (1, 4) and choices[int(logits.argmax())] == "banana"


def test_collator_pads_every_choice_and_reshapes(tmp_path):
    from notrainer.cli.run import parse_args
    from notrainer.data.builtin import train_tokenizer

    cfg, task_cls = parse_args(["task=multiple_choice", f"output_dir={tmp_path}"])
    task = task_cls(cfg)
    raw = task.load_raw_datasets()
    tok = train_tokenizer(task.tokenizer_texts(raw), style="bert")
    ds = task.prepare_datasets(raw, tok)["train"]
    batch = task.collator(tok)([ds[i] for i in range(3)])
    b, c, length = batch["input_ids"].shape
    assert (b, c) == (3, 4) and batch["attention_mask"].shape == (3, 4, length)
    assert batch["labels"].tolist() == raw["train"]["label"][:3]
    longest = max(len(ids) for i in range(3) for ids in ds[i]["input_ids"])
    assert length == longest
    no_labels = task.collator(tok)([{k: v for k, v in ds[i].items() if k != "labels"} for i in range(2)])
    assert "labels" not in no_labels and no_labels["input_ids"].shape[:2] == (2, 4)


def test_swag_csv_of_the_hf_examples_runs_unchanged(tmp_path):
    train = write_swag_csv(tmp_path / "train.csv", swag_rows(256, seed=1))
    val = write_swag_csv(tmp_path / "val.csv", swag_rows(64, seed=2))
    with one_thread():
        res = run_cli("task=multiple_choice", f"train_file={train}", f"validation_file={val}", "max_train_steps=60",
                      "learning_rate=2e-3", "logging_steps=100", output_dir=tmp_path / "o")
    assert res["eval_samples"] == 64
    assert res["eval_accuracy"] >= 0.6, res  # chance 0.25


def test_general_layout_with_context_label_text_and_letters(tmp_path):
    from notrainer.cli.run import parse_args

    rows = [{"context": "the farm", "question": "which animal says moo ?", "choices": ["cow", "cat", "owl"],
             "answer": "cow"},
            {"context": "the sky", "question": "what colour is it ?", "choices": ["red", "blue", "green"],
             "answer": "B"},
            {"context": "maths", "question": "one plus one ?", "choices": ["1", "2", "3"], "answer": 1}]
    path = write_jsonl(tmp_path / "t.jsonl", rows * 4)
    cfg, task_cls = parse_args(["task=multiple_choice", f"train_file={path}", "validation_split_percentage=0",
                                f"output_dir={tmp_path / 'o'}"])
    task = task_cls(cfg)
    raw = task.load_raw_datasets()
    assert (task.context_col, task.question_col, task.choices_col, task.label_col) == \
        ("context", "question", "choices", "answer")
    assert task.num_choices == {"train": 3}
    from notrainer.data.builtin import train_tokenizer

    tok = train_tokenizer(task.tokenizer_texts(raw), style="bert")
    ds = task.prepare_datasets(raw, tok)["train"]
    assert ds["labels"][:3] == [0, 1, 1]
    # the second text of each pair is the question followed by the choice
    assert tok.decode(ds[0]["input_ids"][0], skip_special_tokens=True).endswith("which animal says moo ? cow")
    res = run_cli("task=multiple_choice", f"train_file={path}", f"validation_file={path}", "max_train_steps=2",
                  output_dir=tmp_path / "run")
    assert res["eval_samples"] == 12


def test_prediction_mode_writes_index_and_scores(trained, tmp_path):
    out, _ = trained
    rows = builtin_questions(30, seed=5)
    test = write_jsonl(tmp_path / "test.jsonl", [{"question": r["question"], "choices": r["choices"]} for r in rows])
    run_cli("task=multiple_choice", "mode=predict", f"model_name_or_path={out}", f"test_file={test}",
            "per_device_eval_batch_size=8", output_dir=tmp_path / "pred")
    records = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 30
    for r, row in zip(records, rows):
        assert len(r["scores"]) == 4 and abs(sum(r["scores"]) - 1) < 1e-4
        assert r["prediction"] == max(range(4), key=lambda i: r["scores"][i])
        assert r["choice"] == row["choices"][r["prediction"]]
    assert sum(r["prediction"] == row["label"] for r, row in zip(records, rows)) / 30 >= 0.7


def test_help_lists_the_task_keys():
    out = subprocess.run([sys.executable, "-m", "notrainer.run", "task=multiple_choice", "--help"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0
    for k in ("context_column", "question_column", "choices_column", "choice_columns", "label_column",
              "max_seq_length"):
        assert k in out.stdout


# ---------------------------------------------------------------------- bad input


def test_a_choice_count_that_differs_is_refused_by_row(tmp_path):
    rows = swag_rows(6, seed=3)
    rows[4]["ending3"] = ""  # the csv cell is empty: that example has 3 endings
    train = write_swag_csv(tmp_path / "t.csv", rows)
    out = tmp_path / "o"
    with pytest.raises(UsageError, match=r"train example 4 has 3 choices but the examples before it have 4"):
        run_cli("task=multiple_choice", f"train_file={train}", "validation_split_percentage=0", output_dir=out)
    assert not out.exists()
    general = [{"question": "q", "choices": ["a", "b", "c"], "label": 0}] * 3 + \
        [{"question": "q", "choices": ["a", "b"], "label": 0}]
    val = write_jsonl(tmp_path / "v.jsonl", general)
    train = write_jsonl(tmp_path / "t.jsonl", general[:3])
    with pytest.raises(UsageError, match=r"validation example 3 has 2 choices but the examples before it have 3"):
        run_cli("task=multiple_choice", f"train_file={train}", f"validation_file={val}", output_dir=out)
    assert not out.exists()


def test_a_label_out_of_range_is_refused_by_row(tmp_path):
    rows = swag_rows(6, seed=4)
    rows[2]["label"] = 4
    train = write_swag_csv(tmp_path / "t.csv", rows)
    out = tmp_path / "o"
    with pytest.raises(UsageError, match=r"train example 2: label 4 is out of range for its 4 choices \(0 to 3\)"):
        run_cli("task=multiple_choice", f"train_file={train}", "validation_split_percentage=0", output_dir=out)
    rows = [{"question": "q", "choices": ["a", "b"], "label": "zz"}] * 2
    with pytest.raises(UsageError, match=r"train example 0: label 'zz' is neither a choice index"):
        run_cli("task=multiple_choice", f"train_file={write_jsonl(tmp_path / 't.jsonl', rows)}",
                "validation_split_percentage=0", output_dir=out)
    assert not out.exists()


def test_the_cli_prints_one_line_and_exits_2(tmp_path):
    rows = swag_rows(6, seed=3)
    rows[1]["label"] = -1
    train = write_swag_csv(tmp_path / "t.csv", rows)
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "notrainer.run", "task=multiple_choice", f"train_file={train}",
                           "validation_split_percentage=0", f"output_dir={out}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, **CPU_ENV})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("notrainer: error:")]
    assert errors == ["notrainer: error: train example 1: label -1 is out of range for its 4 choices (0 to 3)"]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------- subclass and kill -9 resume

SLOW_MC = slow_task_source("notrainer.tasks.multiple_choice", "MultipleChoiceTask", "SlowMultipleChoice")
ARGS = ["report_to=none", "max_train_steps=12", "checkpointing_steps=4", "gradient_accumulation_steps=2",
        "per_device_train_batch_size=8", "logging_steps=3", "eval_steps=6", "max_eval_samples=64"]


@pytest.mark.slow
def test_kill9_then_auto_resume_is_bitwise_equal(tmp_path):
    task_file = tmp_path / "slow_mc.py"
    task_file.write_text(SLOW_MC)
    args = [f"task={task_file}:SlowMultipleChoice", *ARGS]
    ref, out = tmp_path / "ref", tmp_path / "run"
    with one_thread():
        run_cli(*args, output_dir=ref)
    kill9_past_checkpoint(args, out, 4, tmp_path / "batches")  # between step 4's and step 8's checkpoints
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_4"]
    assert not (out / "model.safetensors").exists()
    with one_thread():
        run_cli(*args, "resume_from_checkpoint=auto", output_dir=out)
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    got, want = read_results(out), read_results(ref)
    for k in ("global_step", "epoch", "eval_loss", "eval_accuracy", "train_loss"):
        assert got[k] == want[k], k
