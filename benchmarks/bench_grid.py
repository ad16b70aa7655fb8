"""Predicted wall time of a configured grid on G GPUs with k jobs each (not a test).

Inputs:

- measured step times: a ``bench_train.py --json`` file (a list of rows), or ``{"rows": [...],
  "jobs_per_gpu_speedup": {...}, "source": ...}`` (e.g. ``benchmarks/h200_reference.json``,
  transcribed from docs/results-gpu-dsb.md). Rows are taken at the config's backbone and input
  size on CUDA (``--backbone``/``--size``/``--device``/``--variant`` override);
- each run's iteration count: the runs of the workflow config (``semibench.workflow.grid.all_runs``:
  Table 1 and the ablation), the split files under its ``splits_dir`` and its ``train`` section
  (batches, ``iters_per_epoch``, epochs), computed as the engine computes them;
- how k jobs share one GPU: the total throughput of k jobs over one job's, S(k)
  (``bench_share.py --json`` output, the file's ``jobs_per_gpu_speedup``, or ``--speedup k=S``).
  Each of k jobs then runs at S(k)/k of its own speed.

A method without a measured step time is priced at SupOnly's step time times the ratio of its
DenseUNet passes to SupOnly's, each image weighted by its pixels (``bench_train.pass_costs`` in
one step of a tiny network at the configured batch; the ratio depends on neither the backbone nor
the size), and marked ``est``. The heads outside the DenseUNets are left out: on DenseNet-161
they are a few per cent of a step (CCT's decoders, GCT's flaw detector). Each run
also pays ``--per-run-s`` (start, data loading, compilation, the test-set evaluation; default 60 s)
and ``--val-s`` per epoch (validation; default 0.5 s).

The wall time is the makespan of the runs over G×k slots, longest first (a lower bound on what
a scheduler that knows the run times reaches; Snakemake starts jobs in its own order), printed
beside the perfect-packing bound Σ time / (G·S(k)).

    python benchmarks/bench_grid.py --steps benchmarks/h200_reference.json --gpus 4 --jobs-per-gpu 1 4
    python benchmarks/bench_grid.py --steps rows.json --share share.json --gpus 1 4 --jobs-per-gpu 1 2 4 6
"""
from __future__ import annotations

