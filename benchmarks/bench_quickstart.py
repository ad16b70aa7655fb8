"""Where a workflow's wall time goes (not a test): per rule, from a Snakemake log and the run
directories it made. For the quick start (``snakemake --cores 2 --configfile config/quick.yaml``):

    python benchmarks/bench_quickstart.py [--log .snakemake/log/<newest>.snakemake.log] [--runs results/runs]

Per rule it prints the jobs, the summed job seconds (a job: from Snakemake's start line to its
"Finished" line, 1 s resolution), the wall span from the rule's first start to its last end,
and for ``train``/``evaluate`` the seconds spent inside the work itself (``train_done.json``:
training + validation; ``metrics.json``: inference + metrics) against the rest of each job:
process start, imports, data loading, file writes. The last line is the whole log's wall time.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
START = re.compile(r"^(?:local)?rule (\S+):$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\S+)\)$")


def job_times(log: Path) -> dict[str, list[tuple[datetime, datetime]]]:
    """{rule: [(start, end)]} of every finished job in a Snakemake log."""
    stamp, rule, started, out = None, None, {}, defaultdict(list)
    for line in log.read_text().splitlines():
        if m := STAMP.match(line):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        elif m := START.match(line):
            rule = (m.group(1), stamp)
        elif (m := JOBID.match(line)) and rule is not None:
            started[m.group(1)] = rule
            rule = None
        elif m := FINISHED.match(line):
            name, t0 = started.pop(m.group(1), (m.group(2), stamp))
            out[name].append((t0, stamp))
    return out


def inner_seconds(runs: Path) -> dict[str, float]:
    """Seconds spent in the work itself, summed over the runs: train (training + validation) and
    evaluate (inference + metrics)."""
    total = {"train": 0.0, "evaluate": 0.0}
    for done in runs.glob("*/*/r*/seed*/train_done.json"):
        total["train"] += json.loads(done.read_text())["timings"]["this_process_wall_s"]
    for metrics in runs.glob("*/*/r*/seed*/metrics.json"):
        timings = json.loads(metrics.read_text())["meta"].get("timings", {})
        total["evaluate"] += sum(v for k, v in timings.items() if k.endswith("_seconds"))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", type=Path, help="a Snakemake log (default: the newest in .snakemake/log)")
    p.add_argument("--runs", type=Path, default=Path("results/runs"))
    args = p.parse_args()
    log = args.log or max(Path(".snakemake/log").glob("*.snakemake.log"), key=lambda f: f.stat().st_mtime)
    jobs = job_times(log)
    inner = inner_seconds(args.runs)
    print(f"{'rule':<10} {'jobs':>4} {'job s':>7} {'span s':>7} {'in work s':>9} {'overhead s/job':>14}")
    first, last = None, None
    for name, times in sorted(jobs.items(), key=lambda kv: min(t for t, _ in kv[1])):
        secs = sum((b - a).total_seconds() for a, b in times)
        t0, t1 = min(a for a, _ in times), max(b for _, b in times)
        first, last = min(first or t0, t0), max(last or t1, t1)
        work = inner.get(name)
        extra = f"{work:9.1f} {(secs - work) / len(times):14.1f}" if work is not None else ""
        print(f"{name:<10} {len(times):4d} {secs:7.0f} {(t1 - t0).total_seconds():7.0f} {extra}")
    print(f"whole workflow: {(last - first).total_seconds():.0f} s wall ({log})")


if __name__ == "__main__":
    main()
