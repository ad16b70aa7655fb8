"""Where the workflow's files live, said once: the rules, the CLI, ``semibench status``, the data
loader and the report import these, and nothing else spells a run or split path.

    <runs_dir>/<RUN_DIR>/               one run: checkpoint.pt, best.pt, train.jsonl, metrics.json…
    <logs_dir>/<step>/<RUN_DIR>.log     its job logs (step: train, evaluate)
    <splits_dir>/<SPLIT_KEY>.json       a dataset's split for one seed
    <logs_dir>/split/<SPLIT_KEY>.log    its job log

``RUN_DIR`` is also the run's key in messages (``dsb2018/cdcl/r32/seed0``).
"""
from __future__ import annotations

import re
from pathlib import Path

RUNS_DIR, LOGS_DIR, SPLITS_DIR = "results/runs", "logs", "results/splits"
RUN_DIR = "{dataset}/{method}/r{ratio}/seed{seed}"
RUN_DIR_GLOB = "*/*/r*/seed*"
SPLIT_KEY = "{dataset}/seed{seed}"
SPLIT_FILE = SPLIT_KEY + ".json"
#: a run directory inside a path, for files that do not carry their run's metadata
RUN_PATH = re.compile(r"(?P<dataset>[^/]+)/(?P<method>[^/]+)/r(?P<ratio>\d+)/seed(?P<seed>\d+)")


def run_key(dataset: str, method: str, ratio: int, seed: int) -> str:
    return RUN_DIR.format(dataset=dataset, method=method, ratio=ratio, seed=seed)


def run_dir(dataset: str, method: str, ratio: int, seed: int,
            runs_dir: str | Path = RUNS_DIR) -> Path:
    return Path(runs_dir) / run_key(dataset, method, ratio, seed)


def log_path(step: str, dataset: str, method: str, ratio: int, seed: int,
             logs_dir: str | Path = LOGS_DIR) -> Path:
    return Path(logs_dir) / step / f"{run_key(dataset, method, ratio, seed)}.log"


def split_path(dataset: str, seed: int, splits_dir: str | Path = SPLITS_DIR) -> Path:
    return Path(splits_dir) / SPLIT_FILE.format(dataset=dataset, seed=seed)
