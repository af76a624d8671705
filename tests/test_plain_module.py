"""notrainer.Loop with a plain nn.Module: no Hugging Face model, no tokenizer."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model
from torch.utils.data import DataLoader, TensorDataset

from notrainer import Loop


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.arange(1.0, 9.0).unsqueeze(1) / 8
    return TensorDataset(x, x @ w + 0.5)


@pytest.mark.slow
def test_regression_trains_to_low_error(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train = DataLoader(_data(512, 0), batch_size=32, shuffle=True)
    val = DataLoader(_data(100, 1), batch_size=32)  # 100 is not a multiple of 32
    results = Loop(model, opt, train, loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]), eval_loader=val,
                   max_train_steps=400, output_dir=str(tmp_path), progress=False).fit()
    assert results["eval_loss"] < 0.01
    assert results["train_loss"] < 0.5

    # the export is a safetensors file the same architecture loads back
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    load_model(fresh, str(tmp_path / "model.safetensors"))
    x, y = _data(100, 1).tensors
    assert F.mse_loss(fresh(x), y).item() < 0.01


def test_extra_scalars_from_the_loss_fn_are_logged_as_window_means(tmp_path):
    """A loss_fn may return {"loss": ..., "name": scalar}: each name is logged beside train_loss,
    averaged over the logging window like the loss (and evaluation uses the "loss" entry)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    data = _data(64, 0)
    train = DataLoader(data, batch_size=8)  # not shuffled: the windows are known

    def loss_fn(m, b):
        return {"loss": F.mse_loss(m(b[0]), b[1]), "mean_target": b[1].mean()}

    results = Loop(model, torch.optim.SGD(model.parameters(), lr=0.01), train, loss_fn=loss_fn,
                   eval_loader=DataLoader(_data(16, 1), batch_size=8), max_train_steps=4,
                   gradient_accumulation_steps=2, logging_steps=2, output_dir=str(tmp_path), progress=False).fit()
    assert results["eval_loss"] > 0
    logged = [r for r in map(json.loads, (tmp_path / "log_history.jsonl").read_text().splitlines())
              if r.get("kind") == "train"]
    assert [r["step"] for r in logged] == [2, 4]
    y = data.tensors[1]
    for r, rows in zip(logged, (y[:32], y[32:])):  # 2 steps x 2 micro-batches x 8 rows per log line
        assert r["mean_target"] == pytest.approx(rows.mean().item(), rel=1e-5)
