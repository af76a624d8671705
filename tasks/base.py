"""The Task contract: everything that differs between tasks, and nothing else.

A task supplies its config keys, the model class, data preparation, the collator, the loss
bookkeeping and the metrics. It never touches the optimizer, the accelerator or checkpoints:
those belong to `notrainer.Loop`.

The lifecycle, in the order the CLI (`notrainer.cli.run.build`) calls it, and the order of the
methods below:

1. `Task(cfg)`: keeps the config. The config's values were already checked by its
   `Config.validate()`; `__init__` checks nothing and loads nothing.
2. `load_raw_datasets()` -> raw `DatasetDict` (train/validation/test). Tasks whose model
   shape follows from the data (classification, NER) settle their columns and labels here.
3. `build_processor(raw)` -> the task's preprocessing object, built in this one step: a
   tokenizer (text tasks: the default calls `build_tokenizer(raw)`, which trains the built-in
   tokenizer when none is given), an image processor (vision tasks, which need no tokenizer:
   `has_text = False` and the base class never trains one for them), or an object holding both.
   Steps 4-7 receive this object; the signatures below name it `tokenizer` for text tasks and
   `processor` for the others. The export writes it beside the model (`save_pretrained`).
4. `build_model(tokenizer)` -> model.
5. `setup(model, tokenizer)`: the checks that need the model and tokenizer (lengths against
   the model's positions, pad/mask tokens), and the ONLY place a task stores what it derives
   from them. Attributes set here, declared on the class that sets them:
     - every task: resizes the input embeddings to the tokenizer when it grew;
     - clm: `_block_size` (tokens per block), `_head` (the chunked-loss lm_head or None);
     - sft: `_max_len` (tokens per example), `_tokenizer` (prediction decodes with it); sets
       the tokenizer's chat template, and its pad token (eos) when it has none;
     - mlm: `_max_len` (tokens per block or line);
     - seq2seq: `_model`, `_tokenizer` (the collator makes decoder inputs with the model;
       evaluation decodes with the tokenizer);
     - classification: the model config's pad_token_id when it has none (GPT-2 style heads
       find the last token by it); classification, NER and qa only check here.
   Attributes set by other steps are declared too, on the class or in `__init__` (classification
   and NER: columns and label names from step 2; qa and seq2seq: per-split records from step 6).
6. `prepare_datasets(raw, tokenizer)` -> tokenized `DatasetDict` with the same split names
   (per-split `datasets.map` through `notrainer.data.files.map_splits`).
7. `collator(tokenizer)` -> the DataLoader's collate_fn.
8. `frozen_models()` -> {attribute name: model} for the models the task runs without training
   them (dpo: its reference copy). After the engine has wrapped the trained model, the CLI
   places each (`notrainer.engine.prepare.prepare_frozen`: sharded under ZeRO-3 and FSDP2, on
   the device otherwise) and sets it back on that attribute. Default: none.
9. Per step, called by the Loop: `loss(model, batch)`, `num_items(batch)`,
   `num_tokens(batch)`; per evaluation: `eval_step(model, batch)` then
   `compute_metrics(outputs, eval_loss)`; with do_predict: `predict_step` then
   `format_predictions`.

Config VALUE checks (ranges, combinations of keys) belong in the task's `Config.validate()`,
which runs before anything heavy; only checks that need the model or tokenizer go in `setup`.
Shared task helpers live in `notrainer.tasks.common`.

Subclass a task to change one piece and run it with `task=my_pkg.my_module:MyTask`:

    class MyTask(CLMTask):
        def collator(self, tokenizer):
            return my_collate
"""

from __future__ import annotations

import math
from typing import Any

import torch

from notrainer import compat
from notrainer.data import builtin
from notrainer.data import files as data
from notrainer.data import raw as raw_data
from notrainer.modeling import loading
from notrainer.modeling import lora
from notrainer.config import TrainConfig
from notrainer.errors import UsageError, check, first_line
from notrainer.imports import import_object


