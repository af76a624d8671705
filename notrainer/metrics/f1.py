"""F1 as a local `evaluate` module (scikit-learn), so it works offline.

`average="binary"` (the default, for two classes: F1 of `pos_label`), "macro", "micro",
"weighted", or None (one F1 per label, as a list). Multi-label input: 0/1 indicator rows.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Harmonic mean of precision and recall.",
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
        score = f1_score(references, predictions, labels=labels, pos_label=pos_label, average=average,
                         sample_weight=sample_weight, zero_division=0)
        return {"f1": float(score) if np.ndim(score) == 0 else np.asarray(score).tolist()}
