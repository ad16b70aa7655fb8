"""Where a configured grid stands: ``semibench status``.

Each run of the grid (:func:`semibench.workflow.grid.all_runs`, the workflow's own list) is read from its
run directory ``<runs_dir>/<dataset>/<method>/r<k>/seed<S>`` and its job logs
``<logs_dir>/{train,evaluate}/<dataset>/<method>/r<k>/seed<S>.log`` (:mod:`semibench.layout`).
The first state that applies wins:

- ``done``: ``metrics.json`` exists (evaluated);
- ``running``: a live local process runs ``semibench train``/``evaluate`` on this run directory
  (``/proc/*/cmdline``), or, with training unfinished, the run was last started on **another
  host** (``train_host.json``, written by ``semibench train``) and its ``train.jsonl`` changed
  within the last ``fresh_minutes``: a job on a shared file system whose process this host cannot
  see. A run started on this host with no live process is never running, however fresh its files
  (a ``kill -9`` leaves them fresh); a run without ``train_host.json`` counts as this host's;
- ``failed``: the tail of the run's newest job log names an error (a ``semibench: error:`` line or
  a Python exception line); the line is shown. A log older than the run's own files is stale (the
  run was restarted since) and ignored; with ``train_done.json`` only the evaluate log counts;
- ``trained``: ``train_done.json`` exists, not yet evaluated;
- ``interrupted``: ``checkpoint.pt`` or ``train.jsonl`` exists, no ``train_done.json``;
- ``missing``: none of these.

ETA (training only; evaluation is not counted). A run with its own ``train.jsonl`` train lines:
remaining iterations × images per step / img/s, where img/s is the mean of its last
:data:`RATE_LINES` train lines, plus the mean validation time of its finished epochs for each
remaining epoch. Remaining iterations are ``iterations_per_epoch × epochs`` minus the last logged
iteration (running) or minus the finished epochs (otherwise: a resumed run replays the cut epoch).
A run with no such lines is estimated from the total training time of the finished or running
runs of the same dataset and method, else of the same dataset (``basis`` says which), scaled by
its remaining fraction of epochs. The rest of the grid: the sum over all runs / ``jobs``.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from semibench.atomic import write_atomic
from semibench.errors import ConfigError
from semibench.layout import RUN_DIR_GLOB, log_path
from semibench.workflow.grid import Run, all_runs, check_schema

SCHEMA = "semibench.status/1"
HOST_FILE = "train_host.json"  # {"host": ..., "pid": ...} of the last `semibench train` on the run
STATES = ("done", "trained", "running", "interrupted", "failed", "missing")
RATE_LINES = 5  # train lines averaged for a run's current img/s
LOG_TAIL_BYTES = 64 * 1024
LOG_TAIL_LINES = 60
VERBS = {"train", "evaluate"}
_ERROR_LINE = re.compile(
    r"^(semibench: error: .*"
    r"|(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)(?::.*)?)$")


@dataclass
class RunStatus:
    dataset: str
    method: str
    ratio: int
    seed: int
    dir: str
    state: str = "missing"
    epochs_done: int = 0  # finished epochs (epoch lines in train.jsonl)
    epochs: int | None = None  # the run's total (config.json, else the workflow config)
    running: dict | None = None  # {"via": "process", "pid": N} | {"via": "train.jsonl", "age_s": s, "host": h}
    error: dict | None = None  # {"log": path, "line": the error line}
    remaining_s: float | None = None  # training seconds left (0 when trained or done)
    basis: str | None = None  # own | dataset+method | dataset | finished; None: no estimate
    # not in the JSON: what the peers' estimates are made of
    _total_s: float | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        d = asdict(self)
        del d["_total_s"]
        return d


# ---------------------------------------------------------------- reading a run directory

def read_jsonl(path: Path) -> list[dict]:
    """The JSON lines of ``path`` (a line cut by a kill is skipped); [] when absent."""
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def log_error(path: Path) -> str | None:
    """The last error line in the tail of a job log, or None."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = re.split(r"[\r\n]+", text)[-LOG_TAIL_LINES:]
    found = [line.rstrip() for line in lines if _ERROR_LINE.match(line.rstrip())]
    return found[-1] if found else None


def _images_per_step(config: Mapping, method: str) -> int | None:
    """As the engine counts them: the labeled batch plus each unlabeled batch the method draws."""
    train = config.get("train") or {}
    try:
        from semibench.registry import METHODS

        cls = METHODS.get(method)
        n_unlabeled = cls.unlabeled_batches if cls.unlabeled_views is not None else 0
        return int(train["batch_labeled"]) + n_unlabeled * int(train["batch_unlabeled"])
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------- live processes

