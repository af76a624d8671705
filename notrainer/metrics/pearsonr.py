"""Pearson correlation as a local `evaluate` module (scipy), so it works offline (regression)."""

import datasets
import evaluate
from scipy.stats import pearsonr


class Pearsonr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Pearson correlation coefficient between predicted and reference values.",
            citation="Virtanen et al. (2020). SciPy 1.0. Nature Methods 17, 261-272.",
            inputs_description="predictions, references: floats; return_pvalue: also return the p-value",
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references, return_pvalue=False):
        result = pearsonr(references, predictions)
        out = {"pearsonr": float(result[0])}
        if return_pvalue:
            out["p-value"] = float(result[1])
        return out
