"""Figure 4 of the paper: the extractor's feature maps of SupOnly and Schemes 1-3 (and, as an
extra panel, full CDCL) on one test image, as the first three principal components shown as
RGB, with the silhouette score of foreground vs background pixels
(PCA colours are not comparable across panels, the score is).

Needs model inference, so it is its own rule; cheap: one image, four forward passes, CPU."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from semibench.errors import DataError

from .plan import ReportPlan, display
from .read import Results

METHODS = ("suponly", "cdcl-scheme1", "cdcl-scheme2", "cdcl-scheme3", "cdcl")  # the paper's four, + CDCL
MAX_PIXELS = 2000  # pixels sampled for the silhouette score (O(n²))


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) in [0, 1]: the first three principal components, min-max scaled."""
    c, h, w = features.shape
    x = features.reshape(c, -1).T.astype(np.float64)
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = x @ vt[:3].T
    lo, hi = comps.min(0), comps.max(0)
    comps = (comps - lo) / np.where(hi > lo, hi - lo, 1)
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    return comps.reshape(h, w, 3)


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (Euclidean) of points x (n, d) with two labels; NaN with one class."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0))
    s = np.empty(len(x))
    for i in range(len(x)):
        same = labels == labels[i]
        same[i] = False
        a = d[i, same].mean() if same.any() else 0.0
        b = d[i, labels != labels[i]].mean()
        s[i] = 0.0 if not same.any() else (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(s.mean())


def _pick(results: Results, plan: ReportPlan):
    cells = []
    if plan.ablation is not None:
        cells += [(d, k) for d in plan.ablation.datasets for k in plan.ablation.ratios]
    cells += [(d, k) for d in plan.grid.datasets for k in plan.grid.ratios]
    for d, k in cells:
        have = [m for m in METHODS if any(key[:3] == (d, m, k) for key in results.run_dirs)]
        if len(have) >= 1:
            seeds = sorted(s for (dd, m, kk, s) in results.run_dirs if (dd, m, kk) == (d, have[0], k))
            return d, k, seeds[0], have
    raise DataError("no run of SupOnly or Schemes 1-3 to draw feature maps from")


def draw(results: Results, plan: ReportPlan, threads: int | None = None):
    import matplotlib.pyplot as plt
    import torch

    from semibench.config import RunConfig
    from semibench.data.loading import load_split, preprocess
    from semibench.data.prepared import PreparedDataset
    from semibench.evaluate.score import load_inference_model

    if threads:
        torch.set_num_threads(threads)
    dataset, ratio, seed, methods = _pick(results, plan)
    first = results.run_dirs[(dataset, methods[0], ratio, seed)]
    cfg0 = RunConfig.from_dict(__import__("json").loads((first / "config.json").read_text()))
    data = PreparedDataset(Path(cfg0.data_dir) / "prepared" / dataset)
    test = sorted(load_split(cfg0.splits_dir, dataset, seed).get("test") or [])
    if not test:
        raise DataError(f"no test images in the {dataset} split of seed {seed}")
    sample = data.load(test[0])
    x = preprocess(sample.image, cfg0.train.input_size)[None]
    panels = []
    rng = np.random.default_rng(0)
    for m in methods:
        run = results.run_dirs.get((dataset, m, ratio, seed))
        if run is None:
            continue
        cfg = RunConfig.from_dict(__import__("json").loads((run / "config.json").read_text()))
        model, _ = load_inference_model(run, cfg)
        with torch.no_grad():
            f = model.eval().extract(x)[0].numpy()
        c, h, w = f.shape
        gt = np.asarray(torch.nn.functional.interpolate(
            torch.from_numpy(sample.mask.astype(np.float32))[None, None], size=(h, w),
            mode="nearest")[0, 0]).astype(int).ravel()
        pix = f.reshape(c, -1).T
        idx = rng.choice(len(pix), size=min(MAX_PIXELS, len(pix)), replace=False)
        panels.append((m, pca_rgb(f), silhouette(pix[idx], gt[idx])))
    fig, axes = plt.subplots(1, 2 + len(panels), figsize=(2.3 * (2 + len(panels)), 2.8))
    axes[0].imshow(sample.image), axes[0].set_title("(a) input", fontsize=8)
    axes[1].imshow(sample.mask, cmap="gray"), axes[1].set_title("(b) ground truth", fontsize=8)
    for i, (ax, (m, rgb, sil)) in enumerate(zip(axes[2:], panels)):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(f"({chr(99 + i)}) {display(m)}\nsilhouette {sil:.2f}", fontsize=8)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{dataset}, 1/{ratio}, seed {seed}, {sample.id}: PCA(3) of extractor features",
                 fontsize=9)
    fig.tight_layout()
    return fig


def write_feature_maps(results: Results, plan: ReportPlan, out_dir: Path,
                       threads: int | None = None) -> list[Path]:
    from .figures import _save, placeholder

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        fig = draw(results, plan, threads)
    except Exception as e:  # an optional figure: say why instead of failing the workflow
        fig = placeholder(f"{type(e).__name__}: {e}")
    return _save(fig, out_dir, "feature_maps")
