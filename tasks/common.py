"""Helpers the task modules share, so that each piece of task logic is written once.

- `max_positions` / `check_length` / `fit_length`: a length key (block_size, max_seq_length) against the
  model's position embeddings, and its default when unset.
- `group_into_blocks`: concatenate tokenized texts and cut them into equal blocks (clm, mlm).
- `label_name`, `label_ids`, `check_no_unseen_labels`, `check_head_size`: label discovery for
  the tasks that read their label set from the training data (classification, NER).
- `sharded_reason`: whether the model's weights are sharded outside its forward (FSDP,
  DeepSpeed ZeRO-3), which the chunked loss and `generate(synced_gpus=...)` care about.
- `chunked_loss_head`, `chunked_lm_loss`, `lm_per_token_losses`: the causal-LM loss through
  notrainer.modeling.losses (clm and sft): training and evaluation read the same chunked head.

The per-split `datasets.map` with the workers and cache keys is `notrainer.data.files.map_splits`.
"""

from __future__ import annotations

from itertools import chain

import numpy as np

from notrainer.errors import UsageError, check

# ---------------------------------------------------------------------- lengths


def max_positions(model) -> int | None:
    """How many positions the model's config says it has, or None when it does not say."""
    c = model.config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(c, attr, None), int):
            return getattr(c, attr)
    return None


def check_length(key: str, value: int, model) -> None:
    """Refuse a length key (block_size, max_seq_length) longer than the model's positions:
    said before training, not as an index error inside the first forward."""
    limit = max_positions(model)
    check(limit is None or value <= limit,
          f"{key}={value} is larger than the model's {limit} positions; use {key}<={limit}")


def fit_length(key: str, value: int | None, model, tokenizer, default_cap: int) -> int:
    """The length to use for config key `key`: `value` when given (see check_length), else the
    smallest of `default_cap`, the model's positions and the tokenizer's model_max_length
    (ignored when it is the "no limit" sentinel)."""
    if value is not None:
        check_length(key, value, model)
        return value
    limit = max_positions(model)
    return min([default_cap] + [x for x in (limit, tokenizer.model_max_length) if x and x < 10**6])


# ---------------------------------------------------------------------- concatenate and chunk


def group_into_blocks(batch: dict, block: int) -> dict:
    """A `datasets.map(batched=True)` batch of tokenized texts -> blocks of exactly `block`
    tokens, every column cut the same way. The remainder of the batch is dropped, as in the
    Hugging Face scripts."""
    joined = {k: list(chain(*batch[k])) for k in batch}
    total = len(joined["input_ids"]) // block * block
    return {k: [v[i:i + block] for i in range(0, total, block)] for k, v in joined.items()}


# ---------------------------------------------------------------------- labels


def label_name(value, class_names: list[str] | None) -> str:
    """A raw label value as its name: a `ClassLabel` index through its names, else str()."""
    if class_names is not None and isinstance(value, (int, np.integer)):
        return class_names[value]
    return str(value)


def label_ids(names: list[str]) -> dict[str, int]:
    return {n: i for i, n in enumerate(names)}


def check_no_unseen_labels(raw, column: str, names_in, known: list[str], what: str) -> None:
    """Validation labels the training data never had cannot be predicted (and would crash the
    encoding): refuse them by name. `names_in(values)` gives the set of names in a column."""
    for split_name in ("validation",):
        if split_name in raw and column in raw[split_name].column_names:
            unseen = sorted(names_in(raw[split_name][column]) - set(known))
            check(not unseen, f"the {split_name} data has {what} never seen in training: "
                              f"{', '.join(map(repr, unseen[:5]))}{' ...' if len(unseen) > 5 else ''}; "
                              "add examples of them to the training data or remove them")


def check_head_size(cfg, head_suffix: str, num_labels: int, what: str) -> list[str] | None:
    """A checkpoint that already has a head of another size: say so before loading it.
    Returns the label names of a head of the right size (id order), else None."""
    if not cfg.model_name_or_path:
        return None
    from transformers import AutoConfig

    from notrainer.modeling.lora import adapter_base

    name = adapter_base(cfg.model_name_or_path) or cfg.model_name_or_path  # an adapter folder: its base's head
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except Exception:
        return None  # build_model reports a model that cannot be loaded
    has_head = any(a.endswith(head_suffix) for a in (getattr(config, "architectures", None) or []))
    if not has_head:
        return None
    if config.num_labels != num_labels:
        if cfg.ignore_mismatched_sizes:
            return None
        raise UsageError(f"model_name_or_path={cfg.model_name_or_path} has a head for {config.num_labels} {what} "
                         f"but the data has {num_labels}; set ignore_mismatched_sizes=true to train a new head")
    return [config.id2label[i] for i in range(config.num_labels)]


