"""The run's keys: `TrainConfig` (every task's keys; each task's `Config` subclasses it) and
`LoraConfig` (`lora.*`). The loop's own keys are `LoopConfig` (notrainer/engine/config.py),
which `TrainConfig` extends, so the CLI's flat keys and the loop's settings are the same fields.

Keys are flat and named as in the Hugging Face `run_*_no_trainer.py` scripts and
`TrainingArguments`; only optional features are nested (`lora.r`). `validate()` checks values
before anything heavy happens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from notrainer.engine.config import Freezable, LoopConfig, key
from notrainer.errors import check
from notrainer.errors import did_you_mean as _did_you_mean


def short_task_name(task: str) -> str:
    name = task.rsplit(":", 1)[-1]
    return name.rsplit("/", 1)[-1].replace(".py", "").lower() or "run"


@dataclass
class LoraConfig(Freezable):
    """`lora.*`: LoRA adapters through peft. Off while `r` is 0."""

    r: int = key(0, "LoRA rank; 0 turns LoRA off")
    alpha: int = key(16, "LoRA scaling alpha")
    dropout: float = key(0.05, "dropout on the LoRA path")
    target_modules: Optional[list[str]] = key(None, "module names to adapt; default chosen per architecture")
    merge: bool = key(False, "also export merged full weights (loadable without peft) into output_dir/merged")


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
    use_slow_tokenizer: bool = key(False, "load the Python (slow) tokenizer instead of the fast one (the HF scripts' flag)", "model")
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
    max_predict_samples: Optional[int] = key(None, "truncate the test set of do_predict (debugging)", "data")
    preprocessing_num_workers: Optional[int] = key(None, "processes for datasets.map", "data")
    overwrite_cache: bool = key(False, "redo tokenization even if datasets has it cached", "data")
    dataloader_num_workers: int = key(0, "DataLoader worker processes", "data")
    streaming: bool = key(False, "read train_file as a stream: tokenize and pack on the fly, nothing up front "
                                 "(clm, sft; needs max_train_steps; docs/data.md)", "data")
    shuffle_buffer_size: int = key(0, "streaming: blocks (or examples) held in a seeded shuffle buffer; 0: file order", "data")
    mixture_stop: str = key("all_exhausted", "train_file as weighted sources: when a round of the mixture ends, "
                                             "first_exhausted or all_exhausted (small sources upsampled; docs/data.md)", "data")
    validation_rows: Optional[int] = key(None, "streaming without validation_file: rows held out for evaluation from the "
                                               "start of each source (default: validation_split_percentage percent of "
                                               "its first 1000 rows)", "data")

    # --- optimisation
    per_device_train_batch_size: int = key(8, "micro-batch size per process", "optim")
    per_device_eval_batch_size: int = key(8, "eval batch size per process", "optim")
    learning_rate: float = key(5e-5, "peak learning rate", "optim")
    weight_decay: float = key(0.0, "AdamW weight decay (not applied to biases and norms)", "optim")
    adam_beta1: float = key(0.9, "AdamW beta1", "optim")
    adam_beta2: float = key(0.999, "AdamW beta2", "optim")
    adam_epsilon: float = key(1e-8, "AdamW epsilon", "optim")
    optim: Optional[str] = key(None, "adamw_torch, adamw_torch_fused, adafactor, sgd, adamw_8bit, paged_adamw_8bit (the "
                                     "Trainer's names), deepspeed_cpu_adam, deepspeed_fused_adam; default adamw_torch, "
                                     "or deepspeed_cpu_adam under ZeRO optimizer offload (notrainer/modeling/optim.py)", "optim")
    optim_args: Optional[str] = key(None, "extra optimizer arguments, \"k=v,k=v\" (e.g. momentum=0.9)", "optim")
    lr_scheduler_type: str = key("linear", "linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, ...", "optim")
    num_warmup_steps: int = key(0, "warmup optimizer steps", "optim")
    warmup_ratio: float = key(0.0, "warmup as a fraction of max_train_steps (used when num_warmup_steps is 0)", "optim")

    # --- speed and memory
    gradient_checkpointing: bool = key(False, "recompute activations in backward to save memory", "speed")

    # --- evaluation, checkpoints, logging

    # --- sharing on the Hugging Face Hub (notrainer/observability/hub.py, docs/observability.md)
    push_to_hub: bool = key(False, "upload the final model, model card and report to the Hub (checked before training)", "hub")
    hub_model_id: Optional[str] = key(None, "Hub repo, 'name' or 'namespace/name' (default: output_dir's name)", "hub")
    hub_private_repo: Optional[bool] = key(None, "create the repo private (default: the Hub's default)", "hub")
    hub_token: Optional[str] = key(None, "Hub token (default: HF_TOKEN or `hf auth login`); never written to config.yaml", "hub")
    hub_strategy: str = key("end", "end; checkpoint (also each checkpoint when saved, as last-checkpoint/); "
                                   "all_checkpoints (also each checkpoint, under checkpoints/); every_save (= end)", "hub")

    # --- optional features
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapters (lora.r, lora.alpha, ...)", "group": "lora"})
    peft: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "any peft method: peft.method=lora|loha|lokr|ia3|prefix_tuning|prompt_tuning|p_tuning, peft.merge=true, "
                "and that method's peft config fields (peft.num_virtual_tokens=20, peft.r=8, ...; docs/peft.md)",
        "group": "lora"})

    def resolved_output_dir(self) -> str:
        return self.output_dir or os.path.join("runs", short_task_name(self.task))

    def task_reads_itself(self, value) -> bool:
        """Whether a train_file/validation_file/test_file value is something the task reads
        itself rather than data files (the vision tasks' image folders); validate() then leaves
        its checks to the task."""
        return False

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
        from notrainer.modeling.optim import check_optim

        check_optim(self)  # optim name (with a did-you-mean) and optim_args keys
        if self.metric_for_best_model or self.load_best_model_at_end or self.early_stopping_patience:
            check(self.do_eval, "metric_for_best_model, load_best_model_at_end and early_stopping_patience need "
                                "evaluation: set do_eval=true")
        check(0 <= self.validation_split_percentage < 100, "validation_split_percentage must be in [0, 100)")
        check(self.shuffle_buffer_size >= 0, "shuffle_buffer_size must be >= 0")
        check(self.mixture_stop in ("first_exhausted", "all_exhausted"),
              f"mixture_stop must be first_exhausted or all_exhausted, got {self.mixture_stop!r}")
        check(self.validation_rows is None or self.validation_rows >= 0, "validation_rows must be >= 0")
        if self.streaming and self.do_train:  # a stream has no length: the run's length must be given
            check(self.max_train_steps is not None, "streaming=true needs max_train_steps=N (a stream has no length "
                                                    "to count epochs in)")
        from transformers import SchedulerType

        names = [s.value for s in SchedulerType]
        check(self.lr_scheduler_type in names,
              f"lr_scheduler_type {self.lr_scheduler_type!r} is unknown{_did_you_mean(self.lr_scheduler_type, names)}; "
              f"choose one of {', '.join(names)}")
        check(self.lora.r >= 0, "lora.r must be >= 0")
        from notrainer.modeling.peft_methods import check_peft

        check_peft(self)  # peft.method, its pass-through keys (did-you-mean) and values
        from notrainer.modeling.loading import check_loading

        check_loading(self)  # torch_dtype, attn_implementation, quantization: what this install can serve
        from notrainer.data.mixture import check_data_spec

        for name in ("train_file", "validation_file", "test_file"):
            value = getattr(self, name)
            if value and not self.task_reads_itself(value):  # a file, glob, folder or list (or weighted
                check_data_spec(value, name)  # sources): each must match, one format per split (per source)
        if self.do_predict:
            check(self.test_file is not None or self.dataset_name is not None,
                  "do_predict=true needs test_file=... (the data to predict on)")
            # Without training and without a model there is nothing trained to predict with.
            check(self.do_train or self.model_name_or_path is not None,
                  "do_predict=true without training needs model_name_or_path=... (a trained run's output_dir)")
