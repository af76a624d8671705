"""Matthews correlation coefficient as a local `evaluate` module (scikit-learn), offline.

Between -1 and +1; 0 is chance level, whatever the class balance (GLUE's CoLA metric).
"""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Matthews correlation coefficient between predicted and reference label ids.",
            citation="Matthews, B. W. (1975). Biochimica et Biophysica Acta 405(2), 442-451.",
            inputs_description="predictions, references: label ids (ints)",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, sample_weight=None):
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions,
                                                                sample_weight=sample_weight))}
