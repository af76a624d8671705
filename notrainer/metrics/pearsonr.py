"""Pearson correlation as a local `evaluate` module (scipy), so it works offline (regression)."""

from scipy.stats import pearsonr

from notrainer.metrics import correlations


class Pearsonr(correlations.Correlation):
    result_key = "pearsonr"
    summary = "Pearson correlation coefficient between predicted and reference values."
    score_fn = staticmethod(pearsonr)
