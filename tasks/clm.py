"""Causal language modelling (pretraining style): text -> concatenated, chunked blocks.

    accelerate launch -m notrainer.run task=clm model_name_or_path=gpt2 train_file=corpus.txt

Each document gets an end-of-text token, documents are concatenated and cut into
`block_size` blocks (the remainder of each map batch is dropped, as in the HF scripts), and
the labels are the inputs: the model shifts them. With `line_by_line=true` each line is its
own padded example instead. Metrics: eval_loss (per target token) and eval_perplexity.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import chain
from typing import Optional

from notrainer.data import builtin
from notrainer.modeling import losses
from notrainer.config import TrainConfig, key
from notrainer.data.files import keeps_linebreaks, map_splits, pick_text_column, reads_text_files, require_columns
from notrainer.errors import check

from . import common
from .base import Task, require_pad_token, safe_exp


@dataclass
class CLMConfig(TrainConfig):
    text_column: Optional[str] = key(None, "column holding the text (default: 'text', else the first string column)")
    block_size: Optional[int] = key(None, "tokens per training block (default: min(1024, the model's positions))")
    line_by_line: bool = key(False, "one padded example per line/document instead of concatenate-and-chunk")
    add_eos_token: bool = key(True, "append the end-of-text token to each document before chunking (JSON/CSV/parquet "
                                    "rows; never to the lines of .txt files, as in run_clm_no_trainer.py)")
    chunked_loss: Optional[bool] = key(None, "lm_head + cross-entropy in chunks, never the full fp32 logits "
                                             "(docs/performance.md); default: on when CUDA is available")
    eval_stride: Optional[int] = key(None, "sliding-window perplexity: score the validation text in windows of block_size "
                                           "tokens that move by this many, each token once (docs/clm.md); default: "
                                           "non-overlapping blocks")

    def validate(self) -> None:
        super().validate()
        check(self.block_size is None or self.block_size >= 2, "block_size must be >= 2")
        check(not (self.streaming and self.line_by_line), "streaming=true packs documents into blocks; "
                                                          "line_by_line=true cannot stream")
        check(self.eval_stride is None or self.eval_stride >= 1, "eval_stride must be >= 1")
        check(not (self.eval_stride and self.line_by_line),
              "eval_stride slides over the concatenated validation text; line_by_line=true scores each line alone")


class CLMTask(Task):
    name = "clm"
    Config = CLMConfig
    auto_model = "AutoModelForCausalLM"
    tiny_model_type = "gpt2"
    tokenizer_style = "gpt"
    supports_streaming = True
    embedded_defaults = dict(learning_rate=3e-3, num_train_epochs=10.0, per_device_train_batch_size=16,
                             per_device_eval_batch_size=16, block_size=64, warmup_ratio=0.05,
                             lr_scheduler_type="cosine", weight_decay=0.01)
    #: with the user's data block_size keeps the scripts' default (min(1024, the model's positions))
    data_length_keys = ("block_size",)

    # ------------------------------------------------------------------ data

    def builtin_datasets(self):
        return builtin_text_splits()

    def tokenizer_texts(self, raw):
        return raw["train"][self.text_column(raw["train"])]

    def text_column(self, ds) -> str:
        return pick_text_column(ds, self.cfg.text_column)

    # ------------------------------------------------------------------ setup (lifecycle step 5)

    #: tokens per block (or per line with line_by_line=true): block_size, else what the model fits
    _block_size: Optional[int] = None
    #: the switchable lm_head when the chunked loss is on (notrainer.modeling.losses), else None
    _head = None

    def setup(self, model, tokenizer) -> None:
        super().setup(model, tokenizer)
        self._block_size = common.fit_length("block_size", self.cfg.block_size, model, tokenizer, default_cap=1024)
        self._head = self.chunked_loss_head(model)
        check(self.cfg.eval_stride is None or self.cfg.eval_stride <= self._block_size,
              f"eval_stride={self.cfg.eval_stride} is larger than block_size={self._block_size}: tokens between the "
              f"windows would never be scored; use eval_stride<={self._block_size}")
        if self.cfg.line_by_line:
            require_pad_token(tokenizer, "line_by_line=true (padding)")

    def prepare_datasets(self, raw, tokenizer):
        cfg, block = self.cfg, self._block_size
        col = self.text_column(raw["train"] if "train" in raw else next(iter(raw.values())))
        for split in raw.values():
            require_columns(split, {"text_column": col})
        eos = tokenizer.eos_token if self.adds_eos(tokenizer) else ""

        if cfg.line_by_line:
            def tokenize(batch):
                texts = [t + eos for t in batch[col] if t and t.strip()]
                return tokenizer(texts, truncation=True, max_length=block)

            return map_splits(raw, tokenize, cfg, desc="tokenizing")

        def tokenize(batch):
            return tokenizer([t + eos for t in batch[col] if t is not None])

        def group(batch):
            out = common.group_into_blocks(batch, block)
            out["labels"] = [ids[:] for ids in out["input_ids"]]
            # Packed blocks have no padding, so their attention_mask is all ones. Without it the
            # model takes SDPA's is_causal path: flash attention, also under torch.compile (a
            # mask, even all ones, forces the slower masked kernel there), and no host-side
            # "is the mask all ones?" check on every forward in eager mode.
            out.pop("attention_mask", None)
            return out

        tokenized = map_splits(raw, tokenize, cfg, desc="tokenizing")
        grouped = map_splits(tokenized, group, cfg, desc=f"grouping into blocks of {block}:")
        if cfg.eval_stride and "validation" in tokenized:
            grouped["validation"] = sliding_window_dataset(tokenized["validation"], block, cfg.eval_stride, cfg)
        if "train" in grouped:
            check(len(grouped["train"]) > 0,
                  f"the training text is shorter than one block of {block} tokens; lower block_size or add data")
        return grouped

    def adds_eos(self, tokenizer) -> bool:
        """End-of-text after each document: rows of JSON/CSV/parquet/hub data are documents; the
        lines of a .txt file are not (run_clm_no_trainer.py reads them with their line breaks
        and adds nothing), so the same .txt gives the same tokens as the script."""
        return bool(self.cfg.add_eos_token and tokenizer.eos_token) and not reads_text_files(self.cfg)

    def train_stream(self, raw, tokenizer, rank: int, world_size: int):
        """The map-style blocks, built on the fly (notrainer.data.streaming: same packing rules)."""
        from notrainer.data.files import resolve_files, split_format
        from notrainer.data.mixture import training_stream
        from notrainer.data.streaming import build_stream

        cfg, column = self.cfg, self.text_column(raw["train"])

        def part(files, dataset=None, **kw):  # one source (of a mixture: each .txt source without eos)
            eos = self.adds_eos(tokenizer) if dataset is not None or files is cfg.train_file else \
                bool(cfg.add_eos_token and tokenizer.eos_token) and split_format(resolve_files(files))[0] != "text"
            return build_stream(files, tokenizer, self._block_size, text_column=column, add_eos=eos,
                                keep_linebreaks=keeps_linebreaks(cfg), dataset=dataset, **kw)

        return training_stream(cfg, part, rank, world_size)

    def collator(self, tokenizer):
        if self.cfg.line_by_line:
            from transformers import DataCollatorForLanguageModeling

            return DataCollatorForLanguageModeling(tokenizer, mlm=False)
        return super().collator(tokenizer)

    # ------------------------------------------------------------------ loss and metrics

    def chunked_loss_head(self, model):
        """Install the switchable lm_head for notrainer.modeling.losses when chunked_loss is on (or auto
        on CUDA and supported); None otherwise."""
        return common.chunked_loss_head(self.cfg, model)

    def loss(self, model, batch):
        if self._head is None:
            return model(**batch).loss
        # The model runs through its wrappers (DDP, compile, autocast) and hands back its last
        # hidden state; the head's matmul and the cross-entropy then run chunk by chunk.
        return common.chunked_lm_loss(self.cfg, model, self._head, batch)

    def num_items(self, batch):
        return shifted_targets(batch)

    def eval_step(self, model, batch):
        per_token = common.lm_per_token_losses(self.cfg, model, self._head, batch)
        return losses.per_example(per_token, losses.shift_labels(batch["labels"]))

    def compute_metrics(self, outputs, eval_loss):
        return perplexity(eval_loss)

    # prediction mode: the loss of each example (a block, or a line with line_by_line=true)
    def predict_step(self, model, batch):
        out = self.eval_step(model, batch)
        return {"loss_sum": out["loss"], "tokens": out["num_items"]}

    def format_predictions(self, outputs, dataset):
        records = []
        for sums, counts in zip(outputs["loss_sum"], outputs["tokens"]):
            for s, n in zip(sums.tolist(), counts.tolist()):
                loss = s / n if n else float("nan")
                records.append({"tokens": int(n), "loss": round(loss, 6), "perplexity": round(safe_exp(loss), 4)})
        return records


def shifted_targets(batch):
    """Target tokens of a causal LM batch: the model shifts labels by one, so the first label
    of each row is never predicted (clm and sft weigh micro-batches by this)."""
    return (batch["labels"][:, 1:] != -100).sum()


def sliding_windows(ids: list[int], block: int, stride: int) -> tuple[list[list[int]], list[list[int]]]:
    """The sliding-window evaluation of the Hugging Face perplexity guide: windows of `block`
    tokens whose starts move by `stride`; in each window only the tokens no earlier window
    scored are targets, the rest (up to block - 1 tokens) are context with label -100. Every
    token but the text's first is scored once (with stride = block: the non-overlapping blocks,
    whose first tokens have no context). The last window ends at the text's end and keeps its
    full length, so all windows have one length and batch without padding.
    Returns (input_ids, labels), one list per window."""
    n, windows, labels = len(ids), [], []
    begin, prev_end = 0, 0
    while prev_end < n:
        end = min(begin + block, n)
        start = max(0, end - block)
        targets = end - prev_end
        window = ids[start:end]
        windows.append(window)
        labels.append([-100] * (len(window) - targets) + window[len(window) - targets:])
        prev_end, begin = end, begin + stride
    return windows, labels


def sliding_window_dataset(tokenized, block: int, stride: int, cfg):
    """The tokenized validation split (one row per document) -> its sliding windows over exactly
    the token sequence the non-overlapping blocks cover: the same map batches as the blocks'
    `group` (map_splits: 1000 rows a batch, `preprocessing_num_workers` shards), each batch's
    documents concatenated and cut to whole blocks (its remainder dropped, as group_into_blocks
    drops it). So stride = block gives the blocks themselves, and a smaller stride scores the
    same text with more context (plus each block's first token, which a block cannot score)."""
    def windows(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        ids = ids[:len(ids) // block * block]
        input_ids, labels = sliding_windows(ids, block, stride) if ids else ([], [])
        return {"input_ids": input_ids, "labels": labels}

    out = map_splits({"validation": tokenized}, windows, cfg,
                     desc=f"sliding windows of {block} tokens, stride {stride}:")["validation"]
    check(len(out) > 0, f"the validation text is shorter than one block of {block} tokens: nothing to score "
                        "with eval_stride; lower block_size or add validation data")
    return out


def perplexity(eval_loss) -> dict[str, float]:
    """A causal LM's metrics: exp of the mean loss per target token (clm and sft)."""
    return {"perplexity": safe_exp(eval_loss)}


# ---------------------------------------------------------------------- built-in corpus

_NOUNS = "cat dog bird fox horse mouse farmer teacher child river garden house ship king queen robot".split()
_ADJS = "small big red green quick lazy old young happy quiet bright dark".split()
_VERBS = "sees follows likes finds helps watches chases visits".split()
_PLACES = "in the garden|near the river|at the house|on the ship|under the tree|by the road".split("|")


def builtin_text_splits(topical: bool = True):
    """The built-in corpus as train and validation splits (the last 40 documents)."""
    rows = [{"text": d} for d in builtin_corpus(topical=topical)]
    return builtin.splits(rows[:-40], rows[-40:])


def builtin_corpus(n_docs: int = 400, seed: int = 0, topical: bool = True) -> list[str]:
    """Short documents from a small grammar: structured enough that a tiny model's perplexity
    falls far below the vocabulary size within a minute or two of CPU training. Each document keeps
    to its own cast (three nouns, three adjectives, two places), so its earlier sentences predict
    its later ones: context beyond the current sentence lowers the loss, which is what a sliding
    window's extra context (eval_stride) measures. `topical=False`: every sentence draws from the
    whole vocabulary (task=mlm's default, which predicts from the sentence around a mask)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        nouns, adjs, places = (rng.sample(_NOUNS, 3), rng.sample(_ADJS, 3), rng.sample(_PLACES, 2)) if topical \
            else (_NOUNS, _ADJS, _PLACES)
        sentences = []
        for _ in range(rng.randint(3, 6)):
            form = rng.random()
            a, b = rng.sample(nouns, 2)
            if form < 0.5:
                s = f"the {rng.choice(adjs)} {a} {rng.choice(_VERBS)} the {b} {rng.choice(places)} ."
            elif form < 0.8:
                s = f"a {a} and a {b} are {rng.choice(adjs)} today ."
            else:
                start = rng.randint(1, 5)
                s = "we count " + " ".join(_NUMBERS[start:start + 4]) + " ."
            sentences.append(s)
        docs.append(" ".join(sentences))
    return docs


_NUMBERS = "zero one two three four five six seven eight nine ten".split()
