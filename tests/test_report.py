"""Table 1 / Table 2 from hand-made run directories: means and stds by hand, bold, ties, marks,
FullSup never bold, missing cells, LaTeX cells (compiled when pdflatex is there), the CLI."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from semibench.cli import main
from semibench.errors import DataError
from semibench.report import build
from semibench.report.read import read_runs
from tests.report_runs import CONFIG, PIXEL, make_runs, write_run


@pytest.fixture
def runs(tmp_path):
    return make_runs(tmp_path / "runs")


def _table(tmp_path, files, config=CONFIG):
    results, plan = build.load(files, config)
    build.write_stats(results, plan, tmp_path / "stats")
    comps = build.read_comparisons(tmp_path / "stats" / "comparisons.csv")
    build.write_tables(results, plan, tmp_path / "tables", comps)
    return pd.read_csv(tmp_path / "tables" / "table1.csv"), comps


def test_table1_values_bold_and_marks(runs, tmp_path):
    t1, comps = _table(tmp_path, runs)
    dice = t1[t1["metric"] == "dice"].set_index(["ratio", "method"])
    # mean/std over the 3 seeds, by hand from the per-image files
    per_run = [pd.read_csv(f.parent / "per_image.csv")["dice"].mean() for f in runs
               if "/suponly/r32/" in f.as_posix()]
    assert dice.loc[(32, "suponly"), "mean"] == pytest.approx(np.mean(per_run))
    assert dice.loc[(32, "suponly"), "std"] == pytest.approx(np.std(per_run, ddof=1))
    assert dice.loc[(32, "suponly"), "n_seeds"] == 3
    # bold: cdcl best among non-fullsup although fullsup is higher
    assert dice.loc[(32, "cdcl"), "bold"] and not dice.loc[(1, "fullsup"), "bold"]
    assert dice.loc[(1, "fullsup"), "mean"] > dice.loc[(32, "cdcl"), "mean"]
    assert dice["bold"].sum() == 2  # one per ratio column
    # ties: every method shows JC 50.00 -> all non-fullsup rows bold, fullsup not
    jac = t1[(t1["metric"] == "jaccard") & (t1["ratio"] == 32)]
    assert jac.set_index("method")["bold"].to_dict() == {"suponly": True, "meanteacher": True, "cdcl": True}
    assert not t1[(t1["method"] == "fullsup")]["bold"].any()
    # marks: suponly and meanteacher significantly below cdcl (†); meanteacher and cdcl above suponly (‡)
    marks = dice["mark"].fillna("").to_dict()
    assert marks[(32, "suponly")] == "†" and marks[(32, "meanteacher")] == "†‡"
    assert marks[(32, "cdcl")] == "‡" and marks[(1, "fullsup")] == ""
    assert t1[t1["metric"] != "dice"]["mark"].isna().all()  # only the tested metric is marked
    # the stats rows behind the marks: n = 14 images, Holm within the family
    row = comps[(comps["family"] == "vs_reference") & (comps["a"] == "suponly") & (comps["ratio"] == 32)].iloc[0]
    assert row["n_cases"] == 14 and row["p_holm"] < 0.05 and row["seeds_same_sign"] == "3/3"


def test_rendered_cells(runs, tmp_path):
    t1, _ = _table(tmp_path, runs)
    r = t1[(t1["metric"] == "dice") & (t1["ratio"] == 32) & (t1["method"] == "cdcl")].iloc[0]
    shown = f"{r['mean'] * 100:.2f} ± {r['std'] * 100:.2f}"
    md = (tmp_path / "tables" / "table1.md").read_text()
    assert "| method | 1/32 DC | 1/32 JC | 1/32 ACC | 1/32 SP | 1/32 SE | 1/8 DC |" in md
    assert f"| CDCL | **{shown}**‡ | **50.00 ± 0.00** |" in md
    assert "| FullSup |" in md and "n = 14 (dsb2018)" in md and "Holm" in md
    assert "With 3 seeds the std is imprecise (95 % CI of σ: 0.52·s to 6.3·s)" in md  # chi² quantiles
    tex = (tmp_path / "tables" / "table1.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\cmidrule(lr){2-6} \cmidrule(lr){7-11}" in tex
    assert r"Method & \multicolumn{5}{c}{1/32} & \multicolumn{5}{c}{1/8} \\" in tex
    assert (rf"CDCL & \textbf{{{r['mean'] * 100:.2f} $\pm$ {r['std'] * 100:.2f}}}$^{{\ddagger}}$ & "
            r"\textbf{50.00 $\pm$ 0.00} &") in tex
    assert r"SupOnly & " in tex and r"$^{\dagger}$" in tex
    assert tex.index(r"\midrule" + "\nFullSup") > tex.index("CDCL &")  # fullsup below a rule
    html = (tmp_path / "tables" / "table1.html").read_text()
    assert "Table 1" in html and f"<b>{shown}</b><sup>‡</sup>" in html
    t2 = (tmp_path / "tables" / "table2.md").read_text()
    # Table 2: baseline, schemes, reference (paper's order), DC only
    assert t2.index("| SupOnly |") < t2.index("| Scheme.1 |") < t2.index("| CDCL |")
    assert "| method | 1/32 DC |" in t2 and "JC" not in t2.split("\n\n")[2]
    t2csv = pd.read_csv(tmp_path / "tables" / "table2.csv").set_index("method")
    assert t2csv.loc["cdcl-scheme1", "mark"] == "†"


def test_missing_cells_are_marked_not_fatal(tmp_path):
    files = make_runs(tmp_path / "runs", skip={("meanteacher", 8, s) for s in range(3)} | {("cdcl", 8, 2)})
    t1, comps = _table(tmp_path, files)
    dice = t1[t1["metric"] == "dice"].set_index(["ratio", "method"])
    assert dice.loc[(8, "meanteacher"), "n_seeds"] == 0 and math.isnan(dice.loc[(8, "meanteacher"), "mean"])
    assert dice.loc[(8, "cdcl"), "n_seeds"] == 2
    md = (tmp_path / "tables" / "table1.md").read_text()
    assert "| MeanTeacher* | " in md and "—" in md and "(n=2)" in md
    # the untested comparisons say why; cdcl 1/8 lacks seed 2, so suponly cannot be paired with it
    row = comps[(comps["a"] == "suponly") & (comps["b"] == "cdcl") & (comps["ratio"] == 8)].iloc[0]
    assert np.isnan(row["p"]) and "cdcl lacks seed 2: 14 image(s)" in row["note"]
    with pytest.raises(DataError, match="cannot pair"):
        results, plan = build.load(files, CONFIG)
        build.write_stats(results, plan, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict" / "comparisons.csv").exists()


def test_latex_compiles(runs, tmp_path):
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed")
    _table(tmp_path, runs)
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\\usepackage[utf8]{inputenc}\\usepackage{booktabs}"
                   "\\usepackage[margin=1cm,landscape]{geometry}\\begin{document}\\input{tables/table1.tex}"
                   "\\input{tables/table2.tex}\\end{document}\n")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_pooled_convention_and_paper_delta(runs, tmp_path):
    cfg = dict(CONFIG, report=dict(CONFIG["report"], convention="pooled"))
    results, plan = build.load(runs, cfg)
    build.write_tables(results, plan, tmp_path / "t", None)
    t1 = pd.read_csv(tmp_path / "t" / "table1.csv")
    r = t1[(t1["metric"] == "dice") & (t1["method"] == "suponly") & (t1["ratio"] == 32)].iloc[0]
    per_run = [pd.read_csv(f.parent / "per_image.csv")["dice"].mean() - 0.01 for f in runs
               if "/suponly/r32/" in f.as_posix()]
    assert r["mean"] == pytest.approx(np.mean(per_run))
    delta = pd.read_csv(tmp_path / "t" / "paper_delta.csv")
    # the paper: dsb2018 1/32 SupOnly DC 83.93, FullSup 90.46 at 100 %; Table 2 scheme1 81.68
    row = delta[(delta["table"] == "table1") & (delta["method"] == "suponly") & (delta["ratio"] == 32)
                & (delta["metric"] == "dice")].iloc[0]
    assert row["paper"] == 83.93 and row["delta"] == pytest.approx(r["mean"] * 100 - 83.93)
    assert set(delta[delta["table"] == "table2"]["method"]) == {"suponly", "cdcl-scheme1", "cdcl"}
    assert not (delta["method"] == "meanteacher").any()  # not in the paper


def test_reader_fallbacks_and_errors(tmp_path):
    f = write_run(tmp_path / "r", "monuseg", "cdcl", 16, 4, np.array([0.5, 0.7]),
                  source_ids=["a", "a"], meta=False)
    doc = json.loads(f.read_text())
    del doc["metric_info"]
    f.write_text(json.dumps(doc))
    res = read_runs([f])
    assert list(res.metrics) == PIXEL  # the five pixel metrics
    assert set(res.runs[["dataset", "method", "ratio", "seed"]].itertuples(index=False)) == {("monuseg", "cdcl", 16, 4)}
    assert res.epochs["val_dice"].tolist() == pytest.approx([0.5, 0.6, 0.7])
    per = pd.read_csv(f.parent / "per_image.csv").drop(columns="source_id")
    per.to_csv(f.parent / "per_image.csv", index=False)
    assert read_runs([f]).per_image["source_id"].tolist() == ["img0", "img1"]  # falls back to id
    with pytest.raises(DataError, match="two metrics files for monuseg/cdcl/r16/seed4"):
        read_runs([f, f])
    doc["pooled"]["dice"] = math.nan  # a value the run could not compute: left out, with a note
    f.write_text(json.dumps(doc))
    res = read_runs([f])
    assert res.left_out == [("pooled", "dice", "monuseg/cdcl/r16/seed4: metrics.json pooled.dice "
                                               "is nan, left out of its cell")]
    assert not ((res.runs["convention"] == "pooled") & (res.runs["metric"] == "dice")).any()
    assert len(res.runs[res.runs["convention"] == "pooled"]) == 4  # the other four stay
    doc["pooled"]["dice"] = "0.5"  # a broken file is still an error
    f.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"pooled.dice is not a number \('0.5'\)"):
        read_runs([f])
    del doc["pooled"]["dice"]
    f.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"pooled.dice is missing"):
        read_runs([f])


def test_cli_partial_grid(runs, tmp_path, capsys):
    out = tmp_path / "out"
    partial = [f for f in runs if "meanteacher/r8" not in f.as_posix()]
    glob = str(tmp_path / "runs" / "**" / "metrics.json")
    for f in runs:
        if "meanteacher/r8" in f.as_posix():
            f.unlink()
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(CONFIG))
    assert main(["report", "--runs", glob, "--config", str(cfg), "--out", str(out), "--step", "stats"]) == 0
    assert main(["report", "--runs", glob, "--config", str(cfg), "--out", str(out), "--step", "tables"]) == 0
    assert "| MeanTeacher* | " in (out / "tables" / "table1.md").read_text()
    assert "—" in (out / "tables" / "table1.md").read_text()
    # without a config: the tables follow the runs found
    assert main(["report", "--metrics", *map(str, partial), "--out", str(tmp_path / "o2"), "--step", "tables"]) == 0
    assert "Scheme.1" in (tmp_path / "o2" / "tables" / "table2.md").read_text()
    assert main(["report", "--runs", str(tmp_path / "nothing" / "*.json"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "semibench: error: no metrics files given or matched (--metrics FILE ... or --runs GLOB)")


def test_plan_from_the_default_config():
    """The default config is the paper's: Table 2 = SupOnly, Schemes 1-6, CDCL on both datasets
    at 1/32, and three families declared before any result."""
    from semibench.config import load_workflow_config
    from semibench.report.plan import plan_from_config

    root = Path(__file__).resolve().parents[1]
    plan = plan_from_config(load_workflow_config([root / "config" / "config.yaml"]))
    assert plan.ablation.methods == ("suponly", *[f"cdcl-scheme{i}" for i in range(1, 7)], "cdcl")
    assert plan.ablation.datasets == ("dsb2018", "monuseg") and plan.ablation.ratios == (32,)
    assert plan.grid.methods[0] == "suponly" and plan.grid.methods[-2:] == ("cdcl", "fullsup")
    fams = {f.name: f for f in plan.family_list()}
    assert set(fams) == {"vs_reference", "vs_baseline", "ablation"}
    assert fams["vs_reference"].against == "cdcl" and "fullsup" not in fams["vs_reference"].methods
    assert "suponly" not in fams["vs_baseline"].methods and fams["vs_baseline"].against == "suponly"
    assert fams["vs_reference"].cells == tuple((d, k) for d in ("dsb2018", "monuseg") for k in (32, 16, 8))
    assert plan.options.n_resamples == 9999 and plan.metric == "dice"


def test_methods_beyond_the_paper_are_set_apart():
    from semibench.report.figures import palette
    from semibench.report.plan import display, order_methods
    from semibench.report.tables import beyond_paper_note
    order = order_methods(["fullsup", "unimatch", "cdcl", "suponly", "fixmatch", "mine", "cutmix"])
    assert order == ["suponly", "cutmix", "mine", "cdcl", "fixmatch", "unimatch", "fullsup"]
    assert (display("fixmatch"), display("unimatch"), display("cdcl")) == ("FixMatch*", "UniMatch*", "CDCL")
    note = beyond_paper_note(("suponly", "unimatch", "cdcl"))
    assert note.startswith(" * Not in the CDCL paper's tables: UniMatch, ") and "FixMatch" not in note
    assert beyond_paper_note(("suponly", "cdcl")) == ""
    from semibench.registry import METHODS
    colours = palette(METHODS.names())
    assert len(set(colours.values())) == len(colours)  # every registered method its own colour


def test_a_plugin_method_declares_how_the_report_shows_it():
    """Name, place, paper mark and colour come from the method's class, not from report code."""
    from semibench.method import Method
    from semibench.registry import METHODS
    from semibench.report.figures import palette
    from semibench.report.plan import display, order_methods
    from semibench.report.tables import beyond_paper_note

    class Mine(Method):
        name, display_name, report_rank, in_paper, colour = "_mine", "Mine", 95, False, "#123456"

    with METHODS.temporarily({"_mine": Mine}):
        assert display("_mine") == "Mine*"
        assert order_methods(["fixmatch", "_mine", "cdcl", "suponly"]) == ["suponly", "cdcl", "_mine", "fixmatch"]
        assert palette(["_mine", "cdcl"]) == {"_mine": "#123456", "cdcl": "#d62728"}
        assert beyond_paper_note(("suponly", "_mine", "unimatch")).startswith(
            " * Not in the CDCL paper's tables: Mine, UniMatch, on the same network")


