"""One reader for every report step: run directories -> tidy pandas frames.

Input contract (``semibench/evaluate/score.py``): each run directory holds ``metrics.json``
(``per_image_mean``, ``pooled``, optional ``dataset_level``, ``metric_info``, ``meta``),
``per_image.csv`` (one row per test sample; ``source_id`` names the source image, e.g. the
MoNuSeg image a tile was cut from), ``train.jsonl`` (``train`` and ``epoch`` events) and optionally
``predictions/<id>.png``. The metric list is data: it comes from ``metric_info``; runs written
before it existed fall back to the five pixel metrics.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from semibench.errors import ConfigError, DataError
from semibench.layout import RUN_PATH, run_key
from semibench.registry import METHODS

CONVENTIONS = ("per_image_mean", "pooled")
RUN_KEYS = ["dataset", "method", "ratio", "seed"]
#: metric_info of runs written before evaluate.py recorded it
FALLBACK_METRIC_INFO = {
    "dice": {"abbrev": "DC", "kind": "pixel", "higher_is_better": True},
    "jaccard": {"abbrev": "JC", "kind": "pixel", "higher_is_better": True},
    "accuracy": {"abbrev": "ACC", "kind": "pixel", "higher_is_better": True},
    "specificity": {"abbrev": "SP", "kind": "pixel", "higher_is_better": True},
    "sensitivity": {"abbrev": "SE", "kind": "pixel", "higher_is_better": True},
}


@dataclass
class Results:
    """Everything the report needs, as tidy frames.

    runs:      dataset, method, ratio, seed, convention, metric, value (one row per run x metric
               x convention; ``dataset_level`` is a third convention when present)
    per_image: dataset, method, ratio, seed, id, source_id, then the per-sample metric columns
    epochs:    dataset, method, ratio, seed, epoch, plus one column per epoch-event field
               (``loss_<name>``, ``val_dice``, ...)
    metrics:   name -> {"abbrev", "kind", "higher_is_better"}, in the order of the first run
    run_dirs:  (dataset, method, ratio, seed) -> run directory
    selected:  (dataset, method, ratio, seed) -> (selected epoch, train.unsup_start_epoch,
               unlabeled images available, unlabeled images per training step: 0 if it never
               loads one), for runs whose metrics.json meta records them
    left_out:  (convention, metric, message) for each metrics.json value that is NaN, ±inf or
               null: that run is left out of its cell for that value, and the tables say so
    provenance: (dataset, method, ratio, seed) -> {train_minutes, eval_seconds, device, threads,
               weights}, what metrics.json meta records (None where a field is absent)
    """
    runs: pd.DataFrame
    per_image: pd.DataFrame
    epochs: pd.DataFrame
    metrics: dict = field(default_factory=dict)
    run_dirs: dict = field(default_factory=dict)
    left_out: list = field(default_factory=list)
    selected: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def abbrev(self, metric: str) -> str:
        return self.metrics.get(metric, {}).get("abbrev", metric)

    def higher_is_better(self, metric: str) -> bool:
        return bool(self.metrics.get(metric, {}).get("higher_is_better", True))


def coordinates(doc: dict, path: Path) -> dict:
    """dataset / method / ratio / seed from the run metadata, else from the path
    (``.../<dataset>/<method>/r<k>/seed<S>/metrics.json``)."""
    for source in (doc.get("meta"), doc.get("config"), doc):
        if isinstance(source, dict) and all(k in source for k in RUN_KEYS):
            c = {k: source[k] for k in RUN_KEYS}
            break
    else:
        match = re.search(RUN_PATH.pattern + r"/[^/]+$", Path(path).as_posix())
        if not match:
            raise DataError(f"{path}: cannot tell its dataset/method/ratio/seed (no run metadata "
                            "inside, and the path is not .../<dataset>/<method>/r<k>/seed<S>/metrics.json)")
        c = match.groupdict()
    return {"dataset": str(c["dataset"]), "method": str(c["method"]), "ratio": int(c["ratio"]),
            "seed": int(c["seed"])}


def _load_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"metrics file {path} not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"metrics file {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise DataError(f"metrics file {path} does not hold a JSON object")
    return doc


def metric_info(doc: dict) -> dict:
    info = doc.get("metric_info")
    if not isinstance(info, dict) or not info:
        return dict(FALLBACK_METRIC_INFO)
    return {name: {"abbrev": str(v.get("abbrev", name)), "kind": str(v.get("kind", "pixel")),
                   "higher_is_better": bool(v.get("higher_is_better", True))}
            for name, v in info.items()}


def _number(block: dict, key: str, path: Path, where: str) -> float | None:
    """The value, or None when it is NaN, ±inf or null (a value the run could not compute: left
    out with a note). A missing key or a string is a broken file."""
    if key not in block:
        raise DataError(f"{path}: {where} is missing")
    value = block[key]
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{path}: {where} is not a number ({value!r})")
    return float(value)


def _selection(doc: dict, method: str):
    """(selected epoch, unsupervised start epoch, unlabeled images available, unlabeled images it
    trained on per step) from metrics.json meta, or None where the run does not record them."""
    meta = doc.get("meta") or {}
    try:
        return (int(meta["checkpoint"]["epoch"]), int(meta["config"]["train"]["unsup_start_epoch"]),
                int(meta["train_done"]["n_unlabeled"]), _unlabeled_per_step(meta["train_done"], method))
    except (KeyError, TypeError, ValueError):
        return None


def _provenance(doc: dict) -> dict:
    """How the run was made, as its metrics.json meta records it: training wall time (with its
    validation), evaluation time, training device and threads, the weights it started from."""
    meta = doc.get("meta") or {}
    timings = meta.get("timings") or {}
    train_s = (timings.get("train") or {}).get("total_s")
    device = (meta.get("device") or {}).get("train") or {}
    weights = meta.get("weights") or {}
    used = sorted({s.get("used") for s in weights.get("segmenters") or [] if s.get("used")})
    return {"train_minutes": train_s / 60 if isinstance(train_s, (int, float)) else None,
            "eval_seconds": timings.get("eval_seconds"),
            "device": device.get("name") if isinstance(device, dict) else None,
            "threads": device.get("threads") if isinstance(device, dict) else None,
            "weights": ", ".join(used) or None}


def _unlabeled_per_step(done: dict, method: str) -> int:
    """train_done.json's ``unlabeled_per_step``; records written before it existed: 0 for a method
    registered here without unlabeled views (SupOnly), else the split's unlabeled count."""
    if "unlabeled_per_step" in done:
        return int(done["unlabeled_per_step"])
    try:
        if METHODS.get(method).unlabeled_views is None:
            return 0
    except ConfigError:
        pass
    return int(done["n_unlabeled"])


