"""Binary segmentation metrics from confusion counts (nucleus = positive).

    DC  dice         2·TP / (2·TP + FP + FN)
    JC  jaccard      TP / (TP + FP + FN)
    ACC accuracy     (TP + TN) / (TP + FP + TN + FN)
    SP  specificity  TN / (TN + FP)
    SE  sensitivity  TP / (TP + FN)

Two aggregations over a test set:

- *pooled*: the counts are summed over all test samples and the metrics computed once (every
  pixel weighs the same; robust to samples with few nuclei).
- *per-image mean*: the metrics of each sample, averaged (every sample weighs the same).
  **The tables report the per-image mean by default** (``report.convention`` in the config; a
  DSB test set mixes 256² and 1388×1040 images, and pooling would let the few large ones dominate).

Edge cases (a ratio whose denominator is zero has nothing it could get wrong, so it is 1):

- empty truth and empty prediction: DC = JC = SE = 1 (and SP = ACC = 1);
- empty truth, non-empty prediction: DC = JC = 0 (FP > 0), SE = 1 (no nucleus missed);
- non-empty truth, empty prediction: DC = JC = SE = 0;
- all-foreground truth: SP = 1 (no background to misclassify);
- an empty mask (no pixels) is an error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from semibench.errors import DataError

METRIC_NAMES = ("dice", "jaccard", "accuracy", "specificity", "sensitivity")


def _info(abbrev: str, kind: str, name: str) -> dict:
    return {"abbrev": abbrev, "kind": kind, "higher_is_better": True, "name": name}


#: What each metric of ``metrics.json`` is, recorded there as ``metric_info`` so that reports
#: choose metrics as data (the instance metrics are defined in :mod:`semibench.evaluate.instances`).
METRIC_INFO = {
    "dice": _info("DC", "pixel", "Dice coefficient"),
    "jaccard": _info("JC", "pixel", "Jaccard index"),
    "accuracy": _info("ACC", "pixel", "pixel accuracy"),
    "specificity": _info("SP", "pixel", "specificity"),
    "sensitivity": _info("SE", "pixel", "sensitivity"),
    "aji": _info("AJI", "instance", "Aggregated Jaccard Index (Kumar et al. 2017)"),
    "aji_plus": _info("AJI+", "instance", "AJI with one-to-one pairing (Graham et al. 2019)"),
    "pq": _info("PQ", "instance", "Panoptic Quality (Kirillov et al. 2019)"),
    "sq": _info("SQ", "instance", "Segmentation Quality: mean IoU of the IoU > 0.5 matches"),
    "dq": _info("DQ", "instance", "Detection Quality: TP / (TP + FP/2 + FN/2)"),
    "obj_precision": _info("P_obj", "instance", "object precision at IoU > 0.5"),
    "obj_recall": _info("R_obj", "instance", "object recall at IoU > 0.5"),
    "obj_f1": _info("F1", "instance", "object F1 at IoU > 0.5"),
}


@dataclass(frozen=True)
class Counts:
    tp: int
    fp: int
    tn: int
    fn: int

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn


def _as_bool(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.bool() if t.dtype != torch.bool else t


def confusion(pred, truth) -> Counts:
    """Counts of a binary prediction against a binary truth (numpy arrays or tensors, any shape,
    nonzero = nucleus)."""
    p, t = _as_bool(pred), _as_bool(truth)
    if p.shape != t.shape:
        raise DataError(f"prediction shape {tuple(p.shape)} differs from truth shape {tuple(t.shape)}")
    if p.numel() == 0:
        raise DataError("cannot score an empty mask")
    tp = int((p & t).sum())
    fp = int((p & ~t).sum())
    fn = int((~p & t).sum())
    return Counts(tp=tp, fp=fp, tn=p.numel() - tp - fp - fn, fn=fn)


def _ratio(num: int, den: int) -> float:
    return 1.0 if den == 0 else num / den


def scores(c: Counts) -> dict[str, float]:
    """DC, JC, ACC, SP, SE (keys :data:`METRIC_NAMES`) from counts; edge cases in the module doc."""
    if c.total == 0:
        raise DataError("cannot score zero pixels")
    return {
        "dice": _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn),
        "jaccard": _ratio(c.tp, c.tp + c.fp + c.fn),
        "accuracy": (c.tp + c.tn) / c.total,
        "specificity": _ratio(c.tn, c.tn + c.fp),
        "sensitivity": _ratio(c.tp, c.tp + c.fn),
    }


def pooled(counts: list[Counts]) -> dict[str, float]:
    """Metrics of the summed counts."""
    if not counts:
        raise DataError("no samples to score")
    total = counts[0]
    for c in counts[1:]:
        total = total + c
    return scores(total)


def per_image_mean(counts: list[Counts]) -> dict[str, float]:
    """Mean over samples of each sample's metrics."""
    if not counts:
        raise DataError("no samples to score")
    per = [scores(c) for c in counts]
    return {k: float(np.mean([s[k] for s in per])) for k in METRIC_NAMES}
