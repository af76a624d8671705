"""task=qa: the embedded default learns to locate answers, SQuAD files as published, long
contexts in several windows, v2 metrics and threshold, prediction mode, pipeline, bad input."""

import json
from collections import defaultdict

import pytest
import torch

from conftest import reset_accelerate_state, read_results, run_cli
from notrainer.errors import UsageError
from notrainer.tasks.qa import builtin_qa


# slow: each test shares the model a module fixture trains (the quick check leaves them to the full suite)
pytestmark = [pytest.mark.usefixtures("one_thread_per_module"), pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The embedded default (tiny BERT, generated facts and questions), trained, exported."""
    out = tmp_path_factory.mktemp("qa") / "run"
    results = run_cli("task=qa", "max_train_steps=240", output_dir=out)
    reset_accelerate_state()
    return out, results


def first_fact_baseline(records) -> float:
    """Exact match of always answering with the first fact's value."""
    from notrainer.metrics import load_metric

    preds = []
    for r in records:
        first = r["context"].split(" . ")[0]
        preds.append({"id": r["id"], "prediction_text": first.split(" is ", 1)[1]})
    return load_metric("squad").compute(predictions=preds, references=[{"id": r["id"], "answers": r["answers"]}
                                                                      for r in records])["exact_match"]


def test_default_learns_to_locate_answers(trained):
    out, results = trained
    baseline = first_fact_baseline(builtin_qa(200, seed=1))
    assert 20 < baseline < 45  # three facts per context
    assert results["eval_exact_match"] > baseline + 35
    assert results["eval_f1"] >= results["eval_exact_match"] > 70
    assert read_results(out)["eval_f1"] == results["eval_f1"]
    preds = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 200 and preds[0]["id"] == "q1-0"


def test_export_is_a_question_answering_model(trained, tmp_path):
    # The export loads as a QA model and answers fresh questions about as well as the run
    # measured: a bound on exact matches, not one asserted answer (the trained bits differ
    # across machines). Evaluated through the task's own windows (the model was trained on
    # 32-token windows), as any user evaluating the export would.
    out, results = trained
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    from transformers.pipelines import SUPPORTED_TASKS

    model, tok = AutoModelForQuestionAnswering.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = model(**tok("what is the owner of the lamp ?", "the owner of the lamp is emma .", return_tensors="pt"))
    assert logits.start_logits.shape == logits.end_logits.shape and logits.start_logits.ndim == 2
    examples = builtin_qa(40, seed=77)
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    again = run_cli("task=qa", "mode=eval", f"model_name_or_path={out}", f"validation_file={fresh}",
                    "max_seq_length=32", "doc_stride=12", output_dir=tmp_path / "eval")
    reset_accelerate_state()
    assert again["eval_exact_match"] > results["eval_exact_match"] - 20, (again, results["eval_exact_match"])
    if "question-answering" in SUPPORTED_TASKS:  # transformers 5.x removed this pipeline
        from transformers import pipeline

        qa = pipeline("question-answering", model=str(out), tokenizer=str(out), device="cpu")
        answers = [qa(question=ex["question"], context=ex["context"], max_seq_len=32, doc_stride=12)["answer"].strip()
                   for ex in examples]
        right = sum(a == ex["answers"]["text"][0] for a, ex in zip(answers, examples))
        assert right / len(examples) > again["eval_exact_match"] / 100 - 0.2


def squad_nested(records) -> dict:
    """SQuAD v1/v2 json as published: data / paragraphs (one per context) / qas."""
    by_context = defaultdict(list)
    for r in records:
        by_context[r["context"]].append(r)
    paragraphs = [{"context": c, "qas": [{"id": r["id"], "question": r["question"], "is_impossible": not r["answers"]["text"],
                                         "answers": [{"text": t, "answer_start": s} for t, s in
                                                     zip(r["answers"]["text"], r["answers"]["answer_start"])]}
                                        for r in rs]} for c, rs in by_context.items()]
    return {"version": "v2.0", "data": [{"title": "generated", "paragraphs": paragraphs}]}


def test_squad_json_as_published_with_contexts_split_in_windows(trained, tmp_path):
    """Evaluate the trained folder on a nested SQuAD file with windows of 32 tokens (as in
    training): every context needs 2+ windows, and answers are picked over all of them."""
    model_dir, _ = trained
    records = builtin_qa(60, seed=7)
    val = tmp_path / "dev.json"
    val.write_text(json.dumps(squad_nested(records)))
    from notrainer.tasks.qa import QAConfig, QATask

    results = run_cli("task=qa", "do_train=false", f"model_name_or_path={model_dir}", f"validation_file={val}",
                      "max_seq_length=32", "doc_stride=12", output_dir=tmp_path / "windows")
    assert results["eval_exact_match"] >= 65, results
    # the same split with a check on how many windows there were
    task = QATask(QAConfig(task="qa", max_seq_length=32, doc_stride=12))
    from transformers import AutoTokenizer

    import datasets

    task.prepare_datasets(datasets.DatasetDict(validation=datasets.Dataset.from_list(records)),
                          AutoTokenizer.from_pretrained(model_dir))
    windows = defaultdict(int)
    for f in task._features["validation"]:
        windows[f.example_index] += 1
    assert min(windows.values()) >= 2


def test_v2_metrics_and_null_threshold(trained, tmp_path):
    """v2 data on the v1-trained model: HasAns/NoAns split; a very negative threshold makes
    every answer empty (NoAns all right, HasAns all wrong)."""
    model_dir, _ = trained
    records = builtin_qa(60, version_2=True, seed=11)
    assert any(not r["answers"]["text"] for r in records)
    val = tmp_path / "dev.jsonl"
    val.write_text("\n".join(json.dumps(r) for r in records))
    common = ("task=qa", "do_train=false", f"model_name_or_path={model_dir}", f"validation_file={val}",
              "version_2_with_negative=true", "max_seq_length=32", "doc_stride=12")
    results = run_cli(*common, output_dir=tmp_path / "v2")
    for k in ("eval_exact_match", "eval_f1", "eval_HasAns_f1", "eval_NoAns_f1"):
        assert k in results
    assert results["eval_HasAns_f1"] > 70
    empty = run_cli(*common, "null_score_diff_threshold=-1e9", output_dir=tmp_path / "v2empty")
    assert empty["eval_NoAns_f1"] == 100.0 and empty["eval_HasAns_f1"] == 0.0


def test_prediction_mode_writes_answers(trained, tmp_path):
    model_dir, _ = trained
    records = builtin_qa(30, seed=13)
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join(json.dumps({k: r[k] for k in ("id", "context", "question")}) for r in records))
    run_cli("task=qa", "mode=predict", f"model_name_or_path={model_dir}", f"test_file={test}", "max_seq_length=32", "doc_stride=12",
            output_dir=tmp_path / "pred")
    preds = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [r["id"] for r in records]
    correct = sum(p["prediction_text"] == r["answers"]["text"][0] for p, r in zip(preds, records))
    assert correct >= 20


