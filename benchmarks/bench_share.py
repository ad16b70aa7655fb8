"""Total training throughput of k jobs sharing one GPU (not a test), for ``SEMIBENCH_JOBS_PER_GPU``.

For each k, k worker processes each build the engine's trainer (``bench_train.make_trainer``:
random in-memory data, the method's real step) on the same device, run their warm-up steps
(and compilation), wait for each other, then all train for the same wall-clock window; the total
img/s is the sum of the workers' images over the window. A small-batch DenseNet job leaves a big
GPU mostly idle (kernel launches, host work), so k jobs together can reach more than one.

The recommended jobs per GPU is the smallest k whose total reaches 95 % of the best total
measured (beyond it more jobs only add memory and contention).

    python benchmarks/bench_share.py --device cuda --method cdcl --jobs 1 2 4 6 --json share.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RECOMMEND_FRACTION = 0.95


def worker(args) -> int:
    from bench_train import make_trainer

    import semibench.train.progress as progress

    if args.threads:
        torch.set_num_threads(args.threads)
    barrier = Path(args.barrier)
    tr = make_trainer(args.method, args.backbone, args.size, args.device, args.batch[0], args.batch[1],
                      100000, args.variant)
    tr.method.train()
    dev = tr.device
    for i in range(args.warmup):
        tr.run_step(0, i)
    tr.read_losses()
    (barrier / f"ready{args.index}").write_text("")
    deadline = time.time() + args.ready_timeout
    while not (barrier / "go").exists():
        if time.time() > deadline:
            print(json.dumps({"index": args.index, "error": "the other workers never became ready"}), flush=True)
            return 1
        time.sleep(0.05)
    start = float((barrier / "go").read_text())
    while time.time() < start:
        time.sleep(0.005)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0, n, it = time.perf_counter(), 0, args.warmup
    while time.time() < start + args.seconds:
        tr.run_step(0, it)
        it, n = it + 1, n + 1
        if n % progress.LOG_EVERY == 0:
            tr.read_losses()
    tr.read_losses()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    print(json.dumps({"index": args.index, "steps": n, "seconds": dt, "images": n * tr.images_per_step,
                      "img_per_s": n * tr.images_per_step / dt, "peak_mem_mb": peak}), flush=True)
    return 0


def measure(k: int, args) -> dict:
    """k workers at once; their img/s summed over the common window."""
    with tempfile.TemporaryDirectory() as barrier:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--barrier", barrier,
               "--method", args.method, "--backbone", args.backbone, "--size", str(args.size),
               "--device", args.device, "--batch", *map(str, args.batch), "--variant", args.variant,
               "--warmup", str(args.warmup), "--seconds", str(args.seconds),
               "--ready-timeout", str(args.ready_timeout)] + (["--threads", str(args.threads)] if args.threads else [])
        env = dict(os.environ, SEMIBENCH_NUM_GPUS="0")  # no slot locks: all share this device
        procs = [subprocess.Popen(cmd + ["--index", str(i)], stdout=subprocess.PIPE, env=env, text=True)
                 for i in range(k)]
        deadline = time.time() + args.ready_timeout

        def ready() -> int:
            return sum((Path(barrier) / f"ready{i}").exists() for i in range(k))

        while ready() < k and time.time() < deadline and all(p.poll() in (None, 0) for p in procs):
            time.sleep(0.05)
        if ready() < k:  # a worker failed or is still warming up: no common window
            for p in procs:
                p.kill()
            codes = [p.wait() for p in procs]
            return {"jobs": k, "method": args.method, "variant": args.variant,
                    "error": f"only {ready()} of {k} workers got ready (exit codes {codes})"}
        (Path(barrier) / "go").write_text(repr(time.time() + 1.0))
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=args.ready_timeout + args.seconds + 60)
            lines = [x for x in out.splitlines() if x.startswith("{")]
            results.append(json.loads(lines[-1]) if lines else {"error": f"worker exited {p.returncode}"})
    errors = [r["error"] for r in results if "error" in r]
    row = {"jobs": k, "method": args.method, "backbone": args.backbone, "size": args.size,
           "device": args.device, "variant": args.variant, "workers": results}
    if errors:
        row["error"] = errors[0]
        return row
    total = sum(r["img_per_s"] for r in results)
    peaks = [r["peak_mem_mb"] for r in results if r.get("peak_mem_mb") is not None]
    row.update(total_img_per_s=total, per_job_img_per_s=total / k, peak_mem_mb_max=max(peaks) if peaks else None)
    return row


def recommend(rows: list[dict]) -> int | None:
    ok = [r for r in rows if r.get("total_img_per_s")]
    if not ok:
        return None
    best = max(r["total_img_per_s"] for r in ok)
    return min(r["jobs"] for r in ok if r["total_img_per_s"] >= RECOMMEND_FRACTION * best)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 4, 6])
    p.add_argument("--method", default="cdcl")
    p.add_argument("--backbone", default="densenet161")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs=2, default=(8, 8), metavar=("LABELED", "UNLABELED"))
    p.add_argument("--variant", default="defaults", help="bench_train variant (off | defaults | on)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seconds", type=float, default=15.0, help="the common timed window")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the warm-ups")
    p.add_argument("--threads", type=int, help="torch CPU threads per worker")
    p.add_argument("--json", type=Path, help="also write the rows here (after every k)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    print(f"{'jobs':>4} {'total img/s':>11} {'per job':>8} {'vs 1 job':>8} {'peak MB':>8}  "
          f"({args.method}, {args.backbone} {args.size}², {args.variant}, {args.device})", flush=True)
    rows: list[dict] = []
    for k in args.jobs:
        row = measure(k, args)
        rows.append(row)
        one = next((r for r in rows if r["jobs"] == 1 and r.get("total_img_per_s")), None)
        if "error" in row:
            print(f"{k:>4} FAILED: {row['error']}", flush=True)
        else:
            row["speedup_vs_1"] = row["total_img_per_s"] / one["total_img_per_s"] if one else None
            vs = f"{row['speedup_vs_1']:>8.2f}" if one else f"{'-':>8}"
            peak = f"{row['peak_mem_mb_max']:>8.0f}" if row["peak_mem_mb_max"] is not None else f"{'-':>8}"
            print(f"{k:>4} {row['total_img_per_s']:>11.1f} {row['per_job_img_per_s']:>8.1f} {vs} {peak}", flush=True)
        if args.json:
            record = {"rows": rows, "recommended_jobs_per_gpu": recommend(rows)}
            args.json.write_text(json.dumps(record, indent=1) + "\n")
    k = recommend(rows)
    print(f"recommended SEMIBENCH_JOBS_PER_GPU: {k if k is not None else '- (no measurement)'} "
          f"(smallest k within {RECOMMEND_FRACTION:.0%} of the best total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
