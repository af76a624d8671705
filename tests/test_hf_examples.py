"""The test commands of transformers' examples/pytorch/test_accelerate_examples.py, run with
`task=...` in place of the script and without `--model_name_or_path` (the tiny built-in
model), on small files of the fixtures' formats that this test writes itself. Each run must
complete and write all_results.json with our names and the scripts' names (docs/hf-scripts.md).
Steps are capped where a command asks for 50 (a handful is enough to check the plumbing)."""

from __future__ import annotations

import csv
import json
import random

import pytest

from conftest import one_thread, read_results
from notrainer.cli.run import run

WORDS = ("the cat dog bird sat ran flew on over under a red green blue mat hill tree house near far small big "
         "river stone cloud old new").split()


def sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """tests/fixtures/sample_text.txt and tests/fixtures/tests_samples/{MRPC,conll,SQUAD,swag,xsum,wmt16}
    in the same formats, with generated text."""
    root = tmp_path_factory.mktemp("tests_samples")
    rng = random.Random(0)
    (root / "sample_text.txt").write_text("\n".join(" ".join(sentence(rng) for _ in range(4)) for _ in range(40)) + "\n")

    (root / "MRPC").mkdir()
    for name, n in (("train.csv", 12), ("dev.csv", 8)):
        with open(root / "MRPC" / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "sentence1", "sentence2"])
            for i in range(n):
                s = sentence(rng)
                w.writerow([i % 2, s, s if i % 2 else sentence(rng)])

    (root / "conll").mkdir()
    tags = {"cat": "B-ANI", "dog": "B-ANI", "bird": "B-ANI", "house": "B-LOC", "hill": "B-LOC"}
    with open(root / "conll" / "sample.json", "w") as f:
        for _ in range(10):
            words = sentence(rng, 10)[:-1].lower().split() + ["."]
            f.write(json.dumps({"words": words, "ner": [tags.get(w, "O") for w in words]}) + "\n")

    (root / "SQUAD").mkdir()
    records = []
    for i in range(12):
        context = " ".join(sentence(rng) for _ in range(6))
        answer = context.split()[5]
        start = context.index(" " + answer + " ") + 1 if " " + answer + " " in context else context.index(answer)
        empty = i % 4 == 3  # some questions have no answer, as in the fixture (a SQuAD v2 sample)
        records.append({"id": f"q{i}", "question": f"What is word six of paragraph {i}?", "context": context,
                        "answers": {"answer_start": [] if empty else [start], "text": [] if empty else [answer]}})
    (root / "SQUAD" / "sample.json").write_text(json.dumps({"version": 2.0, "data": records}, indent=1))

    (root / "swag").mkdir()
    with open(root / "swag" / "sample.json", "w") as f:
        for i in range(10):
            start, right = sentence(rng, 6), sentence(rng, 5)
            endings = [sentence(rng, 5) for _ in range(3)]
            endings.insert(i % 4, right)
            f.write(json.dumps({**{f"ending{k}": e for k, e in enumerate(endings)}, "label": i % 4,
                                "sent1": start, "sent2": "The cat"}) + "\n")

    (root / "xsum").mkdir()
    with open(root / "xsum" / "sample.json", "w") as f:
        for _ in range(10):
            doc = "\n".join(sentence(rng, 12) for _ in range(5))
            f.write(json.dumps({"document": doc, "summary": doc.split("\n")[0]}) + "\n")

    (root / "wmt16").mkdir()
    with open(root / "wmt16" / "sample.json", "w") as f:
        for _ in range(10):
            en = sentence(rng, 6)
            f.write(json.dumps({"translation": {"en": en, "ro": en[::-1]}}) + "\n")

    # the image examples read Hub datasets (cats_vs_dogs_sample, semantic-segmentation-test-sample);
    # offline, folders of the same kind of data: a class folder, and images/ + masks/ pairs
    from PIL import Image

    for label, colour in (("cat", (200, 80, 40)), ("dog", (40, 80, 200))):
        (root / "cats_vs_dogs" / label).mkdir(parents=True)
        for i in range(10):
            noise = [(c + rng.randint(-30, 30)) % 256 for c in colour]
            Image.new("RGB", (32, 32), tuple(noise)).save(root / "cats_vs_dogs" / label / f"{label}_{i}.png")
    for sub in ("images", "masks"):
        (root / "segmentation" / sub).mkdir(parents=True)
    for i in range(10):
        image, mask = Image.new("RGB", (32, 32), (20, 20, 20)), Image.new("L", (32, 32), 0)
        box = (rng.randint(0, 12), rng.randint(0, 12))
        box = (*box, box[0] + 16, box[1] + 16)
        image.paste((220, 220, 40), box)
        mask.paste(1 + i % 2, box)
        image.save(root / "segmentation" / "images" / f"scene_{i}.png")
        mask.save(root / "segmentation" / "masks" / f"scene_{i}.png")
    return root