# ---------------------------------------------------------------- issue 22: trust in the report

def _report_cli(tmp_path, files, config, *extra) -> tuple[int, str]:
    """`semibench report` as the workflow runs it (stats --strict, tables); stderr's notes."""
    import io
    from contextlib import redirect_stderr

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config))
    err = io.StringIO()
    with redirect_stderr(err):
        for step in ("stats", "tables"):
            rc = main(["report", "--metrics", *map(str, files), "--config", str(cfg), "--out",
                       str(tmp_path / "out"), "--step", step, *(["--strict"] if step == "stats" else []),
                       *extra])
            if rc:
                return rc, err.getvalue()
    return 0, err.getvalue()


def test_nan_tile_and_nan_metrics_json_give_notes_and_a_finished_report(tmp_path):
    files = make_runs(tmp_path / "runs")
    run = tmp_path / "runs/dsb2018/meanteacher/r32/seed1"
    per = pd.read_csv(run / "per_image.csv")
    per.loc[per["id"] == "img5", "dice"] = np.nan  # a NaN tile (DSB: the image itself)
    per.to_csv(run / "per_image.csv", index=False)
    doc = json.loads((tmp_path / "runs/dsb2018/cdcl/r8/seed2/metrics.json").read_text())
    doc["per_image_mean"]["dice"] = math.nan  # a NaN in metrics.json
    (tmp_path / "runs/dsb2018/cdcl/r8/seed2/metrics.json").write_text(json.dumps(doc))
    rc, err = _report_cli(tmp_path, files, CONFIG)
    assert rc == 0, err
    assert ("semibench: note: left out: dsb2018/cdcl/r8/seed2: metrics.json per_image_mean.dice "
            "is nan, left out of its cell") in err
    assert "1 test sample(s) with NaN DC (dsb2018/meanteacher/r32/seed1 img5)" in err
    comps = pd.read_csv(tmp_path / "out/stats/comparisons.csv")
    mt = comps[(comps["a"] == "meanteacher") & (comps["ratio"] == 32)]
    assert (mt["n_cases"] == 14).all()  # img5 still has seeds 0 and 2
    assert mt["note"].str.contains("1 (seed, image) pair(s) left out, NaN dice: meanteacher "
                                   "seed 1 img5", regex=False).all()
    # Table 1: the cdcl 1/8 DC cell from its two finite seeds, said so under the table
    t1 = pd.read_csv(tmp_path / "out/tables/table1.csv").set_index(["ratio", "method", "metric"])
    assert t1.loc[(8, "cdcl", "dice"), "n_seeds"] == 2 and t1.loc[(8, "cdcl", "jaccard"), "n_seeds"] == 3
    md = (tmp_path / "out/tables/table1.md").read_text()
    assert "(n=2)" in md and "Left out: dsb2018/cdcl/r8/seed2: metrics.json per_image_mean.dice is nan" in md
    friedman = pd.read_csv(tmp_path / "out/stats/friedman.csv").set_index(["ratio", "block"])
    assert "NaN dice: meanteacher seed 1 img5" in friedman.loc[(32, "table1"), "note"]
    assert pd.isna(friedman.loc[(32, "table2"), "note"])  # Table 2's rows have no NaN


