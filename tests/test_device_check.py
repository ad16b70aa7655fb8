"""benchmarks/device_check.py, the one script a session with the GPU runs: its CPU dry run goes
through every stage and writes every result; under a budget too small for the stages it still
ends in time, exit 0, with a summary that says which stages did not run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.py"


def _run(tmp_path, *args, timeout):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "CUDA_VISIBLE_DEVICES")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run even on a machine with a GPU
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path / "out"), *args],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t0


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_and_writes_every_result(tmp_path):
    p, _ = _run(tmp_path, "--budget-s", "900", timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(f.name for f in out.iterdir()) == [
        "bench_train.json", "device_check.log", "grid.json", "pytest_gpu.txt", "results.json", "share.json",
        "summary.md"]
    res = json.loads((out / "results.json").read_text())
    assert {s: r["status"] for s, r in res["stages"].items()} == {
        s: "ok" for s in ("env", "tests", "bench", "compile", "share", "dsb")}
    rows = res["bench_train"]
    assert {(r["method"], r["variant"]) for r in rows} == {
        (m, v) for m in ("suponly", "meanteacher", "cdcl") for v in ("off", "defaults", "on")}
    mt = next(r for r in rows if r["method"] == "meanteacher" and r["variant"] == "on")
    # the counts are the method's, copied to its compiled row: MT's step is 2.33 SupOnly passes
    assert mt["passes_vs_suponly"] == pytest.approx(7 / 3) and mt["flops_vs_suponly"] > 2
    assert mt["execution"]["compile"] and mt["speedup_vs_off"] > 0
    assert [r["jobs"] for r in res["share"]["rows"]] == [1, 2] and res["share"]["recommended_jobs_per_gpu"] in (1, 2)
    runs = res["dsb"]["runs"]
    assert sorted(runs) == ["off-seed0", "off-seed1", "on-seed0", "on-seed1"]
    assert all(len(r["val_dice"]) == 2 and r["finished"] and r["test_dice"] is not None for r in runs.values())
    assert [a["epoch"] for a in res["dsb"]["agreement"]] == [0, 1]
    assert res["tests"]["counts"].get("skipped", 0) > 0  # no GPU here: the gpu tests skip
    grid = res["grid"]
    assert grid["runs"] == 186 and set(grid["variants"]) == {"off", "defaults", "on"}
    summary = (out / "summary.md").read_text()
    for heading in ("## pytest -m gpu", "## bench_train", "## Jobs sharing the GPU", "## 2-epoch runs",
                    "## Predicted wall time"):
        assert heading in summary
    assert summary in p.stdout  # printed too


def test_a_budget_too_small_still_ends_in_time_with_a_summary(tmp_path):
    p, seconds = _run(tmp_path, "--budget-s", "45", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    statuses = {s: r["status"] for s, r in res["stages"].items()}
    assert set(statuses) == {"env", "tests", "bench", "compile", "share", "dsb"}
    assert statuses["env"] == "skipped (no time left)"  # its share of 45 s is under a second
    assert any(s.startswith(("timeout", "skipped")) for s in statuses.values())
    for r in res["stages"].values():  # every stage kept to its allowance
        assert r["seconds"] <= max(r.get("allowed_s", 0), 0) + 5
    assert "## bench_train" in (tmp_path / "out" / "summary.md").read_text()
    # the stages' time plus the summary's: the budget, give or take the summary's own work
    assert seconds < 45 + 120
