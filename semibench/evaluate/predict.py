"""`semibench predict`: a trained run's best model on a folder of new images.

Every ``.tif``/``.tiff``/``.png`` image directly in ``--images`` is read as the folder recipe
reads images (:func:`semibench.data.folder.to_rgb8`: 16-bit percentile-normalised, greyscale to
three channels) and segmented at the scale the network was trained at:

- the *window* is the median side of the run's training samples (its prepared manifest; without
  it, the training input size). An image no larger than the window goes through whole, exactly
  as the evaluation predicts a test sample (resized to the input size, logits resized back,
  argmax). A larger image is covered by windows overlapping by a quarter window; the foreground
  probabilities are averaged where windows overlap and thresholded at 0.5;
- instances as in the run's evaluation (``metrics.json`` meta ``evaluate``; else the defaults),
  :func:`semibench.evaluate.instances.instances_from_mask`.

Written to ``--out`` (new or empty; filled under a temporary name, renamed when complete):
``NAME.tif`` (instance labels, uint16 or int32, 0 background, the image's size),
``NAME_overlay.png`` (the image with the nuclei's outlines) and ``nuclei.csv`` (image, label,
area, centroid_y, centroid_x in pixels).

Refused with one line before any work: a folder without images, an unreadable image, a run that
has not finished, and an image whose channel count differs from the run's training images
(greyscale vs colour, when the manifest records it).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from tqdm import tqdm

from semibench.atomic import new_folder
from semibench.config import RunConfig
from semibench.data.folder import images_in, probe, read_array, to_rgb8
from semibench.data.loading import preprocess
from semibench.errors import DataError
from semibench.evaluate.instances import check_instance_options, instances_from_mask
from semibench.evaluate.score import (
    DEFAULT_INSTANCES,
    DEFAULT_MIN_OBJECT_SIZE,
    full_size_logits,
    load_inference_model,
    read_run_json,
)
from semibench.train.device import resolve_device

CSV_COLUMNS = ("image", "label", "area", "centroid_y", "centroid_x")
OUTLINE = (255, 255, 0)


def windows(length: int, window: int) -> list[int]:
    """Start offsets of windows of ``window`` covering ``length`` with a quarter-window overlap;
    the last one ends at the edge."""
    if length <= window:
        return [0]
    stride = max(1, window - window // 4)
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


def _training_facts(cfg: RunConfig) -> tuple[int, set[int] | None]:
    """(window, channel counts of the training images or None) from the run's prepared manifest."""
    path = Path(cfg.data_dir) / "prepared" / cfg.dataset / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return cfg.train.input_size, None
    sides = [max(s["height"], s["width"]) for s in manifest.get("samples", []) if s.get("subset") == "train"]
    window = int(np.median(sides)) if sides else cfg.train.input_size
    channels = {i["channels"] for i in manifest.get("images", []) if "channels" in i}
    return window, channels or None


def _colour(channels: int) -> bool:
    return channels >= 3  # 1 grey, 2 grey + alpha; 3 RGB, 4 RGBA


@torch.no_grad()
def segment(model: torch.nn.Module, image: np.ndarray, window: int, size: int, batch: int,
            device: torch.device) -> np.ndarray:
    """The predicted foreground (bool HxW) of one HxWx3 uint8 image (module doc)."""
    h, w = image.shape[:2]
    if h <= window and w <= window:
        x = preprocess(image, size, device)[None]
        return (full_size_logits(model, x, [(h, w)])[0].argmax(0) == 1).cpu().numpy()
    bh, bw = min(window, h), min(window, w)  # every window has this size
    boxes = [(t, left) for t in windows(h, window) for left in windows(w, window)]
    prob = torch.zeros((h, w), dtype=torch.float32, device=device)
    hits = torch.zeros((h, w), dtype=torch.float32, device=device)
    for start in range(0, len(boxes), batch):
        chunk = boxes[start:start + batch]
        x = torch.stack([preprocess(np.ascontiguousarray(image[t:t + bh, left:left + bw]), size, device)
                         for t, left in chunk])
        for (t, left), lg in zip(chunk, full_size_logits(model, x, [(bh, bw)] * len(chunk))):
            prob[t:t + bh, left:left + bw] += torch.softmax(lg, 0)[1]
            hits[t:t + bh, left:left + bw] += 1
    return (prob / hits > 0.5).cpu().numpy()


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    out = image.copy()
    out[find_boundaries(labels, mode="inner")] = OUTLINE
    return out