def test_marks_in_both_directions_and_the_footnote(tmp_path):
    """Reference MeanTeacher, baseline CDCL: CDCL is significantly above the reference (§), SupOnly
    below it (†), SupOnly and MeanTeacher below the baseline (¶)."""
    cfg = dict(CONFIG, report=dict(CONFIG["report"], reference="meanteacher", baseline="cdcl"))
    t1, comps = _table(tmp_path, make_runs(tmp_path / "runs"), cfg)
    marks = t1[t1["metric"] == "dice"].set_index(["ratio", "method"])["mark"].fillna("").to_dict()
    assert marks[(32, "cdcl")] == "§" and marks[(32, "suponly")] == "†¶"
    assert marks[(32, "meanteacher")] == "¶" and marks[(1, "fullsup")] == ""
    md = (tmp_path / "tables" / "table1.md").read_text()
    assert "† / § DC significantly below / above MeanTeacher*; ‡ / ¶ significantly above / below CDCL" in md
    assert "zsplit" not in md and "an image with no difference counting half to each side" in md
    tex = (tmp_path / "tables" / "table1.tex").read_text()
    assert r"$^{\S}$" in tex and r"$^{\dagger}$$^{\P}$" in tex


def test_footnote_counts_the_seeds_found(tmp_path):
    one_seed = [f for f in make_runs(tmp_path / "runs") if "/seed0/" in f.as_posix()]
    _table(tmp_path, one_seed)  # the config asks for 3 seeds
    md = (tmp_path / "tables" / "table1.md").read_text()
    assert "One seed per cell: no spread." in md and "With 3 seeds" not in md
    mixed = make_runs(tmp_path / "runs2", skip={("cdcl", 8, 2)})
    _table(tmp_path / "m", mixed)
    md = (tmp_path / "m" / "tables" / "table1.md").read_text()
    assert ("With 2–3 seeds per cell (n shown where fewer than configured) the std is imprecise "
            "(95 % CI of σ: 2 seeds: 0.45·s to 31.9·s, 3 seeds: 0.52·s to 6.3·s)") in md


