"""stats/comparisons.md (the comparisons as Markdown) and `semibench report --quote-into`
(a results page's quoted report files kept in step with the report)."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from semibench.cli import main
from semibench.errors import ConfigError
from semibench.report.quote import quote_into, quoted, sync
from tests.report_runs import write_run

CONFIG = {
    "grid": {"datasets": ["dsb2018"], "methods": ["suponly", "meanteacher", "cdcl", "fixmatch"], "ratios": [32],
             "fullsup": False, "seeds": [0, 1, 2]},
    "ablation": {"datasets": [], "methods": [], "ratios": [], "seeds": []},
    "report": {"n_resamples": 999, "n_boot_rank": 50},
}


def _runs(root: Path) -> list[Path]:
    """CDCL = SupOnly + 0.02 and FixMatch = SupOnly + 0.01 on every image of every seed (Δ +2.00
    and +1.00 points exactly); Mean Teacher has no runs. Same 14 images in every seed."""
    base = np.linspace(0.55, 0.81, 14)
    return [write_run(root, "dsb2018", method, 32, seed, base + shift + 0.01 * seed)
            for method, shift in (("suponly", 0.0), ("cdcl", 0.02), ("fixmatch", 0.01))
            for seed in range(3)]


def _report(tmp_path, *extra) -> tuple[int, str]:
    """stats, then tables with ``extra`` (the last step: every quoted file exists by then)."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG))
    err = io.StringIO()
    with redirect_stderr(err):
        for step in ("stats", "tables"):
            rc = main(["report", "--runs", str(tmp_path / "runs" / "**" / "metrics.json"),
                       "--config", str(cfg), "--out", str(tmp_path / "out"), "--step", step,
                       *(extra if step == "tables" else ())])
            if rc:
                return rc, err.getvalue()
    return 0, err.getvalue()