def nuclei_rows(name: str, labels: np.ndarray) -> list[dict]:
    flat = labels.ravel()
    n = int(flat.max(initial=0)) + 1
    area = np.bincount(flat, minlength=n)
    yy, xx = np.indices(labels.shape)
    cy = np.bincount(flat, weights=yy.ravel(), minlength=n)
    cx = np.bincount(flat, weights=xx.ravel(), minlength=n)
    return [{"image": name, "label": i, "area": int(area[i]), "centroid_y": round(cy[i] / area[i], 3),
             "centroid_x": round(cx[i] / area[i], 3)} for i in range(1, n) if area[i]]


def _evaluate_options(run_dir: Path, instances: str | None, min_object_size: int | None) -> tuple[str, int]:
    """The run's evaluation settings (metrics.json), overridden by the arguments given."""
    recorded: dict = {}
    try:
        recorded = json.loads((run_dir / "metrics.json").read_text())["meta"]["evaluate"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    mode = instances if instances is not None else recorded.get("instances", DEFAULT_INSTANCES)
    size = min_object_size if min_object_size is not None else recorded.get("min_object_size",
                                                                             DEFAULT_MIN_OBJECT_SIZE)
    check_instance_options(mode, size)
    return mode, size


def predict_folder(run_dir: Path, images_dir: Path, out: Path, device: str | None = None,
                   instances: str | None = None, min_object_size: int | None = None) -> Path:
    run_dir, images_dir, out = Path(run_dir), Path(images_dir), Path(out)
    cfg = RunConfig.from_dict(read_run_json(run_dir / "config.json", "not a run directory"))
    if not (run_dir / "best.pt").is_file():
        raise DataError(f"{run_dir / 'best.pt'} not found: the run has not finished training")
    mode, min_size = _evaluate_options(run_dir, instances, min_object_size)
    if not images_dir.is_dir():
        raise DataError(f"--images {images_dir}: not a folder")
    images = images_in(images_dir)
    if not images:
        raise DataError(f"--images {images_dir}: no images (.tif, .tiff, .png)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out} already exists and is not an empty folder")
    window, trained = _training_facts(cfg)
    for p in images.values():
        _, _, c, _ = probe(p)
        if trained and _colour(c) not in {_colour(t) for t in trained}:
            kinds = "colour (RGB)" if _colour(c) else "greyscale"
            was = "greyscale" if not any(_colour(t) for t in trained) else "colour (RGB)"
            raise DataError(f"{p}: a {kinds} image ({c} channel{'s' * (c > 1)}), but run {run_dir} was "
                            f"trained on {was} images of {cfg.dataset}; use a run trained on {kinds} images")
    model, _ = load_inference_model(run_dir, cfg)
    dev = resolve_device(device or "auto")
    model.eval().to(dev)
    with new_folder(out) as tmp:
        rows: list[dict] = []
        for name, p in tqdm(sorted(images.items()), desc="predict", unit="img"):
            rgb = to_rgb8(read_array(p), p)
            mask = segment(model, rgb, window, cfg.train.input_size, cfg.train.eval_batch_size, dev)
            labels = instances_from_mask(mask, mode, min_size)
            labels = labels.astype(np.uint16 if labels.max(initial=0) < 65536 else np.int32)
            tifffile.imwrite(tmp / f"{name}.tif", labels, photometric="minisblack")
            Image.fromarray(overlay(rgb, labels)).save(tmp / f"{name}_overlay.png")
            rows += nuclei_rows(name, labels)
        with open(tmp / "nuclei.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    return out
