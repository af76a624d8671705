"""Entity-level sequence labelling metrics (seqeval) as a local `evaluate` module, offline.

Returns overall_precision, overall_recall, overall_f1 (entities must match exactly, type and
span), overall_accuracy (per tag), and for each entity type a dict of precision, recall, f1
and number (its count in the references), as the hub's `seqeval` module does.
"""

import datasets
import evaluate
from seqeval.metrics import accuracy_score, classification_report


class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Entity-level precision, recall and F1 of IOB/IOBES tag sequences (seqeval).",
            citation="Hiroki Nakayama (2018). seqeval: A Python framework for sequence labeling evaluation.",
            inputs_description="predictions, references: lists of tag sequences (e.g. ['B-PER', 'I-PER', 'O']); "
                               "scheme: None (conlleval style) or IOB1/IOB2/IOE1/IOE2/IOBES/BILOU with mode='strict'",
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("string", id="label"), id="sequence"),
                "references": datasets.Sequence(datasets.Value("string", id="label"), id="sequence"),
            }),
        )

    def _compute(self, predictions, references, suffix=False, scheme=None, mode=None, sample_weight=None,
                 zero_division=0):
        if scheme is not None:
            from seqeval import scheme as schemes

            scheme = getattr(schemes, scheme)
        report = classification_report(y_true=references, y_pred=predictions, suffix=suffix, output_dict=True,
                                       scheme=scheme, mode=mode, sample_weight=sample_weight,
                                       zero_division=zero_division)
        report.pop("macro avg", None)
        report.pop("weighted avg", None)
        overall = report.pop("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
        out = {name: {"precision": float(s["precision"]), "recall": float(s["recall"]),
                      "f1": float(s["f1-score"]), "number": int(s["support"])} for name, s in report.items()}
        out["overall_precision"] = float(overall["precision"])
        out["overall_recall"] = float(overall["recall"])
        out["overall_f1"] = float(overall["f1-score"])
        out["overall_accuracy"] = float(accuracy_score(y_true=references, y_pred=predictions))
        return out
