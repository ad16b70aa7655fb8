"""The published real-data results rebuild from the files that ship with the repository.

``results/reference/dsb2018-r128/`` holds every finished run of ``config/studies/paper-cpu.yaml``
(metrics.json, per_image.csv, train_done.json: no checkpoints, no predictions) and ``report/``, the
tables and statistics rendered from exactly those runs. A rebuild without training must reproduce
them byte for byte, and the tables quoted in ``docs/results-cpu-dsb.md`` must be those tables."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from semibench.cli import main as semibench_main
from semibench.layout import RUN_DIR
from semibench.report.quote import sync
from semibench.workflow.grid import all_runs

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "results" / "reference" / "dsb2018-r128"
CONFIG = ROOT / "config" / "studies" / "paper-cpu.yaml"
DOC = ROOT / "docs" / "results-cpu-dsb.md"
RUN_FILES = ("metrics.json", "per_image.csv", "train_done.json")

pytestmark = pytest.mark.reference
needs_runs = pytest.mark.skipif(not list(STUDY.glob("**/metrics.json")),
                                reason=f"no shipped runs under {STUDY}")


def _shipped_runs() -> list[Path]:
    return sorted(p.parent for p in STUDY.glob("**/metrics.json"))


@needs_runs
def test_every_shipped_run_is_a_run_of_the_study_with_its_three_files():
    expected = {RUN_DIR.format(**run._asdict()) for run in all_runs(yaml.safe_load(CONFIG.read_text()))}
    assert len(expected) == 51  # 10 methods + FullSup and 6 schemes, 3 seeds
    for run in _shipped_runs():
        assert run.relative_to(STUDY).as_posix() in expected, run
        assert sorted(p.name for p in run.iterdir()) == sorted(RUN_FILES), run  # nothing else ships


@needs_runs
def test_rebuild_reproduces_the_shipped_report_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the documented command, from the repository root
    for step in ("stats", "tables"):
        assert semibench_main(["report", "--runs", "results/reference/dsb2018-r128/**/metrics.json",
                               "--config", "config/studies/paper-cpu.yaml", "--out", str(tmp_path),
                               "--step", step]) in (0, None)
    shipped = sorted(p.relative_to(STUDY / "report") for p in (STUDY / "report").rglob("*") if p.is_file())
    rebuilt = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert shipped == rebuilt and shipped
    for rel in shipped:
        assert (tmp_path / rel).read_bytes() == (STUDY / "report" / rel).read_bytes(), rel


def _table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


@needs_runs
@pytest.mark.skipif(not DOC.exists() or "results/reference/dsb2018-r128" not in DOC.read_text(),
                    reason="docs/results-cpu-dsb.md does not quote the shipped study yet")
def test_the_docs_quote_the_shipped_tables():
    doc = DOC.read_text()
    for name in ("table1.md", "table2.md"):
        rows = _table_rows((STUDY / "report" / "tables" / name).read_text())
        assert rows, name
        block = "\n".join(rows)
        assert block in doc, f"{name}'s table is not in {DOC.name} as rendered"
    # every quoted block is its report file as rendered now (semibench report --quote-into)
    assert sync(doc, STUDY / "report") == doc, f"{DOC.name}'s quoted blocks are stale: re-quote them"
    assert re.search(r"semibench report --runs 'results/reference/dsb2018-r128/\*\*/metrics.json'", doc)
