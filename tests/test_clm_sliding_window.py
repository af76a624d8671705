"""task=clm eval_stride=N: sliding-window perplexity. Each token is scored once with up to
block_size - 1 tokens of context; the result matches a token-by-token computation, equals the
non-overlapping blocks at stride = block_size (it scores exactly the text the blocks cover: the
same map batches, each cut to whole blocks), and is the same on 2 processes as on 1. Whether it
is lower than the blocks' depends on the model (docs/clm.md: the tiny default model is not)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import cli_subprocess, read_results, run_cli

from notrainer.errors import UsageError
from notrainer.tasks.clm import sliding_windows

# each test here trains a model (or shares one a module fixture trains): the quick check
# (-m "not slow") leaves them to the full suite
pytestmark = pytest.mark.slow


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


def test_windows_cover_exactly_the_text_of_the_blocks():
    """The windows are built over the blocks' map batches (1000 rows), each cut to whole blocks:
    stride = block gives the blocks row for row; a smaller stride scores every token of each
    batch's blocks but the batch's first, each once."""
    import datasets
    from types import SimpleNamespace

    from notrainer.tasks import common
    from notrainer.tasks.clm import sliding_window_dataset

    rng = random.Random(3)
    docs = [[rng.randrange(1, 500) for _ in range(rng.randint(1, 30))] for _ in range(2500)]
    ds = datasets.Dataset.from_dict({"input_ids": docs})
    cfg = SimpleNamespace(preprocessing_num_workers=None, overwrite_cache=False)
    block = 8
    blocks = ds.map(lambda b: common.group_into_blocks(b, block), batched=True, remove_columns=ds.column_names)
    same = sliding_window_dataset(ds, block, block, cfg)
    assert same["input_ids"] == blocks["input_ids"] and same["labels"] == blocks["input_ids"]

    windows = sliding_window_dataset(ds, block, 3, cfg)
    assert {len(w) for w in windows["input_ids"]} == {block}
    scored = [lab[i] for lab in windows["labels"] for i in range(1, block) if lab[i] != -100]
    expected = []
    for first in range(0, len(docs), 1000):  # each map batch: its whole blocks, all but the first token
        ids = [t for d in docs[first:first + 1000] for t in d]
        expected += ids[1:len(ids) // block * block]
    assert scored == expected


BLOCK = 64  # the embedded default's block_size (a saved model folder would default to its 512 positions)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The embedded default, briefly trained and saved (model and tokenizer)."""
    out = tmp_path_factory.mktemp("clm") / "run"
    run_cli("task=clm", "max_train_steps=30", "report_to=none", output_dir=out)
    return out


def _evaluate(folder, output_dir, *extra):
    return run_cli("task=clm", "mode=eval", f"model_name_or_path={folder}", f"block_size={BLOCK}",
                   "report_to=none", *extra, output_dir=output_dir)


def test_stride_equal_to_block_size_is_the_non_overlapping_blocks(trained, tmp_path):
    blocks = _evaluate(trained, tmp_path / "blocks")
    same = _evaluate(trained, tmp_path / "stride", f"eval_stride={BLOCK}")
    assert same["eval_samples"] == blocks["eval_samples"]
    assert same["eval_loss"] == blocks["eval_loss"]
    assert same["eval_perplexity"] == blocks["eval_perplexity"]


def _reference_perplexity(folder, stride: int) -> float:
    """By hand, with plain forward passes: the validation documents with their end-of-text
    tokens, concatenated and cut to whole blocks (the text the blocks cover); each token p >= 1
    scored once, given the context its window of the Hugging Face perplexity guide gives it (the
    first window [0, BLOCK) scores all its tokens; window k spans [k*stride, k*stride + BLOCK),
    the last one ending at the text's end)."""
    import math
    from collections import defaultdict

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from notrainer.tasks.clm import builtin_text_splits

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    texts = builtin_text_splits()["validation"]["text"]
    ids = [t for row in tok([t + tok.eos_token for t in texts])["input_ids"] for t in row]
    n = len(ids) // BLOCK * BLOCK
    by_length = defaultdict(list)  # context length -> [(start, p)]
    for p in range(1, n):
        k = max(0, -(-(p + 1 - BLOCK) // stride))  # the first window that ends after p
        start = max(0, min(k * stride + BLOCK, n) - BLOCK)
        assert 1 <= p - start <= BLOCK - 1 and (stride > 1 or p - start == min(p, BLOCK - 1))
        by_length[p - start].append((start, p))
    total, count = 0.0, 0
    with torch.no_grad():
        for length, items in by_length.items():
            context = torch.tensor([ids[s:p] for s, p in items])
            logp = torch.log_softmax(model(context).logits[:, -1].double(), -1)
            total -= float(logp.gather(1, torch.tensor([[ids[p]] for _, p in items])).sum())
            count += len(items)
    assert count == n - 1
    return math.exp(total / count)


@pytest.mark.parametrize("stride,chunked", [(16, False), (5, True), (1, False)])
def test_eval_perplexity_matches_a_token_by_token_reference(trained, tmp_path, stride, chunked):
    got = _evaluate(trained, tmp_path / "eval", f"eval_stride={stride}", f"chunked_loss={str(chunked).lower()}")
    assert got["eval_perplexity"] == pytest.approx(_reference_perplexity(trained, stride), rel=1e-5)


@pytest.mark.slow
def test_two_processes_give_the_same_sliding_window_perplexity(trained, tmp_path):
    """97 windows, eval batch 16 per process: the last batch is uneven on 2 processes and its
    duplicated rows must be dropped (gather_for_metrics), so each token counts once."""
    args = ["task=clm", "mode=eval", f"model_name_or_path={trained}", f"block_size={BLOCK}", "eval_stride=16",
            "per_device_eval_batch_size=16", "report_to=none"]
    one = run_cli(*args, output_dir=tmp_path / "one")
    cli_subprocess(*args, f"output_dir={tmp_path / 'two'}", num_processes=2)
    two = read_results(tmp_path / "two")
    assert one["eval_samples"] == two["eval_samples"] and one["eval_samples"] % 32 != 0
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)
    assert two["eval_perplexity"] == pytest.approx(one["eval_perplexity"], rel=1e-6)


@pytest.mark.slow
def test_the_default_run_scores_lower_with_a_sliding_window(tmp_path):
    """The embedded default trained in full (its documents keep to a cast, so context past the
    current sentence helps): a stride of half a block gives every token more context than the
    blocks do, and a lower perplexity."""
    out = tmp_path / "run"
    blocks = run_cli("task=clm", "report_to=none", output_dir=out)["eval_perplexity"]
    window = _evaluate(out, tmp_path / "s32", "eval_stride=32")["eval_perplexity"]
    assert window < blocks, (window, blocks)
