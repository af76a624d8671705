"""Masked language modelling (BERT-style pretraining or domain adaptation of an encoder).

    accelerate launch -m notrainer.run task=mlm model_name_or_path=bert-base-uncased train_file=corpus.txt

Texts are tokenized with their special tokens, concatenated and cut into `max_seq_length`
blocks (or, with line_by_line=true, each line is one example). Training batches are masked
afresh every time by `DataCollatorForLanguageModeling` (`mlm_probability`, optionally whole
words). The validation set is masked once, while it is prepared, with a generator seeded by
(seed, row index): eval_perplexity is the same number on every run of the same checkpoint,
under any number of processes and batch sizes.

Metrics: eval_loss (per masked token), eval_perplexity, eval_accuracy (masked tokens
predicted exactly). There is no prediction mode (do_predict=true is refused before
training); use pipeline("fill-mask", model=output_dir) on the exported model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from notrainer.config import TrainConfig, key
from notrainer.data.files import map_splits, pick_text_column, require_columns
from notrainer.errors import check

from . import common
from .base import Task, require_pad_token, safe_exp, token_losses


@dataclass
class MLMConfig(TrainConfig):
    text_column: Optional[str] = key(None, "column holding the text (default: 'text', else the first string column)")
    max_seq_length: Optional[int] = key(None, "tokens per example (default: min(512, the model's positions))")
    line_by_line: bool = key(False, "one example per line/document (padded) instead of concatenate-and-chunk")
    mlm_probability: float = key(0.15, "fraction of tokens masked for the loss")
    whole_word_masking: bool = key(False, "mask all sub-tokens of a word together (needs a fast tokenizer)")

    def validate(self) -> None:
        super().validate()
        check(0.0 < self.mlm_probability < 1.0, f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        check(self.max_seq_length is None or self.max_seq_length >= 4, "max_seq_length must be >= 4")
        check(not (self.streaming and self.line_by_line), "streaming=true packs text into blocks; "
                                                          "line_by_line=true cannot stream")


class MLMTask(Task):
    name = "mlm"
    Config = MLMConfig
    auto_model = "AutoModelForMaskedLM"
    tiny_model_type = "bert"
    tokenizer_style = "bert"
    supports_streaming = True
    # The tiny model sits at the unigram level (perplexity ~30) for a few hundred steps before
    # it learns to use the context; a decaying schedule stalls it there, a constant one does not.
    embedded_defaults = dict(learning_rate=1e-3, num_train_epochs=40.0, per_device_train_batch_size=16,
                             per_device_eval_batch_size=32, max_seq_length=64, warmup_ratio=0.02,
                             lr_scheduler_type="constant_with_warmup", weight_decay=0.01)
    #: with the user's data max_seq_length keeps the scripts' default (the model's positions, at most 512)
    data_length_keys = ("max_seq_length",)

    # ------------------------------------------------------------------ data

    def builtin_datasets(self):
        from .clm import builtin_text_splits

        return builtin_text_splits(topical=False)  # task=clm's grammar, each sentence drawn on its own

    def tokenizer_texts(self, raw):
        return raw["train"][self.text_column(raw["train"])]

    def text_column(self, ds) -> str:
        return pick_text_column(ds, self.cfg.text_column)

    # ------------------------------------------------------------------ setup (lifecycle step 5)

    #: tokens per block (or per line with line_by_line=true): max_seq_length, else what the model fits
    _max_len: Optional[int] = None

    def setup(self, model, tokenizer) -> None:
        super().setup(model, tokenizer)
        check(tokenizer.mask_token is not None,
              "the tokenizer has no mask token, which masked language modelling needs; use an encoder's "
              "tokenizer (BERT, RoBERTa, ...) or task=clm for a decoder")
        check(not self.cfg.whole_word_masking or tokenizer.is_fast,
              "whole_word_masking=true needs a fast tokenizer (offset mappings)")
        require_pad_token(tokenizer, "masked language modelling (padding)")
        self._max_len = common.fit_length("max_seq_length", self.cfg.max_seq_length, model, tokenizer, default_cap=512)

    def prepare_datasets(self, raw, tokenizer):
        cfg, max_len = self.cfg, self._max_len
        col = self.text_column(raw["train"] if "train" in raw else next(iter(raw.values())))
        for split in raw.values():
            require_columns(split, {"text_column": col})
        wwm = cfg.whole_word_masking

        if cfg.line_by_line:
            def tokenize(batch):
                texts = [t for t in batch[col] if t and t.strip()]
                return tokenizer(texts, truncation=True, max_length=max_len, return_special_tokens_mask=True,
                                 return_offsets_mapping=wwm)

            blocks = map_splits(raw, tokenize, cfg, desc="tokenizing")
        else:
            def tokenize(batch):
                return tokenizer([t for t in batch[col] if t], return_special_tokens_mask=True,
                                 return_offsets_mapping=wwm)

            def group(batch):
                return common.group_into_blocks(batch, max_len)

            tokenized = map_splits(raw, tokenize, cfg, desc="tokenizing")
            blocks = map_splits(tokenized, group, cfg, desc=f"grouping into blocks of {max_len}:")
        for name, split in blocks.items():
            check(len(split) > 0, f"the {name} text is shorter than one block of {max_len} tokens; "
                                  "lower max_seq_length, add text, or use line_by_line=true")
        if "validation" in blocks:
            blocks["validation"] = self.mask_once(blocks["validation"], tokenizer)
        return blocks

    def train_stream(self, raw, tokenizer, rank: int, world_size: int):
        """streaming=true: the map-style blocks (tokenized with special tokens, concatenated, cut
        into max_seq_length blocks per read group), built on the fly; masked by the collator."""
        from notrainer.data.files import keeps_linebreaks
        from notrainer.data.mixture import training_stream
        from notrainer.data.streaming import build_example_stream

        cfg, col, max_len = self.cfg, self.text_column(raw["train"]), self._max_len

        def encode(batch):
            tokens = tokenizer([t for t in batch[col] if t], return_special_tokens_mask=True,
                               return_offsets_mapping=cfg.whole_word_masking)
            return common.group_into_blocks(dict(tokens), max_len)

        def part(files, **kw):
            return build_example_stream(files, encode, keep_linebreaks=keeps_linebreaks(cfg), **kw)

        return training_stream(cfg, part, rank, world_size)

    def masking_collator(self, tokenizer):
        from transformers import DataCollatorForLanguageModeling

        wwm = self.cfg.whole_word_masking
        # whole-word masking always puts [MASK] (no random or kept tokens): say so, not warn
        replace = dict(mask_replace_prob=1.0, random_replace_prob=0.0) if wwm else {}
        return DataCollatorForLanguageModeling(tokenizer, mlm_probability=self.cfg.mlm_probability,
                                               whole_word_mask=wwm, **replace)

    def mask_once(self, split, tokenizer):
        """Mask the validation set now, row by row with a generator seeded by (seed, row):
        the same masks on every run, whatever the batch size, process count or map batching."""
        masker, seed = self.masking_collator(tokenizer), self.cfg.seed

        def mask(batch, indices):
            inputs, labels = [], []
            for row, ids in zip(range(len(indices)), batch["input_ids"]):
                masker.generator = torch.Generator().manual_seed(seed * 1_000_003 + indices[row])
                special = torch.tensor([batch["special_tokens_mask"][row]])
                offsets = torch.tensor([batch["offset_mapping"][row]]) if "offset_mapping" in batch else None
                masked, lab = masker.torch_mask_tokens(torch.tensor([ids]), special_tokens_mask=special,
                                                       offset_mapping=offsets)
                inputs.append(masked[0].tolist())
                labels.append(lab[0].tolist())
            return {"input_ids": inputs, "labels": labels}

        drop = [c for c in ("special_tokens_mask", "offset_mapping") if c in split.column_names]
        return split.map(mask, batched=True, with_indices=True, remove_columns=drop, desc="masking validation",
                         load_from_cache_file=not self.cfg.overwrite_cache)

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification

        train_collate = self.masking_collator(tokenizer)
        # The validation rows come masked already (they have labels): only pad them.
        pad_collate = DataCollatorForTokenClassification(tokenizer)

        def collate(features):
            if "labels" in features[0]:
                return pad_collate(features)
            if "offset_mapping" in features[0]:
                # Whole-word masking reads word boundaries from the offsets; tokenizer.pad does
                # not pad them, so pad them here ((0, 0): no word) to the batch's length.
                longest = max(len(f["input_ids"]) for f in features)
                features = [{**f, "offset_mapping": [list(o) for o in f["offset_mapping"]]
                             + [[0, 0]] * (longest - len(f["input_ids"]))} for f in features]
            return train_collate(features)

        return collate

    # ------------------------------------------------------------------ loss and metrics

    def num_items(self, batch):
        return (batch["labels"] != -100).sum()

    def eval_step(self, model, batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        labels = batch["labels"]
        out = token_losses(logits, labels)
        out["correct"] = ((logits.argmax(-1) == labels) & (labels != -100)).sum(1)
        out["masked"] = out["num_items"].clone()
        return out

    def compute_metrics(self, outputs, eval_loss):
        out = {"perplexity": safe_exp(eval_loss)}
        if "correct" in outputs:
            masked = sum(int(x.sum()) for x in outputs["masked"])
            out["accuracy"] = sum(int(x.sum()) for x in outputs["correct"]) / max(masked, 1)
        return out