def test_comparisons_markdown_hand_computed(tmp_path):
    _runs(tmp_path / "runs")
    assert _report(tmp_path)[0] == 0
    md = (tmp_path / "out" / "stats" / "comparisons.md").read_text()
    # 14 images, every difference +0.02: Δ +2.00 points, each seed +2.00; exact two-sided
    # Wilcoxon p = 2 / 2**14 = 1.2e-4 for CDCL and for FixMatch; Holm over the vs-SupOnly family
    # (Mean Teacher cannot be paired): 2 x 1.2e-4 for the first, max(that, 1 x 1.2e-4) for the
    # second = 2.4e-4 for both, bold (significant)
    row = next(line for line in md.splitlines() if line.startswith("| CDCL | SupOnly |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == ["14", "+2.00"]
    assert cells[6:8] == ["0.00012", "**0.00024**"]
    assert cells[8] == "s0 +2.00, s1 +2.00, s2 +2.00"
    # run means: SupOnly base+{0, .01, .02}, CDCL base+{.02, .03, .04}: of the 9 pairs CDCL wins
    # 8 and ties 1 (its seed 0 with SupOnly's seed 2), which counts 1/2: (8 + 0.5) / 9 = 0.94
    assert cells[9].startswith("0.94 [")
    assert "- MeanTeacher* vs SupOnly: no per-image results for meanteacher" in md
    assert "| FixMatch* | SupOnly | 14 | +1.00 |" in md
    # every image ranks CDCL first, FixMatch second, SupOnly third
    assert "Friedman over 3 methods on the 42 of 42 (seed, image) pairs" in md
    assert "mean ranks (1 = best) CDCL 1.00, FixMatch* 2.00, SupOnly 3.00." in md
    assert "first: CDCL 100%" in md


def test_quoted_drops_the_title_and_bolds_sections():
    text = "# Table 1: x\n\n## dsb2018\n\n| a |\n|---|\n| 1 |\n\nCells: note.\n\n"
    assert quoted(text) == ["**dsb2018**", "", "| a |", "|---|", "| 1 |", "", "Cells: note."]


def test_sync_replaces_only_the_quoted_blocks(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t.md").write_text("# T\n\n| new |\n")
    page = ("# Page\n\nprose stays\n<!-- semibench report: tables/t.md -->\n| old |\n| older |\n"
            "<!-- /semibench report -->\nafter\n")
    expected = ("# Page\n\nprose stays\n<!-- semibench report: tables/t.md -->\n| new |\n"
                "<!-- /semibench report -->\nafter\n")
    assert sync(page, tmp_path) == expected
    assert sync(expected, tmp_path) == expected  # idempotent


@pytest.mark.parametrize("page, message", [
    ("<!-- semibench report: tables/none.md -->\n<!-- /semibench report -->\n", "page:1 quotes tables/none.md"),
    ("x\n<!-- semibench report: tables/t.md -->\n| a |\n", "page:2: quote not closed"),
    ("<!-- semibench report: tables/t.md -->\n<!-- semibench report: tables/t.md -->\n",
     "page:2: a quote opens before the one at line 1 is closed"),
])
def test_sync_refuses_bad_markers(tmp_path, page, message):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t.md").write_text("| a |\n")
    with pytest.raises(ConfigError, match=message):
        sync(page, tmp_path)


def test_quote_into_checks_every_page_before_writing_any(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t.md").write_text("| new |\n")
    good = tmp_path / "good.md"
    good.write_text("<!-- semibench report: tables/t.md -->\n<!-- /semibench report -->\n")
    bad = tmp_path / "bad.md"
    bad.write_text("<!-- semibench report: tables/t.md -->\n")
    plain = tmp_path / "plain.md"
    plain.write_text("no quotes\n")
    before = good.read_text()
    with pytest.raises(ConfigError, match="quote not closed"):
        quote_into([good, bad], tmp_path)
    assert good.read_text() == before
    with pytest.raises(ConfigError, match="no '<!-- semibench report: FILE -->' block"):
        quote_into([plain], tmp_path)
    assert quote_into([good], tmp_path) == [good]
    assert "| new |" in good.read_text()
    assert quote_into([good], tmp_path) == []  # in step: not rewritten


def test_cli_quote_into_fills_a_results_page(tmp_path):
    _runs(tmp_path / "runs")
    page = tmp_path / "results.md"
    page.write_text("# Our results\n\n<!-- semibench report: tables/table1.md -->\n"
                    "<!-- /semibench report -->\n\n<!-- semibench report: stats/comparisons.md -->\n"
                    "<!-- /semibench report -->\n")
    rc, err = _report(tmp_path, "--quote-into", str(page))
    assert rc == 0, err
    text = page.read_text()
    table_rows = [line for line in (tmp_path / "out" / "tables" / "table1.md").read_text().splitlines()
                  if line.startswith("|")]
    assert "\n".join(table_rows) in text
    assert "| CDCL | SupOnly | 14 | +2.00 |" in text and text.startswith("# Our results\n")
    page.write_text(text.replace("<!-- /semibench report -->\n", "", 1))
    broken = page.read_text()
    rc, err = _report(tmp_path, "--quote-into", str(page))
    assert rc != 0 and "a quote opens before the one at line 3 is closed" in err
    assert len(err.strip().splitlines()) == 1 and page.read_text() == broken


def _record(metrics_file: Path, epoch: int, minutes: float, threads: int) -> None:
    """What semibench evaluate copies into metrics.json meta: selection, timings, device, weights."""
    doc = json.loads(metrics_file.read_text())
    doc["meta"].update(checkpoint={"epoch": epoch}, config={"train": {"unsup_start_epoch": 1}},
                       train_done={"n_unlabeled": 10, "unlabeled_per_step": 8},
                       timings={"train": {"total_s": minutes * 60}, "eval_seconds": 2.0},
                       device={"train": {"name": "cpu: test", "threads": threads}},
                       weights={"segmenters": [{"used": "random-init"}]})
    metrics_file.write_text(json.dumps(doc))


def test_runs_table_lists_every_run_with_its_epoch_and_minutes(tmp_path):
    files = _runs(tmp_path / "runs")
    for i, f in enumerate(files):  # suponly s0-2, cdcl s0-2, fixmatch s0-2
        _record(f, epoch=i % 4, minutes=10.0 * (i + 1), threads=1 if i < 8 else 2)
    assert _report(tmp_path)[0] == 0
    md = (tmp_path / "out" / "tables" / "runs.md").read_text()
    base = np.linspace(0.55, 0.81, 14).mean() * 100  # SupOnly seed 0's per-image mean
    assert f"| SupOnly | {base:.2f} @0 · 10.0 min | {base + 1:.2f} @1 · 20.0 min | " \
           f"{base + 2:.2f} @2 · 30.0 min | 20.0 |" in md
    # tables' order: SupOnly, CDCL, then FixMatch (beyond the paper)
    assert md.index("| SupOnly |") < md.index("| CDCL |") < md.index("| FixMatch* |")
    assert f"| CDCL | {base + 2:.2f} @3 · 40.0 min |" in md
    # 10 + 20 + ... + 90 minutes = 450 = 7.5 h; one run on 2 threads is named as such
    assert "Training time of these 9 runs: 7.5 h (450 min)." in md
    assert "cpu: test, 1 thread (8 runs); cpu: test, 2 threads (1 run)" in md
    assert "Weights: random-init." in md
    assert "All " not in md  # one cell: its total is the total
    csv = (tmp_path / "out" / "tables" / "runs.csv").read_text().splitlines()
    assert csv[0] == ("dataset,method,ratio,seed,value,selected_epoch,unsup_start_epoch,train_minutes,"
                      "eval_seconds,device,threads,weights") and len(csv) == 10


def test_table1_metrics_adds_instance_metrics_in_the_order_given(tmp_path):
    files = _runs(tmp_path / "runs")
    for i, f in enumerate(files):  # an instance metric as semibench evaluate reports it
        doc = json.loads(f.read_text())
        doc["metric_info"] = dict(doc["metric_info"], aji={"abbrev": "AJI", "kind": "instance",
                                                           "higher_is_better": True})
        for block in ("per_image_mean", "pooled"):
            doc[block]["aji"] = 0.40 + 0.01 * (i // 3)  # suponly .40, cdcl .41, fixmatch .42
        f.write_text(json.dumps(doc))
    CONFIG["report"]["table1_metrics"] = ["dice", "aji", "jaccard"]
    try:
        assert _report(tmp_path)[0] == 0
        md = (tmp_path / "out" / "tables" / "table1.md").read_text()
        assert "| method | 1/32 DC | 1/32 AJI | 1/32 JC |" in md
        assert "| FixMatch* |" in md and "| **42.00 ± 0.00** |" in md  # AJI: FixMatch best
        CONFIG["report"]["table1_metrics"] = ["dice", "pq"]
        rc, err = _report(tmp_path)
        assert rc != 0 and "report.table1_metrics: 'pq' not reported by these runs" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        del CONFIG["report"]["table1_metrics"]
    assert _report(tmp_path)[0] == 0  # default: the pixel metrics only (the paper's Table 1)
    head = next(line for line in (tmp_path / "out" / "tables" / "table1.md").read_text().splitlines()
                if line.startswith("| method"))
    assert head == "| method | 1/32 DC | 1/32 JC | 1/32 ACC | 1/32 SP | 1/32 SE |"


def test_runs_table_totals_over_cells_and_leaves_out_runs_outside_the_grid(tmp_path):
    files = _runs(tmp_path / "runs") + [
        write_run(tmp_path / "runs", "dsb2018", "fullsup", 1, seed, np.full(14, 0.9)) for seed in range(3)]
    files.append(write_run(tmp_path / "runs", "dsb2018", "suponly", 32, 7, np.full(14, 0.5)))  # not configured
    for f in files:
        _record(f, epoch=1, minutes=6.0, threads=1)
    CONFIG["grid"]["fullsup"] = True
    try:
        assert _report(tmp_path)[0] == 0
    finally:
        CONFIG["grid"]["fullsup"] = False
    md = (tmp_path / "out" / "tables" / "runs.md").read_text()
    assert "## dsb2018 1/32" in md and "## dsb2018 1/1" in md and "seed 7" not in md
    # 9 runs at 1/32 and 3 FullSup runs, 6 minutes each: 54 + 18 = 72 min = 1.2 h
    assert "Training time of these 3 runs: 0.3 h (18 min)." in md
    assert "All 12 runs: 1.2 h of training (72 min)." in md


def test_paper_gains_hand_computed(tmp_path):
    """tables/paper_gains: our gain over SupOnly (mean over the shared seeds) beside the paper's,
    FullSup as the headroom, the order agreement over the methods both have."""
    base = np.linspace(0.55, 0.81, 14)
    for method, shift, seeds in (("suponly", 0.0, (0, 1, 2)), ("tcsmv2", 0.03, (0, 1, 2)),
                                 ("cutmix", 0.02, (0, 1, 2)), ("cdcl", 0.01, (0, 1, 2)),
                                 ("fixmatch", 0.05, (0,)), ("fullsup", 0.10, (0, 1, 2))):
        for seed in seeds:
            write_run(tmp_path / "runs", "dsb2018", method, 1 if method == "fullsup" else 32,
                      seed, base + shift + 0.01 * seed)
    cfg = {**CONFIG, "grid": dict(CONFIG["grid"], fullsup=True,
                                  methods=["suponly", "meanteacher", "tcsmv2", "cutmix", "cdcl",
                                           "fixmatch"])}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    for step in ("stats", "tables"):
        assert main(["report", "--runs", str(tmp_path / "runs" / "**" / "metrics.json"), "--config",
                     str(tmp_path / "cfg.json"), "--out", str(tmp_path / "out"), "--step", step]) == 0
    md = (tmp_path / "out" / "tables" / "paper_gains.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")}
    # paper DSB (Table 1): SupOnly 83.93 / 86.10 / 87.38 at 1/32 / 1/16 / 1/8; TCSMv2 85.04 at
    # 1/32 -> +1.11; CutMix 86.03 -> +2.10; CDCL 87.49 -> +3.56, 89.88 - 86.10 = +3.78 at 1/16;
    # FullSup 90.46 - 83.93 = +6.53, - 86.10 = +4.36, - 87.38 = +3.08
    assert rows["TCSMv2"] == ["+3.00", "+1.11", "+1.38", "+1.04"]
    assert rows["CutMix"] == ["+2.00", "+2.10", "+1.60", "+0.94"]
    assert rows["CDCL"] == ["+1.00", "+3.56", "+3.78", "+2.71"]
    assert rows["FullSup"] == ["+10.00", "+6.53", "+4.36", "+3.08"]
    # FixMatch: seed 0 only (its shift +5 on the same seed); no paper row
    assert rows["FixMatch*"] == ["+5.00 (n=1)", "—", "—", "—"]
    assert rows["MeanTeacher*"] == ["—", "—", "—", "—"]  # configured, not run, not in the paper
    # ours order TCSMv2 > CutMix > CDCL, the paper's the reverse: every pair discordant, τ = -1
    assert "over the 3 methods both have (FullSup left out): Kendall's τ of the gains = -1.00; " \
           "a gain above 0 for 3 of them here and 3 in the paper." in md
    gains = pd.read_csv(tmp_path / "out" / "tables" / "paper_gains.csv")
    fix = gains[(gains["method"] == "fixmatch") & (gains["source"] == "ours")].iloc[0]
    assert fix["n_seeds"] == 1 and fix["baseline_value"] == pytest.approx(base.mean() * 100)
