"""The Snakemake workflow: lint, the paper grid's dry run, config errors at dry run, and (marker
``workflow``) the quick workflow end to end in a temporary working copy, checked against the
metrics files it produced."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from semibench.registry import DATASETS, METHODS
from semibench.report.tables import METRICS, read_table1
from tests.workflow_tools import ROOT, WORKFLOW_FILES, copy_workflow, snakemake


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A working copy of the workflow (no data, no results)."""
    return copy_workflow(tmp_path)


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, flags=re.M)}


def test_lint_is_clean(workdir):
    out = snakemake("--lint", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr
    assert "Lints for" not in out.stdout + out.stderr


def test_paper_grid_dry_run(workdir):
    out = snakemake("-n", "--cores", "all", "--resources", "gpu=4", cwd=workdir)
    assert out.returncode == 0, out.stderr
    counts = job_counts(out.stdout + out.stderr)
    # Table 1: 2 datasets x (8 methods x 3 ratios + fullsup at 1) x 3 seeds = 150;
    # Table 2 (the paper's ablation): 2 datasets x 6 schemes at 1/32 x 3 seeds = 36
    assert counts["train"] == counts["evaluate"] == 150 + 36
    assert counts["obtain"] == counts["verify"] == counts["prepare"] == 2
    assert counts["split"] == 2 * 3
    assert counts["tables"] == counts["stats"] == counts["figures"] == counts["all"] == 1
    text = out.stdout + out.stderr
    assert "results/runs/monuseg/fullsup/r1/seed2/best.pt" in text
    assert "results/runs/monuseg/cdcl-scheme6/r32/seed0/metrics.json" in text
    assert "results/runs/dsb2018/cdcl-scheme1/r8" not in text  # the ablation is at 1/32 only
    assert "results/runs/dsb2018/suponly/r1/" not in text  # only fullsup runs at ratio 1


@pytest.mark.parametrize("override, message", [
    ("grid: {datasets: [kaggle]}",
     "unknown dataset(s) 'kaggle' in config grid.datasets; known: {datasets}"),
    ("ablation: {methods: [cdcl-scheme9]}",
     "unknown method(s) 'cdcl-scheme9' in config ablation.methods; known: {methods}"),
    ("grid: {ratios: [8, 0]}",
     "invalid config at grid.ratios.1: 0 is less than the minimum of 1"),
    ("method_params: {meanteacher: {no_such_option: 1}}",
     "unknown hyperparameter(s) for "),
    ("grid: {datasets: [synthetic]}\ndatasets: {synthetic: {colour: red}}",
     "datasets.synthetic: unknown key(s) colour; known: "),
    ("train: {epochz: 3}",  # the schema: no unknown train options
     "invalid config at train: Additional properties are not allowed ('epochz' was unexpected)"),
    ("train: {augment: {hflip_p: 2}}",  # the schema checks augmentation magnitudes too
     "invalid config at train.augment.hflip_p: 2 is greater than the maximum of 1"),
    ("gird: {seeds: [0]}",  # the schema: no unknown top-level keys
     "invalid config at top level: Additional properties are not allowed ('gird' was unexpected)"),
])
def test_bad_config_stops_the_dry_run(workdir, override, message):
    (workdir / "bad.yaml").write_text(override + "\n")
    out = snakemake("-n", "--cores", "1", "--configfile", "bad.yaml", cwd=workdir)
    assert out.returncode != 0
    expected = "semibench: error: " + message.format(datasets=", ".join(DATASETS.names()),
                                                     methods=", ".join(METHODS.names()))
    lines = [line for line in out.stderr.splitlines() if line.startswith("semibench: error:")]
    assert len(lines) == 1 and lines[0].startswith(expected), out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.workflow
@pytest.mark.timeout(900)
def test_quick_workflow_end_to_end(workdir):
    t0 = time.monotonic()
    out = snakemake("--cores", "2", "--configfile", "config/quick.yaml", cwd=workdir, timeout=900)
    wall = time.monotonic() - t0
    print(f"quick workflow wall time: {wall:.0f} s")
    assert out.returncode == 0, out.stderr[-5000:]

    import yaml

    from semibench.config import deep_merge
    cfg = deep_merge(yaml.safe_load((workdir / "config/config.yaml").read_text()),
                     yaml.safe_load((workdir / "config/quick.yaml").read_text()))
    from semibench.workflow.grid import all_runs, section_runs
    runs = [tuple(r) for r in all_runs(cfg)]
    grid_runs = [tuple(r) for r in section_runs(cfg, "grid")]
    assert len(cfg["grid"]["seeds"]) >= 2 and "fullsup" not in cfg["grid"]["methods"]
    assert {m for _, m, _, _ in grid_runs} == set(cfg["grid"]["methods"]) | {"fullsup"}

    # every run has its files and logs; metrics carry the run's coordinates
    metrics = {}
    for d, m, k, s in runs:
        run = workdir / f"results/runs/{d}/{m}/r{k}/seed{s}"
        for name in ("best.pt", "train_done.json", "metrics.json", "per_image.csv", "config.json"):
            assert (run / name).is_file(), run / name
        assert (workdir / f"logs/train/{d}/{m}/r{k}/seed{s}.log").is_file()
        assert (workdir / f"logs/evaluate/{d}/{m}/r{k}/seed{s}.log").is_file()
        doc = json.loads((run / "metrics.json").read_text())
        assert (doc["meta"]["dataset"], doc["meta"]["method"], doc["meta"]["ratio"],
                doc["meta"]["seed"]) == (d, m, k, s)
        # the run saw exactly the merged workflow config
        assert doc["meta"]["config"]["train"] == cfg["train"]
        metrics[(d, m, k, s)] = doc["per_image_mean"]

    # Table 1 holds the grid only: one row per dataset x ratio x method x pixel metric, its
    # values the mean and sample std over seeds of the metrics files
    rows = read_table1(workdir / "results/tables/table1.csv")
    cells = {(d, k, m) for d, m, k, _ in grid_runs}
    assert len(rows) == len(cells) * len(METRICS)
    for r in rows:
        xs = [v[r["metric"]] for (d, m, k, s), v in metrics.items()
              if (d, m, k) == (r["dataset"], r["method"], r["ratio"])]
        assert r["n_seeds"] == len(xs) == len(cfg["grid"]["seeds"])
        assert r["mean"] == pytest.approx(statistics.fmean(xs), abs=1e-9)
        assert r["std"] == pytest.approx(statistics.stdev(xs), abs=1e-9)
        assert 0.0 <= r["mean"] <= 1.0 and not math.isnan(r["std"])
    fullsup_dc = [r["mean"] for r in rows if r["method"] == "fullsup" and r["metric"] == "dice"]
    assert fullsup_dc[0] >= 0.8, f"the quick run should be worth looking at: FullSup DC {fullsup_dc}"
    assert "| FullSup |" in (workdir / "results/tables/table1.md").read_text()
    table2 = (workdir / "results/tables/table2.csv").read_text()
    assert all(m in table2 for m in cfg["ablation"]["methods"])
    for name in ("comparisons.csv", "friedman.csv"):
        assert (workdir / "results/stats" / name).stat().st_size > 0
    figures = sorted((workdir / "results/figures").glob("*.png"))
    assert len(figures) >= 7 and all(f.stat().st_size > 1000 for f in figures)

    # Snakemake's own HTML report holds both tables
    report = snakemake("--report", "report.html", "--configfile", "config/quick.yaml", cwd=workdir)
    assert report.returncode == 0, report.stderr[-3000:]
    html_text = (workdir / "report.html").read_text(errors="replace")
    assert "Table 1" in html_text and "Table 2" in html_text

    # nothing left to do: the workflow is complete and consistent
    again = snakemake("-n", "--cores", "2", "--configfile", "config/quick.yaml", cwd=workdir)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

    # .gitignore covers everything the workflow wrote: git status lists only the shipped files
    shutil.copy2(ROOT / ".gitignore", workdir / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=workdir,
                            capture_output=True, text=True, check=True).stdout
    shipped = {p.relative_to(workdir).as_posix() for name in (*WORKFLOW_FILES, ".gitignore")
               for p in ([workdir / name] if (workdir / name).is_file() else (workdir / name).rglob("*"))
               if p.is_file() and "__pycache__" not in p.parts}
    assert {line[3:] for line in status.splitlines()} - shipped == set()


# A grid as a new user writes it: no report.baseline (suponly) anywhere. Tiny: 3 runs of 2 steps.
NO_BASELINE = """
grid: {datasets: [synthetic], methods: [meanteacher, cdcl], ratios: [8], fullsup: false, seeds: [0]}
ablation: {datasets: [synthetic], methods: [cdcl-scheme4], ratios: [8], seeds: [0]}
datasets: {synthetic: {count: 32}}
train: {epochs: 1, iters_per_epoch: 2, batch_labeled: 2, batch_unlabeled: 2, unsup_start_epoch: 0}
"""


@pytest.mark.workflow
@pytest.mark.timeout(600)
def test_grid_without_the_baseline_says_what_the_report_leaves_out(workdir):
    (workdir / "nobase.yaml").write_text(NO_BASELINE)
    args = ("--cores", "2", "--configfile", "config/quick.yaml", "nobase.yaml")
    dry = snakemake("-n", *args, cwd=workdir)
    assert dry.returncode == 0, dry.stderr[-3000:]
    notes = [line for line in dry.stderr.splitlines() if line.startswith("semibench: note:")]
    assert notes == [
        "semibench: note: the report will leave out family vs_baseline (SupOnly, report.baseline, "
        "is not in grid.methods); Table 2 row SupOnly (report.baseline: the grid does not train it "
        "at the ablation's cells; add it to grid.methods and the ablation's datasets and ratios to "
        "the grid)"]
    assert job_counts(dry.stdout + dry.stderr)["train"] == 3  # no suponly run is added
    assert not (workdir / "results" / "runs").exists()  # said before any training

    out = snakemake(*args, cwd=workdir, timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    table1 = (workdir / "results/tables/table1.md").read_text()
    assert "Left out: family vs_baseline (SupOnly, report.baseline, is not in grid.methods)." in table1
    table2 = (workdir / "results/tables/table2.md").read_text()
    assert "| SupOnly |" not in table2 and "| Scheme.4 |" in table2 and "| CDCL |" in table2
    assert "Left out: Table 2 row SupOnly" in table2
    comparisons = (workdir / "results/stats/comparisons.csv").read_text().splitlines()
    assert {line.split(",")[0] for line in comparisons[1:]} == {"vs_reference", "ablation"}
    assert not (workdir / "results/runs/synthetic/suponly").exists()


def _readme_block(title: str) -> str:
    """The single command in the first ```bash block after the heading ``## <title>``."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    assert "\n" not in block, "one command, one line"
    return block


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_block("Tests (one command)")
    assert command.endswith("&& pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
    quick = _readme_block("Quick start (one command)")
    assert quick.endswith("snakemake --cores 2 --configfile config/quick.yaml")
    install = command.split(" && ruff check")[0]
    assert command == install + " && ruff check && snakemake --lint && pytest"
    assert quick.split(" && snakemake")[0] == install.replace("'.[dev]'", ".")


def _slurm_answers() -> bool:
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mixed", "allocated")
                                       for s in out.stdout.split())


@pytest.mark.workflow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not _slurm_answers(),
                    reason="no SLURM cluster answers (a local one: bash tests/local_slurm.sh start)")
def test_quick_workflow_on_slurm(workdir):
    """profiles/slurm as shipped; squeue for job states (a test cluster has no accounting)."""
    out = snakemake("--profile", "profiles/slurm", "--configfile", "config/quick.yaml",
                    "--slurm-status-command", "squeue",
                    "--slurm-init-seconds-before-status-checks", "5", cwd=workdir, timeout=1800)
    assert out.returncode == 0, out.stderr[-5000:]
    # the heavy rules ran as SLURM jobs, obtain and report (localrules) on this host
    submitted = re.findall(r"has been submitted with SLURM jobid \d+ \(log: \S*/rule_(\w+)/",
                           out.stdout + out.stderr)
    assert {r: submitted.count(r) for r in set(submitted)} == \
        {"verify": 1, "prepare": 1, "split": 2, "train": 10, "evaluate": 10}
    rows = read_table1(workdir / "results/tables/table1.csv")
    assert len(rows) == 5 * len(METRICS) and all(r["n_seeds"] == 2 for r in rows)
