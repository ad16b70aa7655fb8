"""What the report shows, decided from the config before any result is read: the Table 1 and
Table 2 cells, the method order and names, the reference and baseline, and the test families."""
from __future__ import annotations

from dataclasses import dataclass, field

from .stats import Family, StatOptions

#: the paper's names; methods not listed keep their registry name
DISPLAY = {"suponly": "SupOnly", "fullsup": "FullSup", "meanteacher": "MeanTeacher",
           "tcsmv2": "TCSMv2", "cutmix": "CutMix", "gct": "GCT", "cct": "CCT", "cac": "CAC",
           "cdcl": "CDCL", **{f"cdcl-scheme{i}": f"Scheme.{i}" for i in range(1, 7)},
           "fixmatch": "FixMatch*", "unimatch": "UniMatch*"}
#: methods that are not in the CDCL paper's tables (later baselines): shown after the paper's
#: rows, their names marked with BEYOND_MARK and explained in the table footnote
BEYOND_PAPER = ("fixmatch", "unimatch")
BEYOND_MARK = "*"
#: one method order everywhere (tables, figures, palette): the paper's rows, then the rest
ORDER = ["suponly", "meanteacher", "tcsmv2", "cutmix", "gct", "cct", "cac",
         *[f"cdcl-scheme{i}" for i in range(1, 7)], "cdcl", *BEYOND_PAPER, "fullsup"]
UPPER_BOUND = "fullsup"  # never bold, never tested: it sees every label
FAMILY_KINDS = ("vs_reference", "vs_baseline", "ablation")


def display(method: str) -> str:
    return DISPLAY.get(method, method)


def order_methods(methods) -> list[str]:
    """Known methods in ORDER, unknown ones before cdcl in the order given, then cdcl, the
    methods beyond the paper and fullsup."""
    methods = list(dict.fromkeys(methods))
    last = ("cdcl", *BEYOND_PAPER, UPPER_BOUND)
    known = [m for m in ORDER if m in methods and m not in last]
    tail = [m for m in last if m in methods]
    return known + [m for m in methods if m not in ORDER] + tail


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
    families: tuple = FAMILY_KINDS
    options: StatOptions = field(default_factory=StatOptions)

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
            out.append(Family("ablation", self.reference, a.methods,
                              tuple((d, k) for d in a.datasets for k in a.ratios)))
        return out


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
    abl = config.get("ablation") or {}
    if abl.get("methods"):
        abl = dict(abl, methods=[baseline] + [m for m in abl["methods"]
                                              if m not in (baseline, reference)] + [reference])
    ablation = _section(abl, with_fullsup=False)
    if ablation is not None:  # Table 2 keeps the config's row order (the paper's), not ORDER
        ablation = Section(ablation.datasets, tuple(dict.fromkeys(abl["methods"])),
                           ablation.ratios, ablation.seeds)
    options = StatOptions(alpha=float(rep.get("alpha", 0.05)),
                          n_resamples=int(rep.get("n_resamples", 9999)),
                          n_boot_rank=int(rep.get("n_boot_rank", 1000)),
                          seed=int(rep.get("seed", 0)))
    return ReportPlan(grid=grid, ablation=ablation, reference=reference, baseline=baseline,
                      metric=rep.get("metric", "dice"),
                      convention=rep.get("convention", "per_image_mean"),
                      families=tuple(rep.get("families", FAMILY_KINDS)), options=options)


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
                      families=base.families, options=base.options)
