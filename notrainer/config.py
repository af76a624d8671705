"""Run configuration: typed dataclasses, parsed with OmegaConf, validated before anything heavy.

Keys are flat and named as in the Hugging Face `run_*_no_trainer.py` scripts and
`TrainingArguments`; only optional features are nested (`lora.r`). A task adds its own keys
by subclassing `TrainConfig` (see `tasks/clm.py`).

    pairs, file_cfg, _ = read_argv(["task=clm", "learning_rate=3e-4", "config=run.yaml"])
    cfg = make_config(CLMConfig, pairs, file_cfg, "clm")

The CLI (`notrainer.run.parse_args`) picks the task's config class from the task registry;
this module never imports a task.

Precedence: dataclass defaults < the YAML file given as `config=` < `key=value` pairs.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UsageError, check, first_line


def key(default: Any, help: str, group: str = "") -> Any:  # noqa: A002 - mirrors argparse
    """A config field with its one-line doc (shown by `--help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, "group": group})
    return field(default=default, metadata={"help": help, "group": group})


@dataclass
class LoraConfig:
    """`lora.*`: LoRA adapters through peft. Off while `r` is 0."""

    r: int = key(0, "LoRA rank; 0 turns LoRA off")
    alpha: int = key(16, "LoRA scaling alpha")
    dropout: float = key(0.05, "dropout on the LoRA path")
    target_modules: Optional[list[str]] = key(None, "module names to adapt; default chosen per architecture")
    merge: bool = key(False, "also export merged full weights (loadable without peft) into output_dir/merged")


@dataclass
class LoopConfig:
    """The loop's own settings, handed to `Loop` whole (or given to it as keyword arguments).

    `TrainConfig` extends this class, so the CLI's flat keys (`max_train_steps=...`) are the
    same fields; a task's config reaches the loop without a copy of each key."""

    output_dir: Optional[str] = key("runs/loop", "run directory", "run")
    seed: Optional[int] = key(None, "seed for model init, data order, dropout", "run")
    data_seed: Optional[int] = key(None, "seed for the data order (the sampler) alone; default: seed", "run")
    num_train_epochs: float = key(1.0, "epochs (ignored when max_train_steps is set)", "optim")
    max_train_steps: Optional[int] = key(None, "optimizer steps in total (overrides num_train_epochs)", "optim")
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step", "optim")
    max_grad_norm: float = key(1.0, "clip the gradient norm to this; 0 disables clipping", "optim")
    # Unset: accelerate's (the launch file or `accelerate config`), else no; the CLI writes the
    # effective value back (run.build), so tasks and config.yaml see what actually runs.
    mixed_precision: Optional[str] = key(None, "no, fp16 or bf16 (default: the launch file's, else no)", "speed")
    torch_compile: bool = key(False, "compile the model with torch.compile", "speed")
    torch_compile_mode: Optional[str] = key(None, "torch.compile mode (default, reduce-overhead, max-autotune)", "speed")
    peak_tflops: Optional[float] = key(None, "the accelerator's peak TFLOP/s for the logged MFU (default: from a table of "
                                             "common GPUs by name, bf16 dense; see docs/performance.md)", "speed")
    eval_steps: Optional[int] = key(None, "evaluate every N optimizer steps (default: once per epoch)", "loop")
    checkpointing_steps: Optional[str] = key(None, "checkpoint every N optimizer steps, or 'epoch'", "loop")
    resume_from_checkpoint: Optional[str] = key(None, "'auto' (newest complete checkpoint in output_dir) or a checkpoint folder", "loop")
    save_total_limit: Optional[int] = key(None, "keep only the newest N checkpoints (and always the best one)", "loop")
    checkpointing_minutes: Optional[float] = key(None, "also checkpoint when this many minutes passed since the last checkpoint", "loop")
    metric_for_best_model: Optional[str] = key(None, "eval metric that picks the best checkpoint, e.g. eval_loss or eval_accuracy", "loop")
    greater_is_better: Optional[bool] = key(None, "whether a higher metric_for_best_model is better (default: false for losses, else true)", "loop")
    load_best_model_at_end: bool = key(False, "export the best checkpoint's weights as the final model (metric default: eval_loss)", "loop")
    early_stopping_patience: Optional[int] = key(None, "stop after this many evaluations without improving metric_for_best_model", "loop")
    early_stopping_threshold: float = key(0.0, "how much metric_for_best_model must improve to count as better", "loop")
    max_nonfinite_steps: int = key(10, "skip optimizer steps with a NaN/inf loss or gradient norm; stop after this many in a row (0: no check)", "loop")
    logging_steps: int = key(10, "log train loss, lr, grad norm, tokens/s every N optimizer steps", "loop")
    report_to: str = key("none", "trackers, comma-separated: any accelerate supports (tensorboard, wandb, mlflow, "
                                 "comet_ml, aim, clearml, dvclive, swanlab, trackio), all or none", "loop")
    progress: bool = key(True, "show the progress bar (on the local main process)", "loop")

    def validate(self) -> None:
        """Checks of the loop's settings; raise UsageError."""
        check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
        check(self.max_train_steps is None or self.max_train_steps >= 1, "max_train_steps must be >= 1")
        check(self.num_train_epochs > 0, "num_train_epochs must be > 0")
        check(self.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0 disables clipping)")
        check(self.logging_steps >= 1, "logging_steps must be >= 1")
        check(self.peak_tflops is None or self.peak_tflops > 0, f"peak_tflops must be > 0, got {self.peak_tflops}")
        check(self.eval_steps is None or self.eval_steps >= 1, "eval_steps must be >= 1")
        check(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit must be >= 1")
        check(self.checkpointing_minutes is None or self.checkpointing_minutes > 0, "checkpointing_minutes must be > 0")
        check(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
              "early_stopping_patience must be >= 1")
        check(self.early_stopping_threshold >= 0, "early_stopping_threshold must be >= 0")
        check(self.max_nonfinite_steps >= 0, "max_nonfinite_steps must be >= 0 (0 turns the check off)")
        check(self.mixed_precision in (None, "no", "fp16", "bf16"),
              f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        from .trackers import resolve_report_to

        resolve_report_to(self.report_to)  # unknown name or package not installed: one line, now
        if self.checkpointing_steps is not None:
            c = str(self.checkpointing_steps)
            check(c == "epoch" or (c.isdigit() and int(c) > 0),
                  f"checkpointing_steps must be a positive number of steps or 'epoch', got {c!r}")


@dataclass
class TrainConfig(LoopConfig):
    """Keys every task shares. Task configs subclass this and add their own.

    The loop's own keys come from `LoopConfig`; the ones redeclared here only change the default."""

    # --- what to run
    output_dir: Optional[str] = key(None, "run directory (default runs/<task>)", "run")
    seed: int = key(42, "seed for model init, data order, dropout", "run")
    num_train_epochs: float = key(3.0, "epochs (ignored when max_train_steps is set)", "optim")
    report_to: str = key("tensorboard", "trackers, comma-separated: any accelerate supports (tensorboard, wandb, "
                                        "mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio), all or none", "loop")
    task: str = key("clm", "task name (clm, mlm, classification, ...), 'pkg.module:Class' or 'path/file.py:Class'", "run")
    config: Optional[str] = key(None, "YAML file with keys; key=value pairs given after it override it", "run")
    overwrite_output_dir: bool = key(False, "start over in an output_dir that already holds a run (deletes its checkpoints)", "run")
    do_train: bool = key(True, "train", "run")
    do_eval: bool = key(True, "evaluate on the validation set", "run")
    do_predict: bool = key(False, "write predictions for test_file", "run")
    mode: Optional[str] = key(None, "shorthand: 'eval' (do_train=false) or 'predict' (only do_predict=true)", "run")

    # --- model and tokenizer
    model_name_or_path: Optional[str] = key(None, "pretrained model: local folder or hub name (default: tiny random model)", "model")
    config_name: Optional[str] = key(None, "model config to train from scratch (folder or hub name)", "model")
    tokenizer_name: Optional[str] = key(None, "tokenizer folder or hub name (default: model_name_or_path, else built-in)", "model")
    model_class: Optional[str] = key(None, "model class 'pkg.module:Class' or a registered model_type (default: the task's Auto class)", "model")
    trust_remote_code: bool = key(False, "allow model code from the hub", "model")
    ignore_mismatched_sizes: bool = key(False, "load a checkpoint whose head has another size (re-initialises it)", "model")
    torch_dtype: Optional[str] = key(None, "weight dtype: auto (as saved), bfloat16, float16, float32 (default: transformers' own: "
                                           "auto for model_name_or_path, the config's for a new model)", "model")
    attn_implementation: Optional[str] = key(None, "attention kernel: eager, sdpa, flash_attention_2, ... (default: transformers' choice)", "model")
    quantization: Optional[str] = key(None, "load model_name_or_path quantized with bitsandbytes: nf4, fp4 or int8 (QLoRA; needs lora.r)", "model")
    load_in_4bit: bool = key(False, "the Trainer/TRL key: same as quantization=nf4", "model")
    load_in_8bit: bool = key(False, "the Trainer/TRL key: same as quantization=int8", "model")

    # --- data
    dataset_name: Optional[str] = key(None, "hub dataset name (online users)", "data")
    dataset_config_name: Optional[str] = key(None, "hub dataset config", "data")
    dataset_split: Optional[str] = key(None, "hub split (or slice, e.g. 'train[:10%]') to train on; default: all splits", "data")
    dataset_revision: Optional[str] = key(None, "hub dataset revision (branch, tag or commit)", "data")
    train_file: Optional[Any] = key(None, "training data: a file, glob, folder or list (YAML list or a,b) of .txt, .json, "
                                          ".jsonl, .csv, .tsv, .parquet, optionally .gz/.bz2/.xz/.zst", "data")
    validation_file: Optional[Any] = key(None, "validation data, same forms", "data")
    test_file: Optional[Any] = key(None, "data for do_predict, same forms", "data")
    keep_linebreaks: bool = key(True, "text files: keep each line's line break (as run_clm_no_trainer.py)", "data")
    validation_split_percentage: int = key(5, "percent of train held out when there is no validation data", "data")
    max_train_samples: Optional[int] = key(None, "truncate the training set (debugging)", "data")
    max_eval_samples: Optional[int] = key(None, "truncate the validation set (debugging)", "data")
    preprocessing_num_workers: Optional[int] = key(None, "processes for datasets.map", "data")
    overwrite_cache: bool = key(False, "redo tokenization even if datasets has it cached", "data")
    dataloader_num_workers: int = key(0, "DataLoader worker processes", "data")
    streaming: bool = key(False, "read train_file as a stream: tokenize and pack on the fly, nothing up front "
                                 "(clm, sft; needs max_train_steps; docs/data.md)", "data")
    shuffle_buffer_size: int = key(0, "streaming: blocks (or examples) held in a seeded shuffle buffer; 0: file order", "data")

    # --- optimisation
    per_device_train_batch_size: int = key(8, "micro-batch size per process", "optim")
    per_device_eval_batch_size: int = key(8, "eval batch size per process", "optim")
    learning_rate: float = key(5e-5, "peak learning rate", "optim")
    weight_decay: float = key(0.0, "AdamW weight decay (not applied to biases and norms)", "optim")
    adam_beta1: float = key(0.9, "AdamW beta1", "optim")
    adam_beta2: float = key(0.999, "AdamW beta2", "optim")
    adam_epsilon: float = key(1e-8, "AdamW epsilon", "optim")
    optim: str = key("adamw_torch", "adamw_torch, adamw_torch_fused, adafactor, sgd, adamw_8bit, paged_adamw_8bit "
                     "(the Trainer's names; see notrainer/optim.py)", "optim")
    optim_args: Optional[str] = key(None, "extra optimizer arguments, \"k=v,k=v\" (e.g. momentum=0.9)", "optim")
    lr_scheduler_type: str = key("linear", "linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, ...", "optim")
    num_warmup_steps: int = key(0, "warmup optimizer steps", "optim")
    warmup_ratio: float = key(0.0, "warmup as a fraction of max_train_steps (used when num_warmup_steps is 0)", "optim")

    # --- speed and memory
    gradient_checkpointing: bool = key(False, "recompute activations in backward to save memory", "speed")

    # --- evaluation, checkpoints, logging

    # --- sharing on the Hugging Face Hub (notrainer/hub.py, docs/observability.md)
    push_to_hub: bool = key(False, "upload the final model, model card and report to the Hub (checked before training)", "hub")
    hub_model_id: Optional[str] = key(None, "Hub repo, 'name' or 'namespace/name' (default: output_dir's name)", "hub")
    hub_private_repo: Optional[bool] = key(None, "create the repo private (default: the Hub's default)", "hub")
    hub_token: Optional[str] = key(None, "Hub token (default: HF_TOKEN or `hf auth login`); never written to config.yaml", "hub")
    hub_strategy: str = key("end", "end; checkpoint (also each checkpoint when saved, as last-checkpoint/); "
                                   "all_checkpoints (also each checkpoint, under checkpoints/); every_save (= end)", "hub")

    # --- optional features
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapters (lora.r, lora.alpha, ...)", "group": "lora"})

    def resolved_output_dir(self) -> str:
        return self.output_dir or os.path.join("runs", _short_task_name(self.task))

    def validate(self) -> None:
        """Cross-field checks that types alone cannot express. Raise UsageError."""
        super().validate()
        check(self.mode in (None, "train", "eval", "predict"), f"mode must be train, eval or predict, got {self.mode!r}")
        if self.mode in ("eval", "predict"):
            self.do_train, self.do_eval, self.do_predict = False, self.mode == "eval", self.mode == "predict"
        check(self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1")
        check(self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size must be >= 1")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)")
        check(self.num_warmup_steps >= 0, "num_warmup_steps must be >= 0")
        from .optim import check_optim

        check_optim(self)  # optim name (with a did-you-mean) and optim_args keys
        if self.metric_for_best_model or self.load_best_model_at_end or self.early_stopping_patience:
            check(self.do_eval, "metric_for_best_model, load_best_model_at_end and early_stopping_patience need "
                                "evaluation: set do_eval=true")
        check(0 <= self.validation_split_percentage < 100, "validation_split_percentage must be in [0, 100)")
        check(self.shuffle_buffer_size >= 0, "shuffle_buffer_size must be >= 0")
        if self.streaming and self.do_train:  # a stream has no length: the run's length must be given
            check(self.max_train_steps is not None, "streaming=true needs max_train_steps=N (a stream has no length "
                                                    "to count epochs in)")
        from transformers import SchedulerType

        names = [s.value for s in SchedulerType]
        check(self.lr_scheduler_type in names,
              f"lr_scheduler_type {self.lr_scheduler_type!r} is unknown{_did_you_mean(self.lr_scheduler_type, names)}; "
              f"choose one of {', '.join(names)}")
        check(self.lora.r >= 0, "lora.r must be >= 0")
        from .loading import check_loading

        check_loading(self)  # torch_dtype, attn_implementation, quantization: what this install can serve
        from .data import resolve_files, split_format

        for name in ("train_file", "validation_file", "test_file"):
            if getattr(self, name):  # a file, glob, folder or list: each must match, one format per split
                split_format(resolve_files(getattr(self, name), name), name)
        if self.do_predict:
            check(self.test_file is not None or self.dataset_name is not None,
                  "do_predict=true needs test_file=... (the data to predict on)")
            # Without training and without a model there is nothing trained to predict with.
            check(self.do_train or self.model_name_or_path is not None,
                  "do_predict=true without training needs model_name_or_path=... (a trained run's output_dir)")


# ----------------------------------------------------------------------------- parsing


def _short_task_name(task: str) -> str:
    name = task.rsplit(":", 1)[-1]
    return name.rsplit("/", 1)[-1].replace(".py", "").lower() or "run"


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def all_keys(config_cls: type) -> list[str]:
    """Every dotted key a config class accepts, nested groups included."""
    out = []
    for f in dataclasses.fields(config_cls):
        tp = f.type if not isinstance(f.type, str) else None
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += [f"{f.name}.{k}" for k in all_keys(type(default))]
        else:
            out.append(f.name)
        del tp
    return out


def _split_argv(argv: list[str]) -> tuple[list[str], bool]:
    """The arguments as key=value pairs. Beside our `key=value`, the Trainer / argparse habits:
    `--key=value`, `--key value` and a bare `--flag` (true). After `--key`, the next argument is
    its value unless it starts with `--` or is itself a `key=value` pair (so a value holding `=`
    needs `--key=value`)."""
    want_help = False
    pairs = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help", "help"):
            want_help = True
            continue
        if arg.startswith("--"):
            name = arg[2:]
            if "=" in name:  # --key=value
                pairs.append(name)
                continue
            check(bool(name), "a lone '--' is not an argument (for example: --learning_rate 3e-4)")
            nxt = argv[i] if i < len(argv) else None
            if nxt is not None and not nxt.startswith("--") and nxt not in ("-h", "help") and not _is_pair(nxt):
                pairs.append(f"{name}={nxt}")  # --key value
                i += 1
            else:
                pairs.append(f"{name}=true")  # --flag
            continue
        check("=" in arg, f"expected key=value, got {arg!r} (for example: learning_rate=3e-4 or --learning_rate 3e-4)")
        pairs.append(arg)
    return pairs, want_help


def _is_pair(arg: str) -> bool:
    """`name=...` with a key-like name (letters, digits, _ and dots), not a value such as 'a=b c'."""
    name = arg.split("=", 1)[0]
    return "=" in arg and bool(name) and name.replace("_", "a").replace(".", "a").isalnum()


def read_argv(argv: list[str] | None = None):
    """The command line as (key=value pairs, the `config=` YAML file as a config, whether --help
    was asked). Nothing is checked against a schema yet: that needs the task's config class."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pairs, want_help = _split_argv(argv)
    given = dict(p.split("=", 1) for p in pairs)
    file_cfg = OmegaConf.create()
    if given.get("config"):
        path = given["config"]
        check(os.path.isfile(path), f"config={path}: no such file")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry multi-line context; keep the first line
            raise UsageError(f"config={path}: not valid YAML ({first_line(e)})") from None
        check(isinstance(file_cfg, type(OmegaConf.create())), f"config={path}: expected a mapping of key: value")
    return pairs, file_cfg, want_help


def requested_task(pairs: list[str], file_cfg) -> str:
    """The `task=` value: from the command line, else the YAML file, else the default."""
    given = dict(p.split("=", 1) for p in pairs)
    return given.get("task") or file_cfg.get("task") or TrainConfig.task


def make_config(config_cls: type, pairs: list[str], file_cfg, task_name: str,
                embedded_defaults: dict | None = None):
    """Merge defaults < YAML file < key=value pairs into `config_cls`, then validate.

    The embedded default (no model given) trains a tiny model from scratch, which wants other
    settings than fine-tuning (a higher learning rate, more epochs): `embedded_defaults` supplies
    them, and anything the user set explicitly wins."""
    schema = OmegaConf.structured(config_cls)
    pairs, file_cfg = _translate_aliases(pairs, file_cfg, config_cls)  # max_steps=, bf16=, ... (aliases.py)
    try:
        merged = OmegaConf.merge(schema, file_cfg, _dotlist(pairs, config_cls))
        merged.task = task_name
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise UsageError(_explain(e, config_cls)) from None
    if cfg.model_name_or_path is None and cfg.config_name is None:
        given_keys = {p.split("=", 1)[0] for p in pairs} | set(OmegaConf.to_container(file_cfg).keys())
        for name, value in (embedded_defaults or {}).items():
            if name not in given_keys:
                setattr(cfg, name, value)
    cfg.validate()
    return cfg


def _translate_aliases(pairs: list[str], file_cfg, config_cls: type):
    """The Trainer's / HF scripts' names (docs/coming-from-trainer.md) as our keys, on the
    command line and in the YAML file alike."""
    from .aliases import translate

    keys = set(all_keys(config_cls))
    try:
        items = translate((p.split("=", 1) for p in pairs), keys)
        file_items = translate(OmegaConf.to_container(file_cfg).items(), keys)
    except ValueError as e:
        raise UsageError(str(e)) from None
    pairs = [f"{name}={_yaml_text(value)}" for name, value in items]
    new_file = OmegaConf.create()
    for name, value in file_items:
        OmegaConf.update(new_file, name, value, merge=True)
    return pairs, new_file


def _yaml_text(value: Any) -> str:
    """A translated value back as dotlist text (None -> null, False -> false)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _dotlist(pairs: list[str], config_cls: type):
    """key=value pairs as a config. Values are YAML, except that a text key keeps its text
    whenever YAML would make anything but a string or null of it: YAML 1.1 reads no/off/yes/on
    as booleans and 1 as a number (mixed_precision=no, save_strategy=no, source_prefix="summarize: ")."""
    text_types = (str, Optional[str], "str", "Optional[str]", "str | None", "Optional[str] | None")

    def is_text_key(dotted: str) -> bool:
        # Walk nested groups (lora.x) through their dataclass defaults.
        cls = config_cls
        *groups, leaf = dotted.split(".")
        for g in groups:
            f = next((f for f in dataclasses.fields(cls) if f.name == g), None) if dataclasses.is_dataclass(cls) else None
            if f is None or f.default_factory is dataclasses.MISSING:
                return False
            cls = type(f.default_factory())
        if not dataclasses.is_dataclass(cls):
            return False
        return any(f.name == leaf and f.type in text_types for f in dataclasses.fields(cls))

    out = OmegaConf.from_dotlist(pairs)
    for pair in pairs:
        name, value = pair.split("=", 1)
        # null stays null (it unsets an optional key); a quoted "no" already arrives as a string.
        if is_text_key(name) and not isinstance(OmegaConf.select(out, name), (str, type(None))):
            OmegaConf.update(out, name, value, force_add=True)
    return out


def _explain(e: OmegaConfBaseException, config_cls: type) -> str:
    """Turn an OmegaConf error into one line that says what to do."""
    full_key = getattr(e, "full_key", None) or ""
    kind = type(e).__name__
    if "Key" in kind and ("not in" in str(e) or "not found" in str(e).lower() or kind == "ConfigKeyError"):
        from .aliases import hint as alias_hint

        keys = all_keys(config_cls)
        # The alias table first: edit distance alone sends save_steps to eval_steps.
        hint = alias_hint(full_key, keys) or " (see --help for the keys)"
        return f"unknown key {full_key!r}{hint}"
    if kind in ("ValidationError", "ConfigTypeError", "GrammarParseError") and full_key:
        return f"{full_key}: {first_line(e)}"
    return first_line(e)


def to_dict(cfg: TrainConfig) -> dict:
    """The resolved config as plain data (for config.yaml and trackers)."""
    return OmegaConf.to_container(OmegaConf.structured(_without_secrets(cfg)), resolve=True)


def _without_secrets(cfg):
    # A token must not land in config.yaml, checkpoints, trackers or a pushed repo.
    if getattr(cfg, "hub_token", None):
        return dataclasses.replace(cfg, hub_token=None)
    return cfg


def save_yaml(cfg: TrainConfig, path: str) -> None:
    tmp = path + ".tmp"
    OmegaConf.save(OmegaConf.structured(_without_secrets(cfg)), tmp)
    os.replace(tmp, path)


def help_text(config_cls: type, task_cls: type | None = None) -> str:
    titles = {
        "run": "Run", "model": "Model and tokenizer", "data": "Data", "optim": "Optimisation",
        "speed": "Speed and memory", "loop": "Evaluation, checkpoints, logging", "lora": "LoRA (peft)", "": "Task",
        "hub": "Hugging Face Hub",
    }
    base_names = {f.name for f in dataclasses.fields(TrainConfig)}
    groups: dict[str, list[str]] = {}

    def add(group: str, name: str, f: dataclasses.Field, default: Any) -> None:
        tname = getattr(f.type, "__name__", None) or str(f.type).replace("typing.", "").replace("Optional", "optional")
        groups.setdefault(group, []).append(f"  {name:<30} {f.metadata.get('help', '')}  [{tname}, default: {default}]")

    for f in dataclasses.fields(config_cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is MISSING or default is dataclasses.MISSING:
            default = "required"
        if dataclasses.is_dataclass(default):
            for sub in dataclasses.fields(type(default)):
                add(f.metadata.get("group", f.name), f"{f.name}.{sub.name}", sub, getattr(default, sub.name))
            continue
        group = f.metadata.get("group", "") if f.name in base_names else "task"
        add(group, f.name, f, default)

    title = f"task={task_cls.name}" if task_cls is not None else "task"
    embedded = getattr(task_cls, "embedded_defaults", None)
    if embedded:
        groups.setdefault("task", []).append(
            "  (without model_name_or_path/config_name the tiny built-in model also uses: "
            + ", ".join(f"{k}={v}" for k, v in embedded.items()) + ")")
    lines = [
        "usage: accelerate launch -m notrainer.run task=NAME [key=value ...] [config=run.yaml]",
        "       python -m notrainer.run task=NAME --help     (adds that task's keys)",
        "",
    ]
    order = ["task", "run", "model", "data", "optim", "speed", "loop", "hub", "lora"]
    for g in order + [g for g in groups if g not in order]:
        if g not in groups:
            continue
        lines.append(f"{title} keys:" if g == "task" else f"{titles.get(g, g)}:")
        lines += groups[g]
        lines.append("")
    return "\n".join(lines)
