"""The CDCL paper's Table 1 and Table 2 as data (``paper_tables/``, see its README for the
source), mapped onto our names: datasets, ratios (1/k -> k, 100% -> 1), methods, metrics."""
from __future__ import annotations

from importlib import resources

import pandas as pd

DATASETS = {"dsb2018": "dsb2018", "monuseg": "monuseg", "DSB": "dsb2018", "MoNuSeg": "monuseg"}
METHODS = {"SupOnly": "suponly", "FullSup": "fullsup", "TCSMv2": "tcsmv2", "CutMix": "cutmix",
           "GCT": "gct", "CCT": "cct", "CAC": "cac", "Ours": "cdcl",
           **{f"Scheme.{i}": f"cdcl-scheme{i}" for i in range(1, 7)}}
TABLE2_RATIO = 32  # "with 1/32 labeled training data"


def load_paper_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    base = resources.files("semibench.report") / "paper_tables"
    with (base / "table1.csv").open() as f1, (base / "table2.csv").open() as f2:
        return pd.read_csv(f1), pd.read_csv(f2, keep_default_na=False)


def _ratio(label: str) -> int:
    label = str(label).strip()
    return 1 if label == "100%" else int(label.split("/")[1])


def paper_long(table1: pd.DataFrame, table2: pd.DataFrame, abbrev_to_metric: dict) -> pd.DataFrame:
    """table, dataset, ratio, method, metric, paper (%) — one row per paper cell."""
    rows = []
    for r in table1.to_dict("records"):
        for abbrev, metric in abbrev_to_metric.items():
            if abbrev in r:
                rows.append({"table": "table1", "dataset": DATASETS[r["dataset"]],
                             "ratio": _ratio(r["labeled"]), "method": METHODS[r["method"]],
                             "metric": metric, "paper": float(r[abbrev])})
    for r in table2.to_dict("records"):
        for col, dataset in (("DSB_DC", "dsb2018"), ("MoNuSeg_DC", "monuseg")):
            rows.append({"table": "table2", "dataset": dataset, "ratio": TABLE2_RATIO,
                         "method": METHODS[r["method"]], "metric": abbrev_to_metric.get("DC", "dice"),
                         "paper": float(r[col])})
    return pd.DataFrame(rows)
