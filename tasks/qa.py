"""Extractive question answering (SQuAD v1.1 / v2.0): find the answer span in a context.

    accelerate launch -m notrainer.run task=qa model_name_or_path=bert-base-uncased \
        train_file=train-v1.1.json validation_file=dev-v1.1.json

Data: the SQuAD json files as published (`{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}`),
the same records flat under "data", or flat json lines / csv with id, context, question and
answers (`{"text": [...], "answer_start": [...]}`). `version_2_with_negative=true` allows
questions without an answer.

Question and context are tokenized together; a long context is split into windows of
`max_seq_length` tokens overlapping by `doc_stride`. A training window points at the answer's
first and last token, or at [CLS] when the answer is not inside it. For evaluation each window
keeps its question and its offset mapping here, on the task side; the loop gathers only the
start/end logits and a window index, and post-processing (tasks/qa_postprocess.py) picks the
best span over all windows of a question. Metrics: exact match and F1 (official SQuAD
normalisation), with the HasAns/NoAns split for v2; predictions go to
output_dir/eval_predictions.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from notrainer.data import builtin
from notrainer.data import files as data
from notrainer.data import raw as raw_data
from notrainer.data.files import map_splits
from notrainer.config import TrainConfig, key
from notrainer.errors import UsageError, check

from .base import Task
from .common import check_length
from .qa_postprocess import Feature, postprocess_predictions

EVAL_PREDICTIONS_FILE = "eval_predictions.jsonl"


@dataclass
class QAConfig(TrainConfig):
    question_column: str = key("question", "column with the question")
    context_column: str = key("context", "column with the context")
    answer_column: str = key("answers", "column with the answers: {'text': [...], 'answer_start': [...]}")
    version_2_with_negative: bool = key(False, "some questions have no answer (SQuAD v2)")
    max_seq_length: int = key(384, "tokens per window (question + context)")
    doc_stride: int = key(128, "tokens of overlap between the windows of a long context")
    n_best_size: int = key(20, "start/end candidates considered per window")
    max_answer_length: int = key(30, "longest answer, in tokens")
    null_score_diff_threshold: float = key(0.0, "v2: answer empty when null score - best span score exceeds this")

    def validate(self) -> None:
        super().validate()
        check(self.max_seq_length >= 8, "max_seq_length must be >= 8")
        check(0 <= self.doc_stride < self.max_seq_length, "doc_stride must be >= 0 and smaller than max_seq_length")
        check(self.n_best_size >= 1 and self.max_answer_length >= 1, "n_best_size and max_answer_length must be >= 1")


class QATask(Task):
    name = "qa"
    Config = QAConfig
    auto_model = "AutoModelForQuestionAnswering"
    tiny_model_type = "bert"
    tokenizer_style = "bert"
    # Windows of 32 tokens split most built-in contexts in two or three: the model learns to
    # point at [CLS] in windows without the answer, as on long real contexts.
    embedded_defaults = dict(learning_rate=1e-3, num_train_epochs=3.0, per_device_train_batch_size=32,
                             per_device_eval_batch_size=64, warmup_ratio=0.1, max_seq_length=32, doc_stride=12)
    #: with the user's data these keep the scripts' defaults (384, 128), not the built-in data's
    data_length_keys = ("max_seq_length", "doc_stride")

    def __init__(self, cfg):
        super().__init__(cfg)
        # Set by prepare_datasets, per split: the questions and each window's (question index, offsets, CLS index). The
        # loop cannot gather these (they are not tensors); windows are found by their index.
        self._examples: dict[str, list[dict]] = {}
        self._features: dict[str, list[Feature]] = {}
        self._metric = None

    # ------------------------------------------------------------------ data

    def builtin_datasets(self):
        v2 = self.cfg.version_2_with_negative
        return builtin.splits(builtin_qa(1500, v2, seed=0), builtin_qa(200, v2, seed=1))

    def load_raw_datasets(self):
        """SQuAD files as published are nested; flatten them, then split/truncate as usual."""
        cfg = self.cfg
        files = {k: v for k, v in (("train", cfg.train_file), ("validation", cfg.validation_file),
                                   ("test", cfg.test_file)) if v}
        if cfg.dataset_name or not files:
            return self._allow_unanswerable(super().load_raw_datasets())
        import datasets

        loaded = datasets.DatasetDict({split: load_qa_file(path, split) for split, path in files.items()})
        # the generic loader holds out validation_split_percentage and applies max_*_samples
        plain = dataclasses.replace(cfg, train_file=None, validation_file=None, test_file=None)
        return self._allow_unanswerable(raw_data.load_raw_datasets(plain, builtin=lambda: loaded))

    #: set by load_raw_datasets: the data has unanswerable questions though version_2_with_negative=false
    _unanswerable_in_data: bool = False

    @property
    def v2(self) -> bool:
        """SQuAD v2 rules: version_2_with_negative=true, or data with unanswerable questions."""
        return bool(self.cfg.version_2_with_negative or self._unanswerable_in_data)

    def _allow_unanswerable(self, raw):
        """Questions without an answer in data read with version_2_with_negative=false are trained
        and evaluated as unanswerable (v2), as run_qa_no_trainer.py does with
        --version_2_with_negative=False (its flag reads any value as true); said in one line."""
        cfg = self.cfg
        if self.v2:
            return raw
        column = cfg.answer_column
        empty = sum(1 for name in ("train", "validation") if name in raw and column in raw[name].column_names
                    for a in raw[name][column] if isinstance(a, dict) and not (a.get("text") or []))
        if empty:
            self._unanswerable_in_data = True
            print(f"the data has {empty} question(s) without an answer: they are trained and evaluated as "
                  "unanswerable (SQuAD v2 rules, version_2_with_negative=true)", flush=True)
        return raw

    def tokenizer_texts(self, raw):
        ds = raw["train"]
        self._require(ds, "train")
        return list(ds[self.cfg.context_column]) + list(ds[self.cfg.question_column])

    def _require(self, ds, split: str) -> None:
        cfg = self.cfg
        cols = {"question_column": cfg.question_column, "context_column": cfg.context_column}
        if split != "test":
            cols["answer_column"] = cfg.answer_column
        data.require_columns(ds, cols)

    def tiny_config(self, tokenizer):
        # No dropout: the tiny random-init model has a few hundred steps to learn the toy data.
        return builtin.tiny_config(self.tiny_model_type, tokenizer, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)

    def setup(self, model, tokenizer):
        super().setup(model, tokenizer)
        check(getattr(tokenizer, "is_fast", False),
              "task=qa needs a fast tokenizer (offset mappings); use a model that ships tokenizer.json")
        check_length("max_seq_length", self.cfg.max_seq_length, model)

    def prepare_datasets(self, raw, tokenizer):
        cfg = self.cfg
        for split, ds in raw.items():
            self._examples[split] = self._checked_examples(ds, split, tokenizer)
        pad_right = tokenizer.padding_side == "right"
        context_seq = 1 if pad_right else 0

        def encode(batch, indices, has_answers: bool):
            questions = [q.lstrip() for q in batch[cfg.question_column]]  # leading spaces waste window room
            contexts = batch[cfg.context_column]
            answers = [normalise_answers(a) for a in batch[cfg.answer_column]] if has_answers else None
            enc = tokenizer(questions if pad_right else contexts, contexts if pad_right else questions,
                            truncation="only_second" if pad_right else "only_first", max_length=cfg.max_seq_length,
                            stride=cfg.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)
            columns = {k: enc[k] for k in enc.keys() if k not in ("offset_mapping", "overflow_to_sample_mapping")}
            # What post-processing needs of each window travels as columns (map may run in
            # worker processes) and becomes a Feature once mapped; see _take_features.
            example_index, context_offsets, cls_index, starts, ends = [], [], [], [], []
            for i, offsets in enumerate(enc["offset_mapping"]):
                row = enc["overflow_to_sample_mapping"][i]
                seq_ids = enc.sequence_ids(i)
                input_ids = enc["input_ids"][i]
                cls = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
                in_context = [tuple(o) if seq_ids[t] == context_seq else None for t, o in enumerate(offsets)]
                example_index.append(indices[row])
                context_offsets.append(in_context)
                cls_index.append(cls)
                if answers is not None:
                    start, end = answer_tokens(answers[row], in_context, cls)
                    starts.append(start)
                    ends.append(end)
            if answers is not None:
                columns["start_positions"], columns["end_positions"] = starts, ends
            columns.update(_example_index=example_index, _context_offsets=context_offsets, _cls_index=cls_index)
            return columns

        mapped = map_splits(raw, encode, cfg, desc="tokenizing", with_indices=True,
                            split_kwargs=lambda name: {"has_answers": cfg.answer_column in raw[name].column_names})
        import datasets

        return datasets.DatasetDict({split: self._take_features(ds, split) for split, ds in mapped.items()})

    def _checked_examples(self, ds, split: str, tokenizer) -> list[dict]:
        """Every question of a split checked before tokenizing (columns, empty texts, answer
        offsets, room beside the question), as the examples post-processing reads."""
        cfg = self.cfg
        self._require(ds, split)
        ids = [str(i) for i in ds["id"]] if "id" in ds.column_names else [str(i) for i in range(len(ds))]
        for column in (cfg.question_column, cfg.context_column):
            empty = [i for i, text in enumerate(ds[column]) if not isinstance(text, str) or not text.strip()]
            check(not empty, f"the {split} split has {len(empty)} empty {column!r} value(s) "
                             f"(first: id {ids[empty[0]] if empty else ''}); remove or fill them")
        questions = [q.lstrip() for q in ds[cfg.question_column]]
        contexts = list(ds[cfg.context_column])
        answers = [normalise_answers(a) for a in ds[cfg.answer_column]] if cfg.answer_column in ds.column_names \
            else [None] * len(ds)
        for i, (context, ans) in enumerate(zip(contexts, answers)):
            check_answers(ids[i], context, ans, split, self.v2)
        self._check_room(questions, ids, tokenizer)
        return [{"id": ids[i], "context": contexts[i], "answers": answers[i]} for i in range(len(ds))]

    def _take_features(self, ds, split: str):
        """Move the windows' post-processing columns into self._features[split]; evaluation and
        prediction windows get the feature_index the loop gathers."""
        self._features[split] = [Feature(e, [tuple(o) if o is not None else None for o in offsets], c)
                                 for e, offsets, c in zip(ds["_example_index"], ds["_context_offsets"], ds["_cls_index"])]
        ds = ds.remove_columns(["_example_index", "_context_offsets", "_cls_index"])
        if split != "train":
            ds = ds.add_column("feature_index", list(range(len(ds))))
        return ds

    def _check_room(self, questions, ids, tokenizer) -> None:
        """Every window must hold the whole question and more than doc_stride context tokens."""
        cfg = self.cfg
        lengths = [len(x) for x in tokenizer(questions, add_special_tokens=False)["input_ids"]]
        longest = int(np.argmax(lengths)) if lengths else 0
        room = cfg.max_seq_length - (lengths[longest] if lengths else 0) - tokenizer.num_special_tokens_to_add(pair=True)
        check(room > cfg.doc_stride,
              f"max_seq_length={cfg.max_seq_length} leaves {max(room, 0)} context tokens beside the longest question "
              f"(id {ids[longest]}, {lengths[longest] if lengths else 0} tokens), but doc_stride={cfg.doc_stride} needs "
              f"more than {cfg.doc_stride}; raise max_seq_length or lower doc_stride")

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if self.cfg.mixed_precision != "no" else None)

    # ------------------------------------------------------------------ evaluation

    def eval_step(self, model, batch):
        inputs = {k: v for k, v in batch.items() if k not in ("feature_index", "start_positions", "end_positions")}
        out = model(**inputs)
        result = {"start_logits": out.start_logits.float(), "end_logits": out.end_logits.float(),
                  "feature_index": batch["feature_index"]}
        if "start_positions" in batch:
            # per-window loss, as the model computes it in training: mean of start and end CE
            ce = torch.nn.functional.cross_entropy
            loss = (ce(result["start_logits"], batch["start_positions"], reduction="none")
                    + ce(result["end_logits"], batch["end_positions"], reduction="none")) / 2
            result.update(loss=loss, num_items=torch.ones_like(loss))
        return result

    def predict_step(self, model, batch):
        out = self.eval_step(model, batch)
        return {k: out[k] for k in ("start_logits", "end_logits", "feature_index")}

    def predictions(self, outputs, split: str) -> list[dict]:
        """Post-process gathered logits of `split` into one answer per question."""
        features = self._features[split]
        starts: list = [None] * len(features)
        ends: list = [None] * len(features)
        for s_batch, e_batch, idx_batch in zip(outputs["start_logits"], outputs["end_logits"], outputs["feature_index"]):
            for s, e, i in zip(s_batch, e_batch, idx_batch):
                starts[int(i)], ends[int(i)] = s, e
        missing = sum(s is None for s in starts)
        if missing:  # never expected: gather_for_metrics returns every window exactly once
            raise RuntimeError(f"{missing} of {len(features)} windows of the {split} split got no logits")
        cfg = self.cfg
        return postprocess_predictions(self._examples[split], features, starts, ends, n_best_size=cfg.n_best_size,
                                       max_answer_length=cfg.max_answer_length,
                                       version_2_with_negative=self.v2,
                                       null_score_diff_threshold=cfg.null_score_diff_threshold)

    def compute_metrics(self, outputs, eval_loss):
        preds = self.predictions(outputs, "validation")
        _write_main(os.path.join(self.cfg.output_dir, EVAL_PREDICTIONS_FILE), _records(preds))
        refs = [{"id": e["id"], "answers": e["answers"]} for e in self._examples["validation"]]
        if self._metric is None:
            from notrainer.metrics import load_metric

            self._metric = load_metric("squad_v2" if self.v2 else "squad")
        if self.v2:
            # the threshold already decided empty answers: the metric takes the text as it is
            scores = self._metric.compute(predictions=[{"id": p["id"], "prediction_text": p["prediction_text"],
                                                        "no_answer_probability": 0.0} for p in preds], references=refs)
            out = {"exact_match": scores["exact"], "f1": scores["f1"]}
            out.update({k: v for k, v in scores.items() if k.startswith(("HasAns_", "NoAns_"))})
            return out
        return self._metric.compute(predictions=[{"id": p["id"], "prediction_text": p["prediction_text"]}
                                                 for p in preds], references=refs)

    def format_predictions(self, outputs, dataset):
        return _records(self.predictions(outputs, "test"))


# ---------------------------------------------------------------------- data helpers


def load_qa_file(spec, split: str):
    """One split's QA files (a file, a list, a glob or a folder, optionally compressed; see
    data.resolve_files) as a flat Dataset: SQuAD json as published, records under "data", or any
    file the generic loader reads (json lines, csv, parquet)."""
    import datasets

    key_name = "validation_file" if split == "validation" else f"{split}_file"
    paths = data.resolve_files(spec, key_name)
    records, plain = [], []
    for path in paths:
        doc = _squad_document(path) if data.inner_extension(path) == ".json" else None
        if doc is None:
            plain.append(path)
            continue
        found = doc["data"]
        if found and isinstance(found[0], dict) and "paragraphs" in found[0]:
            found = flatten_squad(found)
        records += [{**r, "answers": normalise_answers(r.get("answers"))} if "answers" in r else r for r in found]
    if not records:
        return data.load_files({split: plain})[split]
    if plain:  # SQuAD documents next to json lines/csv files: one list of records
        records += [{**r, "answers": normalise_answers(r.get("answers"))} if "answers" in r else r
                    for r in data.load_files({split: plain})[split]]
    return datasets.Dataset.from_list(records)


def _squad_document(path: str):
    """The parsed file when it is one JSON document with a "data" list (SQuAD as published),
    else None (json lines and other shapes are left to the generic loader)."""
    try:
        with data.open_maybe_compressed(path, "rb") as f:  # json.load detects the UTF encoding
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("data"), list) else None


def flatten_squad(articles: list[dict]) -> list[dict]:
    """SQuAD's data/paragraphs/qas nesting -> one record per question."""
    records = []
    for article in articles:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                records.append({"id": str(qa.get("id")), "title": article.get("title", ""),
                                "context": paragraph["context"], "question": qa["question"],
                                "answers": normalise_answers(answers)})
    return records


