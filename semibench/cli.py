"""The `semibench` command: one verb per workflow step, each parsing its arguments and calling one
function. Heavy modules are imported inside the verbs so that `semibench --help` stays instant.
Expected failures (:class:`~semibench.errors.SemibenchError`) print one line and exit with 2."""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from semibench.errors import ConfigError, SemibenchError
from semibench.layout import RUNS_DIR, SPLITS_DIR, run_dir, run_key, split_path

EXIT_ERROR = 2


# ---------------------------------------------------------------- configuration helpers

def _workflow_config(args) -> dict:
    """--config files in order, then --config-json fragments, deep-merged like Snakemake does."""
    from semibench.config import deep_merge, load_workflow_config

    cfg = load_workflow_config(args.config or [])
    for text in args.config_json or []:
        try:
            fragment = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config-json is not valid JSON: {e}") from None
        if not isinstance(fragment, dict):
            raise ConfigError("--config-json must hold a JSON object")
        cfg = deep_merge(cfg, fragment)
    return cfg


def _data_dir(args, cfg: dict) -> Path:
    return Path(args.data_dir or cfg.get("data_dir", "data"))


def _dataset_options(cfg: dict, name: str) -> dict:
    from semibench.data.obtain import recipe_of
    from semibench.registry import DATASETS

    options = dict((cfg.get("datasets") or {}).get(name) or {})
    DATASETS.get(recipe_of(name, options))  # unknown name -> ConfigError listing the known ones
    return options


def check_ratio(method: str, ratio: int) -> None:
    """``ratio`` is an integer k >= 1 (1/k labeled: stored in the split file or derived nested in
    it, :func:`semibench.data.splits.labeled_subset`) and fits the method."""
    from semibench.registry import METHODS

    if ratio < 1:
        raise ConfigError(f"label ratio must be an integer k >= 1 (1/k labeled), got {ratio}")
    fixed = METHODS.static(method, "fixed_ratio")
    if fixed is not None and ratio != fixed:
        raise ConfigError(f"method {method!r} trains at ratio {fixed} only, not {ratio}")


def step_threads(given: int | None, cfg: dict, step: str) -> int | None:
    """--threads, else the config's ``threads.<step>``: on the CPU a run is bit-identical only at
    the same thread count (reductions are split by thread), so a run started by hand computes
    what the workflow's job computes (None: torch's default, every core)."""
    return given or (cfg.get("threads") or {}).get(step)


def _set_threads(n: int | None) -> None:
    if n:
        import torch
        torch.set_num_threads(n)


# ---------------------------------------------------------------- verbs

def cmd_names(registry_name: str) -> Callable:
    def run(args) -> None:
        from semibench import registry
        for name in getattr(registry, registry_name).names():
            print(name)
    return run


def cmd_data_step(step: str) -> Callable:
    """obtain / verify / prepare: same arguments, one function each in semibench.data.obtain."""
    def run(args) -> None:
        from semibench.data import obtain as obtain_module

        cfg = _workflow_config(args)
        options = _dataset_options(cfg, args.dataset)
        if args.workers and "workers" not in options:
            options["workers"] = args.workers
        result = getattr(obtain_module, step)(args.dataset, _data_dir(args, cfg), options)
        print(result if isinstance(result, Path) else json.dumps(result, indent=1, default=str))
    return run


def cmd_split(args) -> None:
    from semibench.data.splits import write_split

    cfg = _workflow_config(args)
    options = _dataset_options(cfg, args.dataset)
    out = args.out or split_path(args.dataset, args.seed, cfg.get("splits_dir", SPLITS_DIR))
    print(write_split(args.dataset, _data_dir(args, cfg), args.seed, Path(out), options))


def cmd_export(args) -> None:
    from semibench.data.export import export

    cfg = _workflow_config(args)
    print(export(args.dataset, args.layout, Path(args.out), _data_dir(args, cfg)))


def cmd_predict(args) -> None:
    from semibench.workflow import gpu

    slot = gpu.claim_for(args.device or "auto")
    _set_threads(args.threads)
    from semibench.evaluate.predict import predict_folder
    opts = {k: v for k, v in (("instances", args.instances), ("min_object_size", args.min_object_size))
            if v is not None}
    print(predict_folder(Path(args.run), Path(args.images), Path(args.out), device=args.device, **opts))
    del slot


