# Shared helpers: config validation, the run grid, paths and per-job config fragments.
import dataclasses
import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from semibench.config import RunConfig
from semibench.errors import ConfigError, DataError
from semibench.workflow.grid import all_runs
from semibench.workflow.grid import check_names as _check_names
from semibench.layout import LOGS_DIR, RUNS_DIR
from semibench.layout import RUN_DIR as RUN_KEY
from semibench.layout import SPLIT_FILE, SPLIT_KEY
from semibench.method import make_hparams, resolved_hparams
from semibench.data.obtain import get_recipe
from semibench.registry import DATASETS, METHODS


def _schema_problem():
    """The first schema violation in one line (Snakemake's own message dumps the schema)."""
    import jsonschema

    schema = json.loads((Path(workflow.basedir) / "config" / "schema.json").read_text())
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(config)
    )
    if error is None:
        return "config does not match config/schema.json"
    where = ".".join(map(str, error.absolute_path)) or "top level"
    return f"invalid config at {where}: {error.message}"


try:
    validate(config, "../config/schema.json")
except WorkflowError:
    sys.exit(f"semibench: error: {_schema_problem()}")

DATA_DIR = config["data_dir"]
SPLITS_DIR = config["splits_dir"]
RUN_DIR = f"{RUNS_DIR}/{RUN_KEY}"  # semibench/layout.py: the one definition


wildcard_constraints:
    dataset=r"[A-Za-z0-9_.-]+",
    method=r"[A-Za-z0-9_.-]+",
    ratio=r"\d+",
    seed=r"\d+",


def _all_runs():
    return all_runs(config)  # semibench/workflow/grid.py: the same run list as `semibench status`


def _check_params(runs):
    """Fail the dry run on unknown train options, dataset options or method hyperparameters."""
    RunConfig.from_workflow(config, *runs[0])  # checks the train keys
    for dataset in dict.fromkeys(d for d, _, _, _ in runs):
        # a folder dataset's files are checked here, before any job writes anything
        get_recipe(dataset, (config.get("datasets") or {}).get(dataset)).check_source()
    overrides = config.get("method_params") or {}
    _check_names("method", list(overrides), METHODS, "method_params")
    for method in sorted({m for _, m, _, _ in runs}):
        hparams = getattr(METHODS.get(method), "Hparams", None)
        if dataclasses.is_dataclass(hparams):
            make_hparams(hparams, overrides.get(method))


def _report_left_out():
    """One line, before any training, on what the report will not show or test because the grid
    does not train it (e.g. grid.methods without report.baseline)."""
    from semibench.report.plan import plan_from_config

    lines = plan_from_config(config).left_out()
    if lines:
        print("semibench: note: the report will leave out " + "; ".join(lines), file=sys.stderr)


try:
    RUNS = _all_runs()
    _check_params(RUNS)
    _report_left_out()
except (ConfigError, DataError) as e:  # one line, no traceback: the user's config or folder
    sys.exit(f"semibench: error: {e}")


def run_dir(wildcards):
    return RUN_DIR.format(**wildcards)


def all_metrics():
    return [
        f"{RUN_DIR}/metrics.json".format(dataset=d, method=m, ratio=k, seed=s)
        for d, m, k, s in RUNS
    ]


def dataset_config_json(wildcards):
    """What obtain/verify/prepare of one dataset see (changing it reruns them)."""
    options = (config.get("datasets") or {}).get(wildcards.dataset) or {}
    return json.dumps(
        {"data_dir": DATA_DIR, "datasets": {wildcards.dataset: options}}, sort_keys=True
    )


def run_config_json(wildcards):
    """The exact config of one training run: the train section and this method's complete
    hyperparameters, defaults merged with the config's overrides (so editing another method's
    overrides or defaults does not rerun this one, and editing this one's does)."""
    overrides = (config.get("method_params") or {}).get(wildcards.method) or {}
    params = resolved_hparams(METHODS.get(wildcards.method), overrides)
    return json.dumps(
        {
            "data_dir": DATA_DIR,
            "splits_dir": SPLITS_DIR,
            "device": config.get("device", "auto"),
            "train": config["train"],
            "method_params": {wildcards.method: params},
        },
        sort_keys=True,
    )


def threads_for(step, default):
    return int((config.get("threads") or {}).get(step, default))


# -- report (rules/report.smk)

def report_config_json(wildcards=None):
    """What the report steps see: the two tables' cells and the report options (changing a
    training option does not rerun them; the runs' files do)."""
    keys = ("data_dir", "grid", "ablation", "report")
    doc = {k: config.get(k) for k in keys if k in config}
    # datasets the config names with a recipe (a folder): the report's grid must know them
    named = {n: {"recipe": o["recipe"]} for n, o in (config.get("datasets") or {}).items()
             if isinstance(o, dict) and "recipe" in o}
    if named:
        doc["datasets"] = named
    return json.dumps(doc, sort_keys=True)


def all_per_image():
    return [f.replace("metrics.json", "per_image.csv") for f in all_metrics()]


def grid_manifests():
    datasets = dict.fromkeys(d for d, _, _, _ in RUNS)
    return [f"{DATA_DIR}/prepared/{d}/manifest.json" for d in datasets]