def normalise_answers(answers) -> dict:
    """Answers as {"text": [...], "answer_start": [...]}, from that form or a list of
    {"text", "answer_start"} records."""
    if answers is None:
        return {"text": [], "answer_start": []}
    if isinstance(answers, dict):
        return {"text": list(answers.get("text") or []), "answer_start": [int(a) for a in answers.get("answer_start") or []]}
    if isinstance(answers, list):
        return {"text": [a["text"] for a in answers], "answer_start": [int(a["answer_start"]) for a in answers]}
    raise UsageError(f"answers must be {{'text': [...], 'answer_start': [...]}}, got {type(answers).__name__}")


def check_answers(qid, context: str, answers: dict | None, split: str, v2: bool) -> None:
    if answers is None:
        return
    texts, starts = answers["text"], answers["answer_start"]
    check(len(texts) == len(starts), f"{split} question {qid}: {len(texts)} answer texts but {len(starts)} answer_start values")
    check(bool(texts) or v2, f"{split} question {qid} has no answer; set version_2_with_negative=true for "
                             "unanswerable questions (SQuAD v2)")
    for text, start in zip(texts, starts):
        found = context[start:start + len(text)]
        check(found == text, f"{split} question {qid}: answer {text!r} does not occur at answer_start={start} "
                             f"(the context has {found!r} there); fix answer_start")