def _read_per_image(path: Path, run: dict, metrics: dict) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"id": str, "source_id": str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty") from None
    if "id" not in frame.columns:
        raise DataError(f"{path}: no 'id' column")
    if "source_id" not in frame.columns:  # runs before source ids: every sample is its own image
        frame["source_id"] = frame["id"]
    if frame["id"].duplicated().any():
        raise DataError(f"{path}: sample id {frame['id'][frame['id'].duplicated()].iloc[0]!r} twice")
    keep = ["id", "source_id"] + [c for c in ("height", "width", "tp", "fp", "tn", "fn") if c in frame]
    keep += [m for m in metrics if m in frame.columns]
    frame = frame[keep].copy()
    for k in RUN_KEYS[::-1]:
        frame.insert(0, k, run[k])
    return frame


def _read_epochs(path: Path, run: dict) -> list[dict]:
    rows = []
    for _n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash: the rest is still useful
            continue
        if not isinstance(event, dict) or event.get("event") != "epoch":
            continue
        row = dict(run, epoch=event.get("epoch"))
        for k, v in event.items():
            if k == "losses" and isinstance(v, dict):
                row.update({f"loss_{name}": x for name, x in v.items()})
            elif k not in ("event", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                row[k] = v
        rows.append(row)
    return rows


def read_runs(metric_files: Iterable[Path]) -> Results:
    """Read every run of ``metric_files`` (its per_image.csv and train.jsonl beside it, when
    present). Two files for one (dataset, method, ratio, seed) are an error."""
    run_rows, per_image, epoch_rows, left_out = [], [], [], []
    metrics: dict = {}
    run_dirs: dict = {}
    selected: dict = {}
    provenance: dict = {}
    for path in metric_files:
        path = Path(path)
        doc = _load_json(path)
        run = coordinates(doc, path)
        key = tuple(run[k] for k in RUN_KEYS)
        if key in run_dirs:
            raise DataError(f"two metrics files for {run_key(*key)}: "
                            f"{run_dirs[key] / 'metrics.json'} and {path}")
        run_dirs[key] = path.parent
        selection = _selection(doc, run["method"])
        if selection is not None:
            selected[key] = selection
        provenance[key] = _provenance(doc)
        info = metric_info(doc)
        for name, v in info.items():
            metrics.setdefault(name, v)
        for convention in CONVENTIONS:
            block = doc.get(convention)
            if not isinstance(block, dict):
                raise DataError(f"{path}: no {convention!r} section")
            for m in info:
                if info[m]["kind"] == "pixel" or m in block:
                    value = _number(block, m, path, f"{convention}.{m}")
                    if value is None:
                        left_out.append((convention, m, f"{run_key(*key)}: "
                                         f"metrics.json {convention}.{m} is {block[m]!r}, left "
                                         f"out of its cell"))
                        continue
                    run_rows.append(dict(run, convention=convention, metric=m, value=value))
        for m, v in (doc.get("dataset_level") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                run_rows.append(dict(run, convention="dataset_level", metric=m, value=float(v)))
        if (path.parent / "per_image.csv").exists():
            per_image.append(_read_per_image(path.parent / "per_image.csv", run, info))
        if (path.parent / "train.jsonl").exists():
            epoch_rows += _read_epochs(path.parent / "train.jsonl", run)
    if not run_dirs:
        raise DataError("no metrics files to report on")
    runs = pd.DataFrame(run_rows, columns=RUN_KEYS + ["convention", "metric", "value"])
    images = (pd.concat(per_image, ignore_index=True) if per_image
              else pd.DataFrame(columns=RUN_KEYS + ["id", "source_id"]))
    epochs = pd.DataFrame(epoch_rows) if epoch_rows else pd.DataFrame(columns=RUN_KEYS + ["epoch"])
    return Results(runs=runs, per_image=images, epochs=epochs, metrics=metrics, run_dirs=run_dirs,
                   left_out=left_out, selected=selected, provenance=provenance)
