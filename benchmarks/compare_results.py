"""Are two results trees the same results (not a test)? Compares every run's ``metrics.json``
(minus timings and peak memory, which differ between any two runs) and ``per_image.csv`` (byte
for byte) under two ``results/runs`` folders, and prints one line per difference:

    python benchmarks/compare_results.py BEFORE/results/runs AFTER/results/runs

Exit status 0 when every file matches, 1 otherwise (a file missing on one side counts).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

VOLATILE = {"timings", "peak_mem_mb", "this_process_wall_s"}


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def first_difference(a, b, path="") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}{k}: only in {'after' if k in b else 'before'}"
            found = first_difference(a[k], b[k], f"{path}{k}.")
            if found:
                return found
        return None
    return None if a == b else f"{path.rstrip('.')}: {a!r} → {b!r}"


def main() -> int:
    before, after = map(Path, sys.argv[1:3])
    names = sorted({p.relative_to(root) for root in (before, after)
                    for pattern in ("*/*/r*/seed*/metrics.json", "*/*/r*/seed*/per_image.csv")
                    for p in root.glob(pattern)})
    differ = 0
    for name in names:
        a, b = before / name, after / name
        if not (a.exists() and b.exists()):
            print(f"{name}: only in {'after' if b.exists() else 'before'}")
            differ += 1
        elif name.suffix == ".json":
            found = first_difference(strip(json.loads(a.read_text())), strip(json.loads(b.read_text())))
            if found:
                print(f"{name}: {found}")
                differ += 1
        elif a.read_bytes() != b.read_bytes():
            print(f"{name}: differs")
            differ += 1
    print(f"{len(names)} files compared, {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
