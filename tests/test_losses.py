"""The chunked lm_head + cross-entropy (notrainer.modeling.losses) against the reference loss."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from notrainer.modeling import losses
from notrainer.errors import UsageError
from tests.conftest import REPO, run_cli


def _reference_and_chunked(dtype=torch.float64, bias=True, chunk_rows=7, compute_dtype=None):
    torch.manual_seed(0)
    n, h, v = 53, 16, 41
    hidden = torch.randn(n, h, dtype=dtype)
    weight = torch.randn(v, h, dtype=dtype)
    b = torch.randn(v, dtype=dtype) if bias else None
    targets = torch.randint(0, v, (n,))
    targets[::4] = losses.IGNORE_INDEX
    results = []
    for fn in ("ref", "chunked"):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight) + ((b,) if bias else ())]
        if fn == "ref":
            logits = leaves[0] @ leaves[1].t() + (leaves[2] if bias else 0)
            loss = F.cross_entropy(logits, targets, ignore_index=losses.IGNORE_INDEX)
        else:
            loss = losses.linear_cross_entropy(leaves[0], leaves[1], targets, bias=leaves[2] if bias else None,
                                               chunk_rows=chunk_rows, compute_dtype=compute_dtype)
        # a non-unit upstream gradient: backward must scale what forward stored
        (loss * 3.0).backward()
        results.append((loss.detach(), [x.grad for x in leaves]))
    return results


@pytest.mark.parametrize("bias", [True, False])
def test_chunked_loss_and_gradients_equal_reference(bias):
    (ref, ref_grads), (out, grads) = _reference_and_chunked(bias=bias)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-8)


def test_chunked_loss_bf16_compute_stays_close():
    (ref, ref_grads), (out, grads) = _reference_and_chunked(dtype=torch.float32, compute_dtype=torch.bfloat16)
    assert abs(out.item() - ref.item()) < 0.05 * abs(ref.item())
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype == torch.float32
        assert (g - r).norm() < 0.05 * r.norm()


def test_compiled_chunks_equal_eager(monkeypatch):
    """The torch.compile'd chunk (torch_compile=true) traces the same maths. aot_eager runs
    dynamo + AOT autograd's functionalisation of the in-place ops without a C++ build."""
    monkeypatch.setattr(losses, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(losses, "_compiled", None)
    torch._dynamo.reset()
    torch.manual_seed(0)
    hidden, weight = torch.randn(53, 16), torch.randn(41, 16)
    targets = torch.randint(0, weight.shape[0], (hidden.shape[0],))
    targets[::4] = losses.IGNORE_INDEX
    results = []
    for compiled in (False, True):
        h, w, b = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_(), \
            torch.ones(weight.shape[0]).requires_grad_()
        loss = losses.linear_cross_entropy(h, w, targets, bias=b, chunk_rows=53, compiled=compiled)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad, b.grad))
    monkeypatch.setattr(losses, "_compiled", None)
    torch._dynamo.reset()
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_all_targets_ignored_gives_zero_not_nan():
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    loss = losses.linear_cross_entropy(hidden, weight, torch.full((5,), losses.IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def _transposed_fp32_token_losses(logits, labels, shift):
    """What eval_step computed before the flat layout: a full fp32 copy of the logits,
    cross-entropy over dimension 1. The reference the new path must reproduce."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(1)
    return {"loss": loss, "num_items": (labels != -100).sum(1)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift", [False, True])
def test_eval_token_losses_equal_the_transposed_fp32_path(dtype, shift):
    """tasks/base.py token_losses (every task's eval_step) gives today's numbers from the flat
    layout, chunk by chunk (a chunk boundary inside a row, too), in fp32 whatever the logits' dtype."""
    from notrainer.tasks.base import token_losses

    torch.manual_seed(0)
    logits = (torch.randn(5, 11, 37) * 4).to(dtype)
    labels = torch.randint(0, 37, (5, 11))
    labels[0, :3] = -100
    labels[3] = -100  # a row with nothing to predict: loss 0, count 0
    want = _transposed_fp32_token_losses(logits, labels, shift)
    got = token_losses(logits, labels, shift=shift)
    assert got["loss"].dtype == torch.float32
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=1e-5)
    assert torch.equal(got["num_items"], want["num_items"])
    targets = losses.shift_labels(labels) if shift else labels
    chunked = losses.per_token_losses(logits, targets, chunk_rows=7)  # 55 rows in 8 chunks
    torch.testing.assert_close(chunked.sum(1), want["loss"], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_eval_from_hidden_states_equals_the_full_logits(bias):
    """The chunked head's per-token losses (clm/sft eval with chunked_loss) equal the
    transposed fp32 path on the full logits, with chunks that split rows."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(4, 9, 16), torch.randn(41, 16)
    b = torch.randn(41) if bias else None
    labels = torch.randint(0, 41, (4, 9))
    labels[1, 5:] = -100
    logits = hidden @ weight.t() + (b if bias else 0)
    want = _transposed_fp32_token_losses(logits, labels, shift=True)
    for chunk_rows in (5, 36, None):
        got = losses.token_losses(hidden, weight, losses.shift_labels(labels), bias=b, chunk_rows=chunk_rows)
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=1e-5)
        assert torch.equal(got["num_items"], want["num_items"])


def _tiny_model(model_type: str, vocab: int = 97):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type not in ("gpt2", "gpt_neox"):
        kwargs.update(num_key_value_heads=2, head_dim=8)
    if model_type == "gpt2":
        kwargs = dict(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
    return model


def _batch(vocab: int = 97):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a right-padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :4] = -100  # e.g. a prompt that is not trained on
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("model_type", losses.SUPPORTED_MODEL_TYPES)
def test_model_loss_and_gradients_match_hf_loss(model_type):
    """For every model type the chunked loss accepts: the same loss as model(**batch).loss and
    the same gradient on every parameter (tied or not), through the switchable head."""
    model, batch = _tiny_model(model_type), _batch()
    model.train()  # with dropout: both passes draw the same masks from the same seed
    assert losses.unsupported_reason(model) is None
    torch.manual_seed(5)
    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    keys_before = list(model.state_dict())
    head = losses.install_hidden_states_head(model)
    assert list(model.state_dict()) == keys_before  # the swap changes no weights or names
    torch.manual_seed(5)
    with losses.hidden_states_from(head):
        hidden = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert hidden.shape[-1] == model.config.hidden_size
    loss = losses.linear_cross_entropy(hidden, head.weight, losses.shift_labels(batch["labels"]),
                                       bias=head.bias, chunk_rows=5)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=f"{model_type}: {n}")

    # Outside the context the head is an ordinary lm_head again.
    model.eval()
    with torch.no_grad():
        ref = model(**batch).loss
        logits = model(input_ids=batch["input_ids"]).logits
        assert logits.shape[-1] == model.config.vocab_size
        with losses.hidden_states_from(head):
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_row = losses.token_losses(hidden, head.weight, losses.shift_labels(batch["labels"]), bias=head.bias,
                                      chunk_rows=13)
    # eval bookkeeping: per-example sums over all targets give back the mean loss
    torch.testing.assert_close(per_row["loss"].sum() / per_row["num_items"].sum(), ref.detach(), rtol=1e-6, atol=1e-6)


def test_models_that_transform_logits_are_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma2", vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=8, intermediate_size=32)
    assert "gemma2" in losses.unsupported_reason(AutoModelForCausalLM.from_config(config))
    config.model_type = "llama"  # even under a supported name, soft-capping is caught
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=50, hidden_size=16,
                                                                  num_hidden_layers=1, num_attention_heads=2,
                                                                  intermediate_size=32))
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in losses.unsupported_reason(model)


def _save_tiny_gemma2(folder):
    """A tiny gemma2 (soft-capped logits) with the built-in tokenizer, as a config_name folder."""
    from transformers import AutoConfig

    from notrainer.data.builtin import train_tokenizer
    from notrainer.tasks.clm import builtin_corpus

    tok = train_tokenizer(builtin_corpus(40), style="gpt")
    tok.save_pretrained(folder)
    AutoConfig.for_model("gemma2", vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, intermediate_size=32,
                         pad_token_id=tok.pad_token_id).save_pretrained(folder)


def test_cli_chunked_loss_on_unsupported_model_is_a_usage_error(tmp_path):
    _save_tiny_gemma2(tmp_path / "gemma2")
    with pytest.raises(UsageError, match="chunked_loss=true: model type 'gemma2'.*set chunked_loss=false"):
        run_cli("task=clm", f"config_name={tmp_path / 'gemma2'}", "chunked_loss=true", "max_train_steps=1",
                output_dir=tmp_path / "run")


def test_cli_chunked_loss_bad_value_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "notrainer.run", "task=clm", "chunked_loss=maybe",
                           f"output_dir={tmp_path}"], capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("notrainer: error: chunked_loss"), proc.stderr


def test_cli_chunked_loss_trains_like_the_default_loss(tmp_path):
    """The same short run with and without the chunked loss: same train and eval loss (fp32,
    so equal up to summation order)."""
    common = ("task=clm", "max_train_steps=4", "logging_steps=2", "max_eval_samples=8", "per_device_train_batch_size=4",
              "per_device_eval_batch_size=4")
    plain = run_cli(*common, "chunked_loss=false", output_dir=tmp_path / "plain")
    chunked = run_cli(*common, "chunked_loss=true", output_dir=tmp_path / "chunked")
    assert abs(chunked["train_loss"] - plain["train_loss"]) < 1e-4
    assert abs(chunked["eval_loss"] - plain["eval_loss"]) < 1e-4
    # and it learned something: below the loss of a uniform guess over the ~1000-token vocabulary
    assert chunked["eval_loss"] < 0.9 * torch.log(torch.tensor(1000.0)).item()


def test_sharded_setups_turn_auto_off_and_refuse_true(monkeypatch):
    """Under FSDP / ZeRO-3 (lm_head.weight is a shard outside the forward) auto keeps the plain
    loss even on CUDA, and chunked_loss=true is a usage error naming the reason."""
    import notrainer.tasks.clm as clm
    from notrainer.tasks import common

    monkeypatch.setattr(common, "sharded_reason", lambda: "FSDP shards lm_head.weight outside the forward pass")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = _tiny_model("llama")
    assert clm.CLMTask(clm.CLMConfig(chunked_loss=None)).chunked_loss_head(model) is None
    with pytest.raises(UsageError, match="chunked_loss=true: FSDP shards lm_head.weight"):
        clm.CLMTask(clm.CLMConfig(chunked_loss=True)).chunked_loss_head(model)
    monkeypatch.setattr(common, "sharded_reason", lambda: None)
    head = clm.CLMTask(clm.CLMConfig(chunked_loss=None)).chunked_loss_head(model)  # auto on "CUDA"
    assert isinstance(head, losses.HiddenStatesHead) and head is model.get_output_embeddings()