def test_grid_without_the_baseline_is_reported_with_a_note(tmp_path):
    """grid.methods [meanteacher, cdcl] (a new user's first grid): no SupOnly run anywhere. The
    report says what it leaves out instead of failing in the stats step."""
    from semibench.report.plan import plan_from_config

    cfg = {**CONFIG, "grid": dict(CONFIG["grid"], methods=["meanteacher", "cdcl"])}
    plan = plan_from_config(cfg)
    assert plan.left_out() == [
        "family vs_baseline (SupOnly, report.baseline, is not in grid.methods)",
        "Table 2 row SupOnly (report.baseline: the grid does not train it at the ablation's "
        "cells; add it to grid.methods and the ablation's datasets and ratios to the grid)"]
    assert plan.ablation.methods == ("cdcl-scheme1", "cdcl")
    files = [f for f in make_runs(tmp_path / "runs") if "/suponly/" not in f.as_posix()]
    rc, err = _report_cli(tmp_path, files, cfg)
    assert rc == 0, err
    assert "semibench: note: left out: family vs_baseline (SupOnly, report.baseline" in err
    comps = pd.read_csv(tmp_path / "out/stats/comparisons.csv")
    assert set(comps["family"]) == {"vs_reference", "ablation"} and comps["p"].notna().all()
    md = (tmp_path / "out/tables/table1.md").read_text()
    assert "Left out: family vs_baseline (SupOnly, report.baseline, is not in grid.methods)" in md
    assert "‡" not in md.split("Cells:")[1]  # the footnote explains no baseline mark
    t2 = (tmp_path / "out/tables/table2.md").read_text()
    assert "| SupOnly |" not in t2 and "Left out: Table 2 row SupOnly" in t2
    # ablation seeds the grid does not train: those comparisons are left out, not failed
    cfg2 = {**CONFIG, "ablation": dict(CONFIG["ablation"], seeds=[0, 1, 2, 3])}
    plan2 = plan_from_config(cfg2)
    assert plan2.left_out() == [
        "1 comparison(s) of family ablation (Scheme.1 vs CDCL at dsb2018 1/32: the config trains "
        "cdcl-scheme1 on seeds [0, 1, 2, 3] and cdcl on seeds [0, 1, 2] at dsb2018 1/32: no "
        "paired test)"]
    files2 = make_runs(tmp_path / "runs2") + [write_run(tmp_path / "runs2", "dsb2018", "cdcl-scheme1",
                                                        32, 3, np.full(14, 0.7))]
    results, plan = build.load(files2, cfg2)
    comps2 = build.compute_stats(results, plan, strict=True)["comparisons"]  # no error
    row = comps2[comps2["a"] == "cdcl-scheme1"].iloc[0]
    assert np.isnan(row["p"]) and row["note"].startswith("left out: the config trains cdcl-scheme1")


