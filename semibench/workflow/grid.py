"""The run grid of a workflow config: every (dataset, method, ratio, seed) it trains.

One definition, used by the workflow (``rules/common.smk``) and by ``semibench status``, so that
both always agree on which runs the config asks for. Sections ``grid`` (Table 1) and ``ablation``
(Table 2) are enumerated in that order and merged without duplicates; a method with a fixed label
ratio (``fullsup``: 1) runs at that ratio only. Unknown names stop with one
:class:`~semibench.errors.ConfigError` naming the known ones.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

from semibench.errors import ConfigError
from semibench.layout import run_key

SECTIONS = ("grid", "ablation")


class Run(NamedTuple):
    dataset: str
    method: str
    ratio: int
    seed: int

    def rel_dir(self) -> str:
        """The run directory relative to the runs directory (and to logs/<rule>/ without .log)."""
        return run_key(*self)


def check_schema(config: Mapping) -> None:
    """The first violation of ``config/schema.json`` as one :class:`ConfigError`, worded as the
    workflow's dry run words it (``invalid config at grid.ratios: ...``)."""
    import json

    import jsonschema

    from semibench.config import SCHEMA_PATH

    schema = json.loads(SCHEMA_PATH.read_text())
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(dict(config)))
    if error is not None:
        where = ".".join(map(str, error.absolute_path)) or "top level"
        raise ConfigError(f"invalid config at {where}: {error.message}")


def check_names(kind: str, names, registry, where: str, extra=()) -> None:
    known = registry.names() + [n for n in extra if n not in registry.names()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"unknown {kind}(s) {', '.join(map(repr, unknown))} in config {where}; "
            f"known: {', '.join(known)}"
        )


def ratios_for(method: str, ratios) -> list[int]:
    """A method with a fixed label ratio (fullsup: 1) runs at that ratio only."""
    from semibench.registry import METHODS

    fixed = METHODS.static(method, "fixed_ratio")  # read from the source: no torch import
    return [fixed] if fixed is not None else list(ratios)


def section_runs(config: Mapping, name: str) -> list[Run]:
    from semibench.registry import DATASETS, METHODS

    section = config.get(name) or {}
    if not section:
        return []
    missing = [k for k in ("datasets", "methods", "ratios", "seeds") if k not in section]
    if missing:  # the workflow's schema says so first; `semibench status` reads configs directly
        raise ConfigError(f"config {name} lacks {', '.join(missing)}")
    methods = list(section["methods"])
    if section.get("fullsup") and "fullsup" not in methods:
        methods.append("fullsup")
    # a dataset the config defines with a recipe (``datasets.mylab.recipe: folder``) is known too
    defined = [n for n, o in (config.get("datasets") or {}).items() if isinstance(o, Mapping) and "recipe" in o]
    check_names("dataset", section["datasets"], DATASETS, f"{name}.datasets", defined)
    check_names("method", methods, METHODS, f"{name}.methods")
    bad = [k for k in section["ratios"] if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad:
        raise ConfigError(f"label ratio(s) {', '.join(map(repr, bad))} in config {name}.ratios are not "
                          f"integers k >= 1 (k means 1/k labeled)")
    return [
        Run(d, m, int(k), int(s))
        for d in section["datasets"]
        for m in methods
        for k in ratios_for(m, section["ratios"])
        for s in section["seeds"]
    ]


def all_runs(config: Mapping) -> list[Run]:
    """Every run of the config, grid first, then the ablation runs not already in the grid."""
    runs = list(dict.fromkeys(run for name in SECTIONS for run in section_runs(config, name)))
    if not runs:
        raise ConfigError("the config selects no runs (grid and ablation are empty)")
    return runs
