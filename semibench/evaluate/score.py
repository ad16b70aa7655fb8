"""Test-set evaluation of a finished run.

Reads ``config.json``, ``best.pt`` (``{"model": state_dict of the inference DenseUNet, ...}``) and
``train_done.json`` from the run directory, predicts every test sample of the run's split at the
training input size, maps the logits back to the sample's original size (bilinear on logits,
then argmax; the foreground probability is the softmax of the same logits) and writes:

- ``predictions/<id>.png``: the predicted mask at the original size, 8-bit, lossless
  (0 = background, 255 = nucleus), and ``predictions/_inference.json`` (checkpoint, device,
  inference time); ``probabilities/<id>.png``: round(255 · p(nucleus)), 8-bit. Each directory
  is filled under a temporary name and renamed into place when complete;
- ``per_image.csv`` (:data:`CSV_COLUMNS`): id, source_id (the source image: for MoNuSeg tiles the
  1000² image, else the id), height, width, tp, fp, tn, fn, the five pixel metrics, the instance
  metrics and the per-sample terms they are made of (:class:`semibench.evaluate.instances.InstanceStats`);
- ``metrics.json`` (written last, so its presence means all of the above are complete):
  ``pooled`` (pixel metrics of the summed counts), ``per_image_mean`` (pixel and instance
  metrics, averaged over samples), ``dataset_level`` (instance metrics of the summed terms:
  AJI = ΣC / ΣU, PQ from ΣTP, ΣFP, ΣFN, ΣIoU), ``metric_info`` (name -> abbrev, kind,
  higher_is_better, name, for every metric present) and ``meta`` (config, seed, versions,
  device, weights, timings, n_test, the ``evaluate`` options).

:func:`rescore_run` (``semibench evaluate --metrics-only``) recomputes ``per_image.csv`` and
``metrics.json`` from the saved predictions, without the model.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import semibench
from semibench.atomic import write_atomic, write_json_atomic
from semibench.config import RunConfig
from semibench.data.loading import load_split, preprocess
from semibench.data.prepared import PreparedDataset, Sample
from semibench.errors import DataError, TrainingError
from semibench.evaluate.instances import (
    INSTANCE_METRIC_NAMES,
    STAT_NAMES,
    InstanceStats,
    check_instance_options,
    dataset_scores,
    instance_scores,
    instances_from_mask,
    match,
)
from semibench.evaluate.metrics import METRIC_INFO, METRIC_NAMES, Counts, confusion, pooled, scores
from semibench.network.densenet import torchvision_version
from semibench.network.model import DenseUNet, build_model
from semibench.train.device import device_name, resolve_device
from semibench.train.execution import resolve_execution, to_device

CSV_COLUMNS = (("id", "source_id", "height", "width", "tp", "fp", "tn", "fn") + METRIC_NAMES
               + INSTANCE_METRIC_NAMES + STAT_NAMES)
PREDICTIONS, PROBABILITIES = "predictions", "probabilities"
INFERENCE_INFO = "_inference.json"  # inside predictions/; no sample id starts with "_"
DEFAULT_INSTANCES, DEFAULT_MIN_OBJECT_SIZE = "components", 0


def versions() -> dict[str, str]:
    import scipy
    import skimage

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "scikit-image": skimage.__version__,
            "semibench": semibench.__version__}


def read_run_json(path: Path, what: str) -> dict:
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


def _chunks(items: list, n: int) -> Iterator[list]:
    for start in range(0, len(items), n):
        yield items[start:start + n]


def full_size_logits(model: torch.nn.Module, x: torch.Tensor, shapes: list[tuple[int, int]],
                     autocast=None) -> list[torch.Tensor]:
    """Each sample's float32 logits (C, h, w) at its original size ``shapes[i]``: the batch ``x``
    (at the input size) through ``model``, then one bilinear resize per distinct original size,
    all on ``x``'s device and without a host synchronisation."""
    with autocast if autocast is not None else nullcontext():
        logits = model(x, project=False).logits
    logits = logits[:len(shapes)].float()  # a padded batch has more inputs than samples
    groups: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    full: list[torch.Tensor] = [logits[0]] * len(shapes)
    for (h, w), idx in groups.items():
        # a list index would be copied to the GPU with a blocking copy; stacking views is not
        part = logits if len(idx) == len(shapes) else torch.stack([logits[i] for i in idx])
        up = F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False)
        for j, i in enumerate(idx):
            full[i] = up[j]
    return full


