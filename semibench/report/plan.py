"""What the report shows, decided from the config before any result is read: the Table 1 and
Table 2 cells, the method order and names, the reference and baseline, and the test families."""
from __future__ import annotations

from dataclasses import dataclass, field

from semibench.errors import ConfigError
from semibench.registry import METHOD_STATIC_ATTRS, METHODS

from .stats import Family, StatOptions

#: the mark of a method the CDCL paper's tables do not have (``in_paper = False`` in its class),
#: explained in the table footnote
BEYOND_MARK = "*"
UPPER_BOUND = "fullsup"  # never bold, never tested: it sees every label
# the all-at-once views of a cell (Friedman, ranking), one per table: stats CSVs' ``block``
BLOCK_TITLES = {"table1": "Table 1's methods", "table2": "Table 2's rows"}
FAMILY_KINDS = ("vs_reference", "vs_baseline", "ablation")
_UNKNOWN = {"display_name": None, "report_rank": METHOD_STATIC_ATTRS["report_rank"],
            "in_paper": True, "colour": None}


def method_facts(method: str) -> dict:
    """How the report shows ``method``: display_name, report_rank, in_paper and colour, as its
    class declares them (semibench.method; read from the source, no import). A name that no
    installed method has (runs read from another machine) keeps its name, the default place,
    no mark and no fixed colour."""
    try:
        return {attr: METHODS.static(method, attr) for attr in _UNKNOWN}
    except ConfigError:
        return dict(_UNKNOWN)


def beyond_paper(method: str) -> bool:
    return not method_facts(method)["in_paper"]


def display(method: str) -> str:
    facts = method_facts(method)
    return (facts["display_name"] or method) + ("" if facts["in_paper"] else BEYOND_MARK)


def order_methods(methods) -> list[str]:
    """One method order everywhere (tables, figures, palette): by each method's report_rank
    (the paper's rows, CDCL, later baselines, FullSup last), ties in the order given."""
    methods = list(dict.fromkeys(methods))
    return sorted(methods, key=lambda m: method_facts(m)["report_rank"])


@dataclass(frozen=True)
class Section:
    """A table's cells: datasets x methods x ratios x seeds (fullsup at ratio 1)."""
    datasets: tuple
    methods: tuple
    ratios: tuple
    seeds: tuple

    def runs(self) -> list[tuple]:
        return [(d, m, 1 if m == UPPER_BOUND else k, s) for d in self.datasets
                for m in self.methods for k in ((1,) if m == UPPER_BOUND else self.ratios)
                for s in self.seeds]


@dataclass(frozen=True)
class ReportPlan:
    grid: Section
    ablation: Section | None
    reference: str = "cdcl"
    baseline: str = "suponly"
    metric: str = "dice"  # the tested endpoint; other metrics are descriptive
    convention: str = "per_image_mean"
    table1_metrics: tuple | None = None  # None: the pixel metrics every run reports (the paper's)
    families: tuple = FAMILY_KINDS
    options: StatOptions = field(default_factory=StatOptions)
    # the runs the config trains, (dataset, method, ratio, seed); None: planned from runs found
    trained: frozenset | None = None
    left_out_rows: tuple = ()  # what the config leaves out of Table 2, one line each

    def seeds_trained(self, dataset: str, method: str, ratio: int) -> set | None:
        """The seeds the config trains of this cell (None: no config, anything goes)."""
        if self.trained is None:
            return None
        k = 1 if method == UPPER_BOUND else ratio
        return {s for d, m, r, s in self.trained if (d, m, r) == (dataset, method, k)}

    def _why_not(self, dataset: str, ratio: int, a: str, b: str) -> str | None:
        sa, sb = self.seeds_trained(dataset, a, ratio), self.seeds_trained(dataset, b, ratio)
        if sa is None:
            return None
        where = f"{dataset} 1/{ratio}"
        for m, seeds in ((b, sb), (a, sa)):
            if not seeds:
                return f"the config does not train {m} at {where}"
        if sa != sb:
            return (f"the config trains {a} on seeds {sorted(sa)} and {b} on seeds {sorted(sb)} "
                    f"at {where}: no paired test")
        return None

    def family_list(self) -> list[Family]:
        out = []
        g = self.grid
        tested = [m for m in g.methods if m != UPPER_BOUND]
        cells = tuple((d, k) for d in g.datasets for k in g.ratios)
        if "vs_reference" in self.families and self.reference in tested:
            out.append(Family("vs_reference", self.reference, tuple(tested), cells))
        if "vs_baseline" in self.families and self.baseline in tested:
            ssl = tuple(m for m in tested if m != self.baseline)
            out.append(Family("vs_baseline", self.baseline, ssl, cells))
        a = self.ablation
        if "ablation" in self.families and a is not None and self.reference in a.methods:
            acells = tuple((d, k) for d in a.datasets for k in a.ratios)
            skip = tuple(((d, k, m), why) for d, k in acells for m in a.methods
                         if m != self.reference
                         and (why := self._why_not(d, k, m, self.reference)) is not None)
            out.append(Family("ablation", self.reference, a.methods, acells, skip))
        return out

    def left_out_by_table(self) -> dict[str, list[str]]:
        """What the report will not show or test although the config's report section asks for
        it, because the grid does not train it, per table: known before any training."""
        out = {"table1": [], "table2": list(self.left_out_rows)}
        tested = [m for m in self.grid.methods if m != UPPER_BOUND]
        for fam, role, method in (("vs_reference", "report.reference", self.reference),
                                  ("vs_baseline", "report.baseline", self.baseline)):
            if fam in self.families and self.grid.methods and method not in tested:
                out["table1"].append(f"family {fam} ({display(method)}, {role}, is not in "
                                     f"grid.methods)")
        for fam in self.family_list():
            if fam.left_out:
                (d, k, m), why = fam.left_out[0]
                more = f" and {len(fam.left_out) - 1} more" if len(fam.left_out) > 1 else ""
                out["table2" if fam.name == "ablation" else "table1"].append(
                    f"{len(fam.left_out)} comparison(s) of family {fam.name} ({display(m)} vs "
                    f"{display(fam.against)} at {d} 1/{k}: {why}{more})")
        return out

    def left_out(self) -> list[str]:
        """Every line of :meth:`left_out_by_table`."""
        return [line for lines in self.left_out_by_table().values() for line in lines]


