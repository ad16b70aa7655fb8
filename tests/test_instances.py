"""Instances from masks and the nucleus-level metrics, on hand-built cases computed by hand."""
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import semibench.evaluate.instances as inst
from semibench.errors import ConfigError, DataError
from semibench.evaluate.instances import (
    InstanceStats,
    components,
    dataset_scores,
    instance_scores,
    instances_from_mask,
    match,
    remove_small,
    watershed,
)


def _boxes(shape, *boxes):
    """A label map with box k+1 = rows r0:r1, cols c0:c1 of ``boxes[k]``."""
    lab = np.zeros(shape, np.int32)
    for k, (r0, r1, c0, c1) in enumerate(boxes, start=1):
        lab[r0:r1, c0:c1] = k
    return lab


def _scores(true, pred):
    return instance_scores(match(true, pred))


def _check(got, **expected):
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k


def test_two_equal_touching_nuclei_predicted_as_one_blob():
    # T1, T2: 3x3 = 9 px each, side by side; P: their union, 18 px. IoU(Ti, P) = 9/18 = 0.5.
    true = _boxes((8, 10), (1, 4, 1, 4), (1, 4, 4, 7))
    pred = (true > 0).astype(np.int32)
    s = match(true, pred)
    # AJI: T1->P (C 9, U 18), T2->P (C 9, U 18): 18/36
    assert (s.aji_c, s.aji_u) == (18, 36)
    # AJI+: P serves one of them (C 9, U 18), the other adds its 9 px: 9/27
    assert (s.aji_plus_c, s.aji_plus_u) == (9, 27)
    # PQ: IoU 0.5 is not > 0.5: TP 0, FP 1, FN 2
    assert (s.tp_obj, s.fp_obj, s.fn_obj, s.n_true, s.n_pred) == (0, 1, 2, 2, 1)
    _check(instance_scores(s), aji=0.5, aji_plus=1 / 3, pq=0, dq=0, sq=0, obj_f1=0,
           obj_precision=0, obj_recall=0)


def test_two_unequal_touching_nuclei_predicted_as_one_blob():
    # T1: 3x4 = 12 px, T2: 3x2 = 6 px, touching; P = union, 18 px.
    # IoU(T1, P) = 12/18 = 2/3 (a match), IoU(T2, P) = 6/18 = 1/3.
    true = _boxes((8, 10), (1, 4, 1, 5), (1, 4, 5, 7))
    pred = components(true > 0)
    assert pred.max() == 1
    # AJI: C = 12 + 6 = 18, U = 18 + 18 = 36 -> 1/2
    # AJI+: P with T1 (C 12, U 18), T2 unpaired (+6): 12/24 = 1/2
    # PQ: TP 1 (IoU 2/3), FP 0, FN 1: DQ = 1/1.5 = 2/3, SQ = 2/3, PQ = 4/9
    # objects: precision 1/1, recall 1/2, F1 = 2/(2+1) = 2/3
    _check(_scores(true, pred), aji=0.5, aji_plus=0.5, dq=2 / 3, sq=2 / 3, pq=4 / 9,
           obj_precision=1, obj_recall=0.5, obj_f1=2 / 3)


def test_one_nucleus_split_in_two():
    # T: 3x6 = 18 px; P1 its left 12 px (IoU 2/3), P2 its right 6 px (IoU 1/3)
    true = _boxes((8, 10), (1, 4, 1, 7))
    pred = _boxes((8, 10), (1, 4, 1, 5), (1, 4, 5, 7))
    s = match(true, pred)
    # AJI: T->P1 (C 12, U 18), P2 unpaired (+6): 12/24
    assert (s.aji_c, s.aji_u, s.aji_plus_c, s.aji_plus_u) == (12, 24, 12, 24)
    # PQ: TP 1, FP 1 (P2), FN 0: DQ = 1/1.5, SQ = 2/3, PQ = 4/9; precision 1/2, recall 1
    _check(instance_scores(s), aji=0.5, aji_plus=0.5, dq=2 / 3, sq=2 / 3, pq=4 / 9,
           obj_precision=0.5, obj_recall=1, obj_f1=2 / 3)


def test_a_missed_nucleus():
    # T1 9 px found exactly; T2 2x2 = 4 px elsewhere, not predicted
    true = _boxes((10, 10), (1, 4, 1, 4), (6, 8, 6, 8))
    pred = _boxes((10, 10), (1, 4, 1, 4))
    # AJI: C 9, U 9 + 4 -> 9/13 (AJI+ the same); PQ: TP 1 (IoU 1), FN 1: DQ 2/3, SQ 1
    _check(_scores(true, pred), aji=9 / 13, aji_plus=9 / 13, dq=2 / 3, sq=1, pq=2 / 3,
           obj_precision=1, obj_recall=0.5, obj_f1=2 / 3)


