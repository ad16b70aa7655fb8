"""The report's figures (matplotlib Agg + seaborn), PNG and PDF, one palette and method order.

Each figure is drawn on its own: one that cannot be drawn (no predictions saved, a single
method) becomes a small placeholder that says why, so the other figures and the report still
build."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from semibench.atomic import write_atomic

from .plan import BLOCK_TITLES, UPPER_BOUND, ReportPlan, display, method_facts, order_methods  # noqa: E402
from .read import Results  # noqa: E402
from .runlevel import AGG_REPS, POI_REPS  # noqa: E402
from .seeding import seeded  # noqa: E402

#: every figure of the report, by name, in drawing order: ``@figure`` adds one. A figure function
#: takes (results, plan, cases, stats_dir, cfg) and returns a matplotlib figure; it is written as
#: results/figures/<name>.{png,pdf}, and a failure becomes a placeholder saying why.
DRAW: dict = {}


def figure(draw):
    DRAW[draw.__name__] = draw
    return draw


def palette(methods) -> dict:
    """The same colour for a method in every figure and report: the colour its class declares
    (the bounds grey/black, CDCL red, the competitors tab10, the ablation schemes one green
    ramp), else the next of a shared palette."""
    extra = iter(sns.color_palette("Dark2", 8).as_hex() * 4)
    return {m: method_facts(m)["colour"] or next(extra) for m in methods}


#: no creation date in the files: identical inputs give identical bytes (PNG carries no date)
METADATA = {"pdf": {"CreationDate": None}, "png": {}}




def _save(fig, out_dir: Path, name: str) -> list[Path]:
    paths = []
    for suffix in ("png", "pdf"):
        path = out_dir / f"{name}.{suffix}"
        write_atomic(path, lambda tmp, s=suffix: fig.savefig(tmp, format=s, bbox_inches="tight",
                                                             dpi=150, metadata=METADATA[s]))
        paths.append(path)
    plt.close(fig)
    return paths


def placeholder(reason: str):
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, f"not drawn: {reason}", ha="center", va="center", wrap=True, fontsize=10)
    return fig


def _facets(n: int, width=4.2, height=3.4):
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


# ---------------------------------------------------------------- figures

@figure
def dice_vs_ratio(results: Results, plan: ReportPlan, cases, stats_dir, cfg=None):
    metric = plan.metric
    runs = results.runs[(results.runs["convention"] == plan.convention) & (results.runs["metric"] == metric)]
    runs = runs[runs["dataset"].isin(plan.grid.datasets) & runs["method"].isin(plan.grid.methods)]
    if runs.empty:
        return placeholder("no runs of the grid")
    datasets = list(dict.fromkeys(runs["dataset"]))
    methods = order_methods(runs["method"])
    pal = palette(methods)
    fig, axes = _facets(len(datasets))
    for ax, d in zip(axes, datasets):
        part = runs[runs["dataset"] == d]
        ratios = sorted({k for k in part.loc[part["method"] != UPPER_BOUND, "ratio"]}, reverse=True)
        xpos = {k: i for i, k in enumerate(ratios)}
        for j, m in enumerate(methods):
            rows = part[part["method"] == m]
            if rows.empty:
                continue
            if m == UPPER_BOUND:
                ax.axhline(rows["value"].mean() * 100, ls="--", color=pal[m], lw=1.2,
                           label=f"{display(m)} (100 %)")
                continue
            off = (j - (len(methods) - 1) / 2) * (0.06 if len(ratios) > 1 else 0.7 / len(methods))
            x = rows["ratio"].map(xpos) + off
            ax.scatter(x, rows["value"] * 100, s=12, color=pal[m], alpha=0.6, zorder=3)
            mean = rows.groupby("ratio")["value"].mean().reindex(ratios)
            if len(ratios) > 1:
                ax.plot(np.arange(len(ratios)) + off, mean.to_numpy() * 100, marker="o",
                        color=pal[m], ls=":" if m == plan.baseline else "-", lw=1.6, label=display(m))
            else:  # one ratio: no line to draw, the mean is a bar across the method's dots
                ax.plot(off + np.array([-0.25, 0.25]) * 0.7 / len(methods), [mean.iloc[0] * 100] * 2,
                        color=pal[m], lw=2.2, label=display(m))
        ax.set_xticks(range(len(ratios)), [f"1/{k}" for k in ratios])
        ax.set_xlim(-0.5, len(ratios) - 0.5)
        ax.set_xlabel("labeled fraction")
        ax.set_ylabel(f"{results.abbrev(metric)} (%)")
        ax.set_title(d)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    n_ratios = len({k for k in runs.loc[runs["method"] != UPPER_BOUND, "ratio"]})
    title = (f"{results.abbrev(metric)} vs label ratio: seeds (dots) and their mean (line)"
             if n_ratios > 1 else
             f"{results.abbrev(metric)} at one label ratio: seeds (dots) and their mean (bar); "
             f"a curve needs several ratios")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _cells_present(cases, plan):
    return list(dict.fromkeys(zip(cases["dataset"], cases["ratio"])))


@figure
def per_image_dice(results, plan, cases, stats_dir, cfg=None):
    if cases.empty:
        return placeholder("no per-image values")
    upper = cases[cases["method"] == UPPER_BOUND]
    cells = [c for c in _cells_present(cases, plan) if c[1] != 1 or upper.empty]
    fig, axes = _facets(len(cells), width=max(4.2, 0.5 * cases["method"].nunique() + 2))
    for ax, (d, k) in zip(axes, cells):
        part = cases[(cases["dataset"] == d) & (cases["ratio"] == k)]
        part = pd.concat([part, upper[upper["dataset"] == d]]).copy()  # FullSup as the reference
        methods = order_methods(part["method"])
        part["value"] *= 100
        pal = palette(methods)
        sns.boxplot(data=part, x="method", y="value", hue="method", order=methods, hue_order=methods,
                    palette=pal, showfliers=False, ax=ax, legend=False, boxprops={"alpha": 0.5})
        sns.stripplot(data=part, x="method", y="value", order=methods, color="0.2", size=2.5,
                      jitter=0.25, alpha=0.6, ax=ax)
        ax.set_xticks(range(len(methods)), [display(m) for m in methods], rotation=45, ha="right")
        ax.set_xlabel("")
        ax.set_ylabel(f"per-image {results.abbrev(plan.metric)} (%)")
        ax.set_title(f"{d}, 1/{k} (n = {part['source_id'].nunique()} images)")
    fig.suptitle("Per source image (mean over seeds); box = quartiles", fontsize=11)
    fig.tight_layout()
    return fig


@figure
def delta_vs_reference(results, plan, cases, stats_dir, cfg=None):
    ref = plan.reference
    if cases.empty or ref not in set(cases["method"]):
        return placeholder(f"no per-image values of the reference {display(ref)}")
    cells = [c for c in _cells_present(cases, plan)
             if ref in set(cases[(cases["dataset"] == c[0]) & (cases["ratio"] == c[1])]["method"])]
    fig, axes = _facets(len(cells), width=max(4.2, 0.5 * cases["method"].nunique() + 2))
    for ax, (d, k) in zip(axes, cells):
        part = cases[(cases["dataset"] == d) & (cases["ratio"] == k)]
        wide = part.pivot(index="source_id", columns="method", values="value")
        methods = [m for m in order_methods(wide.columns) if m != ref]
        long = (wide[methods].sub(wide[ref], axis=0) * 100).melt(var_name="method", value_name="delta",
                                                                 ignore_index=False).dropna()
        pal = palette(methods)
        sns.boxplot(data=long, x="method", y="delta", hue="method", order=methods, hue_order=methods,
                    palette=pal, showfliers=False, ax=ax, legend=False, boxprops={"alpha": 0.5})
        sns.stripplot(data=long, x="method", y="delta", order=methods, color="0.2", size=2.5,
                      jitter=0.25, alpha=0.6, ax=ax)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(methods)), [display(m) for m in methods], rotation=45, ha="right")
        ax.set_xlabel("")
        ax.set_ylabel(f"Δ{results.abbrev(plan.metric)} vs {display(ref)} (points)")
        ax.set_title(f"{d}, 1/{k}")
    fig.suptitle(f"Per-image difference to {display(ref)} (what the Wilcoxon test tests); "
                 "below 0 = worse", fontsize=11)
    fig.tight_layout()
    return fig


def _cliques(methods_by_rank, pvals, alpha):
    """Maximal runs of rank-neighbours whose pairs are all not significantly different."""
    n = len(methods_by_rank)
    out = []
    for i in range(n):
        j = i
        while j + 1 < n and all(pvals.get(frozenset((methods_by_rank[a], methods_by_rank[j + 1])), 1.0)
                                >= alpha for a in range(i, j + 1)):
            j += 1
        if j > i and not any(s <= i and j <= e for s, e in out):
            out.append((i, j))
    return out


@figure
def cd_diagram(results, plan, cases, stats_dir, cfg=None):
    friedman = _read(stats_dir, "friedman.csv")
    pairwise = _read(stats_dir, "pairwise.csv")
    if friedman is None or friedman.empty:
        return placeholder("no Friedman results")
    rows = [r for r in friedman.to_dict("records") if r["k"] >= 2]
    if not rows:
        return placeholder("fewer than two methods per cell")
    fig, axes = plt.subplots(len(rows), 1, figsize=(7.5, 1.0 + 0.32 * max(r["k"] for r in rows)) if len(rows) == 1
                             else (7.5, len(rows) * (1.0 + 0.3 * max(r["k"] for r in rows))), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        methods = r["methods"].split()
        ranks = {m: r[f"rank_{m}"] for m in methods}
        by_rank = sorted(methods, key=lambda m: ranks[m])
        k = len(methods)
        pw = pairwise[(pairwise["dataset"] == r["dataset"]) & (pairwise["ratio"] == r["ratio"])
                      & (pairwise["block"] == r["block"])]
        pvals = {frozenset((a, b)): (p if np.isfinite(p) else 1.0) for a, b, p in
                 zip(pw["a"], pw["b"], pw["p_holm"])}
        ax.set_xlim(k + 0.3, 0.7)  # rank 1 (best) on the right, as in Demsar's diagrams
        ax.set_ylim(-(k // 2 + 2) * 0.5, 1.2)
        ax.axhline(0, color="k", lw=1)
        for t in range(1, k + 1):
            ax.plot([t, t], [0, 0.12], color="k", lw=1)
            ax.text(t, 0.22, str(t), ha="center", fontsize=8)
        pal = palette(methods)
        half = (k + 1) // 2
        for i, m in enumerate(by_rank):
            right = i < half  # the better half labelled on the right
            level = -(i if right else k - 1 - i) * 0.5 - 0.5
            x_text = 0.8 if right else k + 0.2
            ax.plot([ranks[m], ranks[m], x_text], [0, level, level], color=pal[m], lw=1)
            ax.text(x_text, level, f" {display(m)} ({ranks[m]:.2f}) " , va="center",
                    ha="left" if right else "right", fontsize=8)
        for c, (i, j) in enumerate(_cliques(by_rank, pvals, plan.options.alpha)):
            y = -0.15 - 0.12 * c
            ax.plot([ranks[by_rank[i]], ranks[by_rank[j]]], [y, y], color="k", lw=3)
        ax.axis("off")
        p = r.get("p", np.nan)
        left = " (some pairs left out: friedman.csv note)" if isinstance(r.get("note"), str) \
            and r["note"].startswith("on the ") else ""
        ax.set_title(f"{r['dataset']}, 1/{int(r['ratio'])}, {BLOCK_TITLES.get(r['block'], r['block'])}: "
                     f"mean rank over {int(r['n_cases'])} images"
                     f"{left} (Friedman p = {p:.2g}); bars join methods not different "
                     f"(Wilcoxon-Holm, α = {plan.options.alpha})", fontsize=9)
    fig.tight_layout()
    return fig


@figure
def ranking_stability(results, plan, cases, stats_dir, cfg=None):
    freq = _read(stats_dir, "ranking_freq.csv")
    summary = _read(stats_dir, "ranking.csv")
    if freq is None or freq.empty:
        return placeholder("no ranking bootstrap (needs two methods with per-image values)")
    cells = list(dict.fromkeys(zip(freq["dataset"], freq["ratio"], freq["block"])))
    fig, axes = _facets(len(cells), width=max(4.2, 0.55 * freq["method"].nunique() + 2))
    for ax, (d, k, block) in zip(axes, cells):
        part = freq[(freq["dataset"] == d) & (freq["ratio"] == k) & (freq["block"] == block)]
        summ = summary[(summary["dataset"] == d) & (summary["ratio"] == k)
                       & (summary["block"] == block)].set_index("method")
        methods = sorted(summ.index, key=lambda m: summ.loc[m, "rank_full"])
        pal = palette(methods)
        for i, m in enumerate(methods):
            rows = part[(part["method"] == m) & (part["freq"] > 0)]
            ax.scatter(np.full(len(rows), i), rows["rank"], s=rows["freq"] * 400, color=pal[m], alpha=0.7)
            ax.plot([i, i], [summ.loc[m, "rank_low"], summ.loc[m, "rank_high"]], color="k", lw=1)
            ax.scatter([i], [summ.loc[m, "rank_median"]], marker="x", color="k", s=30, zorder=3)
        ax.set_xticks(range(len(methods)), [display(m) for m in methods], rotation=45, ha="right")
        ax.set_yticks(range(1, len(methods) + 1))
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_ylim(len(methods) + 0.6, 0.4)  # rank 1 on top
        ax.set_ylabel("rank (1 = best)")
        tau = summ["kendall_tau"].iloc[0]
        ax.set_title(f"{d}, 1/{k}, {BLOCK_TITLES.get(block, block)}: Kendall τ = {tau:.2f}",
                     fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    n = int(summary["n_boot"].iloc[0])
    fig.suptitle(f"Ranking stability: {n} bootstrap resamples of the images (area = frequency, "
                 "× median, line 95 %)", fontsize=10)
    fig.tight_layout()
    return fig


@figure
def over_runs(results, plan, cases, stats_dir, cfg=None):
    """rliable's aggregates over training runs (runlevel.csv): per scope one row of panels,
    mean and IQM of per-run DC, P(method > baseline), P(method > reference), 95 % CIs."""
    frame = _read(stats_dir, "runlevel.csv")
    if frame is None or frame.empty:
        return placeholder("no run-level statistics (runlevel.csv)")
    frame = frame.assign(ratio=frame["ratio"].fillna(0).astype(int))  # 0: all cells
    scopes = list(dict.fromkeys(zip(frame["scope"], frame["dataset"], frame["ratio"])))
    panels = [("mean", "", f"mean {results.abbrev(plan.metric)} (%)"),
              ("iqm", "", f"IQM {results.abbrev(plan.metric)} (%)"),
              ("p_improvement", plan.baseline, f"P(method > {display(plan.baseline)})"),
              ("p_improvement", plan.reference, f"P(method > {display(plan.reference)})")]
    methods = order_methods(frame["method"])
    pal = palette(methods)
    fig, axes = plt.subplots(len(scopes), 4, figsize=(13, 0.8 + 0.32 * len(methods) * len(scopes)
                                                       + 0.6 * len(scopes)), squeeze=False)
    for row, (scope, d, k) in zip(axes, scopes):
        part = frame[(frame["scope"] == scope) & (frame["dataset"] == d) & (frame["ratio"] == k)]
        for ax, (stat, vs, label) in zip(row, panels):
            rows = part[(part["statistic"] == stat) & (part["vs"].fillna("") == vs)]
            rows = rows.set_index("method")
            scale = 100 if stat != "p_improvement" else 1
            for i, m in enumerate(methods):
                if m not in rows.index:
                    continue
                r = rows.loc[m]
                ax.plot([r["ci_low"] * scale, r["ci_high"] * scale], [i, i], color=pal[m], lw=4,
                        alpha=0.5, solid_capstyle="butt")
                ax.plot([r["value"] * scale], [i], "|", color="k", ms=12, mew=1.6)
            if stat == "p_improvement":
                ax.axvline(0.5, color="0.4", ls="--", lw=0.8)
                ax.set_xlim(-0.02, 1.02)
            ax.set_yticks(range(len(methods)), [display(m) for m in methods] if ax is row[0] else [])
            ax.set_ylim(len(methods) - 0.5, -0.5)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3, axis="x")
        n_tasks = int(part["n_tasks"].max()) if not part.empty else 0
        where = f"{d}, 1/{int(k)}" if scope == "cell" else f"all {n_tasks} cells"
        row[0].set_title(f"{where} ({int(part['n_runs'].max())} runs per task)", fontsize=9,
                         loc="left")
    fig.suptitle(f"Over training runs (rliable): tasks = dataset × ratio cells; bars = stratified "
                 f"bootstrap 95 % CIs over runs ({AGG_REPS} resamples, {POI_REPS} for P), "
                 f"| = estimate; P counts a tie as 1/2", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if len(scopes) > 1 else 0.9))
    return fig


def _load_prepared(cfg: dict, dataset: str):
    from semibench.data.prepared import PreparedDataset

    root = Path(cfg.get("data_dir", "data")) / "prepared" / dataset
    return PreparedDataset(root) if (root / "manifest.json").exists() else None


@figure
def overlays(results, plan, cases, stats_dir, cfg=None):
    """Figure 3/5 style: truth red, prediction green, overlap yellow, for the test images at the
    10th/50th/90th percentile of ΔDC (reference − baseline) in the first seed: one column per
    image, one row per method."""
    from PIL import Image

    cfg = cfg or {}
    per = results.per_image
    if per.empty:
        return placeholder("no per-image results")
    ref, base = plan.reference, plan.baseline
    for d, k in [(d, k) for d in plan.grid.datasets for k in plan.grid.ratios]:
        part = per[(per["dataset"] == d) & (per["ratio"] == k)]
        methods = [m for m in order_methods(part["method"])]
        if ref not in methods or base not in methods:
            continue
        seed = sorted(set(part.loc[part["method"] == ref, "seed"]))[0]
        data = _load_prepared(cfg, d)
        if data is None:
            return placeholder(f"prepared data of {d} not found under data_dir")
        full = per[(per["dataset"] == d) & (per["method"] == UPPER_BOUND) & (per["seed"] == seed)]
        shown = ([UPPER_BOUND] if not full.empty else []) + methods
        wide = part[part["seed"] == seed].pivot(index="id", columns="method", values=plan.metric)
        delta = (wide[ref] - wide[base]).dropna().sort_values()
        if delta.empty:
            continue
        picks = [delta.index[int(round(q * (len(delta) - 1)))] for q in (0.1, 0.5, 0.9)]
        # one column per picked image, one row per method: three panels across stay readable
        # at the report's width however many methods there are (the rows scroll)
        fig, axes = plt.subplots(len(shown) + 1, 3, figsize=(7.2, 2.3 * (len(shown) + 1)),
                                 squeeze=False)
        for col, (q, sid) in enumerate(zip((10, 50, 90), picks)):
            sample = data.load(sid)
            axes[0, col].imshow(sample.image)
            axes[0, col].set_title(f"{sid}\nP{q}: Δ = {delta[sid] * 100:+.1f}", fontsize=9)
            if col == 0:
                axes[0, col].set_ylabel("image", fontsize=10)
            gt = sample.mask.astype(bool)
            for row, m in enumerate(shown, start=1):
                ax = axes[row, col]
                ratio = 1 if m == UPPER_BOUND else k
                run_dir = results.run_dirs.get((d, m, ratio, seed))
                png = run_dir / "predictions" / f"{sid}.png" if run_dir else None
                ax.imshow(sample.image, alpha=0.35)
                if png is None or not png.exists():
                    ax.text(0.5, 0.5, "no prediction\nsaved", ha="center", va="center",
                            transform=ax.transAxes, fontsize=9)
                else:
                    pred = np.asarray(Image.open(png).convert("L")) > 127
                    rgba = np.zeros(gt.shape + (4,))
                    rgba[..., 0] = gt
                    rgba[..., 1] = pred
                    rgba[..., 3] = 0.75 * (gt | pred)
                    ax.imshow(rgba)
                    score = per[(per["dataset"] == d) & (per["method"] == m) & (per["ratio"] == ratio)
                                & (per["seed"] == seed) & (per["id"] == sid)][plan.metric]
                    if not score.empty:
                        ax.text(0.02, 0.98, f"{score.iloc[0] * 100:.1f}", transform=ax.transAxes,
                                va="top", fontsize=9, color="w",
                                bbox={"facecolor": "k", "alpha": 0.5, "pad": 1, "lw": 0})
                if col == 0:
                    ax.set_ylabel(display(m), fontsize=10)
        for ax in axes.flat:
            ax.set_xticks([]), ax.set_yticks([])
        fig.suptitle(f"{d}, 1/{k}, seed {seed}: truth red, prediction green, overlap yellow\n"
                     f"columns = 10th/50th/90th percentile of Δ{results.abbrev(plan.metric)} "
                     f"({display(ref)} − {display(base)})\ncorner = the image's "
                     f"{results.abbrev(plan.metric)} (%)", fontsize=9)
        fig.tight_layout()
        return fig
    return placeholder(f"no dataset/ratio with both {display(ref)} and {display(base)} per-image results")


@figure
def training_curves(results, plan, cases, stats_dir, cfg=None):
    ep = results.epochs
    if ep.empty:
        return placeholder("no train.jsonl epoch events")
    cells = list(dict.fromkeys(zip(ep["dataset"], ep["ratio"])))
    cells = sorted(cells, key=lambda c: (c[0], -c[1]))
    has_val = "val_dice" in ep.columns
    fig, axes = plt.subplots(2 if has_val else 1, len(cells), figsize=(4.2 * len(cells), 6.4 if has_val else 3.4),
                             squeeze=False)
    for j, (d, k) in enumerate(cells):
        part = ep[(ep["dataset"] == d) & (ep["ratio"] == k)]
        methods = order_methods(part["method"])
        pal = palette(methods)
        loss = "loss_loss" if "loss_loss" in part.columns else next(
            (c for c in part.columns if c.startswith("loss_")), None)
        for m in methods:
            rows = part[part["method"] == m].groupby("epoch").mean(numeric_only=True)
            # an ablation scheme is a variant of CDCL and can coincide with its curve: dashed, on top
            style = ({"ls": (0, (4, 2)), "lw": 1.6, "zorder": 3} if m.startswith("cdcl-scheme")
                     else {"lw": 1.4, "zorder": 2})
            if loss is not None:
                axes[0, j].plot(rows.index, rows[loss], color=pal[m], label=display(m), **style)
            if has_val:
                axes[1, j].plot(rows.index, rows["val_dice"] * 100, color=pal[m],
                                label=display(m), **style)
        axes[0, j].set_title(f"{d}, {'100%' if k == 1 else f'1/{k}'}", fontsize=10)
        axes[0, j].set_ylabel("total training loss (mean over seeds)")
        axes[0, j].set_yscale("log")
        if has_val:
            axes[1, j].set_ylabel("validation DC (%)")
            axes[1, j].set_xlabel("epoch")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.tight_layout()
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="center left",
               bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig


def _read(stats_dir, name):
    path = Path(stats_dir) / name if stats_dir else None
    if path is None or not path.exists() or path.stat().st_size == 0:
        return None
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    if name in BLOCKED and "block" not in frame.columns:  # written before the per-table views
        frame.insert(2, "block", "table1")
    return frame


BLOCKED = ("friedman.csv", "pairwise.csv", "ranking.csv", "ranking_freq.csv")


FIGURES = list(DRAW)


def write_figures(results: Results, plan: ReportPlan, stats_dir: Path, out_dir: Path,
                  cfg: dict | None = None, names=FIGURES) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="ticks", context="paper")
    cases = _read(stats_dir, "cases.csv")
    if cases is None:
        cases = pd.DataFrame(columns=["dataset", "ratio", "method", "source_id", "value"])
    paths = []
    for name in names:
        try:
            draw = DRAW[name]
            with seeded(plan.options.seed):
                fig = draw(results, plan, cases, stats_dir, cfg)
        except Exception as e:  # one figure must not take down the others
            plt.close("all")
            fig = placeholder(f"{type(e).__name__}: {e}")
        paths += _save(fig, out_dir, name)
    return paths