def answer_tokens(answers: dict | None, offsets: list, cls: int) -> tuple[int, int]:
    """First and last token of the (first) answer in a window, or (cls, cls) when the window
    does not contain all of it (or there is no answer)."""
    if not answers or not answers["text"]:
        return cls, cls
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    inside = [t for t, o in enumerate(offsets) if o is not None]
    if not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
        return cls, cls
    start = next(t for t in inside if offsets[t][1] > start_char)
    end = next(t for t in reversed(inside) if offsets[t][0] < end_char)
    return start, end


def _records(preds: list[dict]) -> list[dict]:
    return [{"id": p["id"], "prediction_text": p["prediction_text"],
             "no_answer_probability": round(p["no_answer_probability"], 6)} for p in preds]


def _write_main(path: str, records: list[dict]) -> None:
    from accelerate.state import PartialState

    from notrainer.data.files import write_jsonl

    if PartialState().is_main_process:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_jsonl(path, records)


# ---------------------------------------------------------------------- built-in data

_ATTRIBUTES = {
    "color": ["red", "blue", "green", "yellow", "black", "white"],
    "owner": ["anna", "bob", "carl", "dora", "emma", "fred"],
    "city": ["paris", "rome", "oslo", "lima", "new york", "los angeles"],
    "price": ["ten dollars", "five euros", "two pounds", "nine yen", "one coin", "six francs"],
}
_OBJECTS = ["car", "house", "boat", "bike", "lamp", "dog"]


def builtin_qa(n: int, version_2: bool = False, seed: int = 0) -> list[dict]:
    """Generated facts ("the color of the car is red .") and questions about one of them
    ("what is the color of the car ?"). With version_2, a third of the questions ask about an
    attribute the context does not mention."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        attrs = rng.sample(sorted(_ATTRIBUTES), 3)
        facts = [(a, rng.choice(_OBJECTS), rng.choice(_ATTRIBUTES[a])) for a in attrs]
        context, starts = "", []
        for attr, obj, value in facts:
            prefix = f"the {attr} of the {obj} is "
            starts.append(len(context) + len(prefix))
            context += f"{prefix}{value} . "
        context = context.strip()
        if version_2 and rng.random() < 1 / 3:
            missing = next(a for a in sorted(_ATTRIBUTES) if a not in attrs)
            question = f"what is the {missing} of the {rng.choice(_OBJECTS)} ?"
            answers = {"text": [], "answer_start": []}
        else:
            k = rng.randrange(3)
            attr, obj, value = facts[k]
            question = f"what is the {attr} of the {obj} ?"
            answers = {"text": [value], "answer_start": [starts[k]]}
        records.append({"id": f"q{seed}-{i}", "context": context, "question": question, "answers": answers})
    return records
