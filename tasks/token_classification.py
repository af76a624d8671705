"""Token classification (NER, POS): words plus one tag per word -> a tag per token.

    accelerate launch -m notrainer.run task=token_classification model_name_or_path=bert-base-cased \
        train_file=train.json validation_file=dev.json

Input: one example per row with a list of words and a list of tags of the same length
(CoNLL-style json lines `{"words": [...], "ner": ["B-PER", "I-PER", "O", ...]}`; the columns
tokens/ner_tags of hub datasets work too). Words are tokenized with `is_split_into_words`
and tags aligned through `word_ids()`: special tokens get -100, the first sub-token of a
word gets the word's tag, the others -100 (or, with label_all_tokens=true, the tag with B-
turned into I-). Tokenizers of the RoBERTa/GPT-2 kind get add_prefix_space=true.

Metrics (seqeval, entity level): eval_precision, eval_recall, eval_f1, eval_accuracy;
return_entity_level_metrics=true adds eval_<TYPE>_precision/recall/f1/number.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional


from notrainer.data import builtin
from notrainer.config import TrainConfig, key
from notrainer.data.files import map_splits, require_columns
from notrainer.errors import UsageError, check
from notrainer.modeling.lora import adapter_base

from .base import Task, require_pad_token, token_losses
from .common import check_head_size, check_length, check_no_unseen_labels, label_ids, label_name

WORDS_CANDIDATES = ("words", "tokens")
TAGS_CANDIDATES = ("ner", "ner_tags", "tags", "labels", "pos_tags")
# Byte-level BPE tokenizers that only see a word start after a space.
PREFIX_SPACE_MODELS = {"roberta", "gpt2", "bloom", "longformer", "bart", "mvp", "led", "deberta", "xlm-roberta-xl"}


@dataclass
class TokenClassificationConfig(TrainConfig):
    words_column: Optional[str] = key(None, "column with the list of words (default: words or tokens)")
    tags_column: Optional[str] = key(None, "column with the list of tags, one per word (default: ner, ner_tags, tags, labels)")
    max_seq_length: int = key(128, "longest input in tokens (longer examples are truncated)")
    label_all_tokens: bool = key(False, "give every sub-token its word's tag (B- becomes I-) instead of only the first")
    return_entity_level_metrics: bool = key(False, "also report precision, recall, F1 and count per entity type")
    add_prefix_space: Optional[bool] = key(None, "tokenizer add_prefix_space (default: true for RoBERTa/GPT-2 style BPE)")
    metric: Optional[str] = key(None, "metric for tag sequences (default: the local seqeval); a hub name needs the network")

    def validate(self) -> None:
        super().validate()
        check(self.max_seq_length >= 2, "max_seq_length must be >= 2")
        check(self.words_column is None or self.words_column != self.tags_column,
              "words_column and tags_column must name different columns")


class TokenClassificationTask(Task):
    name = "token_classification"
    Config = TokenClassificationConfig
    auto_model = "AutoModelForTokenClassification"
    tiny_model_type = "bert"
    tokenizer_style = "bert"
    embedded_defaults = dict(learning_rate=2e-3, num_train_epochs=4.0, per_device_train_batch_size=32,
                             per_device_eval_batch_size=64, max_seq_length=64, warmup_ratio=0.1, weight_decay=0.01)
    #: with the user's data max_seq_length keeps the scripts' default (128)
    data_length_keys = ("max_seq_length",)

    # Settled by load_raw_datasets (lifecycle step 2): the model's head follows from them.
    #: the columns of the words and of the tags (None: prediction data without tags)
    words_col: Optional[str] = None
    tags_col: Optional[str] = None
    #: tag names in id order (build_model may reorder them to a fine-tuned head's ids)
    label_names: list[str] = []
    #: a ClassLabel feature's names (raw ints -> names), else None
    _class_names: Optional[list[str]] = None
    #: the raw test split: prediction records carry its words
    _raw_test = None
    #: metric=..., loaded in load_raw_datasets (an unknown name fails early), else seqeval on first use
    _metric = None

    # ------------------------------------------------------------------ data

    def builtin_datasets(self):
        rows = builtin_ner_sentences(1000, seed=0)
        return builtin.splits(rows[:850], rows[850:])

    def load_raw_datasets(self):
        raw = super().load_raw_datasets()
        self.words_col, self.tags_col = self.find_columns(raw)
        self.find_labels(raw)
        self._raw_test = raw["test"] if "test" in raw else None
        if self.cfg.metric:
            from notrainer.metrics import load_metric

            self._metric = load_metric(self.cfg.metric)  # an unknown name fails now, not after training
        return raw

    def find_columns(self, raw) -> tuple[str, str | None]:
        cfg = self.cfg
        ref = raw["train"] if "train" in raw else next(iter(raw.values()))
        names = ref.column_names
        words = cfg.words_column or next((c for c in WORDS_CANDIDATES if c in names), None)
        check(words is not None, f"no words column found (columns: {', '.join(names)}); set words_column=...")
        tags = cfg.tags_column or next((c for c in TAGS_CANDIDATES if c in names), None)
        if tags is None and ("train" in raw or "validation" in raw):
            raise UsageError(f"no tags column found (columns: {', '.join(names)}); set tags_column=...")
        for split_name, split in raw.items():
            require_columns(split, {"words_column": words})
            if split_name != "test":
                require_columns(split, {"tags_column": tags})
        return words, tags

    def find_labels(self, raw) -> None:
        import datasets

        for split_name, split in raw.items():
            if self.tags_col not in split.column_names:
                continue
            for i, (w, t) in enumerate(zip(split[self.words_col], split[self.tags_col])):
                check(w is not None and t is not None and len(w) == len(t),
                      f"{split_name} example {i} ({' '.join(map(str, (w or [])[:6]))}{' ...' if len(w or []) > 6 else ''}) "
                      f"has {len(w or [])} words but {len(t or [])} tags; every word needs exactly one tag")
        if "train" not in raw:
            return self._labels_from_model()
        feature = raw["train"].features[self.tags_col]
        inner = getattr(feature, "feature", None)
        if isinstance(inner, datasets.ClassLabel):
            self._class_names = list(inner.names)
            self.label_names = list(inner.names)
        else:
            seen = self._tags_in(raw["train"][self.tags_col])
            check(len(seen) > 0, "the training data has no tags")
            self.label_names = sorted(seen)
        check_no_unseen_labels(raw, self.tags_col, self._tags_in, self.label_names, "tags")

    def _tags_in(self, rows) -> set[str]:
        return {self._name(t) for row in rows for t in row}

    def _name(self, tag) -> str:
        return label_name(tag, self._class_names)

    def _labels_from_model(self) -> None:
        config = self.pretrained_config("tags")
        self.label_names = [config.id2label[i] for i in range(config.num_labels)]

    @property
    def label2id(self) -> dict[str, int]:
        return label_ids(self.label_names)

    def b_to_i(self) -> list[int]:
        """For each tag id, the id sub-tokens after the first get under label_all_tokens."""
        ids = self.label2id
        return [ids.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(self.label_names)]

    def tokenizer_texts(self, raw):
        return [" ".join(w) for w in raw["train"][self.words_col]]

    def tokenizer_kwargs(self) -> dict:
        return {"add_prefix_space": True} if self._needs_prefix_space() else {}

    def _needs_prefix_space(self) -> bool:
        cfg = self.cfg
        if cfg.add_prefix_space is not None:
            return cfg.add_prefix_space
        name = cfg.model_name_or_path or cfg.config_name
        if name is None:
            return False
        from transformers import AutoConfig

        try:
            base = adapter_base(name) or name  # an adapter folder has no config.json: its base model's decides
            return AutoConfig.from_pretrained(base, trust_remote_code=cfg.trust_remote_code).model_type in PREFIX_SPACE_MODELS
        except Exception:
            return False

    def prepare_datasets(self, raw, tokenizer):
        cfg = self.cfg
        words_col, tags_col = self.words_col, self.tags_col
        ids, follow = self.label2id, self.b_to_i()

        def preprocess(batch, with_labels: bool):
            words = [[str(w) for w in ws] for ws in batch[words_col]]
            enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=cfg.max_seq_length)
            tags = batch[tags_col] if with_labels and tags_col in batch else None
            all_labels = []
            for i in range(len(words)):
                labels, previous = [], None
                for word in enc.word_ids(batch_index=i):
                    if word is None:
                        labels.append(-100)  # special tokens
                    elif tags is None:
                        # prediction data: mark the first sub-token of each word, to read the tags back
                        labels.append(0 if word != previous else -100)
                    else:
                        tag = ids[self._name(tags[i][word])]
                        if word != previous:
                            labels.append(tag)
                        else:
                            labels.append(follow[tag] if cfg.label_all_tokens else -100)
                    previous = word
                all_labels.append(labels)
            enc["labels"] = all_labels
            return enc

        # test data is only predicted: its tags, if any, are not read
        return map_splits(raw, preprocess, cfg, desc="tokenizing", split_kwargs=lambda name: {"with_labels": name != "test"})

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer)

    # ------------------------------------------------------------------ model

    def model_kwargs(self, tokenizer) -> dict:
        return dict(num_labels=len(self.label_names), id2label=dict(enumerate(self.label_names)),
                    label2id=self.label2id)

    def build_model(self, tokenizer):
        order = check_head_size(self.cfg, "ForTokenClassification", len(self.label_names), "tags")
        if order and set(order) == set(self.label_names):
            self.label_names = order  # a fine-tuned head keeps its own tag ids
        return super().build_model(tokenizer)

    def setup(self, model, tokenizer) -> None:
        super().setup(model, tokenizer)
        check(tokenizer.is_fast, "token classification needs a fast tokenizer (word_ids()); "
                                 "use a model or tokenizer_name with a tokenizer.json")
        require_pad_token(tokenizer, "batching sentences of different lengths")
        check_length("max_seq_length", self.cfg.max_seq_length, model)

    # ------------------------------------------------------------------ training and evaluation

    def num_items(self, batch):
        # the model's loss is a mean over the labelled tokens
        return (batch["labels"] != -100).sum()

    def eval_step(self, model, batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        labels = batch["labels"]
        out = token_losses(logits, labels)
        preds = logits.argmax(-1)
        # -100 where there is no label: the rows are padded with -100 across ranks the same way
        out["predictions"] = preds.masked_fill(labels == -100, -100)
        out["references"] = labels
        return out

    def tag_sequences(self, outputs) -> tuple[list[list[str]], list[list[str]]]:
        """The gathered (batch, tokens) arrays -> per-example lists of tag names, labelled tokens only."""
        preds, refs = [], []
        for p_batch, r_batch in zip(outputs["predictions"], outputs["references"]):
            for p, r in zip(p_batch, r_batch):
                keep = r != -100
                preds.append([self.label_names[i] for i in p[keep]])
                refs.append([self.label_names[i] for i in r[keep]])
        return preds, refs

    def compute_metrics(self, outputs, eval_loss):
        preds, refs = self.tag_sequences(outputs)
        if self._metric is None:
            from notrainer.metrics import load_metric

            self._metric = load_metric(self.cfg.metric or "seqeval")
        scores = self._metric.compute(predictions=preds, references=refs)
        out: dict[str, float] = {"samples": len(refs)}
        for name in ("precision", "recall", "f1", "accuracy"):
            if f"overall_{name}" in scores:
                out[name] = scores[f"overall_{name}"]
        for k, v in scores.items():
            if isinstance(v, dict) and self.cfg.return_entity_level_metrics:
                out.update({f"{k}_{m}": x for m, x in v.items()})
            elif not k.startswith("overall_") and isinstance(v, (int, float)):
                out[k] = v
        return out

    # ------------------------------------------------------------------ prediction mode

    def predict_step(self, model, batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return {"predictions": logits.argmax(-1).masked_fill(batch["labels"] == -100, -100)}

    def format_predictions(self, outputs, dataset) -> list[dict]:
        """One record per example: its words and one tag per word (words cut off by
        max_seq_length get "O")."""
        rows = [row[row != -100] for batch in outputs["predictions"] for row in batch]
        words = self._raw_test[self.words_col] if self._raw_test is not None and len(self._raw_test) == len(rows) \
            else [None] * len(rows)
        records = []
        for ws, row in zip(words, rows):
            tags = [self.label_names[i] for i in row]
            if ws is not None:
                tags += ["O"] * (len(ws) - len(tags))
                records.append({"words": list(ws), "tags": tags})
            else:
                records.append({"tags": tags})
        return records


# ---------------------------------------------------------------------- built-in data

PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
          "mary jones", "peter smith", "anna lee", "tom baker", "lucy gray"]
PLACES = ["paris", "london", "berlin", "madrid", "rome", "oslo", "cairo", "lima",
          "new york", "san diego", "hong kong", "buenos aires", "cape town"]
ORGS = ["acme", "globex", "initech", "umbrella", "hooli", "vandelay", "stark industries",
        "wayne enterprises", "blue river bank", "north star airlines"]
_TEMPLATES = [
    "{PER} moved to {LOC} last year .",
    "{PER} works for {ORG} in {LOC} .",
    "yesterday {PER} met {PER} near the station .",
    "{ORG} opened a new office in {LOC} .",
    "the manager of {ORG} is {PER} .",
    "we flew from {LOC} to {LOC} with {ORG} .",
    "{PER} said that {ORG} will hire more people .",
    "people in {LOC} like the shops and the parks .",
    "after lunch {PER} called {PER} about the report .",
    "{ORG} and {ORG} signed a deal on monday .",
]


def builtin_ner_sentences(n: int, seed: int = 0) -> list[dict]:
    """Sentences from templates with person, place and organisation names (some of several
    words) tagged in IOB2: B- on an entity's first word, I- on the rest, O elsewhere."""
    rng = random.Random(seed)
    pools = {"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS}
    rows = []
    for _ in range(n):
        words, tags = [], []
        for piece in rng.choice(_TEMPLATES).split():
            if piece.startswith("{"):
                kind = piece[1:-1]
                entity = rng.choice(pools[kind]).split()
                words += entity
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
            else:
                words.append(piece)
                tags.append("O")
        rows.append({"words": words, "ner": tags})
    return rows
