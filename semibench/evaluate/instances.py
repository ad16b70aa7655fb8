"""Nucleus instances from a binary prediction, and nucleus-level metrics against a label map.

Instances (``evaluate.instances`` in the config):

- ``components`` (default): the 8-connected components of the predicted foreground at the
  sample's original size, no size filter.
- ``watershed``: each component is split by a marker watershed on its Euclidean distance
  transform (markers: the 8-connected plateaus of local maxima of the distance, smoothed by a
  Gaussian of sigma 1, within a (2·4+1)² window and at least 2 px from the background; a
  component with no such marker keeps one marker at its deepest pixel), so touching round nuclei
  come apart (``skimage.segmentation.watershed`` on the negated distance, 8-connected, within the
  foreground; scipy's ``watershed_ift`` floods by grey-level differences, not by depth, and
  splits equal disks unevenly).
- ``min_object_size`` (default 0): objects of fewer pixels are dropped afterwards.

Metrics of one sample (true objects: the ids 1..N of the ground-truth label map; predicted
objects: those of the instance map; IoU of a pair = |T∩P| / |T∪P|):

- ``aji``: Aggregated Jaccard Index (Kumar et al., "A dataset and a technique for generalized
  nuclear segmentation for computational pathology", IEEE TMI 36(7), 2017; the MoNuSeg metric).
  Each true object T_i is paired with the predicted object P_j of highest IoU (ties: larger
  intersection, then lower id); a predicted object may be paired with several true ones.
  C = Σ|T_i ∩ P_j|, U = Σ|T_i ∪ P_j| over the pairs, plus the area of every true object that
  overlaps no prediction and of every predicted object paired with none. AJI = C / U.
- ``aji_plus``: AJI+ (Graham et al., "HoVer-Net", Medical Image Analysis 58, 2019): the same
  sums with a one-to-one pairing that maximises the summed IoU (Hungarian assignment, pairs of
  IoU 0 dropped), so one prediction covering two nuclei is credited once.
- ``pq``, ``sq``, ``dq``: Panoptic Quality (Kirillov et al., "Panoptic Segmentation", CVPR 2019).
  Matches are the pairs of IoU > 0.5 (unique by construction); TP = matches, FP = unmatched
  predictions, FN = unmatched true objects. DQ = TP / (TP + ½FP + ½FN), SQ = mean IoU of the
  matches, PQ = DQ · SQ.
- ``obj_precision`` = TP / n_pred, ``obj_recall`` = TP / n_true, ``obj_f1`` = 2TP / (n_true +
  n_pred) at the same IoU > 0.5 matching (so ``obj_f1`` equals ``dq``); ``n_true``, ``n_pred``.

Empty cases (as for the pixel metrics, a ratio whose denominator is zero has nothing it could get
wrong, so it is 1):

- no true and no predicted object: every metric is 1 (U = 0, TP + FP + FN = 0);
- no true object, some predicted: AJI = AJI+ = PQ = DQ = SQ = F1 = precision = 0, recall = 1;
- some true object, none predicted: AJI = AJI+ = PQ = DQ = SQ = F1 = recall = 0, precision = 1;
- SQ when there is no match but some object: 0 (so PQ = DQ · SQ still holds).

Dataset-level values (:func:`dataset_scores`) use the summed per-sample terms: AJI = ΣC / ΣU
(the MoNuSeg aggregate), AJI+ likewise, PQ/DQ/SQ and the object scores from ΣTP, ΣFP, ΣFN and
Σ IoU of the matches.

Speed: the overlaps come from one ``np.bincount`` over the paired labels (a contingency table),
never from a loop over objects over the image.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from semibench.errors import ConfigError, DataError

INSTANCE_MODES = ("components", "watershed")
INSTANCE_METRIC_NAMES = ("aji", "aji_plus", "pq", "sq", "dq", "obj_precision", "obj_recall",
                         "obj_f1")
EIGHT = np.ones((3, 3), bool)
WATERSHED_MIN_DISTANCE = 4  # px between markers: DSB/MoNuSeg nuclei have radii of about 5-15 px
WATERSHED_MIN_DEPTH = 2.0   # px from the background: shallower maxima are contour noise
_DENSE_LIMIT = 1 << 22      # contingency tables up to this many cells are dense


# ------------------------------------------------------------------ instances from a mask

def check_instance_options(instances: str, min_object_size: int) -> None:
    if instances not in INSTANCE_MODES:
        raise ConfigError(f"unknown evaluate.instances {instances!r}; known: {', '.join(INSTANCE_MODES)}")
    if isinstance(min_object_size, bool) or not isinstance(min_object_size, (int, np.integer)) \
            or min_object_size < 0:
        raise ConfigError(f"evaluate.min_object_size must be an integer >= 0, got {min_object_size!r}")


def components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of ``mask`` (nonzero = foreground), ids 1..n (int32)."""
    labels, _ = ndimage.label(np.asarray(mask) != 0, structure=EIGHT)
    return labels.astype(np.int32, copy=False)


