"""The main job: task=clm on its embedded default, and CLM on a user's own files."""

import json
import math

import pytest

from conftest import read_results, run_cli


@pytest.mark.slow
def test_embedded_default_learns_and_exports(tmp_path):
    out = tmp_path / "run"
    results = run_cli("task=clm", "report_to=tensorboard", output_dir=out)
    assert math.isfinite(results["eval_perplexity"])
    # A random model over a ~200-token vocabulary starts near perplexity 200.
    assert results["eval_perplexity"] < 8
    assert results["train_tokens_per_second"] > 0
    assert read_results(out)["eval_perplexity"] == results["eval_perplexity"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the big cat sees the dog in the garden .", return_tensors="pt")
    assert model(**ids, labels=ids["input_ids"]).loss.item() < 3.0  # it learned the grammar
    assert (out / "config.yaml").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs are written by default"


@pytest.mark.slow
def test_own_text_files_and_yaml_config(tmp_path):
    from notrainer.tasks.clm import builtin_corpus

    docs = builtin_corpus(120, seed=3)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs[:100]))
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs[100:]))
    (tmp_path / "run.yaml").write_text(f"train_file: {tmp_path / 'train.jsonl'}\nvalidation_file: {tmp_path / 'val.jsonl'}\n"
                                       "text_column: body\nblock_size: 32\nlearning_rate: 0.001\nmax_train_steps: 5\n")
    out = tmp_path / "run"
    # keys given after config= override the file
    results = run_cli("task=clm", f"config={tmp_path / 'run.yaml'}", "max_train_steps=8", output_dir=out)
    assert results["global_step"] == 8
    saved = (out / "config.yaml").read_text()
    assert "text_column: body" in saved and "max_train_steps: 8" in saved and "learning_rate: 0.001" in saved


def test_plain_text_file_with_held_out_split(tmp_path):
    from notrainer.tasks.clm import builtin_corpus

    (tmp_path / "corpus.txt").write_text("\n".join(builtin_corpus(200, seed=5)))
    results = run_cli("task=clm", f"train_file={tmp_path / 'corpus.txt'}", "validation_split_percentage=10",
                      "max_train_steps=6", "block_size=32", output_dir=tmp_path / "run")
    assert math.isfinite(results["eval_loss"]) and results["global_step"] == 6


@pytest.mark.slow
def test_line_by_line_pads_and_masks(tmp_path):
    results = run_cli("task=clm", "line_by_line=true", "max_train_steps=6", output_dir=tmp_path / "run")
    assert math.isfinite(results["eval_perplexity"])


@pytest.mark.slow
def test_a_second_run_in_the_same_output_dir_is_refused(tmp_path):
    from notrainer import UsageError

    out = tmp_path / "run"
    run_cli("task=clm", "max_train_steps=2", output_dir=out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="already holds a run"):
        run_cli("task=clm", "max_train_steps=2", output_dir=out)
    assert (out / "model.safetensors").read_bytes() == before
    run_cli("task=clm", "max_train_steps=2", "overwrite_output_dir=true", output_dir=out)


def test_block_size_is_checked_when_the_config_is_parsed():
    from notrainer.errors import UsageError
    from notrainer.cli.run import parse_args

    with pytest.raises(UsageError, match="block_size must be >= 2"):
        parse_args(["task=clm", "block_size=1"])


def test_a_subclass_with_the_old_check_model_name_is_refused():
    """check_model is now setup (the task lifecycle in tasks/base.py): a subclass
    written for the old name would silently lose its checks, so defining it is an error."""
    from notrainer.tasks.clm import CLMTask

    with pytest.raises(TypeError, match="now called setup"):
        type("Old", (CLMTask,), {"check_model": lambda self, model, tokenizer: None})
