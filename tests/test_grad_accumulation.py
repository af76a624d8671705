"""Accumulating 4 micro-batches of 2 gives the same gradient as one batch of 8.

Sequences have different lengths, so a mean of per-batch means would be wrong: the loop must
normalise by the target tokens of the whole accumulation window.
"""

import copy

import torch
from torch.utils.data import DataLoader

from conftest import reset_accelerate_state
from notrainer import Loop
from notrainer.tasks.clm import CLMTask


def _model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, bos_token_id=0, eos_token_id=0, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def _examples():
    g = torch.Generator().manual_seed(1)
    rows = []
    for length in (3, 17, 5, 12, 9, 20, 4, 14):  # very uneven target counts per micro-batch
        ids = torch.randint(1, 50, (20,), generator=g)
        mask = torch.zeros(20, dtype=torch.long)
        mask[:length] = 1
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _update(model, batch_size, accumulation, tmp_path):
    """Parameter change of one SGD(lr=1) step = minus the gradient the loop produced."""
    before = copy.deepcopy(model.state_dict())
    loader = DataLoader(_examples(), batch_size=batch_size, shuffle=False, collate_fn=_collate)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loop = Loop(model, opt, loader, max_train_steps=1, gradient_accumulation_steps=accumulation,
                max_grad_norm=0.0, num_items_fn=CLMTask(cfg=None).num_items,
                output_dir=str(tmp_path / f"b{batch_size}"), export=False, progress=False)
    loop.fit()
    return {k: before[k] - v for k, v in loop.accelerator.unwrap_model(loop.model).state_dict().items()}


def test_accumulated_gradient_equals_big_batch(tmp_path):
    big = _update(_model(), batch_size=8, accumulation=1, tmp_path=tmp_path)
    reset_accelerate_state()
    small = _update(_model(), batch_size=2, accumulation=4, tmp_path=tmp_path)
    for name in big:
        assert torch.allclose(big[name], small[name], rtol=1e-4, atol=1e-7), name
    assert any(big[k].abs().sum() > 0 for k in big)


def test_mean_of_means_would_differ():
    """The check above has teeth: weighting micro-batches equally gives another gradient."""
    model = _model()
    batches = [_collate(_examples()[i:i + 2]) for i in range(0, 8, 2)]
    naive = sum(model(**b).loss for b in batches) / 4
    naive.backward()
    g_naive = model.transformer.wte.weight.grad.clone()
    model.zero_grad()
    model(**_collate(_examples())).loss.backward()
    g_true = model.transformer.wte.weight.grad
    assert not torch.allclose(g_naive, g_true, rtol=1e-3, atol=1e-6)
