"""Spearman rank correlation as a local `evaluate` module (scipy), so it works offline (regression)."""

from scipy.stats import spearmanr

from notrainer.metrics import correlations


class Spearmanr(correlations.Correlation):
    result_key = "spearmanr"
    summary = "Spearman rank correlation coefficient between predicted and reference values."
    score_fn = staticmethod(spearmanr)