def _section(sec: dict | None, with_fullsup: bool) -> Section | None:
    if not sec or not sec.get("datasets") or not sec.get("methods"):
        return None
    methods = list(sec["methods"])
    if with_fullsup and sec.get("fullsup") and UPPER_BOUND not in methods:
        methods.append(UPPER_BOUND)
    return Section(tuple(sec["datasets"]), tuple(order_methods(methods)),
                   tuple(sorted(sec["ratios"], reverse=True)), tuple(sec["seeds"]))


def plan_from_config(config: dict) -> ReportPlan:
    """From the workflow config: ``grid`` (Table 1), ``ablation`` (Table 2 = baseline, the
    ablation methods and the reference, in that order) and ``report``."""
    rep = config.get("report") or {}
    reference = rep.get("reference", "cdcl")
    baseline = rep.get("baseline", "suponly")
    grid = _section(config.get("grid"), with_fullsup=True)
    if grid is None:
        grid = Section((), (), (), ())
    trained = _trained_runs(config)
    abl = config.get("ablation") or {}
    left_out_rows = []
    if abl.get("methods"):
        # Table 2's baseline and reference rows come from the grid's runs: a row the grid does
        # not train at any of the ablation's cells is left out (and said so), not shown empty
        rows = []
        for m, role in ((baseline, "report.baseline"), (reference, "report.reference")):
            cells = [(d, k) for d in abl.get("datasets") or [] for k in abl.get("ratios") or []]
            if trained is not None and m not in abl["methods"] and not any(
                    (d, m, k, s) in trained for d, k in cells for s in abl.get("seeds") or []):
                left_out_rows.append(f"Table 2 row {display(m)} ({role}: the grid does not "
                                     f"train it at the ablation's cells; add it to grid.methods "
                                     f"and the ablation's datasets and ratios to the grid)")
            else:
                rows.append(m)
        base_rows = [baseline] if baseline in rows else []
        ref_rows = [reference] if reference in rows else []
        abl = dict(abl, methods=base_rows + [m for m in abl["methods"]
                                             if m not in (baseline, reference)] + ref_rows)
    ablation = _section(abl, with_fullsup=False)
    if ablation is not None:  # Table 2 keeps the config's row order (the paper's), not report_rank
        ablation = Section(ablation.datasets, tuple(dict.fromkeys(abl["methods"])),
                           ablation.ratios, ablation.seeds)
    options = StatOptions(alpha=float(rep.get("alpha", 0.05)),
                          n_resamples=int(rep.get("n_resamples", 9999)),
                          n_boot_rank=int(rep.get("n_boot_rank", 1000)),
                          seed=int(rep.get("seed", 0)))
    return ReportPlan(grid=grid, ablation=ablation, reference=reference, baseline=baseline,
                      metric=rep.get("metric", "dice"),
                      convention=rep.get("convention", "per_image_mean"),
                      table1_metrics=tuple(rep["table1_metrics"]) if rep.get("table1_metrics") else None,
                      families=tuple(rep.get("families", FAMILY_KINDS)), options=options,
                      trained=trained, left_out_rows=tuple(left_out_rows))


def _trained_runs(config: dict) -> frozenset | None:
    """The workflow's own run list (semibench.workflow.grid), or None without a grid."""
    if not (config.get("grid") or config.get("ablation")):
        return None
    from semibench.workflow.grid import section_runs

    return frozenset(tuple(r) for name in ("grid", "ablation") for r in section_runs(config, name))


def plan_from_runs(run_keys, base: ReportPlan | None = None) -> ReportPlan:
    """Without a config: Table 1 = every non-ablation method found, Table 2 = the ablation
    schemes found (with baseline and reference), over the datasets, ratios and seeds found."""
    keys = list(run_keys)
    base = base or ReportPlan(grid=Section((), (), (), ()), ablation=None)
    schemes = [m for _, m, _, _ in keys if m.startswith("cdcl-scheme")]
    datasets = tuple(dict.fromkeys(d for d, _, _, _ in keys))
    grid_methods = order_methods(m for _, m, _, _ in keys if m not in schemes)
    ratios = tuple(sorted({k for _, m, k, _ in keys if m != UPPER_BOUND}, reverse=True))
    seeds = tuple(sorted({s for *_, s in keys}))
    grid = Section(datasets, tuple(grid_methods), ratios, seeds)
    ablation = None
    if schemes:
        cells = {(d, k) for d, m, k, _ in keys if m in schemes}
        methods = [base.baseline] + sorted(set(schemes)) + [base.reference]
        ablation = Section(tuple(d for d in datasets if any(c[0] == d for c in cells)),
                           tuple(methods), tuple(sorted({k for _, k in cells}, reverse=True)), seeds)
    return ReportPlan(grid=grid, ablation=ablation, reference=base.reference,
                      baseline=base.baseline, metric=base.metric, convention=base.convention,
                      table1_metrics=base.table1_metrics, families=base.families, options=base.options)
