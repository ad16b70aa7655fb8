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
from semibench.report.read import FALLBACK_METRIC_INFO, read_runs

PIXEL = list(FALLBACK_METRIC_INFO)
CONFIG = {
    "grid": {"datasets": ["dsb2018"], "methods": ["suponly", "meanteacher", "cdcl"], "ratios": [32, 8],
             "fullsup": True, "seeds": [0, 1, 2]},
    "ablation": {"datasets": ["dsb2018"], "methods": ["cdcl-scheme1"], "ratios": [32], "seeds": [0, 1, 2]},
    "report": {"n_resamples": 999, "n_boot_rank": 50},
}


def write_run(root: Path, dataset, method, ratio, seed, dice: np.ndarray, extra=None,
              source_ids=None, meta=True) -> Path:
    """A run directory as semibench.evaluate writes it: per-image Dice `dice`, the other pixel
    metrics 0.5 (accuracy 0.9), metrics.json means of those."""
    run = root / dataset / method / f"r{ratio}" / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    ids = [f"img{i}" for i in range(len(dice))]
    frame = pd.DataFrame({"id": ids, "source_id": source_ids or ids, "height": 8, "width": 8,
                          "tp": 1, "fp": 1, "tn": 1, "fn": 1, "dice": dice, "jaccard": 0.5,
                          "accuracy": 0.9, "specificity": 0.5, "sensitivity": 0.5})
    frame.to_csv(run / "per_image.csv", index=False)
    means = {m: float(frame[m].mean()) for m in PIXEL}
    doc = {"per_image_mean": means, "pooled": dict(means, dice=float(frame["dice"].mean()) - 0.01),
           "metric_info": FALLBACK_METRIC_INFO, **(extra or {})}
    if meta:
        doc["meta"] = {"dataset": dataset, "method": method, "ratio": ratio, "seed": seed}
    (run / "metrics.json").write_text(json.dumps(doc))
    lines = [{"event": "epoch", "epoch": e, "losses": {"loss": 1.0 / (e + 1)}, "val_dice": 0.5 + 0.1 * e}
             for e in range(3)]
    (run / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return run / "metrics.json"


def make_runs(root: Path, n_images=14, skip=()) -> list[Path]:
    """dsb2018: cdcl clearly best, meanteacher ~ suponly + 2 points, suponly; fullsup on top;
    Table 2's scheme1 below cdcl. Same 14 test images in every seed (MoNuSeg-like)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.8, n_images)
    shift = {"suponly": 0.0, "meanteacher": 0.02, "cdcl": 0.06, "cdcl-scheme1": 0.01, "fullsup": 0.15}
    files = []
    for method, s in shift.items():
        for ratio in ((1,) if method == "fullsup" else (32, 8) if method != "cdcl-scheme1" else (32,)):
            for seed in range(3):
                if (method, ratio, seed) in skip:
                    continue
                noise = rng.normal(0, 0.004, n_images)
                dice = np.clip(base + s + noise + (0.02 if ratio == 8 else 0), 0, 1)
                files.append(write_run(root, "dsb2018", method, ratio, seed, dice))
    return files


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
    assert "| MeanTeacher | " in md and "—" in md and "(n=2)" in md
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
    doc["pooled"] = {"dice": math.nan}
    f.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"pooled.dice is missing or not a finite number"):
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
    assert "| MeanTeacher | " in (out / "tables" / "table1.md").read_text()
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
    assert note.startswith(" * Not in the CDCL paper: UniMatch, ") and "FixMatch" not in note
    assert beyond_paper_note(("suponly", "cdcl")) == ""
    from semibench.registry import METHODS
    colours = palette(METHODS.names())
    assert len(set(colours.values())) == len(colours)  # every registered method its own colour
