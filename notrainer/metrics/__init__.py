"""Metrics that work offline.

The metrics the tasks use ship with notrainer as local `evaluate` modules (one file each in
this folder, computed with scikit-learn, scipy, seqeval, sacrebleu or rouge-score), so
`evaluate.load` never needs the network for them. Any other name goes to `evaluate.load`,
which fetches it from the hub for users who are online (`metric=<name>`).

    metric = load_metric("accuracy")          # local module, offline
    metric.compute(predictions=[...], references=[...])
"""

from __future__ import annotations

import os

from notrainer.errors import UsageError, first_line

_HERE = os.path.dirname(os.path.abspath(__file__))

#: metric name -> file in this folder holding its evaluate module
LOCAL_METRICS: dict[str, str] = {}
# classification and token classification (scikit-learn, scipy, seqeval)
LOCAL_METRICS.update({n: f"{n}.py" for n in ("accuracy", "f1", "precision", "recall", "matthews_correlation", "pearsonr", "spearmanr", "seqeval")})
# generation (rouge-score, sacrebleu) and extractive QA (official SQuAD normalisation)
LOCAL_METRICS.update({n: f"{n}.py" for n in ("rouge", "sacrebleu", "chrf", "squad", "squad_v2")})
# semantic segmentation (evaluate's mean_iou definitions, from a confusion matrix)
LOCAL_METRICS["mean_iou"] = "mean_iou.py"


def load_metric(name: str, **kwargs):
    """An `evaluate` metric: the local module if notrainer ships one, else from the hub."""
    import evaluate

    # In memory: every rank computes on the gathered data, and evaluate's default on-disk cache
    # file would be shared (and locked) by all ranks on one machine.
    kwargs.setdefault("keep_in_memory", True)
    if name in LOCAL_METRICS:
        return evaluate.load(os.path.join(_HERE, LOCAL_METRICS[name]), **kwargs)
    try:
        return evaluate.load(name, **kwargs)
    except Exception as e:
        raise UsageError(f"metric={name!r} could not be loaded ({first_line(e)}); offline, use one of: "
                         f"{', '.join(sorted(LOCAL_METRICS)) or 'none'}") from None
