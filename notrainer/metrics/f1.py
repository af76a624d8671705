"""F1 as a local `evaluate` module (scikit-learn), so it works offline.

`average="binary"` (the default, for two classes: F1 of `pos_label`), "macro", "micro",
"weighted", or None (one F1 per label, as a list). Multi-label input: 0/1 indicator rows.
"""

from sklearn.metrics import f1_score

from notrainer.metrics import label_scores


class F1(label_scores.LabelScore):
    result_key = "f1"
    summary = "Harmonic mean of precision and recall."
    score_fn = staticmethod(f1_score)