def _option(argv: list[str], name: str) -> str | None:
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(name + "="):
            return token[len(name) + 1:]
    return None


def command_run_dir(argv: list[str], cwd: str) -> str | None:
    """The run directory a ``semibench train``/``evaluate`` command line works on, as an absolute
    real path (relative paths taken from the process's ``cwd``), or None for any other command."""
    for i, token in enumerate(argv[:-1]):
        is_semibench = os.path.basename(token) == "semibench" or (
            token == "-m" and argv[i + 1] == "semibench")
        if not is_semibench:
            continue
        j = i + 2 if token == "-m" else i + 1
        if j >= len(argv) or argv[j] not in VERBS:
            continue  # e.g. `semibench gpu-slot -- semibench train ...`: the inner one counts
        rest = argv[j + 1:]
        if argv[j] == "evaluate":
            target = _option(rest, "--run")
        else:
            target = _option(rest, "--out")
            if target is None:  # cmd_train's default
                parts = [_option(rest, k) for k in ("--dataset", "--method", "--ratio", "--seed")]
                if None in parts:
                    return None
                target = os.path.join("results/runs", Run(parts[0], parts[1], parts[2],
                                                          parts[3]).rel_dir())
        if target is None:
            return None
        return os.path.realpath(os.path.join(cwd, target))
    return None


def live_run_dirs(proc_root: Path = Path("/proc")) -> dict[str, int]:
    """{real run directory: pid} of the `semibench train`/`evaluate` processes on this host."""
    found: dict[str, int] = {}
    try:
        entries = list(proc_root.iterdir())
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile, or not ours to read
        argv = [a.decode("utf-8", errors="replace") for a in argv if a]
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            cwd = os.getcwd()
        run_dir = command_run_dir(argv, cwd)
        if run_dir is not None:
            found.setdefault(run_dir, int(entry.name))
    return found


# ---------------------------------------------------------------- one run

def _progress(status: RunStatus, run_dir: Path, default_epochs: int | None) -> None:
    """Epochs reached and the run's own ETA from its files (sets remaining_s/basis if it can)."""
    lines = read_jsonl(run_dir / "train.jsonl")
    config = _read_json(run_dir / "config.json") or {}
    done = _read_json(run_dir / "train_done.json")
    epoch_lines = [r for r in lines if r.get("event") == "epoch"]
    train_lines = [r for r in lines if r.get("event") == "train" and r.get("img_per_s")]
    epochs = (done or {}).get("epochs") or (config.get("train") or {}).get("epochs") or default_epochs
    status.epochs = int(epochs) if epochs else None
    status.epochs_done = int(epoch_lines[-1]["epoch"]) + 1 if epoch_lines else 0
    if done is not None:
        status.epochs_done = int(done.get("epochs", status.epochs_done))
        status.remaining_s, status.basis = 0.0, "finished"
        total = (done.get("timings") or {}).get("total_s")
        status._total_s = float(total) if total else None
        return
    per_epoch = None
    if epoch_lines and epoch_lines[-1].get("iteration"):
        per_epoch = int(epoch_lines[-1]["iteration"]) // (int(epoch_lines[-1]["epoch"]) + 1)
    elif (config.get("train") or {}).get("iters_per_epoch"):
        per_epoch = int(config["train"]["iters_per_epoch"])
    if not (train_lines and per_epoch and status.epochs):
        return
    ips = next((r["images_per_step"] for r in reversed(lines) if r.get("images_per_step")), None)
    ips = ips or _images_per_step(config, status.method)
    if not ips:
        return
    rate = sum(r["img_per_s"] for r in train_lines[-RATE_LINES:]) / len(train_lines[-RATE_LINES:])
    if status.state == "running":
        reached = max(int(r.get("iteration", 0)) for r in lines)
    else:  # a resumed run starts over at its last finished epoch
        reached = status.epochs_done * per_epoch
    val_s = [float(r["val_s"]) for r in epoch_lines if r.get("val_s") is not None]
    mean_val = sum(val_s) / len(val_s) if val_s else 0.0
    total_iters = per_epoch * status.epochs
    status.remaining_s = (max(0, total_iters - reached) * ips / rate
                          + max(0, status.epochs - status.epochs_done) * mean_val)
    status.basis = "own"
    status._total_s = total_iters * ips / rate + status.epochs * mean_val


