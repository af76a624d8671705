"""Config parsing, --help, user tasks, and every bad input from the foundation issue."""

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, run_cli
from notrainer import UsageError
from notrainer.cli.run import parse_args


@pytest.mark.slow
def test_help_lists_every_key_with_default_and_doc():
    out = subprocess.run([sys.executable, "-m", "notrainer.run", "task=clm", "--help"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0
    for key in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "resume_from_checkpoint",
                "block_size", "text_column", "lora.r"):
        assert key in out.stdout
    assert "default: 5e-05" in out.stdout  # defaults are shown
    assert "task=clm keys:" in out.stdout  # the task's own keys are listed apart


def test_types_and_nested_keys_parse():
    cfg, task_cls = parse_args(["task=clm", "learning_rate=3e-4", "max_train_steps=7", "lora.r=4",
                                "checkpointing_steps=epoch", "model_name_or_path=x"])
    assert cfg.learning_rate == 3e-4 and cfg.max_train_steps == 7 and cfg.lora.r == 4
    assert cfg.checkpointing_steps == "epoch" and task_cls.name == "clm"


def test_embedded_defaults_apply_only_without_a_model_and_yield_to_the_user():
    from notrainer.tasks.clm import CLMTask

    cfg, _ = parse_args(["task=clm"])
    assert cfg.learning_rate == CLMTask.embedded_defaults["learning_rate"] != 5e-5
    cfg, _ = parse_args(["task=clm", "learning_rate=1e-4"])
    assert cfg.learning_rate == 1e-4
    cfg, _ = parse_args(["task=clm", "model_name_or_path=some/model"])
    assert cfg.learning_rate == 5e-5


@pytest.mark.parametrize("argv, message", [
    (["task=clm", "lerning_rate=1e-3"], "unknown key 'lerning_rate' (did you mean learning_rate?)"),
    (["task=clm", "lora.rank=4"], "unknown key 'lora.rank' (did you mean lora.r"),
    (["task=clm", "max_train_steps=many"], "max_train_steps"),
    (["task=clm", "learning_rate=fast"], "learning_rate"),
    (["task=clm", "mixed_precision=fp8"], "mixed_precision must be no, fp16 or bf16"),
    (["task=clm", "lr_scheduler_type=cosin"], "did you mean cosine"),
    (["task=clm", "checkpointing_steps=often"], "checkpointing_steps must be"),
    (["task=clm", "train_file=/no/such/file.txt"], "no such file"),
    (["task=nope"], "unknown task 'nope'"),
    (["task=clm", "learning_rate"], "expected key=value"),
    (["task=no_such_module:Task"], "cannot import 'no_such_module'"),
])
def test_bad_input_is_one_clear_line(argv, message):
    with pytest.raises(UsageError) as err:
        parse_args(argv)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_empty_and_unreadable_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UsageError, match="empty"):
        parse_args(["task=clm", f"train_file={tmp_path / 'empty.txt'}"])
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(UsageError, match="unsupported file type .xml"):
        run_cli("task=clm", f"train_file={tmp_path / 'data.xml'}", output_dir=tmp_path / "r0")


def test_missing_text_column(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"body": "hello world"}) + "\n")
    with pytest.raises(UsageError, match="1 row.*too few to hold out"):
        run_cli("task=clm", f"train_file={tmp_path / 't.jsonl'}", output_dir=tmp_path / "r0")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"body": f"hello world {i}"}) for i in range(20)))
    with pytest.raises(UsageError, match="text_column='text'.*no such column.*body"):
        run_cli("task=clm", f"train_file={tmp_path / 't.jsonl'}", "text_column=text", output_dir=tmp_path / "r")


def test_block_size_larger_than_the_model(tmp_path):
    with pytest.raises(UsageError, match="block_size=4096 is larger than the model's 512 positions"):
        run_cli("task=clm", "block_size=4096", output_dir=tmp_path / "r")


def test_tokenizer_without_pad_token_where_padding_is_needed(tmp_path):
    from notrainer.data.builtin import train_tokenizer
    from notrainer.tasks.clm import builtin_corpus

    tok = train_tokenizer(builtin_corpus(50), style="gpt")
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(UsageError, match="no pad token, which line_by_line=true"):
        run_cli("task=clm", f"tokenizer_name={tmp_path / 'tok'}", "line_by_line=true", output_dir=tmp_path / "r")


@pytest.mark.slow
def test_cli_exit_status_and_single_line_on_stderr(tmp_path):
    out = subprocess.run([sys.executable, "-m", "notrainer.run", "task=clm", "lerning_rate=1",
                          f"output_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["notrainer: error: unknown key 'lerning_rate' (did you mean learning_rate?)"]
    assert not any(tmp_path.iterdir()), "nothing is written before the input is valid"


def test_import_time_warnings_of_bitsandbytes_and_kernels_stay_off_stderr():
    """Whether or not they are installed: their warnings at peft's import (a Hub kernel they cannot
    have offline) would otherwise come before every one-line error (docs/versions.md)."""
    code = textwrap.dedent("""
        import logging
        import notrainer.cli.run
        logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
        logging.getLogger("kernels").error("an error still shows")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines() == ["an error still shows"]


@pytest.mark.slow
def test_subclassed_task_from_a_file(tmp_path):
    """task=path/file.py:Class runs a user's subclass; its collator is the one used."""
    (tmp_path / "my_task.py").write_text(textwrap.dedent('''
        import torch
        from notrainer.tasks.clm import CLMTask

        class OnlySecondHalf(CLMTask):
            """Train only on the second half of each block."""
            calls = 0

            def collator(self, tokenizer):
                base = super().collator(tokenizer)

                def collate(rows):
                    OnlySecondHalf.calls += 1
                    batch = base(rows)
                    half = batch["labels"].shape[1] // 2
                    batch["labels"][:, :half] = -100
                    return batch
                return collate
    '''))
    results = run_cli(f"task={tmp_path / 'my_task.py'}:OnlySecondHalf", "max_train_steps=4", "block_size=32",
                      output_dir=tmp_path / "run")
    import my_task  # registered in sys.modules by the loader

    assert my_task.OnlySecondHalf.calls >= 4
    assert results["global_step"] == 4


def test_subclassed_task_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_pkg_tasks.py").write_text(textwrap.dedent('''
        from notrainer.tasks.clm import CLMTask

        class Tiny(CLMTask):
            embedded_defaults = {**CLMTask.embedded_defaults, "block_size": 16}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg, task_cls = parse_args(["task=my_pkg_tasks:Tiny"])
    assert task_cls.__name__ == "Tiny" and cfg.block_size == 16
    with pytest.raises(UsageError, match="not a subclass of notrainer.tasks.base.Task"):
        parse_args(["task=json:dumps"])
