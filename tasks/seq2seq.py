"""Sequence to sequence: summarization and translation with encoder-decoder models.

    accelerate launch -m notrainer.run task=seq2seq model_name_or_path=t5-small \
        train_file=train.jsonl validation_file=val.jsonl source_prefix="summarize: "

Data: a source and a target text column (`source_column`, `target_column`; defaults for the
usual names: document/summary, article/highlights, source/target, ...), or translation records
`{"translation": {"en": ..., "ro": ...}}` with `source_lang`/`target_lang`. Sources get
`source_prefix` (T5 style) and are truncated to `max_source_length`, targets (tokenized with
`text_target=`) to `max_target_length`. `DataCollatorForSeq2Seq` pads labels with -100 and
makes decoder_input_ids.

Evaluation generates (`num_beams`, `generation_max_length`) and reports ROUGE-1/2/L/Lsum, BLEU,
chrF (0-100) and the mean generated length; `predict_with_generate=false` reports eval_loss
only. The embedded default trains a tiny T5 on a toy word-for-word translation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from notrainer.data import builtin
from notrainer.config import TrainConfig, key
from notrainer.data.files import map_splits, require_columns
from notrainer.errors import UsageError, check, first_line
from notrainer.modeling.lora import adapter_base

from . import common
from .base import Task, token_losses

#: (source, target) column names used when source_column/target_column are not given
KNOWN_COLUMNS = [("source", "target"), ("document", "summary"), ("article", "highlights"), ("text", "summary"),
                 ("dialogue", "summary"), ("input", "output")]


@dataclass
class Seq2SeqConfig(TrainConfig):
    source_column: Optional[str] = key(None, "column with the input text (default: document, article, source, ...)")
    target_column: Optional[str] = key(None, "column with the target text (default: summary, highlights, target, ...)")
    source_lang: Optional[str] = key(None, "source language key of translation records, e.g. en")
    target_lang: Optional[str] = key(None, "target language key of translation records, e.g. ro")
    source_prefix: str = key("", "text put before every source, e.g. 'summarize: ' for T5")
    max_source_length: int = key(1024, "truncate sources to this many tokens")
    max_target_length: int = key(128, "truncate targets to this many tokens")
    predict_with_generate: bool = key(True, "generate during evaluation for ROUGE/BLEU/chrF (false: eval_loss only)")
    num_beams: int = key(1, "beams for generation in evaluation and prediction")
    generation_max_length: Optional[int] = key(None, "max new tokens generated (default: max_target_length)")

    def validate(self) -> None:
        super().validate()
        check(self.max_source_length >= 1 and self.max_target_length >= 1,
              "max_source_length and max_target_length must be >= 1")
        check(self.num_beams >= 1, "num_beams must be >= 1")
        check(self.generation_max_length is None or self.generation_max_length >= 1, "generation_max_length must be >= 1")
        # One of source_column / target_column alone: the other is the data's other text column
        # (run_summarization_no_trainer.py's --text_column / --summary_column given alone).


class Seq2SeqTask(Task):
    name = "seq2seq"
    Config = Seq2SeqConfig
    auto_model = "AutoModelForSeq2SeqLM"
    tiny_model_type = "t5"
    tokenizer_style = "gpt"
    embedded_defaults = dict(learning_rate=3e-3, num_train_epochs=2.0, per_device_train_batch_size=32,
                             per_device_eval_batch_size=64, warmup_ratio=0.05, lr_scheduler_type="linear",
                             max_source_length=32, max_target_length=32)
    #: with the user's data these keep the scripts' defaults (1024, 128), not the built-in data's
    data_length_keys = ("max_source_length", "max_target_length")

    #: set by setup: the collator makes decoder_input_ids with the model; evaluation decodes with the tokenizer
    _model = None
    _tokenizer = None
    #: set by prepare_datasets: the test split's source texts, for the prediction records
    _sources: Optional[dict] = None
    #: loaded on first use: rouge, sacrebleu, chrf
    _metrics: Optional[dict] = None

    # ------------------------------------------------------------------ data

    def builtin_datasets(self):
        rows = [{"source": s, "target": t} for s, t in toy_translation_pairs(2200)]
        return builtin.splits(rows[:2000], rows[2000:])

    def columns(self, ds, split: str = "train") -> tuple[str, str]:
        """(source, target) column names, or ("translation", "translation") for translation records."""
        cfg, names = self.cfg, ds.column_names
        if cfg.source_column and cfg.target_column:
            return cfg.source_column, cfg.target_column
        if cfg.source_column or cfg.target_column:  # one given: the other is the first other column
            given = cfg.source_column or cfg.target_column
            require_columns(ds, {"source_column" if cfg.source_column else "target_column": given})
            others = [n for n in names if n != given]
            if not others and split == "test" and cfg.source_column:
                return given, None
            check(bool(others), f"{'source' if cfg.source_column else 'target'}_column={given!r}: the data has no "
                                "other column to pair it with; set both source_column=... and target_column=...")
            known = [t if cfg.source_column else s for s, t in KNOWN_COLUMNS]
            other = next((n for n in known if n in others), others[0])
            return (given, other) if cfg.source_column else (other, given)
        if "translation" in names:
            langs = set(_translation_langs(ds))
            check(cfg.source_lang is not None and cfg.target_lang is not None,
                  f"translation records need source_lang=... and target_lang=... (the data has {', '.join(sorted(langs))})")
            for name in ("source_lang", "target_lang"):
                lang = getattr(cfg, name)
                check(record_lang(lang, langs) in langs, f"{name}={lang!r}: no such language in the translation records "
                                                         f"(they have {', '.join(sorted(langs))})")
            return "translation", "translation"
        for source, target in KNOWN_COLUMNS:
            if source in names and (target in names or split == "test"):  # test data may lack targets
                return source, target
        raise UsageError(f"cannot tell the source and target columns apart (columns: {', '.join(names)}); "
                         "set source_column=... and target_column=...")

    def texts(self, ds, split: str) -> tuple[list[str], list[str] | None]:
        """Source texts (with the prefix) and target texts (None for an unlabelled test split)."""
        src_col, tgt_col = self.columns(ds, split)
        if src_col != "translation":
            require_columns(ds, {"source_column": src_col})
            if split != "test":
                require_columns(ds, {"target_column": tgt_col})
        sources, targets = self.pick_texts(ds, ds.column_names, src_col, tgt_col)
        _check_texts(sources, f"the {split} split", "source")
        if split == "test" and targets is not None and not all(t and str(t).strip() for t in targets):
            targets = None  # prediction needs no targets (a test file loaded beside labelled ones has empty ones)
        if targets is not None:
            _check_texts(targets, f"the {split} split", "target")
        return [self.cfg.source_prefix + s for s in sources], targets

    def pick_texts(self, table, names, src_col: str, tgt_col: str) -> tuple[list, list | None]:
        """Sources and targets (None without a target column) of a split or a map batch, as
        they are (no prefix, not checked)."""
        if src_col == "translation":
            records = list(table["translation"])
            langs = set(records[0]) if records and isinstance(records[0], dict) else set()
            src, tgt = record_lang(self.cfg.source_lang, langs), record_lang(self.cfg.target_lang, langs)
            return [r.get(src) for r in records], [r.get(tgt) for r in records]
        return list(table[src_col]), (list(table[tgt_col]) if tgt_col in names else None)

    def tokenizer_texts(self, raw):
        sources, targets = self.texts(raw["train"], "train")
        return sources + targets

    def build_tokenizer(self, raw):
        tokenizer = super().build_tokenizer(raw)
        if not (self.cfg.tokenizer_name or self.cfg.model_name_or_path or self.cfg.config_name):
            # The built-in tokenizer adds nothing; like T5's, end every sequence with </s> so the
            # model learns where to stop generating.
            from tokenizers import processors

            eos = tokenizer.eos_token
            tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
                single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, tokenizer.eos_token_id)])
        return tokenizer

    def prepare_datasets(self, raw, tokenizer):
        cfg = self.cfg
        self._sources = {}
        plans = {}  # split -> how encode reads it: source column, target column, with targets
        for split, ds in raw.items():
            sources, targets = self.texts(ds, split)  # every row checked here, before tokenizing
            if split == "test":  # kept for the prediction records
                self._sources[split] = sources
            src_col, tgt_col = self.columns(ds, split)
            plans[split] = dict(src_col=src_col, tgt_col=tgt_col, with_targets=targets is not None)

        def encode(batch, src_col, tgt_col, with_targets):
            sources, targets = self.pick_texts(batch, batch.keys(), src_col, tgt_col)
            enc = tokenizer([cfg.source_prefix + s for s in sources], max_length=cfg.max_source_length, truncation=True)
            out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            if with_targets:
                out["labels"] = tokenizer(text_target=targets, max_length=cfg.max_target_length,
                                          truncation=True)["input_ids"]
            return out

        return map_splits(raw, encode, cfg, desc="tokenizing", split_kwargs=plans.__getitem__)

    def collator(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        # With the model, the collator also makes decoder_input_ids (labels shifted right).
        multiple = 8 if self.cfg.mixed_precision in ("fp16", "bf16") else None
        return DataCollatorForSeq2Seq(tokenizer, model=self._model, label_pad_token_id=-100,
                                      pad_to_multiple_of=multiple)

    # ------------------------------------------------------------------ model

    def build_model(self, tokenizer):
        name = self.cfg.model_name_or_path or self.cfg.config_name
        if name and not self.cfg.model_class:
            from transformers import AutoConfig

            self.check_local_paths()
            try:
                # an adapter folder has no config.json: its base model's decides
                config = AutoConfig.from_pretrained(adapter_base(name) or name, trust_remote_code=self.cfg.trust_remote_code)
            except Exception as e:
                raise UsageError(f"model {name!r} could not be loaded: {first_line(e)}") from None
            _require_encoder_decoder(config, name)
        return super().build_model(tokenizer)

    def tiny_config(self, tokenizer):
        # No dropout: the tiny random-init model has a few hundred steps to learn the toy data.
        return builtin.tiny_config(self.tiny_model_type, tokenizer, dropout_rate=0.0)

    def setup(self, model, tokenizer):
        super().setup(model, tokenizer)
        _require_encoder_decoder(model.config, self.cfg.model_name_or_path or self.cfg.config_name or "the model")
        start = getattr(model.generation_config, "decoder_start_token_id", None)
        if start is None:
            start = model.config.decoder_start_token_id
        check(start is not None, "the model config has no decoder_start_token_id; set it in its config.json")
        check(tokenizer.pad_token_id is not None, "the tokenizer has no pad token; seq2seq batches need one")
        self._model, self._tokenizer = model, tokenizer

    # ------------------------------------------------------------------ loss, generation, metrics

    def num_items(self, batch):
        # Labels are aligned with the decoder outputs (no shift): every label != -100 counts.
        return (batch["labels"] != -100).sum()

    def generate(self, model, batch) -> torch.Tensor:
        model = getattr(model, "module", model)  # generate on the model inside a DDP wrapper
        return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              max_new_tokens=self.cfg.generation_max_length or self.cfg.max_target_length,
                              num_beams=self.cfg.num_beams, synced_gpus=common.sharded_reason() is not None)

    def eval_step(self, model, batch):
        logits = model(**batch).logits
        out = token_losses(logits, batch["labels"])
        if self.cfg.predict_with_generate:
            out["generated"] = self.generate(model, batch)
            out["labels"] = batch["labels"]
        return out

    def predict_step(self, model, batch):
        return {"generated": self.generate(model, batch)}

    def decode(self, arrays: list[np.ndarray]) -> list[str]:
        tok, pad = self._tokenizer, self._tokenizer.pad_token_id
        texts = []
        for ids in arrays:
            ids = np.where(ids < 0, pad, ids)  # -100: label padding and padding across processes
            texts += [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
        return texts

    def compute_metrics(self, outputs, eval_loss):
        if "generated" not in outputs:
            return {}
        predictions, references = self.decode(outputs["generated"]), self.decode(outputs["labels"])
        gen_len = _mean_len(outputs["generated"], self._tokenizer.pad_token_id)
        return {**generation_metrics(predictions, references, self._load_metrics()), "gen_len": round(gen_len, 4)}

    def format_predictions(self, outputs, dataset):
        predictions = self.decode(outputs["generated"])
        return [{"source": s, "prediction": p} for s, p in zip((self._sources or {}).get("test", [""] * len(predictions)),
                                                                 predictions)]

    # ------------------------------------------------------------------ helpers

    def _load_metrics(self):
        if self._metrics is None:
            from notrainer.metrics import load_metric

            self._metrics = {name: load_metric(name) for name in ("rouge", "sacrebleu", "chrf")}
        return self._metrics


def generation_metrics(predictions: list[str], references: list[str], metrics: dict) -> dict[str, float]:
    """ROUGE (x100), BLEU and chrF of generated texts against one reference each."""
    # rougeLsum scores sentence by sentence: one sentence per line.
    def lines(texts):
        return ["\n".join(s for s in re.split(r"(?<=[.!?])\s+", t) if s) for t in texts]

    rouge = metrics["rouge"].compute(predictions=lines(predictions), references=lines(references))
    out = {k: round(v * 100, 4) for k, v in rouge.items()}
    out["bleu"] = round(metrics["sacrebleu"].compute(predictions=predictions, references=references)["score"], 4)
    out["chrf"] = round(metrics["chrf"].compute(predictions=predictions, references=references)["score"], 4)
    return out


def _mean_len(arrays: list[np.ndarray], pad: int) -> float:
    lengths = np.concatenate([((ids >= 0) & (ids != pad)).sum(1) for ids in arrays])
    return float(lengths.mean()) if len(lengths) else 0.0


def _require_encoder_decoder(config, name: str) -> None:
    check(getattr(config, "is_encoder_decoder", False),
          f"task=seq2seq needs an encoder-decoder model (T5, BART, Marian, ...); {name} is a "
          f"{getattr(config, 'model_type', 'decoder-only')} model without a decoder stack "
          "(for a decoder-only model use task=sft or task=clm)")


def record_lang(code: str | None, langs) -> str | None:
    """The key of a translation record for a language code: the code itself, else its part
    before "_" (mBART codes: en_XX -> en, as run_translation_no_trainer.py reads them)."""
    if code is None or code in langs:
        return code
    short = code.split("_")[0]
    return short if short in langs else code


def _translation_langs(ds) -> list[str]:
    feature = ds.features["translation"]
    if hasattr(feature, "keys"):
        return list(feature.keys())
    return list(getattr(feature, "languages", []) or [])


def _check_texts(texts, where: str, what: str) -> None:
    empty = [i for i, t in enumerate(texts) if t is None or not str(t).strip()]
    check(not empty, f"{where} has {len(empty)} empty {what} text(s) (first at row {empty[0] if empty else 0}); "
                     f"remove or fill them")


# ---------------------------------------------------------------------- built-in data

#: English -> toy-language dictionary of the built-in translation data
TOY_LEXICON = {
    "the": "le", "a": "un", "red": "rosso", "blue": "blau", "green": "verde", "black": "nero", "white": "blanko",
    "cat": "gato", "dog": "hundo", "bird": "fogel", "horse": "kavalo", "fox": "vulpo", "mouse": "muso",
    "sees": "vidas", "likes": "amas", "finds": "trovas", "follows": "sekvas", "chases": "casas",
    "small": "piko", "big": "grando", "old": "veko", "new": "nova",
    "car": "auto", "house": "kasa", "tree": "baumo", "boat": "barko", "lamp": "lampo", "box": "skatol",
    "today": "hodiau", "at": "je", "night": "nokto", "in": "en", "town": "urbo",
}


def toy_translation_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """English-like sentences and their word-for-word toy translation: a tiny model learns the
    dictionary within a minute, while copying the source scores a BLEU near 0. Each slot of
    the sentence has its own vocabulary, so word order is easy to get right."""
    rng = random.Random(seed)
    colors, animals = ["red", "blue", "green", "black", "white"], ["cat", "dog", "bird", "horse", "fox", "mouse"]
    verbs, sizes = ["sees", "likes", "finds", "follows", "chases"], ["small", "big", "old", "new"]
    things, tails = ["car", "house", "tree", "boat", "lamp", "box"], [[], ["today"], ["at", "night"], ["in", "town"]]
    pairs = []
    for _ in range(n):
        words = ["the"] + ([rng.choice(colors)] if rng.random() < 0.7 else []) + [rng.choice(animals), rng.choice(verbs)]
        words += ["a"] + ([rng.choice(sizes)] if rng.random() < 0.7 else []) + [rng.choice(things)] + rng.choice(tails)
        pairs.append((" ".join(words), " ".join(TOY_LEXICON[w] for w in words)))
    return pairs
