"""Test-set evaluation of a finished run.

Reads ``config.json``, ``best.pt`` (``{"model": state_dict of the inference DenseUNet, ...}``) and
``train_done.json`` from the run directory, predicts every test sample of the run's split at the
training input size, maps the logits back to the sample's original size (bilinear on logits,
then argmax) and writes, each atomically:

- ``per_image.csv``: id, height, width, tp, fp, tn, fn and the five metrics per test sample;
- ``metrics.json`` (written last, so its presence means both are complete): ``pooled`` and
  ``per_image_mean`` (keys ``dice, jaccard, accuracy, specificity, sensitivity``),
  and ``meta`` (config, seed, versions, device, weights, timings, n_test).
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import semibench

from .config import RunConfig
from .data import load_split, preprocess
from .device import device_name, resolve_device
from .errors import DataError, TrainingError
from .metrics import METRIC_NAMES, Counts, confusion, per_image_mean, pooled, scores
from .model import DenseUNet, build_model
from .prepared import PreparedDataset

CSV_COLUMNS = ("id", "height", "width", "tp", "fp", "tn", "fn") + METRIC_NAMES


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename: readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__,
            "semibench": semibench.__version__}


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise DataError(f"{path} not found: {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None


def load_inference_model(run_dir: Path, cfg: RunConfig) -> tuple[DenseUNet, dict]:
    """The DenseUNet of ``best.pt`` and the checkpoint's other entries (epoch, val score, ...)."""
    path = run_dir / "best.pt"
    if not path.exists():
        raise DataError(f"{path} not found: the run has not finished training")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{path} cannot be read: {e}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise DataError(f"{path} holds no 'model' state dict")
    model = build_model(cfg.train.backbone, "none")
    # The projector plays no part in prediction and its shape is method-specific: ignore it.
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("projector.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when not strict
        raise TrainingError(f"{path} does not fit a {cfg.train.backbone} DenseUNet: "
                            f"{str(e).splitlines()[1].strip()}") from None
    missing = [k for k in missing if not k.startswith("projector.")]
    if missing or unexpected:
        raise TrainingError(f"{path} does not fit a {cfg.train.backbone} DenseUNet: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    extra = {k: v for k, v in ckpt.items() if k != "model" and isinstance(v, (int, float, str))}
    return model, extra


@torch.no_grad()
def predict_counts(model: torch.nn.Module, dataset: PreparedDataset, ids: list[str], size: int,
                   batch_size: int, device: torch.device, amp: bool = True) -> list[dict]:
    """Per-sample rows (id, height, width, counts) of the model's predictions."""
    model.eval().to(device)
    autocast = (torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda"
                else nullcontext())
    rows = []
    for start in tqdm(range(0, len(ids), batch_size), desc="evaluate", unit="batch", leave=False):
        samples = [dataset.load(i) for i in ids[start:start + batch_size]]
        x = torch.stack([preprocess(s.image, size) for s in samples]).to(device)
        with autocast:
            logits = model(x, project=False).logits
        for s, lg in zip(samples, logits):
            h, w = s.label.shape
            full = F.interpolate(lg[None].float(), size=(h, w), mode="bilinear", align_corners=False)
            pred = full[0].argmax(0)
            truth = torch.from_numpy(s.mask).to(device)
            c = confusion(pred == 1, truth)
            rows.append({"id": s.id, "height": h, "width": w, "tp": c.tp, "fp": c.fp, "tn": c.tn,
                         "fn": c.fn})
    return rows


def evaluate_run(run_dir: Path, device: str | None = None) -> dict:
    """Evaluate ``run_dir`` on its test split; ``device`` overrides the run's configured one."""
    run_dir = Path(run_dir)
    cfg = RunConfig.from_dict(_read_json(run_dir / "config.json", "not a run directory"))
    train_done = _read_json(run_dir / "train_done.json", "the run has not finished training")
    dev = resolve_device(device or cfg.device)
    model, ckpt_info = load_inference_model(run_dir, cfg)

    split = load_split(cfg.splits_dir, cfg.dataset, cfg.seed)
    test_ids = list(split.get("test") or [])
    if not test_ids:
        raise DataError(f"the split of {cfg.dataset} seed {cfg.seed} has no test samples")
    dataset = PreparedDataset(Path(cfg.data_dir) / "prepared" / cfg.dataset)

    t0 = time.perf_counter()
    rows = predict_counts(model, dataset, test_ids, cfg.train.input_size,
                          cfg.train.eval_batch_size, dev, amp=cfg.train.amp)
    eval_seconds = time.perf_counter() - t0

    counts = [Counts(r["tp"], r["fp"], r["tn"], r["fn"]) for r in rows]
    for r, c in zip(rows, counts):
        r.update(scores(c))
    result = {
        "pooled": pooled(counts),
        "per_image_mean": per_image_mean(counts),
        "meta": {
            "dataset": cfg.dataset, "method": cfg.method, "seed": cfg.seed,
            "ratio": train_done.get("ratio", cfg.ratio),  # FullSup trains at 1 whatever the run says
            "n_test": len(rows),
            "config": cfg.to_dict(),
            "versions": versions(),
            "device": {"eval": str(dev), "eval_name": device_name(dev),
                       "train": train_done.get("device")},
            "weights": train_done.get("weights_info"),
            "checkpoint": ckpt_info,
            "timings": {"train": train_done.get("timings"), "eval_seconds": eval_seconds},
            "train_done": train_done,
        },
    }

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    write_atomic(run_dir / "per_image.csv", buf.getvalue())
    write_atomic(run_dir / "metrics.json", json.dumps(result, indent=1, default=str) + "\n")
    return result