def test_bad_input_is_one_clear_line(tmp_path):
    records = builtin_qa(20, seed=3)

    def write(name, rows):
        path = tmp_path / name
        path.write_text("\n".join(json.dumps(r) for r in rows))
        return str(path)

    moved = [dict(r) for r in records]
    moved[4] = {**moved[4], "answers": {"text": moved[4]["answers"]["text"], "answer_start": [3]}}
    with pytest.raises(UsageError, match=r"question q3-4: answer .* does not occur at answer_start=3"):
        run_cli("task=qa", f"train_file={write('moved.jsonl', moved)}", output_dir=tmp_path / "a")
    no_answer = [dict(r) for r in records]
    no_answer[2] = {**no_answer[2], "answers": {"text": [], "answer_start": []}}
    # run_qa_no_trainer.py's rule: data with unanswerable questions is read as SQuAD v2 (said in one
    # line; docs/hf-scripts.md), not refused
    from notrainer.cli.run import parse_args

    cfg, task_cls = parse_args(["task=qa", f"train_file={write('v2.jsonl', no_answer)}"])
    task = task_cls(cfg)
    task.load_raw_datasets()
    assert task.v2 and not cfg.version_2_with_negative
    blank = [dict(r) for r in records]
    blank[1] = {**blank[1], "question": "  "}
    with pytest.raises(UsageError, match="train split has 1 empty 'question' value"):
        run_cli("task=qa", f"train_file={write('blank.jsonl', blank)}", "validation_split_percentage=0",
                "do_eval=false", output_dir=tmp_path / "q")
    with pytest.raises(UsageError, match="question_column='query': no such column"):
        run_cli("task=qa", f"train_file={write('ok.jsonl', records)}", "question_column=query", output_dir=tmp_path / "c")
    with pytest.raises(UsageError, match=r"max_seq_length=12 leaves .* beside the longest question"):
        run_cli("task=qa", f"train_file={write('ok.jsonl', records)}", "max_seq_length=12", "doc_stride=4",
                output_dir=tmp_path / "d")


