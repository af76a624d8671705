"""Run under 1 or 2 processes: records the learning rate each optimizer step used and prints
it as JSON on rank 0 (see tests/test_ddp.py)."""

import json
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import get_scheduler

from notrainer import Loop

out_dir = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
seen = []


def loss_fn(m, batch):
    seen.append(opt.param_groups[0]["lr"])
    return torch.nn.functional.mse_loss(m(batch[0]), batch[1])


loop = Loop(model, opt, DataLoader(data, batch_size=4, shuffle=True), loss_fn=loss_fn, max_train_steps=10,
            scheduler=lambda o, total: get_scheduler("linear", o, num_warmup_steps=3, num_training_steps=total),
            output_dir=out_dir, export=False, progress=False)
loop.fit()
if loop.accelerator.is_main_process:
    print("LRS=" + json.dumps({"lrs": seen, "processes": loop.accelerator.num_processes}))
