"""The shared body of the local precision, recall and f1 modules: one scikit-learn score over
label ids (or 0/1 indicator rows for multi-label).

Each metric file subclasses `LabelScore` and names its scikit-learn function. The files import
this module (not the class), because `evaluate.load` takes the first metric class it finds in a
file's namespace.
"""

import datasets
import evaluate
import numpy as np


class LabelScore(evaluate.Metric):
    #: set by each metric file
    result_key: str = ""
    summary: str = ""
    score_fn = None

    def _info(self):
        return evaluate.MetricInfo(
            description=self.summary,
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
        score = type(self).score_fn(references, predictions, labels=labels, pos_label=pos_label, average=average,
                                    sample_weight=sample_weight, zero_division=0)
        return {self.result_key: float(score) if np.ndim(score) == 0 else np.asarray(score).tolist()}