# ---------------------------------------------------------------------- distributed


def sharded_reason() -> str | None:
    """Why the model's weights are only shards outside its forward pass (FSDP, DeepSpeed
    ZeRO-3), or None. Reading a weight directly (the chunked loss) then fails, and every rank
    must keep stepping `generate` until all are done (synced_gpus)."""
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import DistributedType

    if not is_initialized():  # no accelerator yet: nothing is sharded
        return None
    state = AcceleratorState()
    if state.distributed_type == DistributedType.FSDP:
        return "FSDP shards lm_head.weight outside the forward pass"
    plugin = getattr(state, "deepspeed_plugin", None)
    if state.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3:
        return "DeepSpeed ZeRO-3 shards lm_head.weight outside the forward pass"
    return None


# ---------------------------------------------------------------------- the chunked causal-LM loss (clm, sft)


def chunked_loss_head(cfg, model):
    """The switchable lm_head for notrainer.modeling.losses when `chunked_loss` is on (or auto: on when
    CUDA is available and the model is supported), else None. `chunked_loss=true` on a model
    or setup it cannot serve is a usage error naming the reason."""
    import torch

    from notrainer.modeling import losses

    want = cfg.chunked_loss
    reason = losses.unsupported_reason(model) or sharded_reason() or _lora_head_reason(cfg, model)
    if want and reason:
        raise UsageError(f"chunked_loss=true: {reason}; set chunked_loss=false")
    if want is None:
        want = torch.cuda.is_available() and reason is None
    return losses.install_hidden_states_head(model) if want else None


def _lora_head_reason(cfg, model) -> str | None:
    """LoRA on the output layer (lora.target_modules naming it, matched as peft matches: the
    whole name or its last parts) would add the adapter's vocabulary-sized output to the hidden
    state the switched-off head returns. setup runs before the adapters are applied, so the
    config says it here."""
    lc = getattr(cfg, "lora", None)
    if lc is None or not lc.r or not lc.target_modules or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if m is head]
    for target in lc.target_modules:
        if any(n == target or n.endswith("." + target) for n in names):
            return f"lora.target_modules adapts the output layer ({target}), which the chunked loss bypasses"
    return None


def _hidden_states(model, head, batch):
    """The model's last hidden state: the model runs through its wrappers (DDP, compile,
    autocast, peft) with the head switched off. use_cache=False: no KV cache object for a
    training forward, and with packing a cache makes transformers skip the packed-sequence
    detection (the examples of a row would attend to each other)."""
    from notrainer.modeling import losses

    with losses.hidden_states_from(head):
        return model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits


def chunked_lm_loss(cfg, model, head, batch):
    """Mean cross-entropy over the batch's shifted targets (labels of -100 skipped: prompts,
    padding, packed-example boundaries), the head's matmul and the softmax chunk by chunk."""
    from notrainer.modeling import losses

    hidden = _hidden_states(model, head, batch)
    return losses.linear_cross_entropy(hidden, head.weight, losses.shift_labels(batch["labels"]), bias=head.bias,
                                       compute_dtype=losses.compute_dtype_for(cfg.mixed_precision),
                                       compiled=cfg.torch_compile)


def lm_per_token_losses(cfg, model, head, batch, **forward_kwargs):
    """Evaluation: each position's loss against its shifted target, (batch, seq), from the
    chunked head when `head` is set, else from the model's logits (called with forward_kwargs)
    read in their flat layout."""
    from notrainer.modeling import losses

    targets = losses.shift_labels(batch["labels"])
    if head is not None:
        hidden = _hidden_states(model, head, batch)
        return losses.per_token_linear_losses(hidden, head.weight, targets, bias=head.bias,
                                              compute_dtype=losses.compute_dtype_for(cfg.mixed_precision))
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, **forward_kwargs).logits
    return losses.per_token_losses(logits, targets)
