"""Cost of the nucleus-level metrics (not a test): per test image, the instances of a predicted
mask (8-connected components, or the distance-transform watershed) plus AJI, AJI+ and PQ
against the ground-truth label map (``semibench.evaluate.instances``), on one CPU thread.

The "prediction" is the ground-truth mask dilated by one pixel (so touching nuclei merge, as a
network's do), which gives the matching realistic work. Data: the prepared DSB 2018 test images
of split seed 0 and the MoNuSeg test tiles under ``<data-dir>/prepared`` when present, else
synthetic 256² images of random discs.

Goal (issue 12): ≤ 50 ms per 256² image for the instance metrics on one core.

It also prints the ceiling of each instance mode: the ground-truth mask itself as the prediction
(a perfect pixel segmentation), whose instances are then only as good as the mode splits
touching nuclei.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval.py [--data-dir data] [--limit 0]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from semibench.data.prepared import PreparedDataset
from semibench.evaluate.instances import dataset_scores, instance_scores, instances_from_mask, match

REPO = Path(__file__).resolve().parent.parent


def synthetic(n: int = 50, size: int = 256, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for k in range(n):
        lab = np.zeros((size, size), np.int32)
        for j in range(1, 41):
            cy, cx, r = rng.integers(0, size), rng.integers(0, size), rng.integers(4, 12)
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = j
        out.append((f"syn{k}", lab))
    return out


def prepared(data_dir: Path, name: str, limit: int) -> list[tuple[str, np.ndarray]] | None:
    root = data_dir / "prepared" / name
    split = REPO / "results" / "splits" / name / "seed0.json"
    if not (root / "manifest.json").exists() or not split.exists():
        return None
    ds = PreparedDataset(root)
    ids = json.loads(split.read_text())["test"]
    ids = ids[:limit] if limit else ids
    return [(i, ds.load(i).label.astype(np.int32)) for i in ids]


def time_one(label: np.ndarray, mode: str, repeats: int) -> float:
    """Seconds (best of ``repeats``) for instances + match + scores of one image."""
    mask = ndimage.binary_dilation(label > 0)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        instance_scores(match(label, instances_from_mask(mask, mode)))
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO / "data")
    ap.add_argument("--limit", type=int, default=0, help="images per dataset (0: all test images)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    sets = {}
    for name in ("dsb2018", "monuseg"):
        got = prepared(args.data_dir, name, args.limit)
        if got is None:
            print(f"{name}: no prepared data under {args.data_dir}/prepared; skipped")
        else:
            sets[name] = got
    if not sets:
        sets["synthetic-256"] = synthetic(args.limit or 50)
    instances_from_mask(np.ones((4, 4), bool), "watershed")  # import scikit-image outside the clock

    print(f"{'data':<14} {'mode':<11} {'images':>6} {'ms/image':>9} {'ms/256²':>8} {'max ms':>7}"
          f" {'ms (256² images)':>17}")
    for name, items in sets.items():
        for mode in ("components", "watershed"):
            secs = np.array([time_one(lab, mode, args.repeats) for _, lab in items])
            pixels = np.array([lab.size for _, lab in items])
            small = pixels == 256 * 256
            per_256 = secs.sum() / (pixels.sum() / (256 * 256))
            small_ms = f"{1e3 * secs[small].mean():.1f} (n={small.sum()})" if small.any() else "-"
            print(f"{name:<14} {mode:<11} {len(items):>6} {1e3 * secs.mean():>9.1f} "
                  f"{1e3 * per_256:>8.1f} {1e3 * secs.max():>7.1f} {small_ms:>17}")

    print("\nceiling: the ground-truth mask as the prediction (AJI, PQ: per-image mean / dataset level)")
    for name, items in sets.items():
        for mode in ("components", "watershed"):
            stats = [match(lab, instances_from_mask(lab > 0, mode)) for _, lab in items]
            per = [instance_scores(s) for s in stats]
            total = dataset_scores(stats)
            print(f"{name:<14} {mode:<11} AJI {np.mean([p['aji'] for p in per]):.4f} / "
                  f"{total['aji']:.4f}   PQ {np.mean([p['pq'] for p in per]):.4f} / {total['pq']:.4f}")


if __name__ == "__main__":
    main()