@torch.no_grad()
def predict_samples(model: torch.nn.Module, dataset: PreparedDataset, ids: list[str], size: int,
                    batch_size: int, device: torch.device, autocast=None
                    ) -> Iterator[tuple[Sample, torch.Tensor, torch.Tensor]]:
    """Yield (sample, mask, probability) per id: the predicted mask (bool) and the foreground
    probability (float32) at the sample's original size, as tensors on ``device``. Images are
    resized on ``device``; ``autocast``: a context (default none: the model's own dtype)."""
    model.eval().to(device)
    for chunk in tqdm(list(_chunks(ids, batch_size)), desc="evaluate", unit="batch", leave=False):
        samples = [dataset.load(i) for i in chunk]
        x = torch.stack([preprocess(s.image, size, device) for s in samples])
        full = full_size_logits(model, x, [s.label.shape for s in samples], autocast)
        for s, lg in zip(samples, full):
            # the mask from the argmax, not from p > 0.5: float32 softmax can round to 0.5
            yield s, lg.argmax(0) == 1, torch.softmax(lg, 0)[1]


class EvalSet:
    """Samples made ready once on ``device`` for repeated scoring (validation after every
    epoch): the inputs at the training size in batches, the truth masks at the original size.
    ``pad``: a short last batch is filled up with copies of its last input (their outputs are
    dropped), so a compiled network sees one batch shape and is not compiled again for it."""

    def __init__(self, samples: list[Sample], size: int, batch_size: int, device: torch.device,
                 pad: bool = False):
        self.batches = []
        for chunk in _chunks(list(samples), batch_size):
            x = torch.stack([preprocess(s.image, size, device) for s in chunk])
            if pad and len(chunk) < batch_size:
                x = torch.cat([x, x[-1:].expand(batch_size - len(chunk), *x.shape[1:])])
            truths = [to_device(torch.from_numpy(s.mask), device).bool() for s in chunk]
            self.batches.append((chunk, x, truths))

    @torch.no_grad()
    def counts(self, model: torch.nn.Module, autocast=None) -> list[dict]:
        """Per-sample rows (id, height, width, tp, fp, tn, fn) of the model's predictions; one
        host synchronisation for the whole set."""
        was_training = model.training
        model.eval()
        samples, stats = [], []
        for chunk, x, truths in self.batches:
            full = full_size_logits(model, x, [t.shape for t in truths], autocast)
            for s, lg, t in zip(chunk, full, truths):
                p = lg.argmax(0) == 1
                stats.append(torch.stack([(p & t).sum(), (p & ~t).sum(), (~p & t).sum()]))
                samples.append(s)
        model.train(was_training)
        host = torch.stack(stats).cpu().tolist() if stats else []
        rows = []
        for s, (tp, fp, fn) in zip(samples, host):
            h, w = s.label.shape
            rows.append({"id": s.id, "height": h, "width": w, "tp": tp, "fp": fp,
                         "tn": h * w - tp - fp - fn, "fn": fn})
        return rows


def predict_counts(model: torch.nn.Module, dataset: PreparedDataset, ids: list[str], size: int,
                   batch_size: int, device: torch.device, autocast=None) -> list[dict]:
    """Per-sample rows (id, height, width, counts) of the model's predictions."""
    model.eval().to(device)
    return EvalSet([dataset.load(i) for i in ids], size, batch_size, device).counts(model, autocast)


def score_sample(sample_id: str, source_id: str, truth: np.ndarray, mask: np.ndarray,
                 instances: str = DEFAULT_INSTANCES, min_object_size: int = DEFAULT_MIN_OBJECT_SIZE
                 ) -> dict:
    """The per_image.csv row of one sample: ``truth`` its instance label map, ``mask`` the
    predicted binary mask (the pixel metrics use it as is; the instance metrics use the
    instances extracted from it)."""
    if mask.shape != truth.shape:
        raise DataError(f"sample {sample_id}: prediction {mask.shape} differs from truth {truth.shape}")
    c = confusion(mask, truth > 0)
    stats = match(truth, instances_from_mask(mask, instances, min_object_size))
    return {"id": sample_id, "source_id": source_id, "height": truth.shape[0],
            "width": truth.shape[1], "tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn,
            **scores(c), **instance_scores(stats), **stats.as_dict()}


