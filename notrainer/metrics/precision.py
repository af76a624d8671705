"""Precision as a local `evaluate` module (scikit-learn), so it works offline.

Same arguments as the local `f1` module (`average`, `pos_label`, `labels`).
"""

from sklearn.metrics import precision_score

from notrainer.metrics import label_scores


class Precision(label_scores.LabelScore):
    result_key = "precision"
    summary = "Fraction of predicted positives that are correct."
    score_fn = staticmethod(precision_score)
