"""Multiple choice: a context (and a question) with several candidate answers -> the right one.

    accelerate launch -m notrainer.run task=multiple_choice model_name_or_path=bert-base-uncased \
        train_file=swag_train.csv validation_file=swag_val.csv

Each (example, choice) pair is encoded as one text pair, as in the Hugging Face
run_swag_no_trainer.py script: the first text is the context, the second the question (if any)
followed by the choice. The collator pads every choice of every example of a batch to one length
and reshapes to (batch, choices, length); `AutoModelForMultipleChoice` scores each choice and the
loss is the cross-entropy over the choices. Metric: eval_accuracy.

Two layouts are read, with their columns found by name unless given:
- SWAG: `sent1` (context), `sent2` (the start of the ending), `ending0` ... `endingN`, `label`
  (the index of the right ending). The csv of the HF examples works as it comes.
- General: `context` and/or `question`, a list column `choices` (or `options`, `endings`), and
  `label` / `answer` / `answerKey`: the index of the right choice, its text, or its letter (A, B, ...).

Any number of choices works, but every example of a split needs the same number (the batch is a
(batch, choices, length) tensor); an example that differs is refused by its index before training.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from notrainer.config import TrainConfig, key
from notrainer.data import builtin
from notrainer.data.files import map_splits, require_columns
from notrainer.errors import UsageError, check

from .base import Task, require_pad_token
from .common import check_length

CONTEXT_CANDIDATES = ("sent1", "context", "article", "passage", "premise")
QUESTION_CANDIDATES = ("sent2", "question", "stem", "startphrase_question")
CHOICES_CANDIDATES = ("choices", "options", "endings", "candidates")
LABEL_CANDIDATES = ("label", "labels", "answer", "answerKey", "answer_idx", "gold")
_NUMBERED = re.compile(r"^(ending|choice|option)(\d+)$")


@dataclass
class MultipleChoiceConfig(TrainConfig):
    context_column: Optional[str] = key(None, "column with the context, the first text of every pair "
                                              "(default: sent1, context, article, passage or premise)")
    question_column: Optional[str] = key(None, "column with the question (SWAG: the start of the ending), put "
                                               "before each choice (default: sent2, question or stem if present)")
    choices_column: Optional[str] = key(None, "column with a list of choices (default: choices, options or endings)")
    choice_columns: Optional[str] = key(None, "comma-separated columns holding one choice each (default: "
                                              "ending0,ending1,... when present)")
    label_column: Optional[str] = key(None, "column with the right choice: its index, its text or its letter "
                                            "(default: label, labels, answer or answerKey)")
    max_seq_length: int = key(128, "longest (context, question + choice) pair in tokens, truncated longest-first")

    def validate(self) -> None:
        super().validate()
        check(self.max_seq_length >= 2, "max_seq_length must be >= 2")
        check(not (self.choices_column and self.choice_columns),
              "give either choices_column (one list column) or choice_columns (one column per choice), not both")
        if self.choice_columns is not None:
            check(len(self.choice_column_list()) >= 2, "choice_columns needs at least two comma-separated columns")

    def choice_column_list(self) -> list[str]:
        return [c.strip() for c in (self.choice_columns or "").split(",") if c.strip()]


class MultipleChoiceTask(Task):
    name = "multiple_choice"
    Config = MultipleChoiceConfig
    auto_model = "AutoModelForMultipleChoice"
    tiny_model_type = "bert"
    tokenizer_style = "bert"
    embedded_defaults = dict(learning_rate=2e-3, num_train_epochs=8.0, per_device_train_batch_size=32,
                             per_device_eval_batch_size=64, max_seq_length=32, warmup_ratio=0.1, weight_decay=0.01)
    #: with the user's data max_seq_length keeps the scripts' default (128)
    data_length_keys = ("max_seq_length",)

    # Settled by load_raw_datasets (lifecycle step 2).
    #: the context column (first text of each pair), the question column (before each choice), or None
    context_col: Optional[str] = None
    question_col: Optional[str] = None
    #: one list column of choices, or else the columns that hold one choice each
    choices_col: Optional[str] = None
    choice_cols: list[str] = []
    #: the label column (None: no labels, prediction only)
    label_col: Optional[str] = None
    #: the number of choices of each split (the same for every example of a split)
    num_choices: dict[str, int] = {}
    #: the raw test split: prediction records carry its choices
    _raw_test = None

    # ------------------------------------------------------------------ data

    def builtin_datasets(self):
        rows = builtin_questions(1400, seed=0)
        return builtin.splits(rows[:1200], rows[1200:])

    def load_raw_datasets(self):
        raw = super().load_raw_datasets()
        self.find_columns(raw)
        self.num_choices = {name: self.check_rows(name, split) for name, split in raw.items()}
        self._raw_test = raw["test"] if "test" in raw else None
        return raw

    def find_columns(self, raw) -> None:
        cfg = self.cfg
        ref = raw["train"] if "train" in raw else next(iter(raw.values()))
        names = ref.column_names

        def pick(configured, candidates):
            return configured or next((c for c in candidates if c in names), None)

        self.choices_col, self.choice_cols = cfg.choices_column, cfg.choice_column_list()
        if not self.choices_col and not self.choice_cols:
            numbered = sorted(((m.group(1), int(m.group(2)), n) for n in names if (m := _NUMBERED.match(n))))
            if numbered:
                prefix = numbered[0][0]
                self.choice_cols = [n for p, _, n in numbered if p == prefix]
            else:
                self.choices_col = next((c for c in CHOICES_CANDIDATES if c in names), None)
        check(self.choices_col or self.choice_cols,
              f"no choices found (columns: {', '.join(names)}); set choices_column=... (a list column) "
              "or choice_columns=ending0,ending1,...")
        self.context_col = pick(cfg.context_column, CONTEXT_CANDIDATES)
        self.question_col = pick(cfg.question_column, QUESTION_CANDIDATES)
        if self.question_col == self.context_col:
            self.question_col = None
        check(self.context_col or self.question_col,
              f"no context or question column found (columns: {', '.join(names)}); set context_column=...")
        self.label_col = pick(cfg.label_column, LABEL_CANDIDATES)
        if self.label_col is None and ("train" in raw or "validation" in raw):
            raise UsageError(f"no label column found (columns: {', '.join(names)}); set label_column=...")
        for split_name, split in raw.items():
            require_columns(split, {"context_column": self.context_col, "question_column": self.question_col,
                                    "choices_column": self.choices_col})
            require_columns(split, {f"choice_columns ({c})": c for c in self.choice_cols})
            if split_name != "test":  # prediction data may come without labels
                require_columns(split, {"label_column": self.label_col})

    def choices_of(self, row: dict) -> list:
        if self.choices_col:
            value = row[self.choices_col]
            if isinstance(value, dict) and "text" in value:  # ARC / CommonsenseQA: {"label": [...], "text": [...]}
                value = value["text"]
            return list(value) if value is not None else []
        return [row[c] for c in self.choice_cols if row[c] is not None]

    def label_index(self, value, choices: list, where: str) -> int:
        """A label as the index of the right choice: an index, a digit string, the choice's text
        or its letter (A = the first choice)."""
        n = len(choices)
        if isinstance(value, (bool, np.bool_)):
            value = None
        if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
            i = int(value)
        elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
            i = int(value.strip())
        elif isinstance(value, str) and value in choices:
            return choices.index(value)
        elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
            i = ord(value.strip().upper()) - ord("A")
        else:
            raise UsageError(f"{where}: label {value!r} is neither a choice index, nor one of its choices, nor a letter")
        check(0 <= i < n, f"{where}: label {value!r} is out of range for its {n} choices (0 to {n - 1})")
        return i

    def check_rows(self, split_name: str, split) -> int:
        """Every example of a split has the same number of choices (>= 2) and a label in range;
        returns that number. Read column by column: no Python dict per row of a large file."""
        cols = [c for c in (self.choices_col, *self.choice_cols) if c]
        data = {c: split[c] for c in cols}
        labels = split[self.label_col] if split_name != "test" and self.label_col in split.column_names else None
        expected = None
        for i in range(len(split)):
            choices = self.choices_of({c: data[c][i] for c in cols})
            where = f"{split_name} example {i}"
            if expected is None:
                expected = len(choices)
                check(expected >= 2, f"{where} has {expected} choice(s); multiple choice needs at least two")
            check(len(choices) == expected,
                  f"{where} has {len(choices)} choices but the examples before it have {expected}; every example "
                  f"of a split needs the same number (a batch is one (batch, choices, length) tensor)")
            check(all(c is not None and str(c).strip() for c in choices), f"{where} has an empty choice")
            if labels is not None:
                check(labels[i] is not None, f"{where} has no label")
                self.label_index(labels[i], choices, where)
        check(expected is not None, f"the {split_name} split is empty")
        return expected

    def tokenizer_texts(self, raw):
        train = raw["train"]
        texts = []
        for col in (self.context_col, self.question_col):
            if col:
                texts += [t for t in train[col] if t]
        if self.choices_col:
            texts += [str(c) for row in train[self.choices_col] for c in self.choices_of({self.choices_col: row})]
        for col in self.choice_cols:
            texts += [t for t in train[col] if t]
        return texts

    def prepare_datasets(self, raw, tokenizer):
        cfg = self.cfg
        cols = [c for c in (self.choices_col, *self.choice_cols) if c]

        def preprocess(batch, with_labels: bool):
            n_rows = len(batch[cols[0]])
            firsts, seconds, labels, counts = [], [], [], []
            for i in range(n_rows):
                choices = [str(c) for c in self.choices_of({c: batch[c][i] for c in cols})]
                context = batch[self.context_col][i] if self.context_col else None
                question = batch[self.question_col][i] if self.question_col else None
                first, head = (context, question) if context is not None else (question, None)
                firsts += [first or ""] * len(choices)
                seconds += [f"{head} {c}" if head else c for c in choices]
                counts.append(len(choices))
                if with_labels:
                    labels.append(self.label_index(batch[self.label_col][i], choices, "example"))
            enc = tokenizer(firsts, seconds, truncation=True, max_length=cfg.max_seq_length)
            out, start = {k: [] for k in enc}, 0
            for n in counts:  # flat (example, choice) pairs back to one list of choices per example
                for k, v in enc.items():
                    out[k].append(v[start:start + n])
                start += n
            if with_labels:
                out["labels"] = labels
            return out

        return map_splits(raw, preprocess, cfg, desc="tokenizing",
                          split_kwargs=lambda name: {"with_labels": name != "test" and self.label_col is not None
                                                     and self.label_col in raw[name].column_names})

    def collator(self, tokenizer):
        from transformers import DataCollatorForMultipleChoice

        pad = DataCollatorForMultipleChoice(tokenizer)

        def collate(examples):
            if "labels" in examples[0]:
                return pad(examples)
            batch = pad([{**e, "labels": -100} for e in examples])  # prediction data without labels
            batch.pop("labels")
            return batch

        return collate

    # ------------------------------------------------------------------ model

    def setup(self, model, tokenizer) -> None:
        super().setup(model, tokenizer)
        require_pad_token(tokenizer, "batching choices of different lengths")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        check_length("max_seq_length", self.cfg.max_seq_length, model)

    # ------------------------------------------------------------------ evaluation

    def _logits(self, model, batch) -> torch.Tensor:
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()

    def eval_step(self, model, batch):
        logits = self._logits(model, batch)
        out = {"predictions": logits.argmax(-1)}
        if "labels" in batch:
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
            out.update(loss=loss, num_items=torch.ones_like(loss), references=batch["labels"].long())
        return out

    def compute_metrics(self, outputs, eval_loss):
        if "references" not in outputs:
            return {}
        from notrainer.metrics import load_metric

        preds = np.concatenate(outputs["predictions"])
        refs = np.concatenate(outputs["references"])
        acc = load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"]
        return {"accuracy": acc, "samples": len(refs)}

    # ------------------------------------------------------------------ prediction mode

    def predict_step(self, model, batch):
        logits = self._logits(model, batch)
        return {"predictions": logits.argmax(-1), "scores": torch.softmax(logits, -1)}

    def format_predictions(self, outputs, dataset) -> list[dict]:
        preds = np.concatenate(outputs["predictions"])
        scores = np.concatenate(outputs["scores"])
        records = [{"prediction": int(p), "scores": [round(float(s), 6) for s in row]} for p, row in zip(preds, scores)]
        test = self._raw_test
        if test is not None and len(test) == len(records):  # the chosen text, in test_file order
            cols = [c for c in (self.choices_col, *self.choice_cols) if c]
            data = {c: test[c] for c in cols}
            for i, r in enumerate(records):
                choices = self.choices_of({c: data[c][i] for c in cols})
                r["choice"] = choices[r["prediction"]]
        return records


# ---------------------------------------------------------------------- built-in data

KINDS = {
    "animal": "cat dog horse mouse tiger rabbit sheep goat lion bear".split(),
    "fruit": "apple banana cherry lemon mango orange pear peach plum grape".split(),
    "tool": "hammer saw drill wrench shovel spade chisel rake axe ladder".split(),
    "colour": "red blue green yellow purple pink brown black white grey".split(),
}


def builtin_questions(n: int, seed: int = 0, num_choices: int = 4) -> list[dict]:
    """Generated questions in the general layout (question, choices, label index). Half ask
    "which of these is a <kind>?" (one choice is of that kind, the others of other kinds), half
    ask "which of these is not a <kind>?" (all choices but one are of that kind): the right
    choice follows from the kind of each word and the word "not", which a tiny model learns."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    rows = []
    for _ in range(n):
        kind = rng.choice(kinds)
        others = [w for k in kinds if k != kind for w in KINDS[k]]
        negated = rng.random() < 0.5
        if negated:
            choices = rng.sample(KINDS[kind], num_choices - 1) + [rng.choice(others)]
        else:
            choices = [rng.choice(KINDS[kind])] + rng.sample(others, num_choices - 1)
        right = choices[-1] if negated else choices[0]
        rng.shuffle(choices)
        question = f"which of these is {'not ' if negated else ''}a {kind} ?"
        rows.append({"question": question, "choices": choices, "label": choices.index(right)})
    return rows