def watershed(mask: np.ndarray) -> np.ndarray:
    """``mask`` split into objects by a distance-transform watershed (module doc), ids 1..n."""
    fg = np.asarray(mask) != 0
    comp = components(fg)
    if comp.max() == 0:
        return comp
    dist = ndimage.distance_transform_edt(fg)
    smooth = ndimage.gaussian_filter(dist, 1.0) * fg
    size = 2 * WATERSHED_MIN_DISTANCE + 1
    peaks = (smooth == ndimage.maximum_filter(smooth, size=size)) & (dist >= WATERSHED_MIN_DEPTH)
    markers, n_markers = ndimage.label(peaks, structure=EIGHT)
    # every component gets a marker: those without one keep their deepest pixel
    has = np.zeros(comp.max() + 1, bool)
    has[comp[markers > 0]] = True
    lacking = np.flatnonzero(~has[1:]) + 1
    if len(lacking):
        deepest = ndimage.maximum_position(dist, comp, lacking)
        for k, pos in enumerate(deepest, start=1):
            markers[pos] = n_markers + k
    from skimage.segmentation import watershed as flood  # imported here: only this mode needs it

    ws = flood(-dist, markers, mask=fg, connectivity=2)
    return relabel(ws)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..n in order of first id, 0 kept (int32)."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    present = present[present != 0]
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.int32)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    return lut[labels]


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Objects of fewer than ``min_size`` pixels set to background, the rest renumbered 1..n."""
    if min_size <= 0:
        return labels
    area = np.bincount(labels.ravel())
    keep = area >= min_size
    keep[0] = False
    return relabel(np.where(keep[labels], labels, 0))


def instances_from_mask(mask: np.ndarray, instances: str = "components",
                        min_object_size: int = 0) -> np.ndarray:
    """The instance map of a binary prediction (module doc), ids 1..n (int32)."""
    check_instance_options(instances, min_object_size)
    labels = components(mask) if instances == "components" else watershed(mask)
    return remove_small(labels, min_object_size)


# ------------------------------------------------------------------ matching and metrics

@dataclass(frozen=True)
class InstanceStats:
    """The per-sample terms the metrics are made of; they add up over samples."""
    n_true: int = 0
    n_pred: int = 0
    aji_c: int = 0       # AJI: summed intersections of the pairs
    aji_u: int = 0       # AJI: summed unions of the pairs + unpaired areas
    aji_plus_c: int = 0
    aji_plus_u: int = 0
    tp_obj: int = 0      # matches at IoU > 0.5
    fp_obj: int = 0
    fn_obj: int = 0
    iou_sum: float = 0.0  # summed IoU of the matches

    def __add__(self, other: "InstanceStats") -> "InstanceStats":
        return InstanceStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_dict(self) -> dict:
        return asdict(self)


STAT_NAMES = tuple(f.name for f in fields(InstanceStats))


def _compact(labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels renumbered 1..n (n = objects present, 0 = background) and each object's area."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub":
        raise DataError(f"{what} instance map must hold integer ids, got {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and labels.min() < 0:
        raise DataError(f"{what} instance map holds negative ids")
    top = int(labels.max(initial=0))
    if top > 4 * labels.size:  # sparse huge ids: sort instead of a lookup table
        present, inverse = np.unique(labels, return_inverse=True)
        inverse = inverse.reshape(labels.shape)
        if present[0] != 0:  # no background: ids start at 1 all the same
            inverse = inverse + 1
        n = len(present) - int(present[0] == 0)
        return inverse, np.bincount(inverse.ravel(), minlength=n + 1)[1:]
    area = np.bincount(labels.ravel(), minlength=top + 1)
    present = np.flatnonzero(area[1:]) + 1
    if len(present) == top:  # already 1..n
        return labels, area[1:]
    lut = np.zeros(top + 1, np.int64)
    lut[present] = np.arange(1, len(present) + 1)
    return lut[labels], area[present]


def overlaps(true: np.ndarray, pred: np.ndarray):
    """The overlapping pairs: (true index, pred index, intersection) arrays (indices 0-based),
    and the areas of the true and the predicted objects."""
    if np.shape(true) != np.shape(pred):
        raise DataError(f"prediction shape {np.shape(pred)} differs from truth shape {np.shape(true)}")
    t, area_t = _compact(true, "true")
    p, area_p = _compact(pred, "predicted")
    nt, np_ = len(area_t), len(area_p)
    cols = np_ + 1
    if (nt + 1) * cols <= _DENSE_LIMIT:
        table = np.bincount((t * cols + p).ravel(), minlength=(nt + 1) * cols).reshape(nt + 1, cols)
        ti, pj = np.nonzero(table[1:, 1:])
        inter = table[1:, 1:][ti, pj]
    else:
        both = (t > 0) & (p > 0)
        keys, inter = np.unique(t[both] * cols + p[both], return_counts=True)
        ti, pj = keys // cols - 1, keys % cols - 1
    return ti, pj, inter.astype(np.int64), area_t, area_p


def match(true: np.ndarray, pred: np.ndarray) -> InstanceStats:
    """The terms of AJI, AJI+ and PQ of instance map ``pred`` against ``true`` (any ids,
    0 = background)."""
    ti, pj, inter, area_t, area_p = overlaps(true, pred)
    nt, np_ = len(area_t), len(area_p)
    union = area_t[ti] + area_p[pj] - inter
    iou = inter / union if len(inter) else np.zeros(0)

    # AJI: each true object with its best prediction (a prediction may serve several)
    order = np.lexsort((pj, -inter, -iou, ti))
    first = order[np.r_[True, ti[order][1:] != ti[order][:-1]]] if len(order) else order
    paired_p = np.zeros(np_, bool)
    paired_p[pj[first]] = True
    paired_t = np.zeros(nt, bool)
    paired_t[ti[first]] = True
    unpaired = int(area_t[~paired_t].sum() + area_p[~paired_p].sum())
    aji_c, aji_u = int(inter[first].sum()), int(union[first].sum()) + unpaired

    # AJI+: one-to-one pairing of maximal summed IoU, on the rows/columns that overlap at all
    rows, r_inv = np.unique(ti, return_inverse=True)
    cols, c_inv = np.unique(pj, return_inverse=True)
    plus_c = plus_pairs_u = 0
    paired_t[:] = False
    paired_p[:] = False
    if len(inter):
        m = np.zeros((len(rows), len(cols)))
        m[r_inv, c_inv] = iou
        r, c = linear_sum_assignment(m, maximize=True)
        keep = m[r, c] > 0
        r, c = r[keep], c[keep]
        pair_of = np.full(m.shape, -1, np.int64)
        pair_of[r_inv, c_inv] = np.arange(len(inter))
        k = pair_of[r, c]
        plus_c, plus_pairs_u = int(inter[k].sum()), int(union[k].sum())
        paired_t[rows[r]] = True
        paired_p[cols[c]] = True
    plus_u = plus_pairs_u + int(area_t[~paired_t].sum() + area_p[~paired_p].sum())

    # PQ: IoU > 0.5 in integers (2·|T∩P| > |T∪P|), so no float rounding decides a match
    matched = 2 * inter > union
    tp = int(matched.sum())
    return InstanceStats(n_true=nt, n_pred=np_, aji_c=aji_c, aji_u=aji_u, aji_plus_c=plus_c,
                         aji_plus_u=plus_u, tp_obj=tp, fp_obj=np_ - tp, fn_obj=nt - tp,
                         iou_sum=float(iou[matched].sum()))


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else num / den


def instance_scores(s: InstanceStats) -> dict[str, float]:
    """AJI, AJI+, PQ, SQ, DQ and the object scores (keys :data:`INSTANCE_METRIC_NAMES`) of one
    sample's terms or of their sum over samples; empty cases in the module doc."""
    dq = _ratio(s.tp_obj, s.tp_obj + 0.5 * s.fp_obj + 0.5 * s.fn_obj)
    if s.tp_obj:
        sq = s.iou_sum / s.tp_obj
    else:
        sq = 1.0 if s.fp_obj + s.fn_obj == 0 else 0.0
    return {
        "aji": _ratio(s.aji_c, s.aji_u),
        "aji_plus": _ratio(s.aji_plus_c, s.aji_plus_u),
        "pq": dq * sq,
        "sq": sq,
        "dq": dq,
        "obj_precision": _ratio(s.tp_obj, s.n_pred),
        "obj_recall": _ratio(s.tp_obj, s.n_true),
        "obj_f1": _ratio(2 * s.tp_obj, s.n_true + s.n_pred),
    }


def dataset_scores(stats: list[InstanceStats]) -> dict[str, float]:
    """Dataset-level values: :func:`instance_scores` of the summed terms (AJI = ΣC / ΣU, ...)."""
    if not stats:
        raise DataError("no samples to score")
    total = InstanceStats()
    for s in stats:
        total = total + s
    return instance_scores(total)
