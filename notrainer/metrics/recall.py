"""Recall as a local `evaluate` module (scikit-learn), so it works offline.

Same arguments as the local `f1` module (`average`, `pos_label`, `labels`).
"""

from sklearn.metrics import recall_score

from notrainer.metrics import label_scores


class Recall(label_scores.LabelScore):
    result_key = "recall"
    summary = "Fraction of actual positives that are found."
    score_fn = staticmethod(recall_score)
