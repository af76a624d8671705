"""SQuAD v1.1 exact match and F1 as a local `evaluate` module, offline.

Answers are compared after the official normalisation: lower case, punctuation removed, the
articles a/an/the removed, white space collapsed. Each prediction scores against its best
gold answer; results are percentages.
"""

import collections
import re
import string

import datasets
import evaluate

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1. When either side normalises to nothing, 1 if both do, else 0."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(score_fn, prediction: str, golds: list) -> float:
    return max(score_fn(prediction, g) for g in golds)


REFERENCE_FEATURES = {
    "id": datasets.Value("string"),
    "answers": datasets.Sequence({"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}),
}


class Squad(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="SQuAD v1.1 exact match and token F1 after the official answer normalisation.",
            citation="Rajpurkar et al., SQuAD: 100,000+ Questions for Machine Comprehension of Text, EMNLP 2016.",
            inputs_description='predictions: {"id", "prediction_text"}; references: {"id", "answers": '
                               '{"text": [...], "answer_start": [...]}}',
            features=datasets.Features({
                "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                "references": REFERENCE_FEATURES,
            }),
        )

    def _compute(self, predictions, references):
        predicted = {p["id"]: p["prediction_text"] for p in predictions}
        em = f1_sum = 0.0
        for ref in references:
            golds = list(ref["answers"]["text"])
            if ref["id"] not in predicted:
                raise ValueError(f"no prediction for question id {ref['id']!r}")
            em += best_over_golds(exact_match, predicted[ref["id"]], golds)
            f1_sum += best_over_golds(f1, predicted[ref["id"]], golds)
        n = max(len(references), 1)
        return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1_sum / n}
