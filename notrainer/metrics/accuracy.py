"""Accuracy as a local `evaluate` module (scikit-learn), so it works offline.

Single-label: the fraction of examples whose predicted id equals the reference id.
Multi-label (0/1 indicator rows): subset accuracy, the fraction of rows predicted exactly.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of examples predicted correctly (exact match of all labels for multi-label).",
            citation="scikit-learn: Machine Learning in Python, Pedregosa et al., JMLR 12, 2011.",
            inputs_description="predictions, references: label ids (ints), or 0/1 indicator lists for multi-label",
            features=[
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
                datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")),
                                   "references": datasets.Sequence(datasets.Value("int64"))}),
            ],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        return {"accuracy": float(accuracy_score(references, predictions, normalize=normalize,
                                                 sample_weight=sample_weight))}