def write_host_file(run_dir: Path) -> None:
    """Record which host trains ``run_dir`` (``semibench train`` calls this before training)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / HOST_FILE,
                 json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n")


def run_host(run_dir: Path) -> str | None:
    """The host that last started training the run (None: unknown, i.e. this host)."""
    host = (_read_json(run_dir / HOST_FILE) or {}).get("host")
    return host if isinstance(host, str) and host else None


def run_status(run: Run, runs_dir: Path, logs_dir: Path, live: Mapping[str, int], now: float,
               fresh_minutes: float, default_epochs: int | None = None,
               this_host: str | None = None) -> RunStatus:
    run_dir = runs_dir / run.rel_dir()
    status = RunStatus(run.dataset, run.method, run.ratio, run.seed, str(run_dir))
    has = {name: (run_dir / name).exists()
           for name in ("metrics.json", "train_done.json", "checkpoint.pt", "train.jsonl")}
    jsonl_mtime = _mtime(run_dir / "train.jsonl")
    pid = live.get(os.path.realpath(run_dir))
    host = run_host(run_dir)
    elsewhere = host is not None and host != (this_host or socket.gethostname())
    if has["metrics.json"]:
        status.state = "done"
    elif pid is not None:
        status.state, status.running = "running", {"via": "process", "pid": pid}
    elif (elsewhere and not has["train_done.json"] and jsonl_mtime is not None
          and now - jsonl_mtime <= fresh_minutes * 60):
        status.state = "running"
        status.running = {"via": "train.jsonl", "age_s": round(max(0.0, now - jsonl_mtime), 1),
                          "host": host}
    else:
        status.error = _failure(run, run_dir, logs_dir, has["train_done.json"])
        if status.error is not None:
            status.state = "failed"
        elif has["train_done.json"]:
            status.state = "trained"
        elif has["checkpoint.pt"] or has["train.jsonl"]:
            status.state = "interrupted"
    _progress(status, run_dir, default_epochs)
    if status.state == "done":
        status.remaining_s, status.basis = 0.0, "finished"
    return status


def _failure(run: Run, run_dir: Path, logs_dir: Path, trained: bool) -> dict | None:
    """The error of the run's last job, unless its log predates the run's own newer files."""
    if trained:  # training succeeded: only evaluation can have failed since
        log, newer_than = log_path("evaluate", *run, logs_dir=logs_dir), ("train_done.json",)
    else:
        log, newer_than = log_path("train", *run, logs_dir=logs_dir), ("train.jsonl", "checkpoint.pt")
    log_mtime = _mtime(log)
    if log_mtime is None:
        return None
    newest = max((m for m in (_mtime(run_dir / n) for n in newer_than) if m is not None),
                 default=None)
    if newest is not None and log_mtime + 1.0 < newest:
        return None  # the run was restarted after this log was written
    line = log_error(log)
    return {"log": str(log), "line": line} if line else None


# ---------------------------------------------------------------- the grid

def _estimate_missing(statuses: list[RunStatus]) -> None:
    """ETA of runs without their own basis, from the same dataset+method, else same dataset."""
    def mean_total(pred) -> float | None:
        totals = [s._total_s for s in statuses if s._total_s and pred(s)]
        return sum(totals) / len(totals) if totals else None

    for s in statuses:
        if s.remaining_s is not None:
            continue
        for basis, pred in (("dataset+method",
                             lambda o, s=s: o.dataset == s.dataset and o.method == s.method),
                            ("dataset", lambda o, s=s: o.dataset == s.dataset)):
            total = mean_total(pred)
            if total is not None:
                left = 1.0
                if s.epochs:
                    left = max(0, s.epochs - s.epochs_done) / s.epochs
                s.remaining_s, s.basis = total * left, basis
                break


def runs_on_disk(runs_dir: Path) -> list[str]:
    """Every run directory under ``runs_dir`` (``D/M/rK/seedS`` with any file), sorted."""
    found = [p for p in Path(runs_dir).glob(RUN_DIR_GLOB) if p.is_dir() and any(p.iterdir())]
    return sorted(p.relative_to(runs_dir).as_posix() for p in found)


def other_config_note(config_files: list[str], runs_dir: Path, found: list[str],
                      total: int) -> str:
    """What to say when none of the config's runs is on disk but others are: which config was
    read, and which config files beside it select the runs found."""
    read = " + ".join(config_files) if config_files else "the given config"
    matches = []
    base = Path(config_files[0]) if config_files else None
    if base is not None and base.parent.is_dir():
        from semibench.config import deep_merge, load_workflow_config

        base_cfg = load_workflow_config([base])
        for other in sorted(base.parent.glob("*.y*ml")):
            if other.resolve() == base.resolve():
                continue
            try:
                runs = all_runs(deep_merge(base_cfg, load_workflow_config([other])))
            except ConfigError:
                continue
            hits = len({r.rel_dir() for r in runs} & set(found))
            if hits:
                matches.append((hits, other.as_posix()))
    hint = ""
    if matches:
        hits, best = max(matches)
        hint = f" ({best} selects {hits} of them)"
    return (f"none of the {total} runs of {read} is under {runs_dir}, which holds {len(found)} "
            f"other run(s), e.g. {found[0]}: pass the config the workflow ran with, e.g. "
            f"`semibench status --config FILE` as in `snakemake --configfile FILE`{hint}")


def grid_status(config: Mapping, runs_dir: Path = Path("results/runs"), logs_dir: Path = Path("logs"),
                jobs: int = 1, fresh_minutes: float = 10.0, now: float | None = None,
                proc_root: Path = Path("/proc"), config_files: list[str] | None = None,
                this_host: str | None = None) -> dict:
    """The status report of the config's grid as a JSON-ready dict (schema in docs/status.md).
    ``config_files``: what the config was read from, named when it matches no run on disk."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if fresh_minutes < 0:
        raise ConfigError(f"--fresh-minutes must be >= 0, got {fresh_minutes}")
    check_schema(config)  # as the workflow's dry run does, before reading the grid
    runs = all_runs(config)
    now = time.time() if now is None else now
    live = live_run_dirs(proc_root)
    default_epochs = (config.get("train") or {}).get("epochs")
    statuses = [run_status(r, Path(runs_dir), Path(logs_dir), live, now, fresh_minutes,
                           default_epochs, this_host) for r in runs]
    _estimate_missing(statuses)
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    known = [s.remaining_s for s in statuses if s.remaining_s is not None]
    remaining = float(sum(known))
    note = None
    if counts["missing"] == len(statuses):
        found = runs_on_disk(Path(runs_dir))
        if found:
            note = other_config_note(list(config_files or []), Path(runs_dir), found, len(statuses))
    return {
        "schema": SCHEMA,
        "generated_at": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "runs_dir": str(runs_dir), "logs_dir": str(logs_dir),
        "config_files": list(config_files or []), "note": note,
        "total": len(statuses), "counts": counts,
        "eta": {"remaining_s": remaining, "jobs": jobs, "eta_s": remaining / jobs,
                "runs_without_estimate": len(statuses) - len(known)},
        "runs": [s.to_json() for s in statuses],
    }