def test_comparisons_page_in_points_with_stable_ids(tmp_path):
    _table(tmp_path, make_runs(tmp_path / "runs"))
    page = (tmp_path / "stats" / "comparisons.html").read_text()
    comps = pd.read_csv(tmp_path / "stats" / "comparisons.csv")
    row = comps[(comps["a"] == "suponly") & (comps["ratio"] == 32)].iloc[0]
    seed0 = float(row["seed_deltas"].split()[0].split(":")[1])
    assert f"s0 {seed0 * 100:+.2f}" in page  # per-seed Δ in points, as Δ and its CI
    assert "per-seed Δ (pts)" in page and "Table 1's difference of two cells averages differently" in page
    assert "zsplit" not in page and "T_comparisons" in page
    _table(tmp_path / "again", make_runs(tmp_path / "runs2"))
    assert (tmp_path / "again" / "stats" / "comparisons.html").read_text() == page


def _set_selection(metrics_file: Path, epoch: int, start: int, unlabeled: int, **done) -> None:
    doc = json.loads(metrics_file.read_text())
    doc["meta"].update(checkpoint={"epoch": epoch}, config={"train": {"unsup_start_epoch": start}},
                       train_done={"n_unlabeled": unlabeled, **done})
    metrics_file.write_text(json.dumps(doc))


