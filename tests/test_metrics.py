import numpy as np
import pytest
import torch

from semibench.errors import DataError
from semibench.evaluate.metrics import METRIC_NAMES, Counts, confusion, per_image_mean, pooled, scores

PRED = np.array([[1, 1, 0],
                 [0, 1, 0],
                 [0, 0, 0]])
TRUTH = np.array([[1, 0, 0],
                  [0, 1, 1],
                  [0, 0, 0]])


def test_counts_by_hand():
    # TP at (0,0),(1,1); FP at (0,1); FN at (1,2); the other 5 pixels TN
    assert confusion(PRED, TRUTH) == Counts(tp=2, fp=1, tn=5, fn=1)
    # tensors and bool/uint8 inputs give the same counts
    assert confusion(torch.from_numpy(PRED).bool(), torch.from_numpy(TRUTH.astype(np.uint8))) == \
        Counts(tp=2, fp=1, tn=5, fn=1)


def test_scores_by_hand():
    s = scores(Counts(tp=2, fp=1, tn=5, fn=1))
    assert s["dice"] == pytest.approx(4 / 6)
    assert s["jaccard"] == pytest.approx(2 / 4)
    assert s["accuracy"] == pytest.approx(7 / 9)
    assert s["specificity"] == pytest.approx(5 / 6)
    assert s["sensitivity"] == pytest.approx(2 / 3)
    assert tuple(s) == METRIC_NAMES


def test_dice_jaccard_relation():
    for c in [Counts(3, 2, 10, 1), Counts(1, 0, 4, 7), Counts(9, 4, 0, 2)]:
        s = scores(c)
        assert s["dice"] == pytest.approx(2 * s["jaccard"] / (1 + s["jaccard"]))


def test_both_empty_is_perfect():
    z = np.zeros((4, 5), dtype=np.uint8)
    c = confusion(z, z)
    assert c == Counts(0, 0, 20, 0)
    assert scores(c) == {k: 1.0 for k in METRIC_NAMES}


def test_empty_truth_nonempty_prediction():
    pred = np.zeros((2, 5))
    pred[0, :2] = 1
    s = scores(confusion(pred, np.zeros((2, 5))))
    assert s["dice"] == 0.0 and s["jaccard"] == 0.0
    assert s["sensitivity"] == 1.0  # no nucleus to miss
    assert s["specificity"] == pytest.approx(8 / 10)
    assert s["accuracy"] == pytest.approx(8 / 10)


def test_empty_prediction_nonempty_truth():
    truth = np.zeros((2, 5))
    truth[1, 1:4] = 1
    s = scores(confusion(np.zeros((2, 5)), truth))
    assert s["dice"] == 0.0 and s["jaccard"] == 0.0 and s["sensitivity"] == 0.0
    assert s["specificity"] == 1.0
    assert s["accuracy"] == pytest.approx(7 / 10)


def test_all_foreground_truth_specificity_is_one():
    ones = np.ones((3, 3))
    pred = ones.copy()
    pred[0, 0] = 0
    s = scores(confusion(pred, ones))
    assert s["specificity"] == 1.0
    assert s["sensitivity"] == pytest.approx(8 / 9)


def test_pooled_versus_per_image_mean():
    a = Counts(tp=2, fp=1, tn=5, fn=1)  # dice 2/3
    b = Counts(tp=0, fp=0, tn=10, fn=10)  # dice 0
    # pooled: tp=2, fp=1, fn=11 -> dice 4/(4+12)
    assert pooled([a, b])["dice"] == pytest.approx(4 / 16)
    assert per_image_mean([a, b])["dice"] == pytest.approx((2 / 3 + 0) / 2)
    assert pooled([a, b])["accuracy"] == pytest.approx((2 + 15) / 29)


def test_bad_inputs():
    with pytest.raises(DataError, match="shape"):
        confusion(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(DataError):
        confusion(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(DataError):
        pooled([])
