"""Trainer, HF-script and TRL spellings accepted as aliases of our keys.

People arrive with `TrainingArguments` habits (`max_steps`, `save_steps`, `bf16`), the names of
the `run_*.py` scripts (`label_column_name`) and TRL's (`lora_r`, `max_length`). Each is turned
into our key before the config is built, so `--help`, config.yaml and the trackers only ever
show one spelling. The table is also what the unknown-key hint looks at first: edit distance
alone sends `save_steps` to `eval_steps`, the opposite of what was meant.

docs/coming-from-trainer.md shows this table and what differs.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Iterable

# alias -> our key(s). With several, the first one the task's config has is taken
# (label_column_name is label_column for classification, tags_column for NER).
RENAMES: dict[str, tuple[str, ...]] = {
    "warmup_steps": ("num_warmup_steps",),
    "save_steps": ("checkpointing_steps",),
    "data_seed": ("data_seed",),
    "evaluation_strategy": ("eval_strategy",),  # the Trainer's older name; translated below
    "label_column_name": ("label_column", "tags_column"),
    "text_column_name": ("text_column", "words_column"),
    "text_column": ("source_column",),  # run_summarization's name; only where text_column is not ours
    "summary_column": ("target_column",),
    "question_column_name": ("question_column",),
    "context_column_name": ("context_column",),
    "answer_column_name": ("answer_column",),
    "dataset_text_field": ("text_column",),  # TRL
    "max_length": ("max_seq_length", "block_size"),  # TRL SFTConfig
    "lora_r": ("lora.r",),  # TRL ModelConfig
    "lora_alpha": ("lora.alpha",),
    "lora_dropout": ("lora.dropout",),
    "lora_target_modules": ("lora.target_modules",),
    "hub_private": ("hub_private_repo",),
    "val_max_target_length": ("generation_max_length",),  # run_summarization / run_translation
    "train_dir": ("train_file",),  # run_image_classification: our data keys take folders
    "validation_dir": ("validation_file",),
    "image_column_name": ("image_column",),
    "do_reduce_labels": ("reduce_labels",),  # run_semantic_segmentation
}

# Aliases whose value changes form, not only the name: alias -> what it sets.
TRUE = ("true", "1", "yes", "on")


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in TRUE


def _precision(kind: str) -> Callable[[Any], list[tuple[str, Any]]]:
    # bf16=true -> mixed_precision=bf16; bf16=false says nothing (the default is no).
    return lambda v: [("mixed_precision", kind)] if _truthy(v) else []


def _save_strategy(v: Any) -> list[tuple[str, Any]]:
    v = str(v).strip().lower()
    if v == "epoch":
        return [("checkpointing_steps", "epoch")]
    if v == "no":
        return [("checkpointing_steps", None)]
    if v == "steps":
        return []  # the number comes from save_steps / checkpointing_steps (see _fill_defaults)
    raise ValueError(f"save_strategy must be steps, epoch or no, got {v!r}")


def _eval_strategy(v: Any) -> list[tuple[str, Any]]:
    v = str(v).strip().lower()
    if v == "epoch":
        return [("eval_steps", None)]  # our default: evaluate once per epoch
    if v == "no":
        return [("do_eval", False)]
    if v == "steps":
        return []  # the number comes from eval_steps (default: logging_steps, as the Trainer)
    raise ValueError(f"eval_strategy must be steps, epoch or no, got {v!r}")


# ---------------------------------------------------------------------- the run_*_no_trainer.py scripts
# Their flags that are not our keys (docs/hf-scripts.md lists every argument of every script).


def _with_tracking(v: Any) -> list[tuple[str, Any]]:
    # The scripts track only with --with_tracking, then to report_to (default "all": every
    # installed tracker). Our report_to is on by default; --with_tracking keeps a given report_to.
    return [("report_to", "all")] if _truthy(v) else [("report_to", "none")]


def _refuse_false(name: str, why: str) -> Callable[[Any], list[tuple[str, Any]]]:
    """A flag whose true value is what notrainer always does: true is accepted, false refused."""
    def convert(v: Any) -> list[tuple[str, Any]]:
        if _truthy(v):
            return []
        raise ValueError(f"{name}=false: {why}")
    return convert


def _pad_to_max_length(v: Any) -> list[tuple[str, Any]]:
    if not _truthy(v):
        return []
    raise ValueError("pad_to_max_length: notrainer pads each batch to its longest example (the same model, less "
                     "compute); remove the flag (the length limit itself is max_seq_length / max_source_length)")


def _debug(v: Any) -> list[tuple[str, Any]]:
    # run_ner / run_swag: --debug trains and evaluates on the first 100 examples of each split
    return [("max_train_samples", 100), ("max_eval_samples", 100)] if _truthy(v) else []


def _offline() -> bool:
    import os

    return any(str(os.environ.get(k, "")).strip().lower() in TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                                                  "TRANSFORMERS_OFFLINE"))


def _task_name(v: Any, keys: set[str]) -> list[tuple[str, Any]]:
    """--task_name: run_ner's tag column (ner, pos, chunk -> <name>_tags), run_glue's GLUE task
    (the nyu-mll/glue dataset from the Hub, as the script loads it)."""
    name = str(v).strip().lower()
    if "tags_column" in keys:
        return [] if name == "ner" else [("tags_column", f"{name}_tags")]  # ner: found as ner / ner_tags
    if "label_column" in keys:
        if _offline():
            raise ValueError(f"task_name={name} downloads GLUE from the Hub, which this run cannot reach (offline); "
                             "give the task's files instead: train_file=... validation_file=... (csv/tsv/json)")
        return [("dataset_name", "nyu-mll/glue"), ("dataset_config_name", name)]
    raise ValueError(f"task_name={name}: only run_glue and run_ner take it (task=classification, task=token_classification)")


#: converters that depend on the task's keys: alias -> f(value, keys)
KEYED_CONVERTERS: dict[str, Callable[[Any, set], list[tuple[str, Any]]]] = {
    "task_name": _task_name,
    # "Model type to use if training from scratch": our model_class takes a registered model_type
    "model_type": lambda v, keys: [("model_class", v)],
    "no_keep_linebreaks": lambda v, keys: [("keep_linebreaks", "false")] if _truthy(v) else [],
}

CONVERTERS: dict[str, Callable[[Any], list[tuple[str, Any]]]] = {
    "with_tracking": _with_tracking,
    # transformers 5 always loads weights this way (the argument is gone from from_pretrained)
    "low_cpu_mem_usage": lambda v: [],
    "ignore_pad_token_for_loss": _refuse_false(
        "ignore_pad_token_for_loss", "notrainer always leaves padding out of the loss (labels -100); remove it"),
    "pad_to_max_length": _pad_to_max_length,
    "debug": _debug,
    # run_image_classification: the fraction held out (0.15) is our percentage (15)
    "train_val_split": lambda v: [("validation_split_percentage", round(float(v) * 100))],

    # The Trainer's max_steps=-1 means "not set" (train num_train_epochs).
    "max_steps": lambda v: [("max_train_steps", None if str(v).strip() == "-1" else v)],
    "bf16": _precision("bf16"),
    "fp16": _precision("fp16"),
    "save_strategy": _save_strategy,
    "eval_strategy": _eval_strategy,
}

#: Every alias name, for the typo hint and the docs.
ALIAS_NAMES = sorted(set(RENAMES) | set(CONVERTERS) | set(KEYED_CONVERTERS))


def _target(name: str, keys: set[str]) -> str | None:
    for cand in RENAMES.get(name, ()):
        if cand in keys:
            return cand
    return None


def translate(items: Iterable[tuple[str, Any]], keys: Iterable[str]) -> list[tuple[str, Any]]:
    """(name, value) pairs with aliases turned into our keys. A name that is already one of
    `keys` (the task's config keys) is ours and kept as it is. Raises ValueError for a value an
    alias cannot take (the caller turns it into a UsageError)."""
    keys = set(keys)
    items = list(items)
    names = {n for n, _ in items}
    out: list[tuple[str, Any]] = []
    # A strategy decides over a step count, whatever their order (save_strategy=no with
    # save_steps=10 does not save, as in the Trainer): converted values go last.
    last: list[tuple[str, Any]] = []
    for name, value in items:
        if name in keys:
            out.append((name, value))
            continue
        if name == "evaluation_strategy":
            name = "eval_strategy"
        if name in KEYED_CONVERTERS:
            last += KEYED_CONVERTERS[name](value, keys)
            continue
        if name == "with_tracking" and "report_to" in names:
            continue  # --with_tracking --report_to X: tracking to X, as in the scripts
        if name in CONVERTERS:
            last += CONVERTERS[name](value)
            if name == "save_strategy" and str(value).strip().lower() == "steps" and not (
                    names & {"save_steps", "checkpointing_steps"}):
                last.append(("checkpointing_steps", 500))  # the Trainer's save_steps default
            if name == "eval_strategy" and str(value).strip().lower() == "steps" and "eval_steps" not in names:
                last.append(("eval_steps", _logging_steps(items)))
            continue
        target = _target(name, keys)
        out.append((target or name, value))  # an unknown name stays: the schema refuses it with a hint
    return out + last


def _logging_steps(items: list[tuple[str, Any]]) -> Any:
    for name, value in items:
        if name == "logging_steps":
            return value
    return 10  # our logging_steps default (the Trainer's eval_steps defaults to logging_steps)


def hint(name: str, keys: Iterable[str]) -> str | None:
    """A did-you-mean for an unknown key that looks at the alias table first."""
    keys = sorted(set(keys))
    if name in RENAMES:  # an alias of a key this task does not have
        wanted = " / ".join(RENAMES[name])
        return f" ({name} is the Hugging Face scripts' name for {wanted}, which this task does not have)"
    close = difflib.get_close_matches(name, keys + ALIAS_NAMES, n=1, cutoff=0.6)
    if not close:
        return None
    word = close[0]
    if word in keys:
        return f" (did you mean {word}?)"
    target = _target(word, set(keys))
    if word in CONVERTERS:
        return f" (did you mean {word}?)"
    if target:
        return f" (did you mean {target}? {word} is accepted too)"
    return None
