"""Extractive QA post-processing: from per-token start/end logits to one answer per question.

A long context is split into several overlapping windows (features). The answer of a question
is the best-scoring span over ALL its features: for each feature the `n_best_size` best start
and end tokens are paired, pairs outside the context, reversed or longer than
`max_answer_length` tokens are dropped, and a span's score is start logit + end logit. Its text
is cut from the original context with the tokens' character offsets.

With unanswerable questions (SQuAD v2), the null score is start + end logit of the CLS token,
the lowest over the question's features; the answer is empty when
null score - best span score > `null_score_diff_threshold`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Feature:
    """What post-processing needs of one tokenized window."""

    example_index: int  # which question it belongs to
    offset_mapping: list  # per token: (start_char, end_char) in the context, or None outside it
    cls_index: int = 0  # the token whose logits score "no answer"


def postprocess_predictions(
    examples: Sequence[dict],
    features: Sequence[Feature],
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> list[dict]:
    """One prediction per example, in order: {"id", "prediction_text", "no_answer_probability",
    "n_best": [{"text", "score", "start"}, ...]}.

    `examples` are dicts with "id" and "context"; `start_logits[i]`/`end_logits[i]` belong to
    `features[i]` (they may be longer than its offset mapping: padding is ignored).
    """
    by_example: dict[int, list[int]] = defaultdict(list)
    for i, feature in enumerate(features):
        by_example[feature.example_index].append(i)

    predictions = []
    for example_index, example in enumerate(examples):
        context = example["context"]
        spans, null_score = [], None
        for i in by_example.get(example_index, []):
            feature = features[i]
            offsets = feature.offset_mapping
            starts = np.asarray(start_logits[i], dtype=np.float64)[: len(offsets)]
            ends = np.asarray(end_logits[i], dtype=np.float64)[: len(offsets)]
            feature_null = starts[feature.cls_index] + ends[feature.cls_index]
            null_score = feature_null if null_score is None else min(null_score, feature_null)
            for s in _top(starts, n_best_size):
                for e in _top(ends, n_best_size):
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    start_char, end_char = offsets[s][0], offsets[e][1]
                    spans.append((starts[s] + ends[e], start_char, end_char))
        spans.sort(key=lambda x: -x[0])
        n_best = [{"text": context[a:b], "score": float(score), "start": int(a)} for score, a, b in spans[:n_best_size]]

        best = n_best[0] if n_best else None
        if version_2_with_negative and null_score is not None:
            scores = [c["score"] for c in n_best] + [float(null_score)]
            no_answer_probability = float(_softmax(np.array(scores))[-1])
            if best is None or null_score - best["score"] > null_score_diff_threshold:
                best = None
        else:
            no_answer_probability = 0.0
        predictions.append({"id": example["id"], "prediction_text": best["text"] if best else "",
                            "no_answer_probability": no_answer_probability, "n_best": n_best})
    return predictions


def _top(logits: np.ndarray, n: int) -> list[int]:
    """Indices of the n largest values, largest first (ties: lower index first)."""
    return np.argsort(-logits, kind="stable")[:n].tolist()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