# task, the command's arguments (the script name and --model_name_or_path left out), our
# result names and the script's that must both be in all_results.json
COMMANDS = {
    "glue": ("classification", """
        --train_file {d}/MRPC/train.csv --validation_file {d}/MRPC/dev.csv
        --per_device_train_batch_size=2 --per_device_eval_batch_size=1 --learning_rate=1e-4 --seed=42
        --checkpointing_steps epoch --with_tracking""", ["eval_accuracy"]),
    "clm": ("clm", """
        --train_file {d}/sample_text.txt --validation_file {d}/sample_text.txt --block_size 128
        --per_device_train_batch_size 5 --per_device_eval_batch_size 5 --num_train_epochs 2
        --checkpointing_steps epoch --with_tracking""", ["eval_perplexity", "perplexity"]),
    "mlm": ("mlm", """
        --train_file {d}/sample_text.txt --validation_file {d}/sample_text.txt --num_train_epochs=1
        --checkpointing_steps epoch --with_tracking""", ["eval_perplexity", "perplexity"]),
    "ner": ("token_classification", """
        --train_file {d}/conll/sample.json --validation_file {d}/conll/sample.json --learning_rate=2e-4
        --per_device_train_batch_size=2 --per_device_eval_batch_size=2 --num_train_epochs=2 --seed 7
        --checkpointing_steps epoch --with_tracking""", ["eval_accuracy", "train_loss"]),
    "squad": ("qa", """
        --version_2_with_negative=False --train_file {d}/SQUAD/sample.json --validation_file {d}/SQUAD/sample.json
        --max_train_steps=10 --num_warmup_steps=2 --learning_rate=2e-4 --per_device_train_batch_size=2
        --per_device_eval_batch_size=1 --checkpointing_steps epoch --with_tracking""",
              ["eval_f1", "eval_exact_match", "eval_exact"]),
    "swag": ("multiple_choice", """
        --train_file {d}/swag/sample.json --validation_file {d}/swag/sample.json --max_train_steps=20
        --num_warmup_steps=2 --learning_rate=2e-4 --per_device_train_batch_size=2 --per_device_eval_batch_size=1
        --with_tracking""", ["eval_accuracy"]),
    "image_classification": ("image_classification", """
        --train_dir {d}/cats_vs_dogs --learning_rate 1e-4 --per_device_train_batch_size 2
        --per_device_eval_batch_size 1 --max_train_steps 2 --train_val_split 0.1 --seed 42 --with_tracking
        --checkpointing_steps 1""", ["eval_accuracy"]),
    "semantic_segmentation": ("semantic_segmentation", """
        --train_file {d}/segmentation --max_train_steps=10 --num_warmup_steps=2 --learning_rate=2e-4
        --per_device_train_batch_size=2 --per_device_eval_batch_size=1 --checkpointing_steps epoch""",
                              ["eval_overall_accuracy", "eval_mean_iou"]),
    "summarization": ("seq2seq", """
        --train_file {d}/xsum/sample.json --validation_file {d}/xsum/sample.json --max_train_steps=4
        --num_warmup_steps=2 --learning_rate=2e-4 --per_device_train_batch_size=2 --per_device_eval_batch_size=1
        --checkpointing_steps epoch --with_tracking""", ["eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum"]),
    "translation": ("seq2seq", """
        --source_lang en --target_lang ro --train_file {d}/wmt16/sample.json --validation_file {d}/wmt16/sample.json
        --max_train_steps=4 --num_warmup_steps=2 --learning_rate=3e-3 --per_device_train_batch_size=2
        --per_device_eval_batch_size=1 --source_lang en_XX --target_lang ro_RO --checkpointing_steps epoch
        --with_tracking""", ["eval_bleu"]),
}


@pytest.mark.parametrize("example", list(COMMANDS))
@pytest.mark.slow
def test_the_examples_test_command_runs(example, fixtures, tmp_path, capsys):
    task, args, names = COMMANDS[example]
    out = tmp_path / "run"
    argv = [f"task={task}", *args.format(d=fixtures).split(), "--output_dir", str(out)]
    with one_thread():
        run(argv)
    results = read_results(out)
    missing = [n for n in names if n not in results]
    assert not missing, f"{missing} not in {sorted(results)}"
    for theirs, ours in (("perplexity", "eval_perplexity"), ("eval_exact", "eval_exact_match")):
        if theirs in names:
            assert results[theirs] == results[ours]
    assert results["global_step"] > 0
    if "--with_tracking" in args:
        assert (out / "logs").is_dir(), "--with_tracking turns the trackers on"
    if example == "squad":  # the unanswerable questions are trained as SQuAD v2 does, and said so
        assert "trained and evaluated as unanswerable" in capsys.readouterr().out


# ---------------------------------------------------------------------- every argument, parsed


def parse(*argv: str):
    from notrainer.cli.run import parse_args

    return parse_args(list(argv))[0]


