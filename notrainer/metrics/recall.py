"""Recall as a local `evaluate` module (scikit-learn), so it works offline.

Same arguments as the local `f1` module (`average`, `pos_label`, `labels`).
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import recall_score


class Recall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of actual positives that are found.",
            citation="scikit-learn: Machine Learning in Python, Pedregosa et al., JMLR 12, 2011.",
            inputs_description="predictions, references: label ids, or 0/1 indicator lists for multi-label; "
                               "average: binary, macro, micro, weighted or None; pos_label; labels",
            features=[
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
                datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")),
                                   "references": datasets.Sequence(datasets.Value("int64"))}),
            ],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        score = recall_score(references, predictions, labels=labels, pos_label=pos_label, average=average,
                             sample_weight=sample_weight, zero_division=0)
        return {"recall": float(score) if np.ndim(score) == 0 else np.asarray(score).tolist()}
