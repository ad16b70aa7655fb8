"""Table 1: test-set metrics per dataset × label ratio × method, mean and spread over seeds.

Convention (what one run contributes): by default each run's **per-image mean**
(``metrics.json["per_image_mean"]``: every metric computed on each test sample, then averaged),
which weighs every test image equally, as the per-image evaluation of the paper's competitors
does; ``convention="pooled"`` uses ``metrics.json["pooled"]`` instead (confusion counts summed
over the test set, so large images weigh more). Across seeds the table gives the mean and the
**sample** standard deviation (ddof = 1); with one seed the spread is unknown, so ``std`` is left
empty in the CSV (NaN when read back) and omitted in the Markdown.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import DataError

METRICS = ("dice", "jaccard", "accuracy", "specificity", "sensitivity")
ABBREVIATIONS = {"dice": "DC", "jaccard": "JC", "accuracy": "ACC", "specificity": "SP",
                 "sensitivity": "SE"}
CONVENTIONS = ("per_image_mean", "pooled")
COLUMNS = ("dataset", "ratio", "method", "metric", "mean", "std", "n_seeds")
_RUN_PATH = re.compile(r"(?P<dataset>[^/]+)/(?P<method>[^/]+)/r(?P<ratio>\d+)/seed(?P<seed>\d+)/[^/]+$")


@dataclass(frozen=True)
class RunMetrics:
    dataset: str
    method: str
    ratio: int
    seed: int
    values: dict  # metric name -> float


def _coordinates(doc: dict, path: Path) -> dict:
    """dataset / method / ratio / seed from the file's run metadata, else from its path
    (``.../<dataset>/<method>/r<k>/seed<S>/metrics.json``)."""
    keys = ("dataset", "method", "ratio", "seed")
    for source in (doc.get("meta"), doc.get("config"), doc):
        if isinstance(source, dict) and all(k in source for k in keys):
            return {k: source[k] for k in keys}
    match = _RUN_PATH.search(Path(path).as_posix())
    if match:
        return match.groupdict()
    raise DataError(f"{path}: cannot tell its dataset/method/ratio/seed (no run config inside, "
                    "and the path is not .../<dataset>/<method>/r<k>/seed<S>/metrics.json)")


def read_metrics(path: Path, convention: str = "per_image_mean") -> RunMetrics:
    if convention not in CONVENTIONS:
        raise DataError(f"unknown convention {convention!r}; known: {', '.join(CONVENTIONS)}")
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"metrics file {path} not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"metrics file {path} is not valid JSON: {e}") from None
    block = doc.get(convention)
    if not isinstance(block, dict):
        raise DataError(f"{path}: no {convention!r} section")
    values = {}
    for m in METRICS:
        v = block.get(m)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(f"{path}: {convention}.{m} is missing or not a finite number ({v!r})")
        values[m] = float(v)
    c = _coordinates(doc, path)
    return RunMetrics(dataset=str(c["dataset"]), method=str(c["method"]), ratio=int(c["ratio"]),
                      seed=int(c["seed"]), values=values)


def summarize(runs: Iterable[RunMetrics]) -> list[dict]:
    """One row per dataset × ratio × method × metric. Datasets and methods keep the order in
    which they first appear; ratios go from the fewest labels (largest k) to full supervision."""
    groups: dict[tuple, list[RunMetrics]] = {}
    seen: set[tuple] = set()
    datasets: list[str] = []
    methods: list[str] = []
    for r in runs:
        key = (r.dataset, r.method, r.ratio, r.seed)
        if key in seen:
            raise DataError(f"two metrics files for {r.dataset}/{r.method}/r{r.ratio}/seed{r.seed}")
        seen.add(key)
        datasets += [r.dataset] if r.dataset not in datasets else []
        methods += [r.method] if r.method not in methods else []
        groups.setdefault((r.dataset, r.ratio, r.method), []).append(r)
    order = sorted(groups, key=lambda g: (datasets.index(g[0]), -g[1], methods.index(g[2])))
    rows = []
    for dataset, ratio, method in order:
        group = sorted(groups[(dataset, ratio, method)], key=lambda r: r.seed)
        for m in METRICS:
            xs = [r.values[m] for r in group]
            rows.append(dict(dataset=dataset, ratio=ratio, method=method, metric=m,
                             mean=statistics.fmean(xs),
                             std=statistics.stdev(xs) if len(xs) > 1 else math.nan,
                             n_seeds=len(xs)))
    return rows


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def render_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:  # floats at full precision (repr); an unknown std stays empty
        writer.writerow([r["dataset"], r["ratio"], r["method"], r["metric"], repr(r["mean"]),
                         "" if math.isnan(r["std"]) else repr(r["std"]), r["n_seeds"]])
    return buf.getvalue()


def render_markdown(rows: list[dict], convention: str) -> str:
    what = {"per_image_mean": "the per-image mean over the test set (`per_image_mean`)",
            "pooled": "pooled over the test set, confusion counts summed (`pooled`)"}[convention]
    out = ["# Table 1: segmentation of the test sets", "",
           f"Each run contributes {what}. Cells: mean ± sample standard deviation (ddof = 1) over "
           "seeds; n = number of seeds (no spread with one seed). Labeled 1/k: 1/k of the "
           "training samples carry labels.", ""]
    by_dataset: dict[str, dict[tuple, dict]] = {}
    for r in rows:
        by_dataset.setdefault(r["dataset"], {}).setdefault((r["ratio"], r["method"]), {})[r["metric"]] = r
    for dataset, lines in by_dataset.items():
        out += [f"## {dataset}", "",
                "| labeled | method | " + " | ".join(ABBREVIATIONS[m] for m in METRICS) + " | n |",
                "|---|---|" + "---|" * len(METRICS) + "---|"]
        for (ratio, method), cell in lines.items():
            values = [f"{cell[m]['mean']:.4f}" if math.isnan(cell[m]["std"])
                      else f"{cell[m]['mean']:.4f} ± {cell[m]['std']:.4f}" for m in METRICS]
            out.append(f"| 1/{ratio} | {method} | " + " | ".join(values)
                       + f" | {cell[METRICS[0]]['n_seeds']} |")
        out.append("")
    return "\n".join(out)


def write_table1(metric_files: Iterable[Path], out_dir: Path,
                 convention: str = "per_image_mean") -> list[Path]:
    """Read run metrics files, write ``table1.csv`` and ``table1.md`` into ``out_dir``
    (each written to a temporary name first, then renamed); return their paths."""
    runs = [read_metrics(Path(f), convention) for f in metric_files]
    if not runs:
        raise DataError("no metrics files to tabulate")
    rows = summarize(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "table1.csv", out_dir / "table1.md"
    _atomic_write(csv_path, render_csv(rows))
    _atomic_write(md_path, render_markdown(rows, convention))
    return [csv_path, md_path]


def read_table1(path: Path) -> list[dict]:
    """Read table1.csv back (``std`` NaN where it was left empty)."""
    with open(path, newline="") as f:
        return [dict(r, ratio=int(r["ratio"]), mean=float(r["mean"]),
                     std=float(r["std"]) if r["std"] else math.nan, n_seeds=int(r["n_seeds"]))
                for r in csv.DictReader(f)]