def cmd_train(args) -> None:
    from semibench.config import RunConfig
    from semibench.registry import METHODS
    from semibench.workflow import gpu

    cfg = _workflow_config(args)
    if args.data_dir:
        cfg["data_dir"] = args.data_dir
    # a prepared dataset is trainable whatever recipe made it (the train rule passes no datasets
    # section); otherwise an unknown name -> ConfigError listing the known ones
    if not (Path(cfg.get("data_dir", "data")) / "prepared" / args.dataset / "manifest.json").is_file():
        _dataset_options(cfg, args.dataset)
    METHODS.get(args.method)
    check_ratio(args.method, args.ratio)
    device = args.device or cfg.get("device", "auto")
    run_cfg = RunConfig.from_workflow(cfg, args.dataset, args.method, args.ratio, args.seed, device)
    out = Path(args.out or run_dir(args.dataset, args.method, args.ratio, args.seed,
                                   cfg.get("runs_dir", RUNS_DIR)))
    slot = gpu.claim_for(device)  # before torch touches CUDA; held until the process exits
    _set_threads(step_threads(args.threads, cfg, "train"))
    from semibench.train.engine import train
    print(train(run_cfg, out))
    del slot


def cmd_check_method(args) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # the stage lines are the progress
    from semibench.checkmethod import check_method

    _set_threads(args.threads)
    t0 = time.perf_counter()
    check_method(args.name, Path(args.keep) if args.keep else None)
    print(f"check-method {args.name}: passed ({time.perf_counter() - t0:.1f} s)")


def cmd_evaluate(args) -> None:
    from semibench.workflow import gpu

    run_dir = Path(args.run)
    # instance options only when given: the defaults live in semibench.evaluate.score
    opts = {k: v for k, v in (("instances", args.instances), ("min_object_size", args.min_object_size))
            if v is not None}
    if args.metrics_only:  # from the saved predictions: no model, no GPU
        from semibench.evaluate.score import rescore_run
        result = rescore_run(run_dir, **opts)
        print(json.dumps({k: result[k] for k in ("pooled", "per_image_mean", "dataset_level")},
                         indent=1))
        return
    config_file = run_dir / "config.json"
    device = args.device
    if device is None and config_file.exists():
        device = json.loads(config_file.read_text()).get("device", "auto")
    slot = gpu.claim_for(device or "auto")
    _set_threads(args.threads)
    from semibench.evaluate.score import evaluate_run
    result = evaluate_run(run_dir, device=args.device, **opts)
    print(json.dumps({k: result[k] for k in ("pooled", "per_image_mean") if k in result}, indent=1))
    del slot


def cmd_report(args) -> None:
    """Tables, statistics and figures from whatever runs exist: missing cells are marked, not
    fatal (``--strict``: a comparison that cannot be paired is an error)."""
    from semibench.report import build

    files = [Path(f) for f in args.metrics or []]
    for pattern in args.runs or []:
        files += sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    if not files:
        raise ConfigError("no metrics files given or matched (--metrics FILE ... or --runs GLOB)")
    cfg = _workflow_config(args) if (args.config or args.config_json) else {}
    if args.convention:
        cfg = dict(cfg, report=dict(cfg.get("report") or {}, convention=args.convention))
    results, plan = build.load(files, cfg)
    configured = set(plan.grid.runs()) | set(plan.ablation.runs() if plan.ablation else [])
    outside = sorted(set(results.run_dirs) - configured)
    if outside:
        print(f"semibench: note: {len(outside)} run(s) outside the configured grid/ablation are "
              "left out of the tables, e.g. {}".format(run_key(*outside[0])), file=sys.stderr)
    for line in build.report_notes(results, plan):
        print(f"semibench: note: left out: {line}", file=sys.stderr)
    out = Path(args.out)
    steps = ("stats", "tables", "figures") if args.step == "all" else (args.step,)
    written = []
    if "stats" in steps:
        written += build.write_stats(results, plan, out / "stats", strict=args.strict)
    if "tables" in steps:
        comparisons = build.read_comparisons(out / "stats" / "comparisons.csv")
        written += build.write_tables(results, plan, out / "tables", comparisons)
    if "figures" in steps:
        from semibench.report import figures
        written += figures.write_figures(results, plan, out / "stats", out / "figures", cfg)
    if args.step == "features":  # Figure 4 needs model inference: only when asked for
        from semibench.report import features
        written += features.write_feature_maps(results, plan, out / "figures", args.threads)
    if args.quote_into:
        from semibench.report.quote import quote_into
        written += quote_into(args.quote_into, out)
    for path in written:
        print(path)


