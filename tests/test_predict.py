"""Prediction mode: Loop.predict on any module, the CLI's do_predict/mode keys and their errors.
(Task-level prediction files are tested in test_seq2seq.py and test_qa.py, with 2 processes there.)"""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import run_cli
from notrainer import Loop
from notrainer.cli.run import parse_args
from notrainer.errors import UsageError


def test_loop_predict_returns_every_row_once_in_order(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(11, 3)
    loader = DataLoader(TensorDataset(x), batch_size=4)  # an uneven last batch
    loop = Loop(model, torch.optim.SGD(model.parameters(), lr=0.1), [], output_dir=str(tmp_path), progress=False)
    out = loop.predict(loader, predict_fn=lambda m, batch: {"y": m(batch[0]), "row_sum": batch[0].sum(1)})
    assert [a.shape for a in out["y"]] == [(4, 2), (4, 2), (3, 2)]
    y = torch.from_numpy(__import__("numpy").concatenate(out["y"]))
    assert torch.equal(y, model(x).detach())
    assert model.training  # predict puts the model back into training mode


def test_mode_shorthand_sets_the_run_flags():
    cfg, _ = parse_args(["task=clm", "mode=eval"])
    assert (cfg.do_train, cfg.do_eval, cfg.do_predict) == (False, True, False)
    with pytest.raises(UsageError, match="do_predict=true needs test_file"):
        parse_args(["task=clm", "mode=predict"])
    with pytest.raises(UsageError, match="mode must be train, eval or predict"):
        parse_args(["task=clm", "mode=infer"])
    with pytest.raises(UsageError, match="test_file=/nonexistent.jsonl: no such file"):
        parse_args(["task=clm", "do_predict=true", "test_file=/nonexistent.jsonl"])


def test_clm_predicts_the_loss_of_each_line(tmp_path):
    import math

    from transformers import AutoModelForCausalLM

    from notrainer.data.builtin import tiny_config, train_tokenizer

    lines = ["the cat sees the dog .", "a bird and a fox are quiet today .", "we count one two three ."]
    tok = train_tokenizer(lines * 5, style="gpt")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", tok)).eval()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    test = tmp_path / "test.txt"
    test.write_text("\n".join(lines))
    run_cli("task=clm", "mode=predict", f"model_name_or_path={tmp_path / 'm'}", f"test_file={test}",
            "line_by_line=true", "per_device_eval_batch_size=2", output_dir=tmp_path / "pred")
    import json

    records = [json.loads(x) for x in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for line, record in zip(lines, records):  # the same loss as the model computes on the line alone
        ids = tok(line + tok.eos_token, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model(ids, labels=ids).loss.item()
        assert record["tokens"] == ids.shape[1] - 1
        assert record["loss"] == pytest.approx(expected, abs=1e-5)
        assert record["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)


def test_a_task_without_prediction_mode_is_refused_before_training(tmp_path):
    task_file = tmp_path / "my_task.py"
    task_file.write_text("from notrainer.tasks.clm import CLMTask\nfrom notrainer.tasks.base import Task\n\n"
                         "class NoPredict(CLMTask):\n    format_predictions = Task.format_predictions\n")
    test = tmp_path / "test.txt"
    test.write_text("the cat sees the dog .\n" * 50)
    # refused when the run starts, before any data is tokenized or any training step is taken
    with pytest.raises(UsageError, match="has no prediction mode"):
        run_cli(f"task={task_file}:NoPredict", "do_predict=true", f"test_file={test}", output_dir=tmp_path / "out")