def test_footnote_names_runs_selected_before_the_unsupervised_start(tmp_path):
    """A semi-supervised run whose best validation epoch precedes the unsupervised gate is scored
    with its labeled stage only (on real data Mean Teacher's seed 0 was SupOnly's network, Δ = 0):
    the table says so. The gate epoch itself and runs without unlabeled images are not named."""
    files = make_runs(tmp_path / "runs")
    by_run = {tuple(f.parts[-5:-1]): f for f in files}
    _set_selection(by_run[("dsb2018", "meanteacher", "r32", "seed1")], 1, 2, 100)
    _set_selection(by_run[("dsb2018", "meanteacher", "r32", "seed0")], 2, 2, 100)  # at the gate
    _set_selection(by_run[("dsb2018", "cdcl", "r8", "seed2")], 4, 5, 100)
    _set_selection(by_run[("dsb2018", "fullsup", "r1", "seed0")], 0, 2, 0)  # no unlabeled images
    # SupOnly has unlabeled images in its split but never loads one: a record that says so, and
    # one written before train_done.json recorded it (the registry says SupOnly has no views)
    _set_selection(by_run[("dsb2018", "suponly", "r32", "seed1")], 1, 2, 100, unlabeled_per_step=0)
    _set_selection(by_run[("dsb2018", "suponly", "r8", "seed1")], 0, 2, 100)
    # a semi-supervised record with the new field is named by it
    _set_selection(by_run[("dsb2018", "cdcl", "r32", "seed1")], 0, 2, 100, unlabeled_per_step=16)
    _table(tmp_path, files)
    md = (tmp_path / "tables" / "table1.md").read_text()
    assert ("Selected (best validation epoch) before the unsupervised losses start, so scored with "
            "a network that never trained on an unlabeled image: CDCL dsb2018 1/8 seed 2 (epoch 4, "
            "start 5); CDCL dsb2018 1/32 seed 1 (epoch 0, start 2); MeanTeacher* dsb2018 1/32 seed 1 "
            "(epoch 1, start 2).") in md
    assert "SupOnly dsb2018" not in md
    assert "seed 0 (epoch" not in md
    _table(tmp_path / "plain", make_runs(tmp_path / "runs2"))
    assert "Selected (best" not in (tmp_path / "plain" / "tables" / "table1.md").read_text()


