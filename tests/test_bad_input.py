"""Bad input, third round: each case ends in one line on stderr and exit status 2, before
training, with no traceback and nothing written to output_dir. Run through the CLI's entry
(`notrainer.cli.run.main`, in this process: a subprocess per case costs a minute on a busy
2-core machine; tests/test_cli.py runs the entry as a real process)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from notrainer.cli.run import main

PROGRESS = re.compile(r"\[\d+:\d\d(:\d\d)?[<,]")


def cli_error(capsys, out, *argv: str) -> str:
    """Run the CLI with `argv`; assert the one-line failure and an untouched output_dir."""
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    status = main([*argv, f"output_dir={out}", "report_to=none"])
    err = capsys.readouterr().err
    # (progress bars of datasets' file reading, redrawn with \r, are progress, not messages)
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS.search(line)]
    assert status == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("notrainer: error: "), err
    if before is None:
        assert not out.exists() or out.is_file(), "nothing is written for bad input"
    else:
        assert sorted(p.name for p in out.iterdir()) == before
    return lines[0]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def texts(n: int = 40) -> list[dict]:
    return [{"text": f"the cat sat on the mat number {i} and the dog ran"} for i in range(n)]


# ---------------------------------------------------------------------- text columns


@pytest.mark.parametrize("task", ["clm", "mlm"])
@pytest.mark.parametrize("value, said", [(None, "'text' is null"), (42, "'text' is 42 (a number), not a text")])
def test_a_text_column_row_that_is_not_text(tmp_path, capsys, task, value, said):
    rows = texts()
    rows[6] = {"text": value}
    data = write_jsonl(tmp_path / "x.jsonl", rows)
    line = cli_error(capsys, tmp_path / "run", f"task={task}", f"train_file={data}")
    assert f"train_file={data} row 7: {said}" in line


def test_a_null_text_in_a_classification_csv(tmp_path, capsys):
    rows = ["text,label"] + [f"good movie {i},pos" if i % 2 else f"bad movie {i},neg" for i in range(30)]
    rows[12] = ",pos"  # an empty cell: pandas reads it as a missing value
    (tmp_path / "x.csv").write_text("\n".join(rows) + "\n")
    line = cli_error(capsys, tmp_path / "run", "task=classification", f"train_file={tmp_path / 'x.csv'}")
    assert "row 12: 'text' is null" in line


def test_a_label_column_mixing_strings_and_numbers(tmp_path, capsys):
    labels = ["pos", 1, "neg", 0]
    rows = [{"text": f"a sentence {i}", "label": labels[i % 4]} for i in range(40)]
    data = write_jsonl(tmp_path / "x.jsonl", rows)
    line = cli_error(capsys, tmp_path / "run", "task=classification", f"train_file={data}")
    assert "'label' mixes strings and numbers (row 1: \"pos\", row 2: 1)" in line
    assert data in line


# ---------------------------------------------------------------------- chats


def test_a_chat_role_the_template_does_not_know(tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(40)]
    rows[9]["messages"][0]["role"] = "robot"
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    line = cli_error(capsys, tmp_path / "run", "task=sft", f"train_file={data}")
    assert f"train_file={data} row 10: chat role 'robot' is not one the chat template knows " \
           "(system, user, assistant, tool)" in line


def test_a_template_that_names_the_role_accepts_it(tmp_path):
    from notrainer.tasks.sft import template_roles

    assert "robot" in template_roles("{% if message['role'] == 'robot' %}beep{% endif %}")
    assert "robot" not in template_roles(None)


# ---------------------------------------------------------------------- compressed files


def test_a_zstd_shard_cut_off_mid_file(tmp_path, capsys):
    zstandard = pytest.importorskip("zstandard")
    blob = zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in texts(400)).encode())
    (tmp_path / "part.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    line = cli_error(capsys, tmp_path / "run", "task=clm", f"train_file={tmp_path / 'part.jsonl.zst'}")
    assert "part.jsonl.zst is truncated: the zstd stream ends before its end mark" in line


# ---------------------------------------------------------------------- model folders


@pytest.fixture
def model_copy(base_folder, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(base_folder, path)
    return path


def test_a_truncated_safetensors_file(model_copy, tmp_path, capsys):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = cli_error(capsys, tmp_path / "run", "task=sft", f"model_name_or_path={model_copy}")
    assert "model.safetensors is damaged or incomplete" in line and "re-download or re-export" in line


def test_a_safetensors_file_cut_inside_its_header(model_copy, tmp_path, capsys):
    (model_copy / "model.safetensors").write_bytes((model_copy / "model.safetensors").read_bytes()[:100])
    line = cli_error(capsys, tmp_path / "run", "task=sft", f"model_name_or_path={model_copy}")
    assert "model.safetensors is damaged or incomplete" in line


@pytest.mark.parametrize("key_name", ["model_name_or_path", "config_name"])
def test_a_config_json_that_is_not_json(model_copy, tmp_path, capsys, key_name):
    (model_copy / "config.json").write_text('{"model_type": "llama",')
    line = cli_error(capsys, tmp_path / "run", "task=sft", f"{key_name}={model_copy}")
    assert f"{key_name}={model_copy}: config.json of the model is not valid JSON" in line
    assert "tokenizer" not in line


def test_a_damaged_tokenizer_file_is_named(model_copy, tmp_path, capsys):
    (model_copy / "tokenizer.json").write_text("{")
    line = cli_error(capsys, tmp_path / "run", "task=sft", f"tokenizer_name={model_copy}")
    assert "tokenizer.json of the model is not valid JSON" in line


# ---------------------------------------------------------------------- output_dir


def test_output_dir_is_an_existing_file(tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("notes\n")
    line = cli_error(capsys, out, "task=clm")
    assert f"output_dir={out}: output_dir is an existing file, not a folder" in line
    assert out.read_text() == "notes\n"


def test_output_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    out = tmp_path / "notes.txt" / "run"
    line = cli_error(capsys, out, "task=clm")
    assert "is a file, so no folder can be made under it" in line


@pytest.mark.parametrize("task", ["multiple_choice", "classification"])
def test_a_test_file_without_training_data(tmp_path, capsys, task):
    test = tmp_path / "q.jsonl"
    test.write_text('{"text": "a b c"}\n')
    status = main([f"task={task}", f"test_file={test}", "do_predict=true", f"output_dir={tmp_path / 'o'}",
                   "report_to=none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == ["notrainer: error: do_train=true needs training data: give train_file=... (to "
                                   "evaluate or predict with a trained model instead: mode=eval or mode=predict "
                                   "with model_name_or_path=...)"], err
    assert not (tmp_path / "o").exists()

