"""Time `prepare` of the full DSB 2018 and MoNuSeg sets from their archives; print images/s.

    python benchmarks/bench_prepare.py [--data ../shared/data] [--workers 2] [--datasets dsb2018 monuseg]

Archives are read from --data (default: $SEMIBENCH_SHARED_DATA or ../shared/data next to the
repository); the prepared output goes to a temporary directory that is deleted afterwards.
Goal (data-layer issue): each under 2 minutes on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

from semibench.data.obtain import prepare

REPO = Path(__file__).resolve().parent.parent


def configs(data: Path) -> dict:
    return {
        "dsb2018": {"archive": str(data / "dsb2018" / "stage1_train.zip")},
        "monuseg": {"archive": str(data / "monuseg")},
    }


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the pool's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("SEMIBENCH_SHARED_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    ap.add_argument("--datasets", nargs="+", default=["dsb2018", "monuseg"])
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, workers={args.workers}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        for name in args.datasets:
            cfg = dict(configs(args.data)[name], workers=args.workers)
            t0, c0 = time.perf_counter(), _cpu()
            root = prepare(name, tmp, cfg)
            wall, cpu = time.perf_counter() - t0, _cpu() - c0
            manifest = json.loads((root / "manifest.json").read_text())
            n_images, n_samples = len(manifest["images"]), len(manifest["samples"])
            size_mb = sum(f.stat().st_size for f in (root / "samples").iterdir()) / 1e6
            print(f"{name}: {n_images} images ({n_samples} samples) in {wall:.1f} s = "
                  f"{n_images / wall:.1f} images/s; CPU {cpu:.1f} s in all processes "
                  f"(~{cpu / args.workers:.1f} s wall on {args.workers} otherwise idle cores); "
                  f"{size_mb:.0f} MB written; goal < 120 s: {'met' if wall < 120 else 'MISSED'}")
            print(f"  load average now: {os.getloadavg()[0]:.1f} (other processes share the CPUs)")
            shutil.rmtree(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
