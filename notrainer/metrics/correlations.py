"""The shared body of the local pearsonr and spearmanr modules: one scipy correlation between
predicted and reference values (regression).

Each metric file subclasses `Correlation` and names its scipy function; the files import this
module (not the class) because `evaluate.load` takes the first metric class in a file's namespace.
"""

import datasets
import evaluate


class Correlation(evaluate.Metric):
    #: set by each metric file
    result_key: str = ""
    summary: str = ""
    score_fn = None

    def _info(self):
        return evaluate.MetricInfo(
            description=self.summary,
            citation="Virtanen et al. (2020). SciPy 1.0. Nature Methods 17, 261-272.",
            inputs_description="predictions, references: floats; return_pvalue: also return the p-value",
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references, return_pvalue=False):
        result = type(self).score_fn(references, predictions)
        out = {self.result_key: float(result[0])}
        if return_pvalue:
            out["p-value"] = float(result[1])
        return out
