"""Prediction mode: Loop.predict on any module, the CLI's do_predict/mode keys and their errors.
(Task-level prediction files are tested in test_seq2seq.py and test_qa.py, with 2 processes there.)"""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import run_cli
from notrainer import Loop
from notrainer.config import parse_args
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


def test_a_task_without_prediction_mode_says_so(tmp_path):
    test = tmp_path / "test.txt"
    test.write_text("the cat sees the dog .\n" * 50)
    # refused when the run starts, before any data is tokenized or any training step is taken
    with pytest.raises(UsageError, match="task=clm has no prediction mode"):
        run_cli("task=clm", "do_predict=true", f"test_file={test}", output_dir=tmp_path / "out")