# ---------------------------------------------------------------- plain text

def format_duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{m:02d}m"
    days, h = divmod(hours, 24)
    return f"{days}d{h:02d}h"


def _note(run: dict) -> str:
    if run["state"] == "failed":
        return f"{run['error']['log']}: {run['error']['line']}"
    if run["running"]:
        r = run["running"]
        return (f"process {r['pid']}" if r["via"] == "process"
                else f"train.jsonl written {format_duration(r['age_s'])} ago on {r['host']}")
    return ""


def format_text(report: Mapping) -> str:
    counts = report["counts"]
    lines = [f"{report['total']} runs: " + ", ".join(f"{counts[s]} {s}" for s in STATES)]
    rows = [r for r in report["runs"] if r["state"] != "done"]
    if rows:
        header = ("state", "dataset", "method", "ratio", "seed", "epoch", "ETA", "estimate", "note")
        table = [header] + [
            (r["state"], r["dataset"], r["method"], f"1/{r['ratio']}", str(r["seed"]),
             f"{r['epochs_done']}/{r['epochs'] if r['epochs'] else '?'}",
             format_duration(r["remaining_s"]), r["basis"] or "none", _note(r))
            for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
        lines.append("")
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
                  for row in table]
        lines = [line.rstrip() for line in lines]
    eta = report["eta"]
    unknown = eta["runs_without_estimate"]
    if unknown and not eta["remaining_s"]:
        text = (f"ETA for the rest of the grid: unknown ({unknown} run(s) left and none trained "
                f"or training to estimate from)")
    else:
        text = (f"ETA for the rest of the grid: {format_duration(eta['eta_s'])} "
                f"({format_duration(eta['remaining_s'])} of training / {eta['jobs']} "
                f"job{'s' if eta['jobs'] != 1 else ''}; evaluation not counted)")
        if unknown:
            text += f"; {unknown} run(s) without an estimate, not counted"
    lines += ["", text]
    if report.get("note"):
        lines += ["", f"note: {report['note']}"]
    return "\n".join(lines)

