"""The local evaluate metric modules: offline, and equal to the libraries they wrap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from notrainer.errors import UsageError
from notrainer.metrics import LOCAL_METRICS, load_metric

REFS = [0, 1, 2, 2, 1, 0, 1, 2, 0, 0]
PREDS = [0, 2, 2, 2, 1, 0, 0, 2, 1, 0]


def test_every_local_metric_loads_offline():
    for name in ("accuracy", "f1", "precision", "recall", "matthews_correlation", "pearsonr", "spearmanr", "seqeval"):
        assert name in LOCAL_METRICS
        assert load_metric(name) is not None


def test_classification_metrics_match_sklearn():
    assert load_metric("accuracy").compute(predictions=PREDS, references=REFS)["accuracy"] == 0.7
    macro = load_metric("f1").compute(predictions=PREDS, references=REFS, average="macro")["f1"]
    assert macro == pytest.approx(f1_score(REFS, PREDS, average="macro"))
    per_label = load_metric("f1").compute(predictions=PREDS, references=REFS, average=None)["f1"]
    assert per_label == pytest.approx(list(f1_score(REFS, PREDS, average=None)))
    binary = load_metric("f1").compute(predictions=[1, 1, 0, 0], references=[1, 0, 0, 0])["f1"]
    assert binary == pytest.approx(2 / 3)
    mcc = load_metric("matthews_correlation").compute(predictions=PREDS, references=REFS)["matthews_correlation"]
    assert mcc == pytest.approx(matthews_corrcoef(REFS, PREDS))
    p = load_metric("precision").compute(predictions=[1, 1, 0, 0], references=[1, 0, 0, 0])["precision"]
    r = load_metric("recall").compute(predictions=[1, 1, 0, 0], references=[1, 0, 1, 0])["recall"]
    assert (p, r) == (0.5, 0.5)


def test_multi_label_indicator_rows():
    refs = [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    preds = [[1, 0, 1], [0, 1, 1], [1, 1, 0]]
    assert load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"] == pytest.approx(2 / 3)
    micro = load_metric("f1").compute(predictions=preds, references=refs, average="micro")["f1"]
    assert micro == pytest.approx(f1_score(np.array(refs), np.array(preds), average="micro"))
    assert accuracy_score(np.array(refs), np.array(preds)) == pytest.approx(2 / 3)


def test_regression_correlations_match_scipy():
    rng = np.random.default_rng(0)
    refs = rng.normal(size=50)
    preds = refs + rng.normal(scale=0.5, size=50)
    got = load_metric("pearsonr").compute(predictions=preds, references=refs)["pearsonr"]
    assert got == pytest.approx(pearsonr(refs, preds)[0])
    got = load_metric("spearmanr").compute(predictions=preds, references=refs)["spearmanr"]
    assert got == pytest.approx(spearmanr(refs, preds)[0])


def test_seqeval_entity_level():
    refs = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "O"]]
    preds = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG", "O"]]
    out = load_metric("seqeval").compute(predictions=preds, references=refs)
    # 2 of 3 reference entities found, both predicted entities right
    assert out["overall_precision"] == 1.0
    assert out["overall_recall"] == pytest.approx(2 / 3)
    assert out["overall_f1"] == pytest.approx(0.8)
    assert out["overall_accuracy"] == pytest.approx(6 / 7)
    assert out["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "number": 1}
    assert out["LOC"]["recall"] == 0.0 and out["LOC"]["number"] == 1
    # a half-found span is not an entity
    out = load_metric("seqeval").compute(predictions=[["B-PER", "O"]], references=[["B-PER", "I-PER"]])
    assert out["overall_f1"] == 0.0


def test_unknown_metric_offline_is_a_usage_error():
    with pytest.raises(UsageError, match="could not be loaded"):
        load_metric("surely_not_a_metric_xyz")