def test_a_false_positive():
    # T1 9 px found exactly; P2 2x2 = 4 px on background
    true = _boxes((10, 10), (1, 4, 1, 4))
    pred = _boxes((10, 10), (1, 4, 1, 4), (6, 8, 6, 8))
    # AJI: C 9, U 9 + 4 (unpaired prediction) -> 9/13; PQ: TP 1, FP 1: DQ 2/3, SQ 1
    _check(_scores(true, pred), aji=9 / 13, aji_plus=9 / 13, dq=2 / 3, sq=1, pq=2 / 3,
           obj_precision=0.5, obj_recall=1, obj_f1=2 / 3)


def test_a_shifted_nucleus():
    # T: 4x4 = 16 px; P: the same box one column right: intersection 12, union 20, IoU 0.6
    true = _boxes((8, 8), (1, 5, 1, 5))
    pred = _boxes((8, 8), (1, 5, 2, 6))
    s = match(true, pred)
    assert (s.aji_c, s.aji_u, s.tp_obj) == (12, 20, 1)
    assert s.iou_sum == pytest.approx(0.6)
    _check(instance_scores(s), aji=0.6, aji_plus=0.6, dq=1, sq=0.6, pq=0.6, obj_f1=1)


def test_aji_pairs_a_prediction_with_several_nuclei_aji_plus_once():
    # T1 (3x4 = 12 px) and T2 (3x4 = 12 px) far apart; P1 covers T1 and T2 and the 3x2 gap
    # between them (30 px); P2 covers T2 exactly.
    true = _boxes((6, 14), (1, 4, 1, 5), (1, 4, 7, 11))
    pred = _boxes((6, 14), (1, 4, 1, 11))
    pred[1:4, 7:11] = 2
    # now P1 = T1 + gap (18 px), P2 = T2 (12 px): IoU(T1, P1) = 12/18, IoU(T2, P2) = 1
    s = match(true, pred)
    assert (s.aji_c, s.aji_u) == (24, 30)  # 12/18 and 12/12
    pred[1:4, 7:11] = 1  # one prediction over both: P1 = 30 px
    s = match(true, pred)
    # AJI: T1->P1 (C 12, U 30), T2->P1 (C 12, U 30): 24/60; AJI+: P1 once (12/30) + T2's 12 px
    assert (s.aji_c, s.aji_u, s.aji_plus_c, s.aji_plus_u) == (24, 60, 12, 42)


def test_empty_cases():
    empty = np.zeros((5, 5), np.int32)
    box = _boxes((5, 5), (1, 3, 1, 3))  # 4 px
    # nothing at all: every ratio 0/0 is 1
    assert instance_scores(match(empty, empty)) == {k: 1.0 for k in inst.INSTANCE_METRIC_NAMES}
    # no nucleus, one prediction: C 0, U 4; FP 1
    _check(_scores(empty, box), aji=0, aji_plus=0, pq=0, dq=0, sq=0, obj_f1=0,
           obj_precision=0, obj_recall=1)
    # one nucleus, no prediction: C 0, U 4; FN 1
    _check(_scores(box, empty), aji=0, aji_plus=0, pq=0, dq=0, sq=0, obj_f1=0,
           obj_precision=1, obj_recall=0)
    assert match(box, empty) == InstanceStats(n_true=1, aji_u=4, aji_plus_u=4, fn_obj=1)


def test_a_diagonal_contact_is_one_object_under_8_connectivity():
    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:3] = True
    mask[3:5, 3:5] = True  # touches the first block at one corner only
    assert components(mask).max() == 1
    mask[3:5, 3:5] = False
    mask[4:6, 4:6] = True  # one pixel of gap
    lab = components(mask)
    assert lab.max() == 2 and set(np.unique(lab)) == {0, 1, 2}


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_watershed_splits_two_overlapping_disks():
    a, b = _disk((40, 60), 20, 20, 10), _disk((40, 60), 20, 34, 10)  # centres 14 px apart
    mask = a | b
    assert components(mask).max() == 1
    lab = watershed(mask)
    assert lab.max() == 2 and np.array_equal(lab > 0, mask)
    true = np.where(a, 1, 0) + np.where(b & ~a, 2, 0)
    s = match(true, lab)
    assert s.tp_obj == 2 and s.iou_sum / 2 > 0.9
    # a lone disk and a lone rectangle stay whole
    assert watershed(_disk((40, 40), 20, 20, 12)).max() == 1
    assert watershed(_boxes((20, 30), (4, 14, 3, 25)) > 0).max() == 1
    # a tiny component (no marker deep enough) is kept as one object
    tiny = np.zeros((10, 10), bool)
    tiny[2, 2] = tiny[7, 7] = True
    assert watershed(tiny).max() == 2


def test_instances_from_mask_options():
    mask = _boxes((10, 10), (0, 2, 0, 2), (5, 9, 5, 9)) > 0  # 4 px and 16 px
    assert instances_from_mask(mask).max() == 2
    lab = instances_from_mask(mask, "components", min_object_size=5)
    assert lab.max() == 1 and (lab > 0).sum() == 16
    assert np.array_equal(remove_small(components(mask), 0), components(mask))
    with pytest.raises(ConfigError, match="unknown evaluate.instances 'blob'; known: components, watershed"):
        instances_from_mask(mask, "blob")
    with pytest.raises(ConfigError, match="min_object_size must be an integer >= 0"):
        instances_from_mask(mask, "components", -2)