class Task:
    #: short name used by `task=...` and the default output_dir
    name: str = "base"
    #: the task's config dataclass (a subclass of TrainConfig with the task's own keys)
    Config: type = TrainConfig
    #: name of the transformers Auto class that loads this task's model
    auto_model: str = "AutoModel"
    #: model type of the tiny random-init model used by the embedded default
    tiny_model_type: str = "bert"
    #: style of the built-in tokenizer: "bert" (adds [CLS]/[SEP]) or "gpt" (adds nothing)
    tokenizer_style: str = "bert"
    #: whether the task reads text; a task without (vision) builds no tokenizer, built-in or not
    has_text: bool = True
    #: config values used when running on the built-in tiny model, unless the user sets them
    embedded_defaults: dict[str, Any] = {}
    #: embedded_defaults keys that keep their own (the HF scripts') default with the user's data
    data_length_keys: tuple[str, ...] = ()
    #: whether streaming=true works: the task implements `train_stream`
    supports_streaming: bool = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A subclass written for the old name would silently lose its checks.
        if "check_model" in vars(cls):
            raise TypeError(f"{cls.__name__}.check_model: the method is now called setup(model, tokenizer)")

    # ------------------------------------------------------------------ 2. raw data

    def builtin_datasets(self):
        """The embedded default data as a DatasetDict (train, validation): small, generated
        offline, learnable by a tiny model."""
        raise UsageError(f"task={self.name} has no built-in data: give train_file=...")

    def load_raw_datasets(self):
        return raw_data.load_raw_datasets(self.cfg, builtin=self.builtin_datasets, check_rows=self.check_raw_rows)

    def check_raw_rows(self, ds, where: str) -> None:
        """A task's own checks of a raw split's values, in file order (`where` names the file):
        raise UsageError naming the row. Text and label columns are already checked
        (`notrainer.data.files.check_column_values`); sft checks chat roles here."""

    # ------------------------------------------------------------------ 3-5. tokenizer, model, setup

    def tokenizer_texts(self, raw):
        """Texts the built-in tokenizer is trained on (when no tokenizer is given)."""
        raise UsageError(f"task={self.name} needs tokenizer_name=... or model_name_or_path=...")

    def build_processor(self, raw):
        """Lifecycle step 3: the preprocessing object steps 4-7 receive. Text tasks: their
        tokenizer. A task without text (`has_text = False`) overrides this (e.g. with an
        `AutoImageProcessor`); the base class then builds nothing."""
        return self.build_tokenizer(raw) if self.has_text else None

    def build_tokenizer(self, raw):
        cfg = self.cfg
        name = cfg.tokenizer_name or cfg.model_name_or_path or cfg.config_name
        if name is None:
            return builtin.train_tokenizer(self.tokenizer_texts(raw), style=self.tokenizer_style)
        self.check_local_paths()
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code, **self.tokenizer_kwargs())
        except Exception as e:
            raise UsageError(f"tokenizer {name!r} could not be loaded: {first_line(e)}") from None

    def tokenizer_kwargs(self) -> dict:
        return {"use_fast": False} if getattr(self.cfg, "use_slow_tokenizer", False) else {}

    def check_local_paths(self) -> None:
        """A misspelled local folder reads "no such folder" instead of the hub's complaint about
        repo ids (data.check_local_model_path); runs before anything is loaded."""
        for key_name in ("model_name_or_path", "tokenizer_name", "config_name"):
            value = getattr(self.cfg, key_name, None)
            data.check_local_model_path(value, key_name)
            loading.check_model_folder(value, key_name)  # a damaged config.json or cut-off weights
            base = lora.adapter_base(value) if value else None
            if base:  # an adapter folder: its base model's folder too
                loading.check_model_folder(base, key_name)

    def pretrained_config(self, needed_for: str):
        """The config of the given model (model_name_or_path, else config_name), e.g. for the
        labels it was trained on when there is no training data to read them from."""
        cfg = self.cfg
        name = cfg.model_name_or_path or cfg.config_name
        check(name is not None, f"without training data the {needed_for} come from the model: give model_name_or_path=...")
        self.check_local_paths()
        from transformers import AutoConfig

        name = lora.adapter_base(name) or name  # an adapter folder has no config.json: its base has
        try:
            return AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
        except Exception as e:
            raise UsageError(f"model {name!r} could not be loaded: {first_line(e)}") from None

    def model_kwargs(self, tokenizer) -> dict:
        """Extra config values for the model (e.g. num_labels, id2label)."""
        return {}

    def model_class(self):
        """The class used to build the model: `model_class=` if given, else the task's Auto class."""
        spec = self.cfg.model_class
        if spec and ":" in spec:
            return import_object(spec, "model_class")
        import transformers

        return getattr(transformers, self.auto_model)

    def tiny_config(self, tokenizer):
        return builtin.tiny_config(self.tiny_model_type, tokenizer, **self.model_kwargs(tokenizer))

    def build_model(self, tokenizer) -> torch.nn.Module:
        cfg, cls = self.cfg, self.model_class()
        self.check_local_paths()
        kwargs = self.model_kwargs(tokenizer)
        try:
            if cfg.model_name_or_path:  # a model folder, a Hub name, or a LoRA adapter folder (base + adapter)
                return lora.from_pretrained(cls, cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code,
                                            ignore_mismatched_sizes=cfg.ignore_mismatched_sizes,
                                            **loading.pretrained_kwargs(cfg), **kwargs)
            if cfg.config_name:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(cfg.config_name, trust_remote_code=cfg.trust_remote_code, **kwargs)
            elif cfg.model_class:  # a registered model_type, or a class: its config type, tiny-sized
                model_type = cfg.model_class if ":" not in cfg.model_class else \
                    getattr(getattr(cls, "config_class", None), "model_type", None) or self.tiny_model_type
                config = builtin.tiny_config(model_type, tokenizer, **kwargs)
            else:
                config = self.tiny_config(tokenizer)
            if hasattr(cls, "from_config"):  # dtype and attention kernel as requested (notrainer/modeling/loading.py)
                return cls.from_config(config, trust_remote_code=cfg.trust_remote_code, **loading.config_kwargs(cfg)) \
                    if cls.__name__.startswith("Auto") else compat.model_from_config(cls, config, **loading.config_kwargs(cfg))
            model = cls(config)
            dtype = loading.config_kwargs(cfg).get("dtype")
            return model.to(dtype) if dtype is not None else model
        except UsageError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            what = cfg.model_name_or_path or cfg.config_name or cfg.model_class
            hint = " (set ignore_mismatched_sizes=true to re-initialise the head)" if "size mismatch" in str(e) else ""
            raise UsageError(f"model {what!r} could not be built: {first_line(e)}{hint}") from None

    def setup(self, model, tokenizer) -> None:
        """Lifecycle step 5: checks that need both model and tokenizer (raise UsageError), and
        the one place a task stores what it derives from them (see the module docstring).
        Subclasses call super().setup(model, tokenizer) first."""
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holding a tokenizer, or None
        if not hasattr(tokenizer, "__len__"):  # no tokenizer (vision): no embeddings to grow
            return
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None and hasattr(emb, "num_embeddings") and len(tokenizer) > emb.num_embeddings:
            model.resize_token_embeddings(len(tokenizer))

    # ------------------------------------------------------------------ 6-7. tokenized data, collator

    def prepare_datasets(self, raw, tokenizer):
        """Raw DatasetDict -> tokenized DatasetDict with the same split names."""
        raise NotImplementedError

    def collator(self, tokenizer):
        from transformers import default_data_collator

        return default_data_collator

    def train_stream(self, raw, tokenizer, rank: int, world_size: int):
        """streaming=true (after setup): this rank's training items, tokenized on the fly, as a
        `notrainer.data.streaming.PackedStream` (checkpointable). `raw["train"]` is a sample of the
        stream's first rows, for columns and formats."""
        raise UsageError(f"task={self.name} cannot stream; streaming=true works with clm, sft and mlm")

    # ------------------------------------------------------------------ 8. frozen models

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        """{attribute: model} for the frozen models the task runs (see the module docstring)."""
        return {}

    # ------------------------------------------------------------------ 9. training and evaluation

    def loss(self, model, batch) -> torch.Tensor:
        """Mean loss over the batch's items (see num_items); or a dict {"loss": loss, "name": scalar}
        whose other scalars are logged beside train_loss (task=dpo's rewards/*)."""
        return model(**batch).loss

    def num_items(self, batch):
        """How many items `loss` is a mean over (the loop weights micro-batches by it)."""
        first = next(iter(batch.values()))
        return first.shape[0]

    def num_tokens(self, batch):
        """Non-padding input tokens, for tokens/s."""
        if "attention_mask" in batch:
            return batch["attention_mask"].sum()
        return batch["input_ids"].numel() if "input_ids" in batch else 0

    def eval_step(self, model, batch) -> dict[str, torch.Tensor] | None:
        """Per-example tensors to gather across ranks: "loss" (summed loss of each example) and
        "num_items" feed eval_loss; any other key goes to compute_metrics. None: loss only."""
        return None

    def compute_metrics(self, outputs: dict[str, list], eval_loss: float | None) -> dict[str, float]:
        """Metrics from the gathered outputs (lists of per-batch numpy arrays, keyed as
        returned by eval_step). Keys get the eval_ prefix."""
        return {}

    # ------------------------------------------------------------------ prediction mode

    def predict_step(self, model, batch) -> dict[str, torch.Tensor]:
        """Per-example tensors for prediction mode (gathered like eval_step's). Default: the
        eval_step outputs without the loss bookkeeping."""
        out = self.eval_step(model, batch)
        if out is None:
            raise UsageError(f"task={self.name} has no prediction mode")
        return {k: v for k, v in out.items() if k not in ("loss", "num_items")}

    def has_prediction_mode(self) -> bool:
        """True when the task formats predictions (do_predict=true)."""
        return type(self).format_predictions is not Task.format_predictions

    def format_predictions(self, outputs: dict[str, list], dataset) -> list[dict]:
        """Turn gathered predict_step outputs into one JSON record per example of `dataset`
        (the tokenized test split, in order): labels, tags, generated text, answers."""
        raise UsageError(f"task={self.name} has no prediction mode")


# ---------------------------------------------------------------------- helpers for tasks


def token_losses(logits: torch.Tensor, labels: torch.Tensor, shift: bool = False) -> dict[str, torch.Tensor]:
    """Per-example summed cross-entropy and target counts, for eval_step. The logits are read
    in their flat layout a chunk of rows at a time (notrainer.modeling.losses.per_token_losses): no fp32
    copy of the whole tensor. With `shift` (causal LM) the labels move, not the logits: slicing
    the logits would copy them."""
    from notrainer.modeling import losses

    targets = losses.shift_labels(labels) if shift else labels
    return losses.per_example(losses.per_token_losses(logits, targets), targets)


def safe_exp(x: float | None) -> float:
    if x is None:
        return float("nan")
    return math.exp(x) if x < 700 else float("inf")


def require_pad_token(tokenizer, why: str) -> None:
    check(tokenizer.pad_token is not None,
          f"the tokenizer has no pad token, which {why} needs; use a tokenizer with one "
          f"(many users set pad_token = eos_token when saving the tokenizer)")