def cmd_status(args) -> None:
    """Where the configured grid stands: config/config.yaml, then --config files in order (as the
    workflow merges --configfile), then --config-json."""
    from semibench.config import SCHEMA_PATH
    from semibench.workflow.status import format_text, grid_status

    base = Path("config/config.yaml")
    if not base.exists():  # outside the workflow directory: the package's own defaults
        base = SCHEMA_PATH.parent / "config.yaml"
    args.config = [str(base)] + list(args.config or [])
    cfg = _workflow_config(args)
    report = grid_status(cfg, Path(args.runs_dir), Path(args.logs_dir), jobs=args.jobs,
                         fresh_minutes=args.fresh_minutes,
                         config_files=args.config + (["--config-json"] if args.config_json else []))
    print(json.dumps(report, indent=1) if args.json else format_text(report))


def cmd_gpu_slot(args) -> None:
    from semibench.workflow import gpu

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    gpu.run_in_slot(cmd, wait=not args.no_wait, timeout=args.timeout)


# ---------------------------------------------------------------- parser

def _config_args(p: argparse.ArgumentParser, data_dir: bool = True) -> None:
    p.add_argument("--config", action="append", metavar="FILE",
                   help="workflow config file (YAML/JSON); repeat to merge several, later wins")
    p.add_argument("--config-json", action="append", metavar="JSON",
                   help="a workflow config fragment as JSON, merged after the files (repeatable)")
    if data_dir:
        p.add_argument("--data-dir", metavar="DIR", help="data directory (default: config data_dir or data/)")


