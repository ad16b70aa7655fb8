"""Hand-made run directories for the report's tests: what semibench.evaluate.score writes, with
per-image Dice chosen by the test."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from semibench.report.read import FALLBACK_METRIC_INFO

PIXEL = list(FALLBACK_METRIC_INFO)
CONFIG = {
    "grid": {"datasets": ["dsb2018"], "methods": ["suponly", "meanteacher", "cdcl"], "ratios": [32, 8],
             "fullsup": True, "seeds": [0, 1, 2]},
    "ablation": {"datasets": ["dsb2018"], "methods": ["cdcl-scheme1"], "ratios": [32], "seeds": [0, 1, 2]},
    "report": {"n_resamples": 999, "n_boot_rank": 50},
}


def write_run(root: Path, dataset, method, ratio, seed, dice: np.ndarray, extra=None,
              source_ids=None, meta=True) -> Path:
    """A run directory as semibench.evaluate.score writes it: per-image Dice `dice`, the other pixel
    metrics 0.5 (accuracy 0.9), metrics.json means of those."""
    run = root / dataset / method / f"r{ratio}" / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    ids = [f"img{i}" for i in range(len(dice))]
    frame = pd.DataFrame({"id": ids, "source_id": source_ids or ids, "height": 8, "width": 8,
                          "tp": 1, "fp": 1, "tn": 1, "fn": 1, "dice": dice, "jaccard": 0.5,
                          "accuracy": 0.9, "specificity": 0.5, "sensitivity": 0.5})
    frame.to_csv(run / "per_image.csv", index=False)
    means = {m: float(frame[m].mean()) for m in PIXEL}
    doc = {"per_image_mean": means, "pooled": dict(means, dice=float(frame["dice"].mean()) - 0.01),
           "metric_info": FALLBACK_METRIC_INFO, **(extra or {})}
    if meta:
        doc["meta"] = {"dataset": dataset, "method": method, "ratio": ratio, "seed": seed}
    (run / "metrics.json").write_text(json.dumps(doc))
    lines = [{"event": "epoch", "epoch": e, "losses": {"loss": 1.0 / (e + 1)}, "val_dice": 0.5 + 0.1 * e}
             for e in range(3)]
    (run / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return run / "metrics.json"


def make_runs(root: Path, n_images=14, skip=()) -> list[Path]:
    """dsb2018: cdcl clearly best, meanteacher ~ suponly + 2 points, suponly; fullsup on top;
    Table 2's scheme1 below cdcl. Same 14 test images in every seed (MoNuSeg-like)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.8, n_images)
    shift = {"suponly": 0.0, "meanteacher": 0.02, "cdcl": 0.06, "cdcl-scheme1": 0.01, "fullsup": 0.15}
    files = []
    for method, s in shift.items():
        for ratio in ((1,) if method == "fullsup" else (32, 8) if method != "cdcl-scheme1" else (32,)):
            for seed in range(3):
                if (method, ratio, seed) in skip:
                    continue
                noise = rng.normal(0, 0.004, n_images)
                dice = np.clip(base + s + noise + (0.02 if ratio == 8 else 0), 0, 1)
                files.append(write_run(root, "dsb2018", method, ratio, seed, dice))
    return files