def test_bad_instance_maps():
    with pytest.raises(DataError, match="differs from truth"):
        match(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(DataError, match="integer ids"):
        match(np.zeros((3, 3), float), np.zeros((3, 3), int))
    with pytest.raises(DataError, match="negative ids"):
        match(np.zeros((3, 3), int), -np.ones((3, 3), int))


# ------------------------------------------------------------------ against a slow reference

def _random_instances(rng, shape=(48, 56), n=8):
    lab = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        lab[_disk(shape, rng.integers(0, shape[0]), rng.integers(0, shape[1]),
                  rng.integers(2, 9))] = k
    return lab


def _reference(true, pred):
    """AJI, AJI+ and PQ terms straight from the definitions, one object at a time."""
    ts = [true == k for k in np.unique(true) if k]
    ps = [pred == k for k in np.unique(pred) if k]
    inter = np.array([[(t & p).sum() for p in ps] for t in ts], dtype=float).reshape(len(ts), len(ps))
    union = np.array([[(t | p).sum() for p in ps] for t in ts], dtype=float).reshape(len(ts), len(ps))
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    c = u = 0
    used = set()
    for i, t in enumerate(ts):
        if len(ps) and iou[i].max() > 0:
            j = int(np.argmax(iou[i]))
            c, u = c + inter[i, j], u + union[i, j]
            used.add(j)
        else:
            u += t.sum()
    u += sum(p.sum() for j, p in enumerate(ps) if j not in used)
    cp = up = 0
    pt, pp = set(), set()
    if len(ts) and len(ps):
        for i, j in zip(*linear_sum_assignment(-iou)):
            if iou[i, j] > 0:
                cp, up = cp + inter[i, j], up + union[i, j]
                pt.add(i), pp.add(j)
    up += sum(t.sum() for i, t in enumerate(ts) if i not in pt)
    up += sum(p.sum() for j, p in enumerate(ps) if j not in pp)
    matched = iou > 0.5
    return dict(n_true=len(ts), n_pred=len(ps), aji_c=c, aji_u=u, aji_plus_c=cp, aji_plus_u=up,
                tp_obj=int(matched.sum()), iou_sum=float(iou[matched].sum()))


@pytest.mark.parametrize("seed", range(6))
def test_match_agrees_with_the_reference(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    true, pred = _random_instances(rng), _random_instances(rng, n=int(rng.integers(0, 12)))
    ref = _reference(true, pred)
    for dense_limit in (1 << 22, 0):  # the dense table and the sparse (sorted) path
        monkeypatch.setattr(inst, "_DENSE_LIMIT", dense_limit)
        got = match(true, pred).as_dict()
        for k, v in ref.items():
            assert got[k] == pytest.approx(v, abs=1e-9), (k, dense_limit)


@pytest.mark.parametrize("seed", range(4))
def test_relabelling_invariance(seed):
    rng = np.random.default_rng(100 + seed)
    true, pred = _random_instances(rng), _random_instances(rng, n=10)
    base = match(true, pred)

    def shuffled(lab, offset):
        ids = np.unique(lab)[1:]
        new = rng.permutation(len(ids)) * 7 + offset  # permuted, gaps, large ids
        lut = np.zeros(lab.max() + 1, np.int64)
        lut[ids] = new
        return lut[lab]

    for offset in (1, 5_000, 10 ** 9):  # 10**9: beyond a lookup table, the sorted path
        t2, p2 = shuffled(true, offset), shuffled(pred, offset + 3)
        assert match(t2, p2) == base
        assert instance_scores(match(t2, p2))["aji"] == instance_scores(base)["aji"]
        assert instance_scores(match(t2, p2))["pq"] == instance_scores(base)["pq"]


def test_dataset_level_is_the_ratio_of_sums():
    rng = np.random.default_rng(7)
    stats = [match(_random_instances(rng), _random_instances(rng)) for _ in range(5)]
    c, u = sum(s.aji_c for s in stats), sum(s.aji_u for s in stats)
    tp, fp, fn = (sum(getattr(s, k) for s in stats) for k in ("tp_obj", "fp_obj", "fn_obj"))
    iou = sum(s.iou_sum for s in stats)
    got = dataset_scores(stats)
    assert got["aji"] == pytest.approx(c / u, abs=1e-12)
    assert got["dq"] == pytest.approx(tp / (tp + 0.5 * fp + 0.5 * fn), abs=1e-12)
    assert got["sq"] == pytest.approx(iou / tp, abs=1e-12)
    assert got["pq"] == pytest.approx(got["dq"] * got["sq"], abs=1e-12)
    # ... which is not the mean of the per-sample AJIs
    assert got["aji"] != pytest.approx(np.mean([instance_scores(s)["aji"] for s in stats]), abs=1e-6)
    with pytest.raises(DataError, match="no samples"):
        dataset_scores([])