def build_parser() -> argparse.ArgumentParser:
    from semibench import __version__

    parser = argparse.ArgumentParser(
        prog="semibench",
        description="Benchmark of semi-supervised nuclei segmentation (CDCL and competitors). "
                    "The Snakemake workflow calls these verbs; they also work by hand.")
    parser.add_argument("--version", action="version", version=f"semibench {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser("datasets", help="list the registered datasets, one per line")
    p.set_defaults(func=cmd_names("DATASETS"))
    p = sub.add_parser("methods", help="list the registered methods, one per line")
    p.set_defaults(func=cmd_names("METHODS"))

    for step, text in (("obtain", "find or download a dataset's archives; writes <data_dir>/raw/D/archives.json"),
                       ("verify", "check a dataset's archives; writes <data_dir>/raw/D/verified.json"),
                       ("prepare", "convert a dataset into the prepared format; writes <data_dir>/prepared/D/")):
        p = sub.add_parser(step, help=text, description=text)
        p.add_argument("--dataset", required=True, metavar="D")
        _config_args(p)
        p.add_argument("--workers", type=int, metavar="N",
                       help="parallel processes, unless the dataset's config sets workers")
        p.set_defaults(func=cmd_data_step(step))

    p = sub.add_parser("split", help="write a dataset's train/val/test + labeled split for one seed")
    p.add_argument("--dataset", required=True, metavar="D")
    p.add_argument("--seed", required=True, type=int, metavar="S")
    p.add_argument("--out", metavar="FILE", help="default: <splits_dir>/D/seed<S>.json")
    _config_args(p)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("export", help="write a prepared dataset as a folder in one of the folder "
                       "layouts (docs/your-data.md)")
    p.add_argument("dataset", metavar="DATASET", help="a prepared dataset (e.g. synthetic)")
    p.add_argument("--layout", required=True, choices=("stardist", "cellpose", "nnunet", "per-nucleus"))
    p.add_argument("out", metavar="OUT", help="the folder to write (new, or empty)")
    _config_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="segment a folder of new images with a run's best model: "
                       "NAME.tif labels, NAME_overlay.png, nuclei.csv")
    p.add_argument("--run", required=True, metavar="DIR", help="a trained run directory (best.pt)")
    p.add_argument("--images", required=True, metavar="DIR", help="a folder of .tif/.tiff/.png images")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new, or empty)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    p.add_argument("--instances", metavar="MODE",
                   help="components | watershed (default: as the run's evaluation)")
    p.add_argument("--min-object-size", type=int, metavar="PX",
                   help="drop objects of fewer pixels (default: as the run's evaluation)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("train", help="train one run (dataset, method, label ratio, seed)")
    _config_args(p)
    p.add_argument("--dataset", required=True, metavar="D")
    p.add_argument("--method", required=True, metavar="M")
    p.add_argument("--ratio", required=True, type=int, metavar="K", help="1/K of the train samples labeled")
    p.add_argument("--seed", required=True, type=int, metavar="S")
    p.add_argument("--out", metavar="DIR", help="run directory (default: results/runs/D/M/rK/seedS)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: config device or auto)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: the config's threads.train; CPU runs are "
                        "bit-identical only at the same thread count)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check-method", help="run a method (built-in or plugin) through the engine on "
                       "toy data: contract, build, two epochs, a resume, an evaluation")
    p.add_argument("name", metavar="NAME", help="a registered method name (semibench methods)")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep its runs (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="CPU threads for torch (default 1)")
    p.set_defaults(func=cmd_check_method)

    p = sub.add_parser("evaluate", help="evaluate a run's best checkpoint on the test set")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the run's device)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    p.add_argument("--instances", metavar="MODE",
                   help="nuclei from the predicted mask: components (default) | watershed")
    p.add_argument("--min-object-size", type=int, metavar="PX",
                   help="drop predicted objects of fewer pixels (default 0)")
    p.add_argument("--metrics-only", action="store_true",
                   help="recompute metrics.json and per_image.csv from the run's saved predictions/")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="tables, statistics and figures from run metrics "
                                      "(<out>/tables, <out>/stats, <out>/figures)")
    p.add_argument("--metrics", nargs="+", metavar="FILE", help="metrics.json files")
    p.add_argument("--runs", action="append", metavar="GLOB",
                   help="glob for metrics files, e.g. 'results/runs/**/metrics.json'")
    _config_args(p, data_dir=False)
    p.add_argument("--out", default="results", metavar="DIR",
                   help="writes DIR/tables, DIR/stats and DIR/figures (default: results)")
    p.add_argument("--step", choices=("all", "stats", "tables", "figures", "features"),
                   default="all", help="one step only (the workflow runs them as separate rules); "
                                       "features = Figure 4 (model inference), never part of all")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for --step features")
    p.add_argument("--convention", choices=("per_image_mean", "pooled"),
                   help="which metrics.json values the tables show (default: config report."
                        "convention, else per_image_mean)")
    p.add_argument("--strict", action="store_true",
                   help="fail when a declared comparison cannot be paired (default: leave it "
                        "untested, with the reason in the stats)")
    p.add_argument("--quote-into", action="append", metavar="PAGE",
                   help="after the steps, refresh PAGE's '<!-- semibench report: tables/table1.md "
                        "-->' ... '<!-- /semibench report -->' blocks from the files under --out")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("status", help="where the configured grid stands: runs done, trained, "
                                      "running, interrupted, failed, missing, and an ETA",
                       description="Classify every run of the configured grid (config/config.yaml "
                                   "merged with --config files in order) and estimate the time left.")
    _config_args(p, data_dir=False)
    p.add_argument("--runs-dir", default="results/runs", metavar="DIR",
                   help="run directories DIR/D/M/rK/seedS (default: results/runs)")
    p.add_argument("--logs-dir", default="logs", metavar="DIR",
                   help="job logs DIR/{train,evaluate}/D/M/rK/seedS.log (default: logs)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs trained at once, dividing the grid's remaining time (default 1)")
    p.add_argument("--fresh-minutes", type=float, default=10.0, metavar="MIN",
                   help="a run started on another host (train_host.json; a shared file "
                        "system) whose train.jsonl changed this recently counts as running "
                        "(default 10); on this host only a live process counts")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema in docs/status.md)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("gpu-slot", help="run CMD holding a free GPU slot (sets CUDA_VISIBLE_DEVICES)",
                       description="Lock a free GPU (flock in $SEMIBENCH_GPU_LOCK_DIR) and run CMD "
                                   "with CUDA_VISIBLE_DEVICES set to it; the lock lasts as long as CMD.")
    p.add_argument("--no-wait", action="store_true", help="fail at once when every slot is busy")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after waiting this long")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    p.set_defaults(func=cmd_gpu_slot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:  # `semibench status --json | head`: the reader had enough
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the exit-time flush does not fail again
        return 0
    except SemibenchError as e:
        print(f"semibench: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("semibench: error: interrupted", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
