"""`output_dir/README.md`: a Hugging Face model card for the exported model.

Like the Trainer's card: YAML metadata the Hub reads (base_model, library_name, pipeline_tag,
tags, datasets, metrics and a `model-index` with the final eval results), then the
hyperparameters, the training results table (one row per evaluation, from
`log_history.jsonl`) and the framework versions. Built with huggingface_hub's
`ModelCardData` / `EvalResult`, so the metadata is in the form the Hub validates.

No absolute path of the training machine goes into the card: local models and data files are
named by their folder / file name only.

Called by the loop at the end of training on the main process, after `all_results.json` and
the export are written: `write_model_card(output_dir, cfg)`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
from typing import Any, Mapping, Optional

from notrainer.observability import history

# task -> Hub pipeline tag (what the Hub's widget and search use)
PIPELINE_TAG = {
    "clm": "text-generation",
    "sft": "text-generation",
    "mlm": "fill-mask",
    "classification": "text-classification",
    "token_classification": "token-classification",
    "qa": "question-answering",
    "seq2seq": "text2text-generation",
}

_HYPERPARAMETERS = (
    "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "seed", "optim", "weight_decay", "max_grad_norm", "lr_scheduler_type", "num_warmup_steps", "warmup_ratio",
    "num_train_epochs", "max_train_steps", "mixed_precision", "block_size", "max_seq_length",
)
_VERSIONS = ("notrainer", "transformers", "accelerate", "torch", "datasets", "tokenizers", "peft")
_NOT_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second", "_samples", "_tokens_per_second")


def _as_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    return dict(vars(cfg))


def _task_name(task: Optional[str]) -> str:
    """'clm', 'notrainer.tasks.clm:CLMTask' or 'path/file.py:MyTask' -> a short name."""
    if not task:
        return ""
    return task.split(":")[0].replace(".py", "").replace("/", ".").split(".")[-1]


def _is_local(path: Optional[str]) -> bool:
    return bool(path) and (os.path.exists(path) or os.path.isabs(path) or path.startswith("."))


def _quality_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in results.items() if k.startswith("eval_") and isinstance(v, (int, float))
            and not isinstance(v, bool) and not k.endswith(_NOT_METRICS)}


def _versions() -> list[str]:
    out = []
    for name in _VERSIONS:
        try:
            out.append(f"- {name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _results_table(records: list[dict]) -> list[str]:
    """Trainer-style: one row per evaluation, with the last train loss logged up to that step."""
    evals = [r for r in records if r.get("kind") == "eval"]
    if not evals:
        return []
    metric_names: list[str] = []
    for r in evals:
        metric_names += [k for k in _quality_metrics(r) if k != "eval_loss" and k not in metric_names]
    head = ["Training Loss", "Epoch", "Step", "Validation Loss"] + [m[len("eval_"):] for m in metric_names]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(":---:" for _ in head) + "|"]
    last_loss = "No log"
    train = iter(r for r in records if r.get("kind", "train") == "train")
    pending = next(train, None)
    for e in evals:
        while pending is not None and pending.get("step", 0) <= e.get("step", 0):
            if isinstance(pending.get("loss"), (int, float)):
                last_loss = _fmt(pending["loss"])
            pending = next(train, None)
        cells = [last_loss, _fmt(e.get("epoch", "")), str(e.get("step", "")), _fmt(e.get("eval_loss", "-"))]
        cells += [_fmt(e.get(m, "-")) for m in metric_names]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def build_model_card(
    output_dir: str,
    cfg: Any = None,
    results: Optional[Mapping[str, Any]] = None,
    records: Optional[list[dict]] = None,
    model_name: Optional[str] = None,
    extra_hyperparameters: Optional[Mapping[str, Any]] = None,
):
    """The card as a `huggingface_hub.ModelCard` (not yet written)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    c = _as_dict(cfg)
    if results is None:
        try:
            with open(os.path.join(output_dir, "all_results.json")) as f:
                results = json.load(f)
        except (OSError, ValueError):
            results = {}
    records = history.read(output_dir) if records is None else records
    task = _task_name(c.get("task"))
    pipeline_tag = PIPELINE_TAG.get(task)
    model_name = model_name or c.get("hub_model_id") or os.path.basename(os.path.abspath(output_dir))
    model_name = model_name.split("/")[-1]

    source = c.get("model_name_or_path") or c.get("config_name")
    base_model = source if source and not _is_local(source) and c.get("model_name_or_path") else None
    dataset = c.get("dataset_name")
    data_files = [os.path.basename(str(c[k])) for k in ("train_file", "validation_file") if c.get(k)]
    metrics = _quality_metrics(results)

    eval_results = None
    if metrics and pipeline_tag:
        eval_results = [
            EvalResult(task_type=pipeline_tag, dataset_type=dataset or "json",
                       dataset_name=dataset or (data_files[-1] if data_files else "validation data"),
                       dataset_config=c.get("dataset_config_name"), metric_type=k[len("eval_"):],
                       metric_name=k[len("eval_"):], metric_value=v)
            for k, v in metrics.items() if k != "eval_loss"
        ] or None
    adapter = os.path.exists(os.path.join(output_dir, "adapter_config.json")) and not os.path.exists(
        os.path.join(output_dir, "config.json"))
    tags = ["notrainer", "generated_from_notrainer"] + ([task] if task else []) + (["lora"] if adapter else [])
    data = ModelCardData(
        base_model=base_model,
        datasets=[dataset] if dataset else None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag=pipeline_tag,
        tags=tags,
        metrics=[k[len("eval_"):] for k in metrics if k != "eval_loss"] or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
    )

    lines = [f"# {model_name}", ""]
    if base_model:
        lines.append(f"This model is a fine-tuned version of [{base_model}](https://huggingface.co/{base_model})")
    elif source:
        lines.append(f"This model was trained from `{os.path.basename(os.path.normpath(source))}` (a local model)")
    else:
        lines.append("This model was trained from a randomly initialised model")
    if dataset:
        cfg_name = c.get("dataset_config_name")
        lines[-1] += f" on the [{dataset}](https://huggingface.co/datasets/{dataset})" + (
            f" dataset ({cfg_name} config)." if cfg_name else " dataset.")
    elif data_files:
        lines[-1] += " on local data files: " + ", ".join(f"`{f}`" for f in data_files) + "."
    else:
        lines[-1] += "."
    lines += ["", f"It was trained with notrainer (a training loop on Hugging Face Accelerate), task `{task or '?'}`.", ""]
    if results:
        lines += ["## Results", "", "| Metric | Value |", "|:---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in results.items() if isinstance(v, (int, float, str))]
        lines.append("")
    hp = {k: c[k] for k in _HYPERPARAMETERS if c.get(k) is not None}
    lora = c.get("lora") or {}
    if isinstance(lora, Mapping) and lora.get("r"):
        hp.update({f"lora.{k}": v for k, v in lora.items() if v is not None})
    hp.update(extra_hyperparameters or {})
    if hp:
        lines += ["## Training hyperparameters", ""] + [f"- {k}: {v}" for k, v in hp.items()] + [""]
    table = _results_table(records)
    if table:
        lines += ["## Training results", ""] + table + [""]
    lines += ["## Framework versions", ""] + _versions() + [""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(output_dir: str, cfg: Any = None, **kwargs: Any) -> str:
    """Write `output_dir/README.md`; returns its path. Main process only."""
    card = build_model_card(output_dir, cfg, **kwargs)
    path = os.path.join(output_dir, "README.md")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(str(card))
    os.replace(tmp, path)
    return path
