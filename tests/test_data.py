"""Data files: globs, folders, lists, compressed shards, line breaks, and bad input named by place."""

import bz2
import gzip
import json
import lzma

import pytest

from notrainer import UsageError
from notrainer.data.files import check_local_model_path, load_files, resolve_files
from notrainer.cli.run import main, parse_args

DOCS = [f"the doc number {i} says hello" for i in range(30)]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps({"text": r}) + "\n" for r in rows).encode()


@pytest.fixture()
def shards(tmp_path):
    """The same 30 documents as one plain file and as shards in several forms."""
    (tmp_path / "plain.jsonl").write_bytes(_jsonl(DOCS))
    folder = tmp_path / "shards"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(DOCS[:10])))
    (folder / "b.jsonl.bz2").write_bytes(bz2.compress(_jsonl(DOCS[10:20])))
    (folder / "sub" / "c.jsonl.xz").write_bytes(lzma.compress(_jsonl(DOCS[20:])))
    (folder / "_SUCCESS").write_text("")  # written by Spark/Hadoop jobs: not data
    return tmp_path


def _texts(spec):
    return load_files({"train": spec})["train"]["text"]


def test_glob_folder_list_and_compressed_shards_load_the_same_rows(shards):
    folder = shards / "shards"
    assert _texts(str(shards / "plain.jsonl")) == DOCS
    assert _texts(str(folder)) == DOCS  # a folder, recursively, sorted
    assert _texts(f"{folder}/**/*.jsonl.*") == DOCS  # a glob
    listed = [str(folder / "a.jsonl.gz"), str(folder / "b.jsonl.bz2"), str(folder / "sub" / "c.jsonl.xz")]
    assert _texts(listed) == DOCS  # a YAML list
    assert _texts(",".join(listed)) == DOCS  # comma-separated


def test_zstd_shard_loads(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(DOCS)))
    assert _texts(str(tmp_path / "a.jsonl.zst")) == DOCS


def test_a_list_and_a_glob_parse_from_the_command_line(shards):
    folder = shards / "shards"
    cfg, _ = parse_args(["task=clm", f"train_file=[{folder}/a.jsonl.gz,{folder}/b.jsonl.bz2]",
                         f"validation_file={folder}/sub/*.xz"])
    assert list(cfg.train_file) == [f"{folder}/a.jsonl.gz", f"{folder}/b.jsonl.bz2"]
    assert resolve_files(cfg.validation_file) == [f"{folder}/sub/c.jsonl.xz"]


def test_clm_blocks_from_shards_equal_blocks_from_one_file(shards):
    from notrainer.tasks.clm import CLMTask

    blocks = []
    for spec in (str(shards / "plain.jsonl"), f"{shards}/shards/**/*.jsonl.*"):
        cfg, _ = parse_args(["task=clm", f"train_file={spec}", "validation_split_percentage=0", "block_size=16"])
        task = CLMTask(cfg)
        raw = task.load_raw_datasets()
        tok = task.build_tokenizer(raw)
        task._block_size = 16
        blocks.append(task.prepare_datasets(raw, tok)["train"]["input_ids"])
    assert blocks[0] == blocks[1] and len(blocks[0]) > 5


def test_text_files_keep_their_line_breaks_by_default(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert load_files({"train": str(tmp_path / "a.txt")})["train"]["text"] == ["line one\n", "line two\n"]
    assert load_files({"train": str(tmp_path / "a.txt")}, keep_linebreaks=False)["train"]["text"] == \
        ["line one", "line two"]


def test_a_text_file_gives_the_tokens_run_clm_no_trainer_gives(tmp_path):
    from notrainer.tasks.clm import CLMTask

    (tmp_path / "a.txt").write_text("".join(f"line {i} of the text\n" for i in range(60)))
    cfg, _ = parse_args(["task=clm", f"train_file={tmp_path / 'a.txt'}", "validation_split_percentage=0",
                         "block_size=16"])
    task = CLMTask(cfg)
    raw = task.load_raw_datasets()
    tok = task.build_tokenizer(raw)
    task._block_size = 16
    got = task.prepare_datasets(raw, tok)["train"]["input_ids"]
    # the script: each line tokenized as read (with its line break), no end-of-text, concatenated, cut
    assert raw["train"]["text"][0] == "line 0 of the text\n"
    ids = [i for line in raw["train"]["text"] for i in tok(line)["input_ids"]]
    assert got == [ids[i:i + 16] for i in range(0, len(ids) // 16 * 16, 16)] and tok.eos_token_id not in ids


def _exit_and_message(argv, capsys):
    status = main(argv + ["report_to=none"])
    # stderr also carries datasets' progress bars; the error itself is one line
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notrainer: error:")]
    assert len(errors) == 1, errors
    return status, errors[0]


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "nothing*.jsonl"), "the pattern matches no file"),
    (lambda d: (d / "empty").mkdir() or str(d / "empty"), "the folder holds no data file"),
    (lambda d: ((d / "a.jsonl").write_text('{"text": "x"}\n'), (d / "b.csv").write_text("text\ny\n"),
                f"{d}/a.jsonl,{d}/b.csv")[-1], "files of different formats in one split (a.jsonl, b.csv)"),
])
def test_file_specs_that_cannot_work_are_one_line(tmp_path, capsys, make, message):
    status, err = _exit_and_message(["task=clm", f"train_file={make(tmp_path)}"], capsys)
    assert status == 2 and message in err


