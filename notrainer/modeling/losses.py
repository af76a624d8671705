"""A causal-LM loss that never materialises the full logits.

The usual path computes `lm_head(hidden)` for every position (batch x seq x vocab), upcasts
it to fp32 (in `ForCausalLMLoss`, and again in accelerate's mixed-precision output wrapper)
and keeps it for backward: 8 x 2048 x 151,936 fp32 logits are 10 GB. Here the head's matmul
and the cross-entropy run over chunks of rows; each chunk's softmax gradient is turned into
the gradients of the hidden states and of the head weight at once, in the forward pass, and
the chunk's logits are dropped. Backward only scales the stored gradients by the incoming
(scalar) gradient. Cost: the same three matmuls as the plain path (logits, dL/dh, dL/dW), no
recomputation; memory: one chunk of logits instead of all of them.

    hidden = model(input_ids=..., attention_mask=...).logits   # with lm_head switched off, below
    loss = linear_cross_entropy(hidden, head.weight, targets)   # mean over targets != -100

How the hidden states come out of an unmodified Hugging Face model: `HiddenStatesHead`, an
nn.Linear holding the very same weight (and bias) Parameters as the model's lm_head, replaces
it through the model's public `set_output_embeddings` (state dict keys, tying and the optimizer's
parameters are unchanged), and returns its input while `head.return_hidden` is set. The model is still called through
its wrappers (DDP, torch.compile, accelerate's autocast), so gradient sync and compilation
work as usual; accelerate's fp32 output conversion then touches the (small) hidden states
instead of the logits. Only model types whose forward does nothing to the logits after the
head are accepted (no soft-capping, no logit scaling): see SUPPORTED_MODEL_TYPES.
"""

from __future__ import annotations

import contextlib

import torch

IGNORE_INDEX = -100

#: Model types checked (tests/test_losses.py) to return `lm_head(last hidden state)` as logits.
SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2")

#: fp32 logits per chunk: rows = CHUNK_ELEMENTS // vocab (2^27 elements = 512 MiB of fp32),
#: e.g. 832 rows for Qwen2's 151,936-token vocabulary, 2,624 for GPT-2's 50,257.
CHUNK_ELEMENTS = 2**27


