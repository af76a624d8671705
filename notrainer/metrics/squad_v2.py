"""SQuAD v2.0 metrics as a local `evaluate` module, offline.

Like SQuAD v1.1 (same answer normalisation), plus unanswerable questions: their gold answer is
the empty string, and a prediction whose `no_answer_probability` exceeds
`no_answer_threshold` counts as the empty answer. Scores are split into questions that have
an answer (HasAns_*) and those that have none (NoAns_*); results are percentages.
"""

import datasets
import evaluate

from notrainer.metrics.squad import REFERENCE_FEATURES, best_over_golds, exact_match, f1, normalize_answer


class SquadV2(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="SQuAD v2.0 exact match and F1 with the HasAns/NoAns split.",
            citation="Rajpurkar, Jia and Liang, Know What You Don't Know: Unanswerable Questions for SQuAD, ACL 2018.",
            inputs_description='predictions: {"id", "prediction_text", "no_answer_probability"}; references: '
                               '{"id", "answers": {"text": [...], "answer_start": [...]}} (empty lists: no answer)',
            features=datasets.Features({
                "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string"),
                                "no_answer_probability": datasets.Value("float32")},
                "references": REFERENCE_FEATURES,
            }),
        )

    def _compute(self, predictions, references, no_answer_threshold=1.0):
        predicted = {p["id"]: p for p in predictions}
        scores = {"HasAns": [], "NoAns": []}
        for ref in references:
            if ref["id"] not in predicted:
                raise ValueError(f"no prediction for question id {ref['id']!r}")
            p = predicted[ref["id"]]
            text = "" if p["no_answer_probability"] > no_answer_threshold else p["prediction_text"]
            golds = [g for g in ref["answers"]["text"] if normalize_answer(g)]
            group = "HasAns" if golds else "NoAns"
            golds = golds or [""]
            scores[group].append((best_over_golds(exact_match, text, golds), best_over_golds(f1, text, golds)))
        everything = scores["HasAns"] + scores["NoAns"]
        out = _summary(everything, "")
        for group, rows in scores.items():
            if rows:
                out.update(_summary(rows, f"{group}_"))
        return out


def _summary(rows, prefix):
    n = len(rows)
    return {f"{prefix}exact": 100.0 * sum(r[0] for r in rows) / max(n, 1),
            f"{prefix}f1": 100.0 * sum(r[1] for r in rows) / max(n, 1), f"{prefix}total": n}
