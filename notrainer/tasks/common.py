"""Helpers the task modules share, so that each piece of task logic is written once.

- `max_positions` / `check_length` / `fit_length`: a length key (block_size, max_seq_length) against the
  model's position embeddings, and its default when unset.
- `group_into_blocks`: concatenate tokenized texts and cut them into equal blocks (clm, mlm).
- `label_name`, `label_ids`, `check_no_unseen_labels`, `check_head_size`: label discovery for
  the tasks that read their label set from the training data (classification, NER).
- `sharded_reason`: whether the model's weights are sharded outside its forward (FSDP,
  DeepSpeed ZeRO-3), which the chunked loss and `generate(synced_gpus=...)` care about.

The per-split `datasets.map` with the workers and cache keys is `notrainer.data.map_splits`.
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

    try:
        config = AutoConfig.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
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
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if not AcceleratorState._shared_state:  # no accelerator yet: nothing is sharded
        return None
    state = AcceleratorState()
    if state.distributed_type == DistributedType.FSDP:
        return "FSDP shards lm_head.weight outside the forward pass"
    plugin = getattr(state, "deepspeed_plugin", None)
    if state.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3:
        return "DeepSpeed ZeRO-3 shards lm_head.weight outside the forward pass"
    return None