def default_chunk_rows(vocab_size: int) -> int:
    # a multiple of 64 keeps the matmuls on full tensor-core tiles
    return max(64, CHUNK_ELEMENTS // max(vocab_size, 1) // 64 * 64)


def _chunk(h, w, bias, t, inv_count, want_grads: bool):
    """Loss sum and gradients of one chunk of rows: (sum of CE, dL/dh, dL/dW, dL/db), where L
    is the mean over the whole batch (hence inv_count). h and w are in the compute dtype;
    softmax and sums run in fp32 (or fp64 for fp64 inputs)."""
    acc = torch.promote_types(h.dtype, torch.float32)
    valid = t != IGNORE_INDEX
    logits = (h @ w.t()).to(acc)
    if bias is not None:
        logits += bias.to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    safe_t = torch.where(valid, t, 0).unsqueeze(1)
    target_logit = logits.gather(1, safe_t).squeeze(1)
    loss_sum = ((lse - target_logit) * valid).sum()
    if not want_grads:
        return loss_sum, None, None, None
    # d(mean CE)/d(logits) = (softmax - onehot) / count on valid rows, 0 elsewhere.
    g = logits.sub_(lse.unsqueeze(1)).exp_()  # in place: the chunk's logits are done
    g.scatter_add_(1, safe_t, torch.full_like(target_logit, -1.0).unsqueeze(1))
    g.mul_((valid.to(acc) * inv_count).unsqueeze(1))
    grad_b = g.sum(0) if bias is not None else None
    g = g.to(h.dtype)
    return loss_sum, g @ w, g.t() @ h, grad_b


_compiled = None
COMPILE_BACKEND = "inductor"  # tests use "aot_eager": the same tracing, no C++/Triton build


def _compiled_chunk():
    """`_chunk` through torch.compile: the softmax, one-hot and scaling fuse into a couple of
    kernels around the matmuls instead of six passes over a (chunk x vocab) fp32 tensor."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_chunk, dynamic=False, backend=COMPILE_BACKEND)
    return _compiled


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over valid rows of cross_entropy(hidden @ weight.T + bias, targets), chunked."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, compute_dtype, compiled):
        acc = torch.promote_types(compute_dtype, torch.float32)
        # Kept on the device: no host sync. An all-ignored batch gives loss 0, not NaN.
        inv_count = 1.0 / (targets != IGNORE_INDEX).sum().clamp(min=1).to(acc)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        want = want_h or want_w or want_b
        w = weight.to(compute_dtype)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_b else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        step = _compiled_chunk() if compiled else _chunk
        for start in range(0, hidden.shape[0], chunk_rows):
            end = min(start + chunk_rows, hidden.shape[0])
            loss_sum, g_h, g_w, g_b = step(hidden[start:end].to(compute_dtype), w, bias, targets[start:end],
                                           inv_count, want)
            total += loss_sum
            if want_h:
                grad_h[start:end] = g_h
            if want_w:
                grad_w += g_w
            if want_b:
                grad_b += g_b
            del g_h, g_w, g_b
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total * inv_count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.to(grad_w.dtype if grad_w is not None else torch.float32)
        out_h = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
        out_b = (grad_b * scale).to(ctx.bias_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk_rows: int | None = None,
                         compute_dtype: torch.dtype | None = None, compiled: bool = False) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T (+ bias)` against `targets` (IGNORE_INDEX
    skipped), computed chunk by chunk. `hidden` is (..., H), `targets` the matching (...).
    `compute_dtype` is the matmul dtype (bf16 under mixed precision); softmax and sums are fp32.
    `compiled`: run each chunk through torch.compile (the CLM task does with torch_compile=true).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    chunk = chunk_rows or default_chunk_rows(weight.shape[0])
    dtype = compute_dtype or hidden.dtype
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, dtype, compiled)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for causal LM: position t predicts label t+1; the last position predicts
    nothing. Same as transformers' ForCausalLMLoss (pad with -100, drop the first)."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


# ---------------------------------------------------------------------- evaluation: per-token losses
#
# Evaluation wants the loss of every example, not the batch mean. The rows of the logits are
# read in their flat (rows x vocab) layout, one chunk at a time, and only that chunk is upcast
# to fp32: `cross_entropy(logits.float().transpose(1, 2), ...)` made a full fp32 copy of the
# logits and then reduced over a strided vocabulary dimension (measured ~2x slower on CPU for
# the same numbers; see bench/eval_loss.py).


@torch.no_grad()
def per_token_losses(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of each position (fp32 or wider; 0 where the target is IGNORE_INDEX), in
    the shape of `targets`. `logits` is (..., vocab) matching `targets` (...)."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # a view for a model's (contiguous) logits
    t = targets.reshape(-1).to(flat.device)
    acc = torch.promote_types(flat.dtype, torch.float32)
    out = torch.empty(t.shape, dtype=acc, device=flat.device)
    step = chunk_rows or default_chunk_rows(vocab)
    for start in range(0, t.shape[0], step):
        end = start + step
        out[start:end] = torch.nn.functional.cross_entropy(flat[start:end].to(acc), t[start:end],
                                                           ignore_index=IGNORE_INDEX, reduction="none")
    return out.view(targets.shape)


@torch.no_grad()
def per_token_linear_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            bias: torch.Tensor | None = None, chunk_rows: int | None = None,
                            compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`per_token_losses` of `hidden @ weight.T (+ bias)` without ever holding more than one
    chunk of logits: `hidden` is (..., H) matching `targets` (...)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(h.device)
    dtype = compute_dtype or h.dtype
    acc = torch.promote_types(dtype, torch.float32)
    w = weight.to(dtype)
    out = torch.empty(t.shape, dtype=acc, device=h.device)
    step = chunk_rows or default_chunk_rows(weight.shape[0])
    for start in range(0, t.shape[0], step):
        end = start + step
        logits = (h[start:end].to(dtype) @ w.t()).to(acc)
        if bias is not None:
            logits += bias.to(acc)
        out[start:end] = torch.nn.functional.cross_entropy(logits, t[start:end], ignore_index=IGNORE_INDEX,
                                                           reduction="none")
        del logits
    return out.view(targets.shape)


def per_example(per_token: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """eval_step's bookkeeping from (batch, seq) per-token losses: each example's summed loss
    and its number of targets."""
    return {"loss": per_token.sum(1), "num_items": (targets != IGNORE_INDEX).sum(1)}


def token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 bias: torch.Tensor | None = None, chunk_rows: int | None = None,
                 compute_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Per-example summed cross-entropy and target counts (for evaluation) of hidden states
    (batch, seq, H) through the head, chunked over rows (per_token_linear_losses)."""
    return per_example(per_token_linear_losses(hidden, weight, targets, bias, chunk_rows, compute_dtype), targets)


# ---------------------------------------------------------------------- getting hidden states out


class HiddenStatesHead(torch.nn.Linear):
    """An nn.Linear that returns its input unchanged while `return_hidden` is set.

    Installed by `install_hidden_states_head` in place of the model's lm_head, sharing its
    Parameters: weights, state dict, tying and `from_pretrained`/`save_pretrained` are untouched.
    """

    return_hidden: bool = False

    def forward(self, x):
        if self.return_hidden:
            return x
        return super().forward(x)


def unsupported_reason(model) -> str | None:
    """Why the chunked loss cannot be used on this model, or None if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one the chunked loss is checked on ({', '.join(SUPPORTED_MODEL_TYPES)})"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) not in (torch.nn.Linear, HiddenStatesHead):
        return f"the model's output layer is a {type(head).__name__}, not an nn.Linear"
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return f"the model transforms its logits ({attr}={getattr(config, attr)})"
    return None


def install_hidden_states_head(model) -> HiddenStatesHead:
    """Make the model's lm_head switchable (see HiddenStatesHead); returns the head."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        new = HiddenStatesHead(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        new.weight = head.weight  # the same Parameter objects: nothing is copied
        if head.bias is not None:
            new.bias = head.bias
        new.train(head.training)
        model.set_output_embeddings(new)
        check = model.get_output_embeddings()
        if check is not new:
            raise RuntimeError(f"{type(model).__name__}.set_output_embeddings did not install the chunked-loss head")
        head = new
    return head


@contextlib.contextmanager
def hidden_states_from(head: HiddenStatesHead):
    """While inside, the model's "logits" output is the last hidden state."""
    head.return_hidden = True
    try:
        yield
    finally:
        head.return_hidden = False


def compute_dtype_for(mixed_precision: str | None) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "no")


__all__ = ["HiddenStatesHead", "SUPPORTED_MODEL_TYPES", "compute_dtype_for", "hidden_states_from",
           "install_hidden_states_head", "linear_cross_entropy", "per_example", "per_token_linear_losses",
           "per_token_losses", "shift_labels", "token_losses", "unsupported_reason"]