def test_the_three_file_layouts_read_the_same(tmp_path):
    from notrainer.tasks.qa import load_qa_file

    records = builtin_qa(6, version_2=True, seed=2)
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps(squad_nested(records)))
    flat_under_data = tmp_path / "flat.json"
    flat_under_data.write_text(json.dumps({"version": 2.0, "data": records}))
    lines = tmp_path / "lines.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in records))
    for path in (nested, flat_under_data, lines):
        ds = load_qa_file(str(path), "validation")
        got = sorted((r["id"], r["question"], r["context"], tuple(r["answers"]["text"]),
                      tuple(r["answers"]["answer_start"])) for r in ds)
        want = sorted((r["id"], r["question"], r["context"], tuple(r["answers"]["text"]),
                       tuple(r["answers"]["answer_start"])) for r in records)
        assert got == want, path.name


def test_squad_files_as_lists_globs_folders_and_compressed(tmp_path):
    """load_qa_file takes every file form the other tasks take (data.resolve_files): SQuAD
    documents compressed, several per split (a glob, a folder, a list), next to json lines."""
    import gzip

    from notrainer.tasks.qa import load_qa_file

    records = builtin_qa(9, version_2=True, seed=3)
    folder = tmp_path / "val"
    folder.mkdir()
    with gzip.open(folder / "part0.json.gz", "wt") as f:
        f.write(json.dumps(squad_nested(records[:4])))
    (folder / "part1.json").write_text(json.dumps(squad_nested(records[4:7])))
    (folder / "part2.jsonl").write_text("\n".join(json.dumps(r) for r in records[7:]))

    def rows(ds):
        return sorted((r["id"], r["question"], tuple(r["answers"]["text"]), tuple(r["answers"]["answer_start"]))
                      for r in ds)

    want = rows(records)
    assert rows(load_qa_file(str(folder), "validation")) == want
    assert rows(load_qa_file([str(folder / "part*.json*")], "validation")) == want
    assert rows(load_qa_file(str(folder / "part0.json.gz"), "validation")) == rows(records[:4])
    with pytest.raises(UsageError, match="validation_file=.*nothing.json: no such file"):
        load_qa_file(str(tmp_path / "nothing.json"), "validation")


def test_windows_are_the_same_with_preprocessing_workers(trained):
    """Tokenizing goes through datasets.map, so preprocessing_num_workers applies to QA too:
    two worker processes give the same windows, and each window still points at its own
    question (row indices are global across the workers' shards)."""
    import datasets
    from transformers import AutoTokenizer

    from notrainer.tasks.qa import QAConfig, QATask

    model_dir, _ = trained
    tok = AutoTokenizer.from_pretrained(model_dir)
    raw = datasets.DatasetDict(validation=datasets.Dataset.from_list(builtin_qa(40, seed=21)))
    results = []
    for workers in (None, 2):
        task = QATask(QAConfig(task="qa", max_seq_length=32, doc_stride=12, preprocessing_num_workers=workers))
        ds = task.prepare_datasets(raw, tok)["validation"]
        features = [(f.example_index, f.offset_mapping, f.cls_index) for f in task._features["validation"]]
        results.append((ds.to_dict(), features))
    assert results[0] == results[1]
    assert sorted({f[0] for f in results[0][1]}) == list(range(40))
    assert results[0][0]["feature_index"] == list(range(len(results[0][1])))
