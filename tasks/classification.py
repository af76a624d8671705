"""Sequence classification: one text or a text pair -> a label, several labels, or a number.

    accelerate launch -m notrainer.run task=classification model_name_or_path=bert-base-uncased \
        train_file=train.csv validation_file=dev.csv

What kind of problem it is follows from the label column of the training data (or
`problem_type=...`):
- strings or ints (or a `ClassLabel`): single-label classification, cross-entropy. The label
  names go into the exported config as `id2label`/`label2id`, so `pipeline("text-classification")`
  reports them. Metrics: eval_accuracy, eval_f1 (binary for two labels, else macro),
  eval_matthews_correlation.
- floats: regression, one output, MSE. Metrics: eval_pearson, eval_spearman.
- lists of labels: multi-label, one sigmoid per label, BCE. Metrics: eval_accuracy (every
  label of the example right), eval_f1 (micro) and eval_f1_macro.

Columns are found by name when not given: the label in label/labels/score/quality, the texts
in sentence1+sentence2, text(+text_pair) or sentence, else the string columns (one: single
text, two: a pair). GLUE's MRPC and STS-B files work as they come.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from notrainer.data import builtin
from notrainer.config import TrainConfig, key
from notrainer.data.files import map_splits, require_columns
from notrainer.errors import UsageError, check
from notrainer.modeling.lora import adapter_base

from .base import Task, require_pad_token
from .common import check_head_size, check_length, check_no_unseen_labels, label_ids, label_name

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
LABEL_CANDIDATES = ("label", "labels", "score", "quality")
TEXT_CANDIDATES = (("sentence1", "sentence2"), ("text", "text_pair"), ("question", "sentence"),
                   ("premise", "hypothesis"), ("sentence", None), ("text", None))


@dataclass
class ClassificationConfig(TrainConfig):
    text_column: Optional[str] = key(None, "column with the (first) text (default: found by name, see docs/classification.md)")
    text_pair_column: Optional[str] = key(None, "column with the second text of a pair (default: found by name; none for single texts)")
    label_column: Optional[str] = key(None, "column with the label(s) (default: label, labels, score or quality)")
    max_seq_length: int = key(128, "longest input in tokens (pairs are truncated longest-first)")
    problem_type: Optional[str] = key(None, "single_label_classification, multi_label_classification or regression (default: from the labels)")
    metric: Optional[str] = key(None, "an extra evaluate metric by name (hub names need the network), computed on predictions/references")
    return_per_label_metrics: bool = key(False, "also report precision, recall, F1 and support of every label (eval_<label>_f1, ...)")

    def validate(self) -> None:
        super().validate()
        check(self.max_seq_length >= 2, "max_seq_length must be >= 2")
        check(self.problem_type in (None, SINGLE, MULTI, REGRESSION),
              f"problem_type must be {SINGLE}, {MULTI} or {REGRESSION}, got {self.problem_type!r}")
        named = [c for c in (self.text_column, self.text_pair_column, self.label_column) if c]
        check(len(named) == len(set(named)), "text_column, text_pair_column and label_column must name different columns")


class ClassificationTask(Task):
    name = "classification"
    Config = ClassificationConfig
    auto_model = "AutoModelForSequenceClassification"
    tiny_model_type = "bert"
    tokenizer_style = "bert"
    embedded_defaults = dict(learning_rate=1e-3, num_train_epochs=4.0, per_device_train_batch_size=32,
                             per_device_eval_batch_size=64, max_seq_length=64, warmup_ratio=0.1, weight_decay=0.01)
    #: with the user's data max_seq_length keeps the scripts' default (128)
    data_length_keys = ("max_seq_length",)

    # Settled by load_raw_datasets (lifecycle step 2): the model's head follows from them.
    #: the columns of the (first) text, the second text of a pair (or None), the label (None: no labels)
    text_col: Optional[str] = None
    pair_col: Optional[str] = None
    label_col: Optional[str] = None
    #: single-label, multi-label or regression
    problem_type: str = SINGLE
    #: label names in id order (build_model may reorder them to a fine-tuned head's ids)
    label_names: list[str] = []
    #: a ClassLabel feature's names (raw ints -> names), else None
    _class_names: Optional[list[str]] = None
    #: the raw test split: prediction records carry its texts
    _raw_test = None

    def __init__(self, cfg):
        super().__init__(cfg)
        self._metrics: dict = {}  # loaded metrics by name, per task object

    # ------------------------------------------------------------------ data

    def builtin_datasets(self):
        rows = builtin_topic_sentences(1400, seed=0)
        return builtin.splits(rows[:1200], rows[1200:])

    def load_raw_datasets(self):
        raw = super().load_raw_datasets()
        # Columns and labels are settled here, before the model is built: its head size and
        # id2label come from them.
        self.text_col, self.pair_col, self.label_col = self.find_columns(raw)
        self.find_labels(raw)
        self._raw_test = raw["test"] if "test" in raw else None  # predictions carry their text
        if self.cfg.metric:
            self.metric(self.cfg.metric)  # an unknown metric name fails now, not after training
        return raw

    def find_columns(self, raw) -> tuple[str, str | None, str | None]:
        cfg = self.cfg
        ref = raw["train"] if "train" in raw else next(iter(raw.values()))
        names = ref.column_names
        lowered = {n.lower(): n for n in names}

        label = cfg.label_column
        if label is None:
            label = next((lowered[c] for c in LABEL_CANDIDATES if c in lowered), None)
        if label is None and ("train" in raw or "validation" in raw):
            raise UsageError(f"no label column found (columns: {', '.join(names)}); set label_column=...")

        text, pair = cfg.text_column, cfg.text_pair_column
        if text is None:
            for first, second in TEXT_CANDIDATES:
                if first in names and (second is None or second in names or first == "text"):
                    text = first
                    pair = pair or (second if second in names else None)
                    break
        if text is None:
            strings = [n for n, f in ref.features.items()
                       if n != label and getattr(f, "dtype", None) in ("string", "large_string")]
            check(len(strings) in (1, 2), f"cannot tell which column holds the text (columns: {', '.join(names)}); "
                                          "set text_column=... (and text_pair_column=... for pairs)")
            text, pair = strings[0], (strings[1] if len(strings) == 2 else pair)

        for split_name, split in raw.items():
            require_columns(split, {"text_column": text, "text_pair_column": pair})
            if split_name != "test":  # prediction data may come without labels
                require_columns(split, {"label_column": label})
        return text, pair, label

    def find_labels(self, raw) -> None:
        """Problem type and label names, from the training labels (or the model's config)."""
        import datasets

        cfg = self.cfg
        if "train" not in raw:
            return self._labels_from_model()
        feature = raw["train"].features[self.label_col]
        values = raw["train"][self.label_col]
        check(all(v is not None for v in values), f"label_column={self.label_col!r} has empty values in the training data")

        is_list = isinstance(feature, (datasets.Sequence, datasets.List)) if hasattr(datasets, "List") \
            else isinstance(feature, datasets.Sequence)
        inner = feature.feature if is_list else feature
        if isinstance(inner, datasets.ClassLabel):
            self._class_names = list(inner.names)
        dtype = getattr(inner, "dtype", None)
        self.problem_type = cfg.problem_type or (MULTI if is_list else REGRESSION if dtype and "float" in dtype else SINGLE)
        check(self.problem_type != MULTI or is_list,
              f"problem_type={MULTI} needs a list of labels per example in label_column={self.label_col!r}")
        check(self.problem_type != REGRESSION or not is_list,
              f"problem_type={REGRESSION} needs one number per example in label_column={self.label_col!r}")
        if self.problem_type == REGRESSION:
            self.label_names = ["LABEL_0"]
            return

        seen = self._names_in(values, is_list)
        check(len(seen) > 0, "the training data has no labels")
        if self._class_names is not None:
            self.label_names = list(self._class_names)
        else:
            numeric = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                          for v in (x for row in values for x in (row if is_list else [row])))
            self.label_names = sorted(seen, key=int) if numeric else sorted(seen)
        if self.problem_type == SINGLE:
            check(len(self.label_names) >= 2, f"the training data has a single label ({self.label_names[0]!r}); "
                                              "classification needs at least two (floats: problem_type=regression)")
        if "validation" in raw and self.label_col in raw["validation"].column_names:
            check(all(v is not None for v in raw["validation"][self.label_col]),
                  f"label_column={self.label_col!r} has empty values in the validation data")
        check_no_unseen_labels(raw, self.label_col, lambda vals: self._names_in(vals, is_list), self.label_names,
                               "labels")

    def _names_in(self, values, is_list: bool) -> set[str]:
        out = set()
        for v in values:
            for x in (v if is_list else [v]):
                out.add(self._name(x))
        return out

    def _name(self, value) -> str:
        return label_name(value, self._class_names)

    def _labels_from_model(self) -> None:
        """Evaluation or prediction without training data: the labels the model was trained on."""
        cfg = self.cfg
        config = self.pretrained_config("labels")
        if adapter_base(cfg.model_name_or_path) and not any(
                a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
            # peft's adapter folder keeps the head's weights but not its labels; a base without the head has none
            raise UsageError(f"model_name_or_path={cfg.model_name_or_path} is a LoRA adapter whose base model has no "
                             "classification head, so its labels are not recorded; give the training data too "
                             "(train_file=..., with do_train=false) and the labels are read from it")
        self.problem_type = cfg.problem_type or config.problem_type or (REGRESSION if config.num_labels == 1 else SINGLE)
        self.label_names = [config.id2label[i] for i in range(config.num_labels)]

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == REGRESSION else len(self.label_names)

    def encode_label(self, value):
        if self.problem_type == REGRESSION:
            return float(value)
        ids = self.label2id
        if self.problem_type == MULTI:
            row = [0.0] * len(ids)
            for x in value:
                row[ids[self._name(x)]] = 1.0
            return row
        return ids[self._name(value)]

    @property
    def label2id(self) -> dict[str, int]:
        return label_ids(self.label_names)

    def tokenizer_texts(self, raw):
        train = raw["train"]
        texts = [t for t in train[self.text_col] if t]
        if self.pair_col:
            texts += [t for t in train[self.pair_col] if t]
        return texts

    def prepare_datasets(self, raw, tokenizer):
        cfg = self.cfg
        text_col, pair_col, label_col = self.text_col, self.pair_col, self.label_col

        def preprocess(batch, with_labels: bool):
            texts = [t if t is not None else "" for t in batch[text_col]]
            pairs = [t if t is not None else "" for t in batch[pair_col]] if pair_col else None
            enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_seq_length)
            if with_labels and label_col in batch:
                enc["labels"] = [self.encode_label(v) for v in batch[label_col]]
            return enc

        # test data is only predicted: its labels, if any (GLUE's are -1), are not read
        return map_splits(raw, preprocess, cfg, desc="tokenizing", split_kwargs=lambda name: {"with_labels": name != "test"})

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    # ------------------------------------------------------------------ model

    def model_kwargs(self, tokenizer) -> dict:
        kwargs = dict(num_labels=self.num_labels, problem_type=self.problem_type)
        if self.problem_type != REGRESSION:
            kwargs.update(id2label=dict(enumerate(self.label_names)), label2id=self.label2id)
        return kwargs

    def build_model(self, tokenizer):
        order = check_head_size(self.cfg, "ForSequenceClassification", self.num_labels, "labels")
        if order and self.problem_type != REGRESSION and set(order) == set(self.label_names):
            self.label_names = order  # a fine-tuned head keeps its own label ids
        return super().build_model(tokenizer)

    def setup(self, model, tokenizer) -> None:
        super().setup(model, tokenizer)
        require_pad_token(tokenizer, "batching texts of different lengths")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # GPT-2 style heads find the last token by it
        check_length("max_seq_length", self.cfg.max_seq_length, model)

    # ------------------------------------------------------------------ evaluation

    def _forward(self, model, batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        labels = batch.get("labels")
        loss = None
        if self.problem_type == REGRESSION:
            preds = logits.squeeze(-1)
            if labels is not None:
                loss = (preds - labels.float()) ** 2
        elif self.problem_type == MULTI:
            preds = (logits > 0).long()
            if labels is not None:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, labels.float(), reduction="none").mean(-1)
        else:
            preds = logits.argmax(-1)
            if labels is not None:
                loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        return logits, preds, labels, loss

    def eval_step(self, model, batch):
        _, preds, labels, loss = self._forward(model, batch)
        out = {"predictions": preds}
        if labels is not None:
            refs = labels.float() if self.problem_type == REGRESSION else labels.long()
            out.update(loss=loss, num_items=torch.ones_like(loss), references=refs)
        return out

    def compute_metrics(self, outputs, eval_loss):
        if "references" not in outputs:
            return {}
        preds = np.concatenate(outputs["predictions"])
        refs = np.concatenate(outputs["references"])
        out: dict[str, float] = {"samples": len(refs)}
        if self.problem_type == REGRESSION:
            out["pearson"] = self.metric("pearsonr").compute(predictions=preds, references=refs)["pearsonr"]
            out["spearman"] = self.metric("spearmanr").compute(predictions=preds, references=refs)["spearmanr"]
        elif self.problem_type == MULTI:
            out["accuracy"] = self.metric("accuracy").compute(predictions=preds, references=refs)["accuracy"]
            out["f1"] = self.metric("f1").compute(predictions=preds, references=refs, average="micro")["f1"]
            out["f1_macro"] = self.metric("f1").compute(predictions=preds, references=refs, average="macro")["f1"]
        else:
            out["accuracy"] = self.metric("accuracy").compute(predictions=preds, references=refs)["accuracy"]
            average = "binary" if self.num_labels == 2 else "macro"
            out["f1"] = self.metric("f1").compute(predictions=preds, references=refs, average=average,
                                                  labels=list(range(self.num_labels)) if average == "macro" else None)["f1"]
            out["matthews_correlation"] = self.metric("matthews_correlation").compute(
                predictions=preds, references=refs)["matthews_correlation"]
        if self.cfg.return_per_label_metrics and self.problem_type != REGRESSION:
            out.update(self.per_label_metrics(preds, refs))
        if self.cfg.metric:
            extra = self.metric(self.cfg.metric).compute(predictions=preds, references=refs)
            out.update({k: v for k, v in extra.items() if isinstance(v, (int, float))})
        return out

    def per_label_metrics(self, preds, refs) -> dict[str, float]:
        from sklearn.metrics import precision_recall_fscore_support

        ids = list(range(self.num_labels))
        p, r, f, s = precision_recall_fscore_support(refs, preds, labels=ids, average=None, zero_division=0)
        out = {}
        for i, name in enumerate(self.label_names):
            out.update({f"{name}_precision": float(p[i]), f"{name}_recall": float(r[i]), f"{name}_f1": float(f[i]),
                        f"{name}_support": int(s[i])})
        return out

    def metric(self, name: str):
        if name not in self._metrics:
            from notrainer.metrics import load_metric

            self._metrics[name] = load_metric(name)
        return self._metrics[name]

    # ------------------------------------------------------------------ prediction mode

    def predict_step(self, model, batch):
        logits, preds, _, _ = self._forward(model, batch)
        if self.problem_type == REGRESSION:
            return {"predictions": preds}
        probs = torch.sigmoid(logits) if self.problem_type == MULTI else torch.softmax(logits, -1)
        return {"predictions": preds, "scores": probs}

    def format_predictions(self, outputs, dataset) -> list[dict]:
        preds = np.concatenate(outputs["predictions"])
        if self.problem_type == REGRESSION:
            records = [{"score": float(p)} for p in preds]
        elif self.problem_type == MULTI:
            scores = np.concatenate(outputs["scores"])
            records = [{"labels": [self.label_names[i] for i in np.flatnonzero(row)],
                        "scores": {n: round(float(s), 6) for n, s in zip(self.label_names, srow)}}
                       for row, srow in zip(preds, scores)]
        else:
            scores = np.concatenate(outputs["scores"])
            records = [{"label": self.label_names[int(p)], "score": round(float(s[int(p)]), 6)}
                       for p, s in zip(preds, scores)]
        test = self._raw_test
        if test is not None and len(test) == len(records):  # put the input first, in test_file order
            cols = [c for c in (self.text_col, self.pair_col) if c]
            texts = {c: test[c] for c in cols}
            records = [{**{c: texts[c][i] for c in cols}, **r} for i, r in enumerate(records)]
        return records


# ---------------------------------------------------------------------- built-in data

TOPICS = {
    "sports": "football tennis goal match team coach stadium player score race".split(),
    "food": "pizza soup bread cheese apple dinner recipe kitchen salad cake".split(),
    "weather": "rain snow storm wind sunshine cloud thunder fog frost heat".split(),
    "music": "guitar piano song concert drum melody singer band violin album".split(),
}
_FILLERS = "yesterday my friend talked about the and a for while with our today then it was very really quite".split()


def builtin_topic_sentences(n: int, seed: int = 0, distractor_prob: float = 0.5) -> list[dict]:
    """Sentences whose topic (the label) is the one with two words in them; some sentences
    (half by default) also carry one word of another topic, so a single word does not decide
    the label."""
    rng = random.Random(seed)
    names = list(TOPICS)
    rows = []
    for _ in range(n):
        label = rng.choice(names)
        words = rng.sample(TOPICS[label], 2)
        if rng.random() < distractor_prob:
            words.append(rng.choice(TOPICS[rng.choice([t for t in names if t != label])]))
        words += rng.sample(_FILLERS, rng.randint(3, 7))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows
