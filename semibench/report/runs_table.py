"""``tables/runs.csv`` and ``runs.md``: every run behind the tables, one line each (its score,
the epoch model selection kept, and what it cost: training minutes on the device and threads it
recorded), so a results page can state its machine time from the runs themselves."""
from __future__ import annotations

import pandas as pd

from .plan import ReportPlan, display, order_methods
from .read import RUN_KEYS, Results

COLUMNS = RUN_KEYS + ["value", "selected_epoch", "unsup_start_epoch", "train_minutes",
                      "eval_seconds", "device", "threads", "weights"]


def runs_frame(results: Results, plan: ReportPlan) -> pd.DataFrame:
    values = results.runs[(results.runs["convention"] == plan.convention)
                          & (results.runs["metric"] == plan.metric)]
    value = {tuple(r[k] for k in RUN_KEYS): r["value"] for _, r in values.iterrows()}
    rank = {m: i for i, m in enumerate(order_methods(k[1] for k in results.run_dirs))}
    # the runs the tables show: a run outside the configured grid is left out of both
    keys = [k for k in results.run_dirs if plan.trained is None or k in plan.trained]
    rows = []
    # dataset, then the scarcest labels first (FullSup's 1/1 last), methods in the tables' order
    for key in sorted(keys, key=lambda k: (k[0], -k[2], rank[k[1]], k[3])):
        selected = results.selected.get(key)
        rows.append(dict(zip(RUN_KEYS, key), value=value.get(key),
                         selected_epoch=selected[0] if selected else None,
                         unsup_start_epoch=selected[1] if selected else None,
                         **results.provenance.get(key, {})))
    return pd.DataFrame(rows, columns=COLUMNS)


def _cell(row) -> str:
    text = "—" if pd.isna(row["value"]) else f"{row['value'] * 100:.2f}"
    if not pd.isna(row["selected_epoch"]):
        text += f" @{int(row['selected_epoch'])}"
    if not pd.isna(row["train_minutes"]):
        text += f" · {row['train_minutes']:.1f} min"
    return text


def _setting(frame: pd.DataFrame) -> str:
    """'cpu: AMD EPYC, 1 thread (all 7 runs)' or each distinct setting with its run count."""
    def one(row) -> str:
        device = row["device"] if isinstance(row["device"], str) else "device not recorded"
        threads = "" if pd.isna(row["threads"]) else \
            f", {int(row['threads'])} thread{'s' if int(row['threads']) != 1 else ''}"
        return device + threads
    counts = frame.apply(one, axis=1).value_counts(sort=False)
    if len(counts) == 1:
        return f"{counts.index[0]} (all {len(frame)} runs)"
    return "; ".join(f"{name} ({n} run{'s' if n != 1 else ''})" for name, n in counts.items())


def runs_markdown(frame: pd.DataFrame, plan: ReportPlan, abbrev) -> str:
    metric = abbrev(plan.metric)
    out = ["# Runs", "",
           f"Every run behind the tables: {metric} ({plan.convention}) in %, @ the epoch model "
           f"selection kept, · its training time (wall minutes of the train step, validation "
           f"included). Trained on: {_setting(frame) if len(frame) else '—'}. Weights: "
           f"{', '.join(sorted(set(frame['weights'].dropna()))) or 'not recorded'}."]
    for (dataset, ratio), cell in frame.groupby(["dataset", "ratio"], sort=False):
        seeds = sorted(cell["seed"].unique())
        head = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | minutes (mean) |"
        out += ["", f"## {dataset} 1/{ratio}", "", head, "|" + "---|" * (len(seeds) + 2)]
        for method, rows in cell.groupby("method", sort=False):
            by_seed = {r["seed"]: _cell(r) for _, r in rows.iterrows()}
            minutes = rows["train_minutes"].dropna()
            mean = f"{minutes.mean():.1f}" if len(minutes) else "—"
            out.append(f"| {display(method)} | " + " | ".join(by_seed.get(s, "—") for s in seeds)
                       + f" | {mean} |")
        total = cell["train_minutes"].dropna()
        if len(total):
            out += ["", f"Training time of these {len(total)} runs: {total.sum() / 60:.1f} h "
                        f"({total.sum():.0f} min)."]
    minutes = frame["train_minutes"].dropna()
    if frame[["dataset", "ratio"]].drop_duplicates().shape[0] > 1 and len(minutes):
        out += ["", f"All {len(minutes)} runs: {minutes.sum() / 60:.1f} h of training "
                    f"({minutes.sum():.0f} min)."]
    return "\n".join(out) + "\n"
