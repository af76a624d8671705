"""task=seq2seq: the embedded default learns, generation eval is the same on 1 and 2 processes,
translation records, prediction mode, bad input."""

import json

import pytest

from conftest import reset_accelerate_state, cli_subprocess, read_results, run_cli
from notrainer.errors import UsageError
from notrainer.tasks.seq2seq import toy_translation_pairs


# slow: each test shares the model a module fixture trains (the quick check leaves them to the full suite)
pytestmark = [pytest.mark.usefixtures("one_thread_per_module"), pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The embedded default (tiny T5, toy translation), trained briefly, exported."""
    out = tmp_path_factory.mktemp("seq2seq") / "run"
    results = run_cli("task=seq2seq", "max_train_steps=80", output_dir=out)
    reset_accelerate_state()
    return out, results


def test_default_learns_and_beats_copying_the_source(trained):
    out, results = trained
    for k in ("eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_bleu", "eval_chrf", "eval_gen_len",
              "eval_loss"):
        assert k in results and read_results(out)[k] == results[k]
    # The trivial baseline: copy the source (the toy language shares no word with English).
    from notrainer.metrics import load_metric

    val = toy_translation_pairs(2200)[2000:]
    copy_bleu = load_metric("sacrebleu").compute(predictions=[s for s, _ in val], references=[t for _, t in val])["score"]
    assert copy_bleu < 5
    assert results["eval_bleu"] > copy_bleu + 70
    assert results["eval_rouge2"] > 70 and results["eval_chrf"] > 70
    # targets have 5 to 10 words; gen_len counts generated tokens without padding
    assert 5 <= results["eval_gen_len"] <= 14


def test_export_is_a_seq2seq_model_with_generation_config(trained):
    """The export loads with its generation config and translates about as well as the run
    measured (a bound, not one exact sentence: the last bits of the weights differ by machine)."""
    out, results = trained
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

    from notrainer.metrics import load_metric

    assert (out / "generation_config.json").is_file()
    saved = GenerationConfig.from_pretrained(out)
    assert saved.decoder_start_token_id is not None
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert model.generation_config.decoder_start_token_id == saved.decoder_start_token_id  # generates with it
    val = toy_translation_pairs(2200)[2000:2064]
    ids = tok([s for s, _ in val], return_tensors="pt", padding=True)
    with torch.no_grad():
        texts = tok.batch_decode(model.generate(**ids, max_new_tokens=16), skip_special_tokens=True)
    bleu = load_metric("sacrebleu").compute(predictions=[t.strip() for t in texts], references=[t for _, t in val])["score"]
    assert bleu > results["eval_bleu"] - 10, (bleu, results["eval_bleu"], texts[:3])


@pytest.mark.slow
def test_two_process_generation_eval_and_prediction_match_one_process(trained, tmp_path):
    """The same model folder evaluated with do_train=false: 1 process in-process, 2 DDP processes.
    97 validation rows with batch 8 leave an uneven last batch that must not count twice."""
    model_dir, _ = trained
    pairs = toy_translation_pairs(97, seed=5)
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(json.dumps({"source": s, "target": t}) for s, t in pairs))
    # prediction mode in the same runs: 13 rows without targets, also uneven over 2 ranks
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join(json.dumps({"source": s}) for s, _ in toy_translation_pairs(13, seed=6)))
    common = ("task=seq2seq", "do_train=false", f"model_name_or_path={model_dir}", f"validation_file={val}",
              "do_predict=true", f"test_file={test}", "per_device_eval_batch_size=8", "max_target_length=32",
              "report_to=none")
    one = run_cli(*common, output_dir=tmp_path / "one")
    cli_subprocess(*common, f"output_dir={tmp_path / 'two'}", num_processes=2)
    two = read_results(tmp_path / "two")
    for k in ("eval_bleu", "eval_chrf", "eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_gen_len"):
        assert two[k] == one[k], k
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    assert one["eval_bleu"] > 80
    predictions = (tmp_path / "one" / "predictions.jsonl").read_text()
    assert len(predictions.splitlines()) == 13
    assert (tmp_path / "two" / "predictions.jsonl").read_text() == predictions  # same rows, same order


def test_prediction_mode_writes_translations(trained, tmp_path):
    model_dir, _ = trained
    pairs = toy_translation_pairs(20, seed=9)
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join(json.dumps({"source": s}) for s, _ in pairs))  # no targets needed
    run_cli("task=seq2seq", "mode=predict", f"model_name_or_path={model_dir}", f"test_file={test}",
            output_dir=tmp_path / "pred")
    records = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert [r["source"] for r in records] == [s for s, _ in pairs]
    correct = sum(r["prediction"] == t for r, (_, t) in zip(records, pairs))
    assert correct >= 16


def test_translation_records_and_loss_only_eval(tmp_path):
    pairs = toy_translation_pairs(120, seed=3)
    rows = [json.dumps({"translation": {"en": s, "toy": t}}) for s, t in pairs]
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:100]))
    (tmp_path / "val.jsonl").write_text("\n".join(rows[100:]))
    files = (f"train_file={tmp_path / 'train.jsonl'}", f"validation_file={tmp_path / 'val.jsonl'}")
    results = run_cli("task=seq2seq", *files, "source_lang=en", "target_lang=toy", "source_prefix=translate: ",
                      "predict_with_generate=false", "max_train_steps=3", output_dir=tmp_path / "run")
    assert "eval_loss" in results and "eval_bleu" not in results
    with pytest.raises(UsageError, match="source_lang=... and target_lang"):
        run_cli("task=seq2seq", *files, "max_train_steps=1", output_dir=tmp_path / "x")
    with pytest.raises(UsageError, match="target_lang='ro': no such language"):
        run_cli("task=seq2seq", *files, "source_lang=en", "target_lang=ro", output_dir=tmp_path / "y")


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    good = [{"document": "a b c", "summary": "b"}] * 10
    train = _write(tmp_path / "t.jsonl", good)
    with pytest.raises(UsageError, match="source_column='body': no such column"):
        run_cli("task=seq2seq", f"train_file={train}", "source_column=body", "target_column=summary",
                output_dir=tmp_path / "a")
    with pytest.raises(UsageError, match="cannot tell the source and target columns apart"):
        run_cli("task=seq2seq", f"train_file={_write(tmp_path / 'u.jsonl', [{'x': 'a', 'y': 'b'}] * 5)}",
                output_dir=tmp_path / "b")
    empty = _write(tmp_path / "e.jsonl", good[:5] + [{"document": "a b", "summary": " "}] + good[:5])
    with pytest.raises(UsageError, match="train split has 1 empty target text"):
        run_cli("task=seq2seq", f"train_file={empty}", output_dir=tmp_path / "c")

    # a decoder-only model folder
    from transformers import AutoModelForCausalLM

    from notrainer.data.builtin import tiny_config, train_tokenizer

    tok = train_tokenizer(["a b c"], style="gpt")
    gpt = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(tiny_config("gpt2", tok)).save_pretrained(gpt)
    tok.save_pretrained(gpt)
    with pytest.raises(UsageError, match="needs an encoder-decoder model.*gpt2"):
        run_cli("task=seq2seq", f"train_file={train}", f"model_name_or_path={gpt}", output_dir=tmp_path / "d")
    # through the CLI entry point: exit status 2 and one line on stderr, no traceback
    from notrainer.cli.run import main

    status = main(["task=seq2seq", f"train_file={train}", f"model_name_or_path={gpt}", f"output_dir={tmp_path / 'e'}",
                   "report_to=none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith("notrainer: error: task=seq2seq needs an encoder-decoder model")
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("args, message", [
    (("num_beams=0",), "num_beams must be >= 1"),
    (("max_target_length=0",), "max_source_length and max_target_length must be >= 1"),
    (("generation_max_length=0",), "generation_max_length must be >= 1"),
])
def test_config_values_are_checked_when_the_config_is_parsed(args, message):
    """Value checks live in Seq2SeqConfig.validate: they fail while parsing, before any data or model."""
    from notrainer.cli.run import parse_args

    with pytest.raises(UsageError, match=message):
        parse_args(["task=seq2seq", *args])


def test_preprocessing_workers_give_the_same_tokens():
    """Tokenizing goes through datasets.map: preprocessing_num_workers applies to seq2seq too."""
    from notrainer.cli.run import parse_args

    out = []
    for workers in ("null", "2"):
        cfg, task_cls = parse_args(["task=seq2seq", "max_train_samples=40", "max_eval_samples=20",
                                    f"preprocessing_num_workers={workers}"])
        task = task_cls(cfg)
        raw = task.load_raw_datasets()
        ds = task.prepare_datasets(raw, task.build_tokenizer(raw))
        out.append({name: split.to_dict() for name, split in ds.items()})
    assert out[0] == out[1] and len(out[0]["train"]["labels"]) == 40
