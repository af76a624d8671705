import pytest
"""notrainer.Loop with a plain nn.Module: no Hugging Face model, no tokenizer."""

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