def test_friedman_and_ranking_per_table_so_a_scheme_does_not_shrink_table1(tmp_path):
    """Table 1's methods and Table 2's rows are ranked apart: Scheme 1 on seed 0 only leaves
    Table 1's Friedman on every (seed, image) pair and joins only Table 2's (SupOnly, Scheme 1,
    CDCL); FullSup, the upper bound, is in neither."""
    files = make_runs(tmp_path / "runs", skip={("cdcl-scheme1", 32, 1), ("cdcl-scheme1", 32, 2)})
    results, plan = build.load(files, CONFIG)
    build.write_stats(results, plan, tmp_path / "stats")
    fr = pd.read_csv(tmp_path / "stats" / "friedman.csv")
    assert list(zip(fr["ratio"], fr["block"], fr["methods"])) == [
        (32, "table1", "suponly meanteacher cdcl"), (32, "table2", "suponly cdcl-scheme1 cdcl"),
        (8, "table1", "suponly meanteacher cdcl")]
    t1, t2 = fr.iloc[0], fr.iloc[1]
    assert t1["note"] != t1["note"]  # NaN: no pair left out
    assert t2["note"].startswith("on the 14 of 42 (seed, image) pairs")
    # shifts 0 / +0.02 / +0.06 against noise sd 0.004: every image ranks the three the same way
    assert (t1["rank_cdcl"], t1["rank_meanteacher"], t1["rank_suponly"]) == (1.0, 2.0, 3.0)
    assert t2["rank_cdcl"] == 1.0 and t2["rank_cdcl-scheme1"] < t2["rank_suponly"]
    pw = pd.read_csv(tmp_path / "stats" / "pairwise.csv")
    assert pw.groupby(["ratio", "block"]).size().to_dict() == {(8, "table1"): 3, (32, "table1"): 3,
                                                              (32, "table2"): 3}
    rk = pd.read_csv(tmp_path / "stats" / "ranking.csv")
    assert sorted(rk[(rk["ratio"] == 32) & (rk["block"] == "table2")]["method"]) == \
        ["cdcl", "cdcl-scheme1", "suponly"]
    assert "fullsup" not in set(rk["method"]) and "fullsup" not in " ".join(fr["methods"])
    md = (tmp_path / "stats" / "comparisons.md").read_text()
    cell32 = md.split("## dsb2018 1/32")[1].split("## dsb2018 1/8")[0]
    assert cell32.index("Table 1's methods, all at once") < cell32.index("Table 2's rows, all at once")
    assert "Friedman over 3 methods on 14 images" in cell32  # Table 1: every pair
