"""Faults where users meet them: the workflow is killed (SIGKILL of its whole process group, as a
dead node or `kill -9` leaves it) during prepare, mid-training and during evaluate; after
`snakemake --unlock` the plain rerun completes, and its tables are byte-identical to those of an
uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.workflow_tools import copy_workflow, snakemake

# Two methods, one seed, a short run: enough for a killed training job to leave a checkpoint.
SLICE = """
grid: {datasets: [synthetic], methods: [suponly, meanteacher], ratios: [8], fullsup: false, seeds: [0]}
ablation: {datasets: [], methods: [], ratios: [], seeds: []}
train: {epochs: 4, iters_per_epoch: 8}
"""
CONFIG = ("--configfile", "config/quick.yaml", "slice.yaml")


def _copy_workflow(dest: Path) -> Path:
    copy_workflow(dest)
    (dest / "slice.yaml").write_text(SLICE)
    return dest


TIMINGS = ("train_minutes", "eval_seconds")  # runs.csv: how long each run took, never the same twice


def _tables(workdir: Path) -> dict[str, bytes]:
    """Every table, byte for byte; of runs.csv everything but the wall times (scores, selected
    epochs, device, threads and weights must come back the same)."""
    tables = sorted((workdir / "results" / "tables").glob("*.csv"))
    assert tables, "no tables written"
    out = {p.name: p.read_bytes() for p in tables}
    runs = pd.read_csv(workdir / "results" / "tables" / "runs.csv")
    assert runs[list(TIMINGS)].notna().all().all(), "runs.csv lost a run's timings"
    out["runs.csv"] = runs.drop(columns=list(TIMINGS)).to_csv(index=False).encode()
    return out


def _run_and_kill(workdir: Path, trigger, timeout: float = 600) -> str:
    """Start the workflow in its own process group; SIGKILL the group as soon as ``trigger()``
    holds. Returns the name of what was running when the kill came."""
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "2", *CONFIG], cwd=workdir,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not trigger():
            if proc.poll() is not None:
                pytest.fail("the workflow ended before the fault could be injected")
            if time.monotonic() > deadline:
                pytest.fail("the fault trigger never fired")
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return "killed"


def _run_dir(workdir: Path, method: str) -> Path:
    return workdir / f"results/runs/synthetic/{method}/r8/seed0"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    workdir = _copy_workflow(tmp_path_factory.mktemp("uninterrupted") / "wf")
    out = snakemake("--cores", "2", *CONFIG, cwd=workdir, timeout=900)
    assert out.returncode == 0, out.stderr[-5000:]
    return _tables(workdir)


def _mid_training(workdir: Path) -> bool:
    """A training job holds a checkpoint and has not finished (wait on the file, not a sleep)."""
    return any((_run_dir(workdir, m) / "checkpoint.pt").exists()
               and not (_run_dir(workdir, m) / "train_done.json").exists()
               for m in ("suponly", "meanteacher"))


def _during(rule: str):
    def trigger(workdir: Path) -> bool:  # the job has started: Snakemake opened its log
        return any((workdir / "logs" / rule).rglob("*.log"))
    return trigger


@pytest.mark.workflow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("phase", ["prepare", "train", "evaluate"])
def test_killed_workflow_reruns_to_the_same_tables(phase, reference, tmp_path):
    workdir = _copy_workflow(tmp_path / "wf")
    trigger = _mid_training if phase == "train" else _during(phase)
    _run_and_kill(workdir, lambda: trigger(workdir))
    if phase == "train":
        assert any((_run_dir(workdir, m) / "checkpoint.pt").exists() for m in ("suponly", "meanteacher"))

    unlock = snakemake("--unlock", *CONFIG, cwd=workdir)
    assert unlock.returncode == 0, unlock.stderr[-3000:]
    rerun = snakemake("--cores", "2", *CONFIG, cwd=workdir, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    assert _tables(workdir) == reference
    done = snakemake("-n", "--cores", "2", *CONFIG, cwd=workdir)
    assert done.returncode == 0 and "Nothing to be done" in done.stdout + done.stderr
