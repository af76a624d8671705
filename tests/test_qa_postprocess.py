"""QA post-processing against hand-computed cases (no model, no tokenizer)."""

import numpy as np
import pytest

from notrainer.tasks.qa_postprocess import Feature, postprocess_predictions

CONTEXT = "aa bb cc dd ee"  # aa=(0,2) bb=(3,5) cc=(6,8) dd=(9,11) ee=(12,14)
Q = [None, None, None]  # [CLS] question [SEP]: outside the context


def logits(values: dict, length: int = 8) -> np.ndarray:
    """A padded logits row (length > the feature's tokens) that is 0 except at `values`."""
    row = np.zeros(length)
    for i, v in values.items():
        row[i] = v
    row[7:] = -100.0  # padding across processes: must be ignored
    return row


def two_windows():
    """Two windows with doc stride: [aa bb cc] and [cc dd ee]; "cc dd" crosses the first boundary."""
    features = [
        Feature(0, Q + [(0, 2), (3, 5), (6, 8), None]),
        Feature(0, Q + [(6, 8), (9, 11), (12, 14), None]),
    ]
    # window 0 only sees "cc" (start 2 + end 1 = 3); window 1 sees "cc dd" (start 3 + end 2 = 5)
    starts = [logits({5: 2.0}), logits({3: 3.0})]
    ends = [logits({5: 1.0}), logits({4: 2.0})]
    return [{"id": "q1", "context": CONTEXT}], features, starts, ends


def test_answer_spanning_two_windows_comes_from_the_window_that_holds_it():
    examples, features, starts, ends = two_windows()
    (pred,) = postprocess_predictions(examples, features, starts, ends, n_best_size=5, max_answer_length=30)
    assert pred["prediction_text"] == "cc dd"
    assert pred["n_best"][0] == {"text": "cc dd", "score": 5.0, "start": 6}
    # every candidate of both windows competes: the window-0 "cc" (3.0) is in the n-best too
    assert {"text": "cc", "score": 3.0, "start": 6} in pred["n_best"]
    assert [c["score"] for c in pred["n_best"]] == sorted((c["score"] for c in pred["n_best"]), reverse=True)


def test_max_answer_length_drops_longer_spans():
    examples, features, starts, ends = two_windows()
    (pred,) = postprocess_predictions(examples, features, starts, ends, max_answer_length=1)
    assert pred["prediction_text"] == "cc"
    assert all(len(c["text"].split()) == 1 for c in pred["n_best"])


def test_n_best_size_limits_candidates():
    examples, features, starts, ends = two_windows()
    (pred,) = postprocess_predictions(examples, features, starts, ends, n_best_size=2)
    assert len(pred["n_best"]) == 2 and pred["prediction_text"] == "cc dd"


def one_window(cls_start: float, cls_end: float):
    features = [Feature(0, Q + [(0, 2), (3, 5), (6, 8), None])]
    starts = [logits({0: cls_start, 4: 2.0})]  # "bb": 2 + 1 = 3
    ends = [logits({0: cls_end, 4: 1.0})]
    return [{"id": "q", "context": CONTEXT}], features, starts, ends


@pytest.mark.parametrize("threshold,expected", [(0.0, ""), (0.99, ""), (1.01, "bb"), (5.0, "bb")])
def test_null_answer_chosen_by_threshold(threshold, expected):
    # null score = 2 + 2 = 4, best span = 3: the difference is 1.0
    examples, features, starts, ends = one_window(2.0, 2.0)
    (pred,) = postprocess_predictions(examples, features, starts, ends, version_2_with_negative=True,
                                      null_score_diff_threshold=threshold)
    assert pred["prediction_text"] == expected
    # softmax over the n-best scores and the null score
    scores = np.array([c["score"] for c in pred["n_best"]] + [4.0])
    assert pred["no_answer_probability"] == pytest.approx(np.exp(4.0) / np.exp(scores).sum())


def test_without_v2_the_best_span_wins_even_over_a_high_null_score():
    examples, features, starts, ends = one_window(9.0, 9.0)
    (pred,) = postprocess_predictions(examples, features, starts, ends)
    assert pred["prediction_text"] == "bb" and pred["no_answer_probability"] == 0.0


def test_null_score_is_the_lowest_over_the_features():
    # window 0: null 4, window 1: null 1; best span "cc dd" = 5 -> 1 - 5 < 0: answer
    examples, features, starts, ends = two_windows()
    starts[0][0], ends[0][0] = 2.0, 2.0
    starts[1][0], ends[1][0] = 0.5, 0.5
    (pred,) = postprocess_predictions(examples, features, starts, ends, version_2_with_negative=True)
    assert pred["prediction_text"] == "cc dd"
    # with a null of 6 in every window the empty answer wins (6 - 5 > 0)
    starts[1][0], ends[1][0] = 3.0, 3.0
    starts[0][0], ends[0][0] = 3.0, 3.0
    (pred,) = postprocess_predictions(examples, features, starts, ends, version_2_with_negative=True)
    assert pred["prediction_text"] == ""


def test_examples_keep_their_order_and_cls_index_is_honoured():
    features = [Feature(1, [(0, 2), (3, 5), None], cls_index=2), Feature(0, [None, (0, 2), (3, 5)])]
    starts = [np.array([0.0, 5.0, 9.0]), np.array([0.0, 1.0, 0.0])]
    ends = [np.array([0.0, 5.0, 9.0]), np.array([0.0, 1.0, 0.0])]
    examples = [{"id": "first", "context": "xx yy"}, {"id": "second", "context": "pp qq"}]
    preds = postprocess_predictions(examples, features, starts, ends, version_2_with_negative=True)
    assert [p["id"] for p in preds] == ["first", "second"]
    assert preds[0]["prediction_text"] == "xx"  # 2 > null 0
    assert preds[1]["prediction_text"] == ""  # null (cls at index 2) 18 beats "qq" 10
