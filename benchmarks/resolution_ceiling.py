"""The Dice a perfect prediction can still score after passing through an s×s grid (not a test).

The DenseUNet classifies on the extractor's 1/4 grid and upsamples the logits, so at input size N
every method sees the test masks through an (N/4)² grid. This prints, for each grid side, the
per-image mean and pooled Dice of the test masks area-averaged to s×s, upsampled bilinearly back
to their size and thresholded at 0.5: an indicator of what the grid costs, not a strict bound
(learned logits can place a boundary between grid points better than an area average).

    python benchmarks/resolution_ceiling.py --dataset dsb2018 --sizes 24 48 80 96
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

from semibench.data.loading import load_split
from semibench.data.prepared import PreparedDataset


def ceiling(mask: np.ndarray, side: int) -> tuple[int, int, int]:
    """(overlap, predicted, true) foreground pixel counts of ``mask`` through a side² grid."""
    truth = torch.from_numpy(mask > 0)
    low = F.interpolate(truth.float()[None, None], size=(side, side), mode="area")
    back = F.interpolate(low, size=mask.shape, mode="bilinear", align_corners=False)[0, 0] > 0.5
    return int((back & truth).sum()), int(back.sum()), int(truth.sum())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="dsb2018")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--splits-dir", default="results/splits")
    p.add_argument("--seed", type=int, default=0, help="the split whose test set is used")
    p.add_argument("--sizes", type=int, nargs="+", default=[24, 32, 48, 64, 80, 96])
    args = p.parse_args(argv)
    prepared = PreparedDataset(f"{args.data_dir}/prepared/{args.dataset}")
    masks = [prepared.load(i).mask for i in load_split(args.splits_dir, args.dataset, args.seed)["test"]]
    print(f"{args.dataset} test set of seed {args.seed}: {len(masks)} samples")
    print(f"{'grid':>6} {'input':>6} {'DC per-image':>13} {'DC pooled':>10}")
    for side in args.sizes:
        counts = np.array([ceiling(m, side) for m in masks], dtype=np.float64)
        per_image = np.mean([2 * o / (pr + t) if pr + t else 1.0 for o, pr, t in counts])
        pooled = 2 * counts[:, 0].sum() / (counts[:, 1].sum() + counts[:, 2].sum())
        print(f"{side:>4}² {4 * side:>5}² {per_image:>13.4f} {pooled:>10.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
