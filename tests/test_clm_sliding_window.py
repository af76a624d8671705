"""task=clm eval_stride=N: sliding-window perplexity. Each token is scored once with up to
block_size - 1 tokens of context; the result matches a token-by-token computation, equals the
non-overlapping blocks at stride = block_size, and is lower than theirs on the default run."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import run_cli

from notrainer.errors import UsageError
from notrainer.tasks.clm import sliding_windows


@pytest.mark.parametrize("n,block,stride", [(50, 8, 1), (50, 8, 3), (50, 8, 8), (64, 8, 8), (5, 8, 2), (97, 16, 5)])
def test_every_token_is_scored_once_with_at_most_block_minus_one_context(n, block, stride):
    ids = list(range(1000, 1000 + n))
    windows, labels = sliding_windows(ids, block, stride)
    assert len({len(w) for w in windows}) == 1 and len(windows[0]) == min(n, block)
    scored = []
    for w, lab in zip(windows, labels):
        # the model shifts the labels: position 0 of a window is never a target
        targets = [w[i] for i in range(1, len(w)) if lab[i] != -100]
        assert all(lab[i] in (-100, w[i]) for i in range(len(w)))
        scored += targets
    if stride < block:  # every token but the text's first
        assert scored == ids[1:]
    else:  # the non-overlapping blocks: each block's first token has no context
        assert len(scored) == len(set(scored)) and set(scored) <= set(ids[1:])


def _tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=101, n_layer=2, n_head=2, n_embd=32, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def _task(block: int, stride: int, chunked: bool, model):
    from notrainer.cli.run import parse_args
    from notrainer.tasks import common

    cfg, task_cls = parse_args(["task=clm", f"block_size={block}", f"eval_stride={stride}",
                                f"chunked_loss={str(chunked).lower()}", "output_dir=unused"])
    task = task_cls(cfg)
    task._block_size = block
    task._head = common.chunked_loss_head(cfg, model)
    return task


@pytest.mark.parametrize("stride,chunked", [(1, False), (3, False), (3, True), (8, True)])
def test_matches_a_token_by_token_computation(stride, chunked):
    block, n = 8, 45
    model = _tiny_gpt2()
    rng = random.Random(1)
    ids = [rng.randrange(101) for _ in range(n)]
    task = _task(block, stride, chunked, model)
    windows, labels = sliding_windows(ids, block, stride)
    with torch.no_grad():
        out = task.eval_step(model, {"input_ids": torch.tensor(windows), "labels": torch.tensor(labels)})
    got = float(out["loss"].sum() / out["num_items"].sum())

    # Reference: every target token on its own forward, over exactly the context its window gives it.
    total, count, start_of = 0.0, 0, {}
    for w_index, (w, lab) in enumerate(zip(windows, labels)):
        start = max(0, min(w_index * stride + block, n) - block)
        for i in range(1, len(w)):
            if lab[i] != -100:
                start_of[start + i] = start
    with torch.no_grad():
        for p, start in sorted(start_of.items()):
            context = torch.tensor([ids[start:p]])
            assert 1 <= context.shape[1] <= block - 1
            logp = torch.log_softmax(model(context).logits[0, -1].double(), -1)
            total -= float(logp[ids[p]])
            count += 1
    assert int(out["num_items"].sum()) == count
    if stride < block:
        assert count == n - 1
        if stride == 1:  # every token has all the context the window size allows
            assert all(p - s == min(p, block - 1) for p, s in start_of.items())
    assert got == pytest.approx(total / count, rel=1e-5)


def test_stride_larger_than_block_or_with_line_by_line_is_refused(tmp_path):
    with pytest.raises(UsageError, match="eval_stride=80 is larger than block_size=64"):
        run_cli("task=clm", "eval_stride=80", "max_train_steps=1", output_dir=tmp_path / "o")
    with pytest.raises(UsageError, match="eval_stride must be >= 1"):
        run_cli("task=clm", "eval_stride=0", output_dir=tmp_path / "o")
    with pytest.raises(UsageError, match="line_by_line=true scores each line alone"):
        run_cli("task=clm", "eval_stride=8", "line_by_line=true", output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