@pytest.mark.parametrize("argv, expected", [
    (["task=clm", "--with_tracking"], {"report_to": "all"}),
    (["task=clm", "--with_tracking", "--report_to", "tensorboard"], {"report_to": "tensorboard"}),
    (["task=clm", "--with_tracking", "false"], {"report_to": "none"}),
    (["task=clm", "--use_slow_tokenizer"], {"use_slow_tokenizer": True}),
    (["task=clm", "--low_cpu_mem_usage"], {}),
    (["task=clm", "--no_keep_linebreaks"], {"keep_linebreaks": False}),
    (["task=clm", "--model_type", "gpt2"], {"model_class": "gpt2"}),
    (["task=clm", "--pad_to_max_length", "false"], {}),
    (["task=token_classification", "--debug"], {"max_train_samples": 100, "max_eval_samples": 100}),
    (["task=token_classification", "--task_name", "pos"], {"tags_column": "pos_tags"}),
    (["task=token_classification", "--task_name", "ner"], {"tags_column": None}),
    (["task=seq2seq", "--ignore_pad_token_for_loss", "true"], {}),
    (["task=seq2seq", "--val_max_target_length", "60"], {"generation_max_length": 60}),
    (["task=seq2seq", "--text_column", "document"], {"source_column": "document", "target_column": None}),
    (["task=seq2seq", "--summary_column", "summary"], {"source_column": None, "target_column": "summary"}),
    (["task=qa", "--max_predict_samples", "5"], {"max_predict_samples": 5}),
    (["task=image_classification", "--train_val_split", "0.15"], {"validation_split_percentage": 15}),
])
def test_script_arguments_are_accepted_with_their_meaning(argv, expected):
    cfg = parse(*argv)
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name


@pytest.mark.parametrize("argv, message", [
    (["task=classification", "--pad_to_max_length"], "pad_to_max_length: notrainer pads each batch to its longest"),
    (["task=seq2seq", "--ignore_pad_token_for_loss", "false"], "notrainer always leaves padding out of the loss"),
    (["task=classification", "--task_name", "mrpc"],
     "task_name=mrpc downloads GLUE from the Hub, which this run cannot reach (offline); give the task's files"),
])
def test_script_arguments_refused_say_what_to_use(argv, message):
    from notrainer import UsageError

    with pytest.raises(UsageError) as err:
        parse(*argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_task_name_loads_glue_from_the_hub_when_online(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # online, whatever the shell has
        monkeypatch.setenv(name, "0")
    cfg = parse("task=classification", "--task_name", "mrpc")
    assert (cfg.dataset_name, cfg.dataset_config_name) == ("nyu-mll/glue", "mrpc")


def test_one_column_given_alone_pairs_with_the_other(fixtures):
    import datasets

    from notrainer.tasks.seq2seq import Seq2SeqTask

    ds = datasets.Dataset.from_list([{"id": "1", "document": "a b", "summary": "a"}])
    assert Seq2SeqTask(parse("task=seq2seq", "--text_column", "document")).columns(ds) == ("document", "summary")
    assert Seq2SeqTask(parse("task=seq2seq", "--summary_column", "summary")).columns(ds) == ("document", "summary")
    plain = datasets.Dataset.from_list([{"body": "a b", "tldr": "a"}])  # no known name: the other column
    assert Seq2SeqTask(parse("task=seq2seq", "--summary_column", "tldr")).columns(plain) == ("body", "tldr")


def test_embedded_defaults_are_said_and_keep_the_scripts_lengths_with_user_data(fixtures, capsys):
    cfg = parse("task=qa")
    assert (cfg.max_seq_length, cfg.doc_stride) == (32, 12)  # the built-in data's
    line = capsys.readouterr().out.strip()
    assert line.startswith("notrainer: no model_name_or_path, so the tiny built-in model trains with learning_rate=0.001")
    assert "max_seq_length=32" in line and "doc_stride=12" in line
    cfg = parse("task=qa", f"train_file={fixtures / 'SQUAD' / 'sample.json'}")
    assert (cfg.max_seq_length, cfg.doc_stride) == (384, 128)  # run_qa_no_trainer.py's
    assert "max_seq_length" not in capsys.readouterr().out
    cfg = parse("task=seq2seq", f"train_file={fixtures / 'xsum' / 'sample.json'}")
    assert (cfg.max_source_length, cfg.max_target_length) == (1024, 128)
    capsys.readouterr()
    assert parse("task=qa", "model_name_or_path=some/model").max_seq_length == 384
    assert capsys.readouterr().out == ""
    # the other tasks alike: the built-in data's short lengths only without a data file
    text, mrpc, conll, swag = (fixtures / "sample_text.txt", fixtures / "MRPC" / "train.csv",
                               fixtures / "conll" / "sample.json", fixtures / "swag" / "sample.json")
    for task, key, data, scripts in (("clm", "block_size", text, None), ("mlm", "max_seq_length", text, None),
                                     ("classification", "max_seq_length", mrpc, 128),
                                     ("token_classification", "max_seq_length", conll, 128),
                                     ("multiple_choice", "max_seq_length", swag, 128)):
        assert getattr(parse(f"task={task}"), key) in (32, 64), task  # the built-in data's
        assert getattr(parse(f"task={task}", f"train_file={data}"), key) == scripts, task  # None: the model's positions
    capsys.readouterr()