import argparse
import heapq
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_steps(path: Path) -> tuple[list[dict], dict[int, float], str]:
    """Rows, the jobs-per-GPU speed-ups in the file (if any) and its source note."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return data, {}, str(path)
    speedup = {int(k): float(v) for k, v in (data.get("jobs_per_gpu_speedup") or {}).items()}
    return list(data["rows"]), speedup, str(data.get("source", path))


def load_share(path: Path) -> dict[int, float]:
    """S(k) from a ``bench_share.py --json`` file: total img/s of k jobs over one job's."""
    data = json.loads(Path(path).read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    total = {int(r["jobs"]): float(r["total_img_per_s"]) for r in rows if r.get("total_img_per_s")}
    if 1 not in total:
        raise SystemExit(f"{path}: no 1-job row to compare the others with")
    return {k: v / total[1] for k, v in total.items()}


def step_seconds(rows: list[dict], backbone: str, size: int, device: str, variant: str | None) -> dict[str, float]:
    """Measured seconds per step by method, for one configuration (the last row wins)."""
    out = {}
    for r in rows:
        if "error" in r or r.get("backbone") != backbone or int(r.get("size", 0)) != size:
            continue
        if not str(r.get("device", "")).startswith(device):
            continue
        if variant is not None and r.get("variant", "defaults") != variant:
            continue
        out[r["method"]] = float(r["step_ms"]) / 1000
    return out


def pass_ratios(methods: list[str], batch_labeled: int, batch_unlabeled: int) -> dict[str, float]:
    """Pixel-weighted DenseUNet passes per step over SupOnly's (tiny backbone, 128², CPU: the
    ratio does not depend on the network or the size)."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_train import make_trainer, pass_costs

    torch.set_num_threads(1)
    out = {}
    for m in ["suponly"] + [m for m in methods if m != "suponly"]:
        tr = make_trainer(m, "tiny", 128, "cpu", batch_labeled, batch_unlabeled, 2)
        tr.method.train()
        out[m] = pass_costs(tr, 0)["pixel_pass_cost"]
    return {m: c / out["suponly"] for m, c in out.items()}


def run_iterations(config: dict) -> list[dict]:
    """Every run of the config with its iterations per epoch and epochs (as the engine counts)."""
    from semibench.data.loading import iterations_per_epoch, load_split, split_ids
    from semibench.registry import METHODS
    from semibench.workflow.grid import all_runs

    t = config.get("train") or {}
    bl, bu = int(t.get("batch_labeled", 8)), int(t.get("batch_unlabeled", 8))
    epochs = int(t.get("epochs", 80))
    splits_dir = REPO / config.get("splits_dir", "results/splits") \
        if not Path(config.get("splits_dir", "results/splits")).is_absolute() else Path(config["splits_dir"])
    runs = []
    for run in all_runs(config):
        ratio = getattr(METHODS.get(run.method), "fixed_ratio", None) or run.ratio
        lab, unl, _ = split_ids(load_split(splits_dir, run.dataset, run.seed), ratio)
        its = iterations_per_epoch(len(lab), len(unl), bl, bu, t.get("iters_per_epoch"))
        runs.append({"dataset": run.dataset, "method": run.method, "ratio": run.ratio, "seed": run.seed,
                     "iterations": its, "epochs": epochs})
    return runs


def makespan(durations: list[float], slots: int) -> float:
    """Longest-processing-time-first list scheduling over ``slots`` identical slots."""
    free = [0.0] * slots
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(free, free[0] + d)
    return max(free)


def predict(runs: list[dict], step_s: dict[str, float], gpus: int, k: int, speedup: float,
            per_run_s: float, val_s: float) -> dict:
    solo = [r["epochs"] * (r["iterations"] * step_s[r["method"]] + val_s) + per_run_s for r in runs]
    slow = k / speedup  # each of k sharing jobs runs at S(k)/k of its own speed
    return {"gpus": gpus, "jobs_per_gpu": k, "speedup": speedup,
            "single_gpu_hours": sum(solo) / 3600,
            "wall_hours": makespan([s * slow for s in solo], gpus * k) / 3600,
            "bound_hours": sum(solo) / (gpus * speedup) / 3600}


def _parse_speedups(items: list[str]) -> dict[int, float]:
    out = {}
    for item in items or []:
        k, _, s = item.partition("=")
        out[int(k)] = float(s)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=Path, required=True, help="bench_train JSON (or a reference file)")
    p.add_argument("--config", type=Path, nargs="*", default=[REPO / "config" / "config.yaml"],
                   help="workflow config files, merged in order (default config/config.yaml)")
    p.add_argument("--backbone", help="default: the config's train.backbone")
    p.add_argument("--size", type=int, help="default: the config's train.input_size")
    p.add_argument("--device", default="cuda")
    p.add_argument("--variant", help="bench_train variant of the rows (default: any)")
    p.add_argument("--share", type=Path, help="bench_share JSON: S(k) for k jobs per GPU")
    p.add_argument("--speedup", nargs="*", metavar="K=S", help="S(k) by hand, e.g. 4=2.2")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 4])
    p.add_argument("--jobs-per-gpu", type=int, nargs="+", default=[1])
    p.add_argument("--per-run-s", type=float, default=60.0)
    p.add_argument("--val-s", type=float, default=0.5, help="validation seconds per epoch")
    p.add_argument("--json", type=Path, help="also write the prediction here")
    args = p.parse_args(argv)

    from semibench.config import load_workflow_config
    config = load_workflow_config(args.config)
    t = config.get("train") or {}
    backbone, size = args.backbone or t.get("backbone", "densenet161"), args.size or int(t.get("input_size", 320))
    rows, speedups, source = load_steps(args.steps)
    if args.share:
        speedups.update(load_share(args.share))
    speedups.update(_parse_speedups(args.speedup))
    speedups.setdefault(1, 1.0)
    missing_k = [k for k in args.jobs_per_gpu if k not in speedups]
    if missing_k:
        raise SystemExit(f"no speed-up for {missing_k} jobs per GPU: give --share FILE or --speedup K=S")

    measured = step_seconds(rows, backbone, size, args.device, args.variant)
    if "suponly" not in measured:
        raise SystemExit(f"{args.steps}: no suponly row at {backbone} {size}² on {args.device}")
    runs = run_iterations(config)
    methods = sorted({r["method"] for r in runs})
    missing = [m for m in methods if m not in measured]
    step_s, how = dict(measured), {m: "measured" for m in measured}
    if missing:
        ratios = pass_ratios(missing, int(t.get("batch_labeled", 8)), int(t.get("batch_unlabeled", 8)))
        for m in missing:
            step_s[m] = measured["suponly"] * ratios[m]
            how[m] = f"est: {ratios[m]:.2f} x suponly passes"

    per_method = Counter()
    for r in runs:
        per_method[r["method"]] += r["epochs"] * r["iterations"]
    print(f"steps: {source} ({backbone} {size}², {args.device}); {len(runs)} runs, "
          f"{sum(per_method.values())} steps; + {args.per_run_s:.0f} s per run, {args.val_s} s validation per epoch")
    print(f"{'method':<14} {'runs':>5} {'steps':>9} {'ms/step':>8} {'GPU h':>7}  source")
    counts = Counter(r["method"] for r in runs)
    for m in methods:
        print(f"{m:<14} {counts[m]:>5} {per_method[m]:>9} {1000 * step_s[m]:>8.1f} "
              f"{per_method[m] * step_s[m] / 3600:>7.2f}  {how[m]}")
    out = []
    print(f"\n{'GPUs':>4} {'jobs/GPU':>8} {'S(k)':>6} {'1-GPU h':>8} {'wall h':>7} {'bound h':>8}")
    for g in args.gpus:
        for k in args.jobs_per_gpu:
            pr = predict(runs, step_s, g, k, speedups[k], args.per_run_s, args.val_s)
            out.append(pr)
            print(f"{g:>4} {k:>8} {pr['speedup']:>6.2f} {pr['single_gpu_hours']:>8.1f} {pr['wall_hours']:>7.1f} "
                  f"{pr['bound_hours']:>8.1f}")
    if args.json:
        args.json.write_text(json.dumps({"source": source, "backbone": backbone, "size": size,
                                         "step_s": step_s, "how": how, "runs": len(runs),
                                         "per_run_s": args.per_run_s, "val_s": args.val_s,
                                         "predictions": out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