def summarize(rows: list[dict]) -> dict:
    """pooled, per_image_mean, dataset_level and metric_info of per_image.csv rows."""
    if not rows:
        raise DataError("no samples to score")
    counts = [Counts(r["tp"], r["fp"], r["tn"], r["fn"]) for r in rows]
    stats = [InstanceStats(**{k: r[k] for k in STAT_NAMES}) for r in rows]
    names = METRIC_NAMES + INSTANCE_METRIC_NAMES
    return {
        "pooled": pooled(counts),
        "per_image_mean": {k: float(np.mean([r[k] for r in rows])) for k in names},
        "dataset_level": dataset_scores(stats),
        "metric_info": {k: METRIC_INFO[k] for k in names},
    }


def _safe_id(sample_id: str) -> str:
    if not sample_id or sample_id.startswith((".", "_")) or "/" in sample_id or "\\" in sample_id:
        raise DataError(f"sample id {sample_id!r} cannot name a prediction file")
    return sample_id


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG")


def _load_mask_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except Exception as e:
        raise DataError(f"{path} cannot be read: {e}") from None
    if arr.ndim != 2 or arr.dtype != np.uint8 or not np.isin(arr, (0, 255)).all():
        raise DataError(f"{path} is not a 0/255 8-bit mask")
    return arr == 255


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete directory ``tmp`` at ``final`` (the old one, if any, goes)."""
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _clear_stale(run_dir: Path) -> None:
    """Temporary directories a killed evaluation left behind."""
    for name in (PREDICTIONS, PROBABILITIES):
        for stale in list(run_dir.glob(f".{name}.tmp-*")) + list(run_dir.glob(f".{name}.old-*")):
            shutil.rmtree(stale, ignore_errors=True)


def _load_run(run_dir: Path) -> tuple[RunConfig, dict, list[str], PreparedDataset]:
    cfg = RunConfig.from_dict(read_run_json(run_dir / "config.json", "not a run directory"))
    train_done = read_run_json(run_dir / "train_done.json", "the run has not finished training")
    split = load_split(cfg.splits_dir, cfg.dataset, cfg.seed)
    test_ids = list(split.get("test") or [])
    if not test_ids:
        raise DataError(f"the split of {cfg.dataset} seed {cfg.seed} has no test samples")
    dataset = PreparedDataset(Path(cfg.data_dir) / "prepared" / cfg.dataset)
    return cfg, train_done, test_ids, dataset


def source_id(dataset: PreparedDataset, sample_id: str) -> str:
    """The source image of a sample as the manifest records it (tiles: the image they were cut
    from), else the sample's own id."""
    return str(dataset.by_id.get(sample_id, {}).get("image") or sample_id)


def _write_results(run_dir: Path, cfg: RunConfig, train_done: dict, rows: list[dict],
                   inference: dict, evaluate_opts: dict, metrics_seconds: float) -> dict:
    result = summarize(rows)
    result["meta"] = {
        "dataset": cfg.dataset, "method": cfg.method, "seed": cfg.seed,
        "ratio": train_done.get("ratio", cfg.ratio),  # FullSup trains at 1 whatever the run says
        "n_test": len(rows),
        "evaluate": evaluate_opts,
        "config": cfg.to_dict(),
        "versions": versions(),
        "device": {"eval": inference.get("device"), "eval_name": inference.get("device_name"),
                   "train": train_done.get("device")},
        "weights": train_done.get("weights_info"),
        "execution": {"train": train_done.get("execution"), "eval": inference.get("execution")},
        "checkpoint": inference.get("checkpoint"),
        "timings": {"train": train_done.get("timings"),
                    "eval_seconds": inference.get("eval_seconds"),
                    "metrics_seconds": metrics_seconds},
        "train_done": train_done,
    }
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    write_atomic(run_dir / "per_image.csv", buf.getvalue())
    write_json_atomic(run_dir / "metrics.json", result)
    return result


def _score_rows(items: Iterable[tuple[str, np.ndarray, np.ndarray]], dataset: PreparedDataset,
                instances: str, min_object_size: int) -> list[dict]:
    return [score_sample(i, source_id(dataset, i), truth, mask, instances, min_object_size)
            for i, truth, mask in items]


