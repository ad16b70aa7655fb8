"""Running the workflow from tests: a working copy of its files and Snakemake with this
interpreter's `semibench` on PATH."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW_FILES = ("Snakefile", "rules", "config", "profiles", "envs", "report")


def snakemake(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # the rules call `semibench`: the one installed beside this interpreter
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def copy_workflow(dest: Path) -> Path:
    """The workflow's files (no data, no results) copied into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / name)
    return dest