def test_csv_short_row_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "train.csv"
    path.write_text("sentence,label\ngood film,1\nbar\nbad film,0\n")
    status, err = _exit_and_message(["task=classification", f"train_file={path}", "max_train_steps=1"], capsys)
    assert status == 2
    assert f"{path} line 3: 1 field(s) where the header has 2 (sentence, label)" in err


def test_malformed_json_line_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a b c"}\n{"text": "d e f"}\n{"text": oops}\n')
    status, err = _exit_and_message(["task=clm", f"train_file={path}", "max_train_steps=1"], capsys)
    assert status == 2
    assert f"{path} line 3: not valid JSON" in err


def test_undecodable_text_names_file_and_byte_offset(tmp_path, capsys):
    path = tmp_path / "train.txt"
    path.write_bytes(b"fine line\nbad \xff byte\n")
    status, err = _exit_and_message(["task=clm", f"train_file={path}", "max_train_steps=1"], capsys)
    assert status == 2
    assert f"{path} byte 14 (line 2): not valid UTF-8 (byte 0xff)" in err


def test_misspelled_local_model_folder_is_no_such_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"model_name_or_path=./no_such_model: no such folder"):
        check_local_model_path("./no_such_model")
    check_local_model_path("gpt2")  # a hub id is left to the hub
    check_local_model_path("openai-community/gpt2")


def test_misspelled_local_model_folder_from_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, err = _exit_and_message(["task=clm", "model_name_or_path=./no_such_model", "max_train_steps=1",
                                     f"output_dir={tmp_path / 'run'}"], capsys)
    assert status == 2 and err == "notrainer: error: model_name_or_path=./no_such_model: no such folder"
    status, err = _exit_and_message(["task=sft", "tokenizer_name=../no_such_tokenizer", "max_train_steps=1",
                                     f"output_dir={tmp_path / 'run2'}"], capsys)
    assert status == 2 and err == "notrainer: error: tokenizer_name=../no_such_tokenizer: no such folder"


def test_dataset_name_takes_a_split_selection(tmp_path):
    """dataset_split picks a split or slice of a dataset_name (a local dataset folder here: offline)."""
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(_jsonl(DOCS))
    (folder / "validation.jsonl").write_bytes(_jsonl(DOCS[:4]))
    from notrainer.data.raw import load_raw_datasets

    cfg, _ = parse_args(["task=clm", f"dataset_name={folder}", "validation_split_percentage=0"])
    assert {k: len(v) for k, v in load_raw_datasets(cfg).items()} == {"train": 30, "validation": 4}
    cfg, _ = parse_args(["task=clm", f"dataset_name={folder}", "dataset_split=train[:50%]",
                         "validation_split_percentage=20"])
    raw = load_raw_datasets(cfg)
    assert len(raw["train"]) + len(raw["validation"]) == 15 and set(raw["train"]["text"]) <= set(DOCS[:15])


def test_sft_examples_from_zst_and_gz_shards_equal_examples_from_one_file(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    from notrainer.tasks.sft import SIMPLE_CHAT_TEMPLATE, builtin_instructions

    rows, _ = builtin_instructions(n_train=60, n_eval=1, seed=4)
    data = [json.dumps(r) + "\n" for r in rows]
    (tmp_path / "plain.jsonl").write_text("".join(data))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(data[:25]).encode()))
    (tmp_path / "shards" / "b.jsonl.gz").write_bytes(gzip.compress("".join(data[25:]).encode()))
    examples = []
    for spec in (str(tmp_path / "plain.jsonl"), str(tmp_path / "shards")):
        cfg, task_cls = parse_args(["task=sft", f"train_file={spec}", "validation_split_percentage=0"])
        task = task_cls(cfg)
        raw = task.load_raw_datasets()
        tok = task.build_tokenizer(raw)
        tok.chat_template = SIMPLE_CHAT_TEMPLATE  # what setup installs on a tokenizer without one
        task._max_len = 128
        examples.append(task.prepare_datasets(raw, tok)["train"]["input_ids"])
    assert examples[0] == examples[1] and len(examples[0]) == 60
