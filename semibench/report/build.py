"""The report's three steps, each writing its own files (so a failing figure never blocks a
table): :func:`write_stats`, :func:`write_tables`, :func:`write_figures`. Files are written to a
temporary name and renamed, so a failed step leaves no half-written output."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from semibench.atomic import write_atomic
from semibench.errors import DataError
from semibench.layout import run_key

from . import runlevel, stats, twolevel
from .markdown import comparisons_markdown, seed_deltas_points, value_with_ci
from .paper import load_paper_tables
from .paper_gains import paper_gains, paper_gains_markdown
from .plan import UPPER_BOUND, ReportPlan, display, plan_from_config, plan_from_runs
from .read import Results, read_runs
from .runs_table import runs_frame, runs_markdown
from .tables import (
    beyond_paper_note,
    build_table,
    footnote,
    n_cases_by_dataset,
    paper_delta,
    render_all,
    summarize,
    table_metrics,
    unlabeled_note,
)

STATS_FILES = ["comparisons.csv", "comparisons.html", "comparisons.md", "friedman.csv",
               "pairwise.csv", "ranking.csv", "ranking_freq.csv", "cases.csv", "runlevel.csv"]
TABLE_FILES = [f"{t}.{s}" for t in ("table1", "table2") for s in ("csv", "md", "tex", "html")] + \
    ["paper_delta.csv", "paper_delta.md", "paper_delta.html", "paper_gains.csv", "paper_gains.md",
     "runs.csv", "runs.md"]


def load(metric_files, config: dict | None) -> tuple[Results, ReportPlan]:
    results = read_runs(metric_files)
    plan = plan_from_config(config) if config and config.get("grid") else None
    if plan is None:
        base = plan_from_config(config or {})
        plan = plan_from_runs(results.run_dirs, base)
    return results, plan


def _cells(plan: ReportPlan) -> list[tuple]:
    cells = [(d, k) for d in plan.grid.datasets for k in plan.grid.ratios]
    if plan.ablation is not None:
        cells += [(d, k) for d in plan.ablation.datasets for k in plan.ablation.ratios]
    return list(dict.fromkeys(cells))


def _blocks(plan: ReportPlan, dataset: str, ratio: int) -> list[tuple[str, list[str]]]:
    """The all-methods-at-once views of a cell, one per table: Table 1's methods (FullSup, the
    upper bound, left out) and Table 2's (baseline, schemes, reference). Each gets its own
    Friedman test and ranking, so an ablation scheme neither joins the methods' ranking nor
    shrinks its paired subset to the seeds the schemes have."""
    blocks = []
    if dataset in plan.grid.datasets and ratio in plan.grid.ratios:
        blocks.append(("table1", [m for m in plan.grid.methods if m != UPPER_BOUND]))
    if plan.ablation is not None and dataset in plan.ablation.datasets and ratio in plan.ablation.ratios:
        blocks.append(("table2", list(plan.ablation.methods)))
    return [(name, methods) for name, methods in blocks if methods]


def compute_stats(results: Results, plan: ReportPlan, strict: bool = False) -> dict:
    """Every stats frame: comparisons, friedman, pairwise, ranking, ranking_freq, cases."""
    metric = plan.metric
    if results.per_image.empty or metric not in results.per_image.columns:
        raise DataError(f"no per-image {metric!r} values (per_image.csv) to test")
    seed_level = stats.seed_cases(results.per_image, metric)
    cases = stats.case_values(seed_level)
    comparisons = stats.run_families(seed_level, plan.family_list(), metric, plan.options, strict)
    scores = runlevel.run_scores(results, plan)
    improvement = runlevel.Improvement(scores, plan.options.seed, plan.options.confidence)
    comparisons = _over_runs(comparisons, seed_level, plan, improvement)
    higher_is_better = results.higher_is_better(metric)
    parts: dict[str, list[pd.DataFrame]] = {"friedman": [], "pairwise": [], "ranking_freq": [],
                                            "ranking": []}
    for dataset, ratio in _cells(plan):
        for block, methods in _blocks(plan, dataset, ratio):
            cell = [(dataset, ratio)]
            omnibus, pairwise = stats.friedman(seed_level, cell, methods, higher_is_better,
                                               plan.options)
            freq, summary = stats.ranking_stability(seed_level, cell, methods, higher_is_better,
                                                    plan.options)
            for name, frame in zip(parts, (omnibus, pairwise, freq, summary)):
                if not frame.empty:
                    frame.insert(2, "block", block)  # after dataset, ratio
                parts[name].append(frame)

    def concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
        kept = [f for f in frames if not f.empty]
        return pd.concat(kept, ignore_index=True) if kept else pd.DataFrame()

    return {"comparisons": comparisons, **{name: concat(frames) for name, frames in parts.items()},
            "cases": cases, "runlevel": runlevel.summarize(scores, plan, improvement)}


def _over_runs(comparisons: pd.DataFrame, seed_level: pd.DataFrame, plan: ReportPlan,
               improvement) -> pd.DataFrame:
    """The comparisons with their claims over training runs: the two-level CI beside the
    image-level one, then P(improvement), seeds needed and the claim in words before the note."""
    out = runlevel.add_improvement(twolevel.annotate(comparisons, seed_level, plan.options),
                                   improvement)
    cols = list(comparisons.columns)
    at = cols.index("ci_high") + 1
    cols[at:at] = ["two_level_low", "two_level_high"]
    cols[-1:-1] = ["p_improvement", "p_improvement_low", "p_improvement_high", "seeds_needed",
                   "holds_over", "claim"]
    return out[cols]


def report_notes(results: Results, plan: ReportPlan) -> list[str]:
    """Everything left out of the report, what the config does not train and what is NaN."""
    return plan.left_out() + data_notes(results, plan)


def data_notes(results: Results, plan: ReportPlan, section=None, limit: int = 3) -> list[str]:
    """The values left out because they are NaN (metrics.json values of the tables' convention,
    per-image samples of the tested metric), for the runs of ``section`` (all when None)."""
    def inside(d, m):
        return section is None or (d in section.datasets and m in section.methods)

    notes = [msg for conv, metric, msg in results.left_out
             if conv == plan.convention and inside(*msg.split("/")[:2])]
    per = results.per_image
    if plan.metric in per.columns:
        nan = per[per[plan.metric].isna()]
        nan = nan[[inside(d, m) for d, m in zip(nan["dataset"], nan["method"])]]
        if not nan.empty:
            shown = ", ".join(f"{run_key(r.dataset, r.method, r.ratio, r.seed)} {r.id}"
                              for r in nan.head(limit).itertuples())
            more = f" and {len(nan) - limit} more" if len(nan) > limit else ""
            notes.append(f"{len(nan)} test sample(s) with NaN {results.abbrev(plan.metric)} "
                         f"({shown}{more}): their images are left out of the tests in those "
                         f"seeds, the comparisons' notes say where")
    return notes


def selection_notes(results: Results, section=None) -> list[str]:
    """The runs that trained on unlabeled images but whose selected (best validation) epoch
    precedes the unsupervised losses' start: the network they are scored with never saw an
    unlabeled image, so their row measures the labeled stage only."""
    notes = []
    for (dataset, method, ratio, seed), (epoch, start, _, per_step) in sorted(results.selected.items()):
        if per_step > 0 and epoch < start and (
                section is None or (dataset in section.datasets and method in section.methods)):
            notes.append(f"{display(method)} {dataset} 1/{ratio} seed {seed} "
                         f"(epoch {epoch}, start {start})")
    return notes


def _comparisons_html(frame: pd.DataFrame, plan: ReportPlan, abbrev, notes=()) -> str:
    show = frame.copy()
    for c in ("delta", "ci_low", "ci_high", "t_low", "t_high", "two_level_low", "two_level_high"):
        show[c] = show[c] * 100
    show["p_improvement"] = [value_with_ci(v, lo, hi) for v, lo, hi in zip(
        frame["p_improvement"], frame["p_improvement_low"], frame["p_improvement_high"])]
    show["a"] = show["a"].map(display)
    show["b"] = show["b"].map(display)
    show["seed_deltas"] = show["seed_deltas"].map(seed_deltas_points)
    metric = abbrev(plan.metric)
    cols = {"family": "family", "dataset": "dataset", "ratio": "1/k", "a": "method",
            "b": "vs", "n_cases": "n images", "delta": f"Δ{metric} (pts)",
            "ci_low": "95% CI low (pts)", "ci_high": "95% CI high (pts)",
            "two_level_low": "two-level CI low (pts)", "two_level_high": "two-level CI high (pts)",
            "W": "W", "p": "p", "p_holm": "p Holm", "claim": "holds over", "rbc": "r (rank-biserial)",
            "seeds_same_sign": "same sign (seeds)", "seed_deltas": "per-seed Δ (pts)",
            "p_improvement": "P(improvement) [95% CI]", "seeds_needed": "seeds needed",
            "test": "test", "note": "note"}
    show = show[list(cols)].rename(columns=cols)
    fmt = {cols[c]: "{:+.2f}" for c in ("delta", "ci_low", "ci_high", "two_level_low",
                                         "two_level_high")}
    fmt.update({"W": "{:.1f}", "p": "{:.2g}", "p Holm": "{:.2g}", cols["rbc"]: "{:+.2f}"})
    styler = show.style.format(fmt, na_rep="—").hide(axis="index").set_uuid("comparisons")
    styler = styler.apply(lambda col: ["font-weight: bold" if v else "" for v in
                                       (frame["significant"].fillna(False).astype(bool))],
                          subset=["p Holm"])
    o = plan.options
    intro = (
        f"<p>Two-sided paired Wilcoxon signed-rank tests on per-source-image {html.escape(metric)} "
        f"(an image with no difference counts half to each side); Holm within family and "
        f"dataset; bold p Holm &lt; {o.alpha}. The <i>test</i> column says how p was computed: "
        f"exact, every sign flip enumerated (up to {stats.EXACT_MAX_N} images), or random sign flips "
        f"({o.n_resamples}, seed {o.seed}).</p>"
        f"<p>Every difference is in {html.escape(metric)} points (×100). <b>Δ</b> = method − vs, "
        f"the mean over source images of each image's difference, an image's value being its "
        f"mean over the seeds whose test set holds it (MoNuSeg: its tiles first); 95 % BCa "
        f"bootstrap CI over images ({o.n_resamples} resamples, seed {o.seed}). Table 1's "
        f"difference of two cells averages differently: each seed's test samples, then the "
        f"seeds. The two agree when every image is in every seed's test set with all its "
        f"tiles; they differ where the test set is re-drawn per seed (DSB: an image in one seed "
        f"weighs as much here as one in three) or a NaN was left out. <b>Per-seed Δ</b>: the "
        f"mean difference over that seed's images; with <i>same sign</i>, a robustness check, "
        f"not a test. <b>r</b> (matched-pairs rank-biserial) = (R+ − R−) / (R+ + R−) over the "
        f"ranks of the non-zero |differences|: +1 when the method wins on every image; its sign "
        f"is the direction the test found (and of the table's marks). Δ and r can disagree in "
        f"sign when a few large differences outweigh many small ones; the note says so where "
        f"it happens.</p>"
        f"<p><b>Over test images or over training runs.</b> p and its CI generalise over test "
        f"images of these trained runs, not over training runs. The <b>two-level CI</b> "
        f"resamples the seeds, then the source images within each drawn seed "
        f"({twolevel.TWO_LEVEL_REPS} resamples, seed {o.seed}); with 2-3 seeds it reaches "
        f"about every seed's own Δ. <i>Holds over</i> says which claim the row supports: "
        f"significant over test images (p Holm &lt; {o.alpha}) and/or established over "
        f"training runs (the two-level CI excludes 0). <b>P(improvement)</b>: rliable's "
        f"probability that a run of the method beats a run of the other at this cell (a tie "
        f"counts 1/2), with a stratified bootstrap CI over runs ({runlevel.POI_REPS} "
        f"resamples). <b>Seeds needed</b>: simulated from the two-level bootstrap of this "
        f"comparison, the fewest seeds at which a difference of this size would have its "
        f"two-level CI exclude 0 with {twolevel.POWER:.0%} probability (searched up to "
        f"{twolevel.MAX_SEEDS}); empty with one seed.</p>")
    if notes:
        intro += "<p>Left out:</p><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) \
            + "</ul>"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Statistics</title>"
            f"<style>table{{border-collapse:collapse;font:12px sans-serif}}td,th{{padding:2px 6px;"
            f"border-bottom:1px solid #ddd}}p,li{{font:13px sans-serif;max-width:60em}}</style>"
            f"</head><body><h2>Statistics: pairwise comparisons</h2>{intro}{styler.to_html()}"
            f"</body></html>")


def write_stats(results: Results, plan: ReportPlan, out_dir: Path, strict: bool = False) -> list[Path]:
    frames = compute_stats(results, plan, strict)
    out_dir = Path(out_dir)
    texts = {f"{name}.csv": frame.to_csv(index=False, float_format="%.10g")
             for name, frame in frames.items()}
    texts["comparisons.html"] = _comparisons_html(frames["comparisons"], plan, results.abbrev,
                                                  report_notes(results, plan))
    texts["comparisons.md"] = comparisons_markdown(frames, plan, results.abbrev)
    paths = []
    for name in STATS_FILES:
        write_atomic(out_dir / name, texts[name])
        paths.append(out_dir / name)
    return paths


def read_comparisons(path: Path | None) -> pd.DataFrame | None:
    if path is None or not Path(path).exists():
        return None
    return pd.read_csv(path, keep_default_na=True)


def table_texts(results: Results, plan: ReportPlan, comparisons: pd.DataFrame | None) -> dict:
    """{file name: text} for both tables, the paper delta and the runs behind them."""
    summary = summarize(results, plan.convention)
    hib = {m: results.higher_is_better(m) for m in results.metrics}
    out = {}
    specs = [("table1", "Table 1", plan.grid, None)]
    if plan.ablation is not None:
        specs.append(("table2", "Table 2", plan.ablation, [plan.metric]))
    left_out = plan.left_out_by_table()
    for name, title, section, metrics in specs:
        metrics = metrics or table_metrics(results, section, plan.convention,
                                           plan.table1_metrics) or [plan.metric]
        frame = build_table(summary, section, metrics, plan, comparisons, name, hib)
        fams = [f.name for f in plan.family_list() if (f.name == "ablation") == (name == "table2")]
        if name == "table2" and any(f.name == "vs_baseline" for f in plan.family_list()) \
                and plan.reference in section.methods:
            fams.append(f"vs_baseline for {display(plan.reference)}")
        notes = left_out[name] + data_notes(results, plan, section)
        note = footnote(plan, n_cases_by_dataset(comparisons, section.datasets), fams,
                        results.abbrev, upper_bound=UPPER_BOUND in section.methods,
                        n_seeds_found=frame.loc[frame["metric"] == metrics[0], "n_seeds"],
                        notes=notes, pre_gate=selection_notes(results, section)) \
            + twolevel.claims_note(comparisons, fams, display) + beyond_paper_note(section.methods) \
            + unlabeled_note(results, section.datasets)
        what = ("segmentation of the test sets" if name == "table1"
                else f"ablation, {results.abbrev(plan.metric)}")
        for suffix, text in render_all(frame, f"{title}: {what}", note, results.abbrev,
                                       f"tab:{name}").items():
            out[f"{name}.{suffix}"] = text
    if "table2.csv" not in out:  # no ablation configured: say so instead of a missing file
        empty = "<p>No ablation configured (config <code>ablation</code> is empty).</p>"
        out.update({"table2.csv": "table,dataset,ratio,method,metric,mean,std,n_seeds,n_expected,bold,mark\n",
                    "table2.md": "# Table 2\n\nNo ablation configured.\n",
                    "table2.tex": "% Table 2: no ablation configured\n",
                    "table2.html": f"<html><body><h2>Table 2</h2>{empty}</body></html>"})
    runs = runs_frame(results, plan)
    out["runs.csv"] = runs.to_csv(index=False, float_format="%.10g")
    out["runs.md"] = runs_markdown(runs, plan, results.abbrev)
    abbrevs = {results.abbrev(m): m for m in results.metrics}
    p1, p2 = load_paper_tables()
    delta = paper_delta(summary, p1, p2, abbrevs)
    out["paper_delta.csv"] = delta.to_csv(index=False, float_format="%.10g")
    intro = ("Ours − paper per cell, percentage points (ours: mean over seeds of the "
             f"{plan.convention} values; paper: CDCL CVPR 2022 Tables 1 and 2, "
             "semibench/report/paper_tables). Only cells both have.")
    if delta.empty:
        intro += " None here: these runs share no (dataset, ratio, method) with the paper."
    show = delta.assign(method=delta["method"].map(display), metric=delta["metric"].map(results.abbrev))
    out["paper_delta.md"] = "# Paper delta\n\n" + intro + "\n\n" + (
        show.to_markdown(index=False, floatfmt=".2f") if not delta.empty else "") + "\n"
    gains = paper_gains(results, plan, p1, p2)
    out["paper_gains.csv"] = gains.to_csv(index=False, float_format="%.10g")
    out["paper_gains.md"] = paper_gains_markdown(gains, plan, results.abbrev)
    out["paper_delta.html"] = (f"<html><head><meta charset='utf-8'></head><body><h2>Ours − paper"
                               f"</h2><p>{html.escape(intro)}</p>"
                               + (show.style.format(precision=2).hide(axis="index")
                                  .set_uuid("paper_delta").to_html() if not delta.empty else "")
                               + "</body></html>")
    return out


def write_tables(results: Results, plan: ReportPlan, out_dir: Path,
                 comparisons: pd.DataFrame | None) -> list[Path]:
    texts = table_texts(results, plan, comparisons)
    paths = []
    for name in TABLE_FILES:
        write_atomic(Path(out_dir) / name, texts[name])
        paths.append(Path(out_dir) / name)
    return paths