def evaluate_run(run_dir: Path, device: str | None = None, instances: str = DEFAULT_INSTANCES,
                 min_object_size: int = DEFAULT_MIN_OBJECT_SIZE) -> dict:
    """Evaluate ``run_dir`` on its test split and save its predictions; ``device`` overrides the
    run's configured one; ``instances``/``min_object_size``: :mod:`semibench.evaluate.instances`."""
    check_instance_options(instances, min_object_size)
    run_dir = Path(run_dir)
    cfg, train_done, test_ids, dataset = _load_run(run_dir)
    for i in test_ids:
        _safe_id(i)
    dev = resolve_device(device or cfg.device)
    model, ckpt_info = load_inference_model(run_dir, cfg)

    _clear_stale(run_dir)
    tag = uuid.uuid4().hex[:8]
    tmp_pred, tmp_prob = run_dir / f".{PREDICTIONS}.tmp-{tag}", run_dir / f".{PROBABILITIES}.tmp-{tag}"
    try:
        tmp_pred.mkdir()
        tmp_prob.mkdir()
        t0 = time.perf_counter()
        saved = []
        ex = resolve_execution(cfg.train, dev)
        if ex.channels_last:
            model.to(memory_format=torch.channels_last)
        for s, mask, prob in predict_samples(model, dataset, test_ids, cfg.train.input_size,
                                             cfg.train.eval_batch_size, dev, ex.autocast()):
            m = mask.cpu().numpy()
            _save_png(tmp_pred / f"{s.id}.png", m.astype(np.uint8) * 255)
            _save_png(tmp_prob / f"{s.id}.png",
                      torch.round(prob * 255).clamp(0, 255).to(torch.uint8).cpu().numpy())
            saved.append((s.id, s.label, m))
        inference = {"device": str(dev), "device_name": device_name(dev), "checkpoint": ckpt_info,
                     "execution": {"precision": ex.precision, "channels_last": ex.channels_last},
                     "eval_seconds": time.perf_counter() - t0, "n": len(saved)}
        (tmp_pred / INFERENCE_INFO).write_text(json.dumps(inference, indent=1) + "\n")
        (run_dir / "metrics.json").unlink(missing_ok=True)  # stale until the new one is written
        _replace_dir(tmp_prob, run_dir / PROBABILITIES)
        _replace_dir(tmp_pred, run_dir / PREDICTIONS)
    finally:
        shutil.rmtree(tmp_pred, ignore_errors=True)
        shutil.rmtree(tmp_prob, ignore_errors=True)
    t1 = time.perf_counter()
    rows = _score_rows(saved, dataset, instances, min_object_size)
    opts = {"instances": instances, "min_object_size": min_object_size, "from": "model"}
    return _write_results(run_dir, cfg, train_done, rows, inference, opts, time.perf_counter() - t1)


def rescore_run(run_dir: Path, instances: str = DEFAULT_INSTANCES,
                min_object_size: int = DEFAULT_MIN_OBJECT_SIZE) -> dict:
    """Recompute ``per_image.csv`` and ``metrics.json`` from ``predictions/`` (no model, no GPU)."""
    check_instance_options(instances, min_object_size)
    run_dir = Path(run_dir)
    cfg, train_done, test_ids, dataset = _load_run(run_dir)
    pred_dir = run_dir / PREDICTIONS
    missing = [i for i in test_ids if not (pred_dir / f"{_safe_id(i)}.png").is_file()]
    if missing:
        raise DataError(f"{pred_dir}: no saved prediction for {len(missing)} of {len(test_ids)} "
                        f"test samples (e.g. {missing[0]}); run `semibench evaluate --run {run_dir}` "
                        "without --metrics-only first")
    info_path = pred_dir / INFERENCE_INFO
    inference = read_run_json(info_path, "saved predictions without their record") \
        if info_path.exists() else {}
    t1 = time.perf_counter()
    rows = _score_rows(((i, dataset.load(i).label, _load_mask_png(pred_dir / f"{i}.png"))
                        for i in test_ids), dataset, instances, min_object_size)
    opts = {"instances": instances, "min_object_size": min_object_size, "from": "predictions"}
    return _write_results(run_dir, cfg, train_done, rows, inference, opts, time.perf_counter() - t1)
