"""Every GPU measurement of issue #24 in one go, for a session that has the device (not a test).

    python3 benchmarks/device_check.py                 # on the GPU machine; results in $OUT
    python3 benchmarks/device_check.py --cpu-smoke     # every stage at toy size on the CPU

Needs no Snakemake, no ../shared, no internet and no installed semibench (it runs from the
checkout: ``PYTHONPATH`` is set to it). It generates its data: the training benchmarks use
random in-memory images; the short training runs use the ``synthetic`` dataset generated at
DSB 2018's size (670 images, split 469 / 67 / 134 like DSB's, here at 320²), since the real DSB
is not on that machine and may not travel with the repository.

Stages, each a subprocess bounded in time (a share of ``--budget-s``; what a stage leaves
unused goes to the next), so one failing or slow measurement never stops the others:

1. ``env``: card, driver, torch/CUDA versions;
2. ``tests``: ``pytest -m gpu`` on every test file with gpu-marked tests;
3. ``bench``: ``bench_train.py`` rows for every registered method (most important first) at
   DenseNet-161 320², batch 8 + 8, variants ``off`` and ``defaults``, with the pass and FLOP
   counts (the FLOP-implied ratio beside the measured one);
4. ``compile``: the same with ``on`` (``defaults`` + torch.compile), same order, as far as the
   time allows (compilation is paid in the warm-up steps and shown as ``warm s``);
5. ``share``: ``bench_share.py``, total img/s of 1, 2, 4, 6 jobs on the GPU (variant
   ``defaults``: compiling in every job would not fit the budget; ``--share-variant on`` for
   that) and the recommended ``SEMIBENCH_JOBS_PER_GPU``;
6. ``dsb``: 2-epoch runs of SupOnly at 1/8 (``semibench train`` and ``evaluate``, the study
   config ``config/studies/dsb_gpu_d161.yaml``), options off vs on, seeds 0 and 1, all four at
   once on the GPU: validation Dice per epoch, test Dice, and whether on and off agree within
   the seed-to-seed spread. ``on`` compiles only where stage 4 found compiling SupOnly worth it
   (``COMPILE_WORTH``), as a run's config would then enable it; its caches are warm then.

Then a summary (also printed): ``summary.md`` and, under ``$OUT`` (default ``./device_check_out``),
``results.json`` (everything), ``bench_train.json``, ``share.json``, ``grid.json`` (bench_grid's
prediction of the paper's grid from these measurements), ``pytest_gpu.txt`` and
``device_check.log`` (every stage's output).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
# most informative first: the paper's baseline and reference, then the competitors, the ablation
PRIORITY = ["suponly", "meanteacher", "cdcl", "cutmix", "tcsmv2", "cct", "gct", "cac", "fullsup"]
STAGES = (("env", 0.02), ("tests", 0.13), ("bench", 0.23), ("compile", 0.22), ("share", 0.2), ("dsb", 0.2))
COMPILE_WORTH = 1.1  # the dsb runs compile when compiling made SupOnly's step this much faster
SUMMARY_RESERVE_S = 20.0


@dataclass
class Plan:
    device: str = "cuda"
    backbone: str = "densenet161"
    size: int = 320
    batch: tuple[int, int] = (8, 8)
    warmup: int = 3
    steps: int = 8
    methods: list[str] = field(default_factory=list)
    threads: int | None = None
    share_method: str = "cdcl"
    share_jobs: tuple[int, ...] = (1, 2, 4, 6)
    share_seconds: float = 10.0
    share_variant: str = "defaults"
    dsb_count: int = 670
    dsb_size: int = 320
    dsb_method: str = "suponly"
    dsb_ratio: int = 8
    dsb_epochs: int = 2
    dsb_iters: int | None = None
    dsb_seeds: tuple[int, ...] = (0, 1)
    dsb_train: dict = field(default_factory=dict)  # train.<key> overrides of the runs
    compile_backend: str | None = None  # SEMIBENCH_COMPILE_BACKEND for the stages


def all_methods() -> list[str]:
    from semibench.registry import METHODS
    names = METHODS.names()
    return [m for m in PRIORITY if m in names] + [m for m in names if m not in PRIORITY]


def gpu_plan(methods: list[str] | None) -> Plan:
    return Plan(methods=methods or all_methods())


def smoke_plan(methods: list[str] | None) -> Plan:
    """Every stage at toy size on the CPU (a dry run of the script; its numbers mean nothing)."""
    return Plan(device="cpu", backbone="tiny", size=64, batch=(2, 2), warmup=1, steps=2,
                methods=methods or ["suponly", "meanteacher", "cdcl"], threads=1,
                share_method="suponly", share_jobs=(1, 2), share_seconds=2.0,
                dsb_count=40, dsb_size=64, dsb_epochs=2, dsb_iters=2,
                dsb_train={"backbone": "tiny", "input_size": 64, "batch_labeled": 2, "batch_unlabeled": 2,
                           "eval_batch_size": 4},
                compile_backend="aot_eager")


# ---------------------------------------------------------------------------- stage runner

class Runner:
    """Runs stages as subprocesses in their own process group, each within its time share."""

    def __init__(self, out: Path, work: Path, budget_s: float, env: dict):
        self.out, self.work, self.env = out, work, env
        self.t0, self.budget = time.monotonic(), budget_s
        self.log = out / "device_check.log"
        self.spent_share = 0.0  # shares of the stages run so far
        self.current: subprocess.Popen | None = None
        self.results: dict[str, dict] = {}

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def run(self, name: str, share: float, cmd: list[str], capture: Path | None = None) -> dict:
        # this stage's share plus whatever the earlier stages left unused
        self.spent_share += share
        allowed = min(self.spent_share * self.budget - (time.monotonic() - self.t0),
                      self.remaining() - SUMMARY_RESERVE_S)
        start = time.monotonic()
        result = {"stage": name, "command": " ".join(cmd), "allowed_s": round(allowed, 1)}
        if allowed < 5:
            result.update(status="skipped (no time left)", seconds=0.0)
            self.results[name] = result
            self._note(f"=== {name}: skipped, {allowed:.0f} s left")
            return result
        self._note(f"=== {name} (up to {allowed:.0f} s): {' '.join(cmd)}")
        target = capture or self.log
        with open(target, "a") as sink:
            try:
                self.current = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                                                start_new_session=True)
                try:
                    rc = self.current.wait(timeout=allowed)
                    status = "ok" if rc == 0 else f"failed (exit {rc})"
                except subprocess.TimeoutExpired:
                    self.kill(self.current)
                    status = "timeout"
            except OSError as e:
                status = f"could not start: {e}"
            finally:
                self.current = None
        if capture:
            with open(self.log, "a") as log:
                log.write(capture.read_text())
        result.update(status=status, seconds=round(time.monotonic() - start, 1))
        self.results[name] = result
        self._note(f"=== {name}: {status} after {result['seconds']} s")
        return result

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the stage and everything it started
        except ProcessLookupError:
            pass
        p.wait()

    def _note(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log, "a") as log:
            log.write(text + "\n")


# ---------------------------------------------------------------------------- stages run in-process of a child

def stage_env(work: Path) -> int:
    import platform

    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        d = torch.device("cuda:0")
        info.update(device=torch.cuda.get_device_name(d), capability=list(torch.cuda.get_device_capability(d)),
                    memory_gb=round(torch.cuda.get_device_properties(d).total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = q.stdout.strip()
    (work / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return 0


def _dsb_run_dir(work: Path, variant: str, seed: int) -> Path:
    return work / "dsb" / f"{variant}-seed{seed}"


def stage_dsb(work: Path, plan: Plan, compile_on: bool) -> int:
    """Generate the data, then train (and evaluate) the four runs at once."""
    data, splits = work / "data", work / "splits"
    dataset_opts = {"synthetic": {"count": plan.dsb_count, "size": plan.dsb_size, "seed": 0}}
    base = {"data_dir": str(data), "splits_dir": str(splits), "datasets": dataset_opts}
    py = [sys.executable, "-m", "semibench"]
    cfg_json = json.dumps(base)
    if not (data / "prepared" / "synthetic" / "manifest.json").exists():
        workers = str(max(1, min(16, (os.cpu_count() or 2))))
        subprocess.run(py + ["prepare", "--dataset", "synthetic", "--config-json", cfg_json, "--workers", workers],
                       check=True, cwd=REPO)
    for seed in plan.dsb_seeds:
        subprocess.run(py + ["split", "--dataset", "synthetic", "--seed", str(seed), "--config-json", cfg_json],
                       check=True, cwd=REPO)
    variants = {
        "off": {"precision": "fp16", "channels_last": False, "fused_adam": False, "compile": False},
        "on": {"precision": "auto", "channels_last": True, "fused_adam": True, "compile": compile_on},
    }
    procs = []
    for variant, options in variants.items():
        for seed in plan.dsb_seeds:
            out = _dsb_run_dir(work, variant, seed)
            train_cfg = {"epochs": plan.dsb_epochs, "iters_per_epoch": plan.dsb_iters, **plan.dsb_train, **options}
            cfg = json.dumps({**base, "train": train_cfg})
            configs = ["--config", str(REPO / "config" / "config.yaml"),
                       "--config", str(REPO / "config" / "studies" / "dsb_gpu_d161.yaml"), "--config-json", cfg]
            device = "cuda:0" if plan.device == "cuda" else "cpu"
            threads = ["--threads", str(plan.threads)] if plan.threads else []
            cmd = (f"{' '.join(map(_q, py))} train {' '.join(map(_q, configs))} --dataset synthetic "
                   f"--method {plan.dsb_method} --ratio {plan.dsb_ratio} --seed {seed} --out {_q(str(out))} "
                   f"--device {device} {' '.join(threads)} && {' '.join(map(_q, py))} evaluate --run {_q(str(out))} "
                   f"--device {device} {' '.join(threads)}")
            print(f"{variant} seed {seed}: {cmd}", flush=True)
            procs.append(subprocess.Popen(["bash", "-c", cmd], cwd=REPO))
    codes = [p.wait() for p in procs]
    print(f"exit codes: {codes}", flush=True)
    return 0 if all(c == 0 for c in codes) else 1


def _q(s: str) -> str:
    import shlex
    return shlex.quote(s)


# ---------------------------------------------------------------------------- summary

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def dsb_results(work: Path, plan: Plan) -> dict:
    runs = {}
    for variant in ("off", "on"):
        for seed in plan.dsb_seeds:
            d = _dsb_run_dir(work, variant, seed)
            lines = []
            if (d / "train.jsonl").exists():
                for line in (d / "train.jsonl").read_text().splitlines():
                    try:
                        lines.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
            epochs = [x for x in lines if x.get("event") == "epoch"]
            done = _read_json(d / "train_done.json") or {}
            metrics = _read_json(d / "metrics.json") or {}
            runs[f"{variant}-seed{seed}"] = {
                "variant": variant, "seed": seed, "val_dice": [e["val_dice"] for e in epochs],
                "train_s": [round(e["train_s"], 1) for e in epochs],
                "img_per_s": [round(e["img_per_s"], 1) for e in epochs],
                "test_dice": (metrics.get("per_image_mean") or {}).get("dice"),
                "execution": {k: (done.get("execution") or {}).get(k)
                              for k in ("precision", "channels_last", "fused_adam", "compile")},
                "finished": bool(done)}
    agreement = []
    n_epochs = max((len(r["val_dice"]) for r in runs.values()), default=0)
    for e in range(n_epochs):
        vals = {v: [r["val_dice"][e] for r in runs.values() if r["variant"] == v and len(r["val_dice"]) > e]
                for v in ("off", "on")}
        if all(len(x) == len(plan.dsb_seeds) for x in vals.values()):
            mean = {v: sum(x) / len(x) for v, x in vals.items()}
            spread = max(max(x) - min(x) for x in vals.values())
            agreement.append({"epoch": e, "mean_off": mean["off"], "mean_on": mean["on"],
                              "difference": mean["on"] - mean["off"], "seed_spread": spread,
                              "within_spread": abs(mean["on"] - mean["off"]) <= spread})
    return {"runs": runs, "agreement": agreement}


def pytest_counts(path: Path) -> dict:
    text = path.read_text() if path.exists() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|xfailed)", text)}
    return {"counts": counts, "tail": text.strip().splitlines()[-1] if text.strip() else ""}


def grid_prediction(out: Path, bench_rows: list[dict], share: dict | None, plan: Plan) -> dict | None:
    """bench_grid on the paper's grid (config/config.yaml) from the best variant measured here."""
    sys.path.insert(0, str(BENCH))
    import bench_grid

    from semibench.config import load_workflow_config

    config = load_workflow_config([REPO / "config" / "config.yaml"])
    runs = bench_grid.run_iterations(config)
    speedups = {1: 1.0}
    rows = (share or {}).get("rows") or []
    one = next((r for r in rows if r.get("jobs") == 1 and r.get("total_img_per_s")), None)
    if one:
        speedups.update({r["jobs"]: r["total_img_per_s"] / one["total_img_per_s"]
                         for r in rows if r.get("total_img_per_s")})
    k = (share or {}).get("recommended_jobs_per_gpu") or 1
    per_variant = {v: bench_grid.step_seconds(bench_rows, plan.backbone, plan.size, plan.device, v)
                   for v in ("off", "defaults", "on")}
    per_variant = {v: s for v, s in per_variant.items() if "suponly" in s}
    methods = sorted({r["method"] for r in runs})
    missing_any = sorted({m for s in per_variant.values() for m in methods if m not in s})
    ratios = bench_grid.pass_ratios(missing_any, *plan.batch) if missing_any else {}
    out_rows = {}
    for variant, step_s in per_variant.items():
        missing = [m for m in methods if m not in step_s]
        for m in missing:
            step_s[m] = step_s["suponly"] * ratios[m]
        preds = [bench_grid.predict(runs, step_s, g, kk, speedups[kk], 60.0, 0.5)
                 for g in (1, 4) for kk in sorted({1, k}) if kk in speedups]
        out_rows[variant] = {"estimated_methods": missing, "step_s": step_s, "predictions": preds}
    result = {"runs": len(runs), "jobs_per_gpu": k, "speedups": speedups, "variants": out_rows,
              "note": "makespan of the paper's grid (config/config.yaml, 80 epochs) on G GPUs with k jobs each; "
                      "methods without a row priced by their pixel-weighted DenseUNet passes x suponly's step; "
                      "+60 s per run, 0.5 s validation per epoch"}
    (out / "grid.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _fmt(v, spec=".1f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def write_summary(out: Path, work: Path, plan: Plan, runner: Runner, args) -> str:
    env = _read_json(work / "env.json") or {}
    bench_rows = (_read_json(work / "bench.json") or []) + (_read_json(work / "bench_on.json") or [])
    sys.path.insert(0, str(BENCH))
    try:
        from bench_train import add_ratios
        add_ratios(bench_rows)
    except Exception as e:  # the summary must come out whatever broke
        print(f"ratios: {type(e).__name__}: {e}", file=sys.stderr)
    (out / "bench_train.json").write_text(json.dumps(bench_rows, indent=1) + "\n")
    share = _read_json(work / "share.json")
    if share:
        (out / "share.json").write_text(json.dumps(share, indent=1) + "\n")
    tests = pytest_counts(out / "pytest_gpu.txt")
    try:
        dsb = dsb_results(work, plan)
    except Exception as e:
        dsb = {"error": f"{type(e).__name__}: {e}"}
    try:
        grid = grid_prediction(out, bench_rows, share, plan)
    except Exception as e:
        grid = {"error": f"{type(e).__name__}: {e}"}

    L = [f"# device_check ({'CPU smoke: toy sizes, numbers mean nothing' if args.cpu_smoke else 'GPU'})", ""]
    L += [f"- card: {env.get('device', env.get('nvidia_smi', 'cpu'))}; torch {env.get('torch')} "
          f"(CUDA {env.get('cuda_build')}, cuDNN {env.get('cudnn', '-')}); python {env.get('python')}",
          f"- budget {args.budget_s:.0f} s; stages: " + "; ".join(
              f"{r['stage']} {r['status']} ({r.get('seconds', 0)} s)" for r in runner.results.values()), ""]
    L += ["## pytest -m gpu", "", f"{tests['tail'] or 'no output'}", ""]
    L += ["## bench_train: " + f"{plan.backbone} {plan.size}², batch {plan.batch[0]}+{plan.batch[1]}, "
          f"{plan.device}", "",
          "variant off: fp16 autocast + GradScaler, NCHW, foreach Adam, eager, losses read every step; "
          "defaults: precision auto (bf16 where native), channels-last, fused Adam, losses read every 25 steps; "
          "on: defaults + torch.compile (its compilation is in 'warm s'). The EMA multi-tensor update and the "
          "pinned copies are not options: 'off' has them too.", "",
          "| method | variant | ms/step | img/s | peak MB | vs sup | flops ratio | passes | TFLOP/s | vs off "
          "| warm s |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in bench_rows:
        if "error" in r:
            L.append(f"| {r['method']} | {r['variant']} | FAILED: {r['error']} | | | | | | | | |")
            continue
        L.append(f"| {r['method']} | {r['variant']} | {_fmt(r['step_ms'])} | {_fmt(r['img_per_s'])} | "
                 f"{_fmt(r['peak_mem_mb'], '.0f')} | {_fmt(r.get('vs_suponly'), '.2f')} | "
                 f"{_fmt(r.get('flops_vs_suponly'), '.2f')} | {_fmt(r.get('passes_vs_suponly'), '.2f')} | "
                 f"{_fmt(r.get('tflop_per_s'), '.2f')} | {_fmt(r.get('speedup_vs_off'), '.2f')} | "
                 f"{_fmt(r.get('warmup_s'))} |")
    measured = sorted({r["method"] for r in bench_rows if "error" not in r})
    L += ["", f"methods measured: {', '.join(measured) or 'none'}; not reached: "
          f"{', '.join(m for m in plan.methods if m not in measured) or 'none'}", ""]
    L += [f"## Jobs sharing the GPU ({plan.share_method}, variant {plan.share_variant})", ""]
    if share:
        L += ["| jobs | total img/s | per job | vs 1 job | peak MB per job |", "|---|---|---|---|---|"]
        for r in share.get("rows", []):
            if "error" in r:
                L.append(f"| {r['jobs']} | FAILED: {r['error']} | | | |")
            else:
                L.append(f"| {r['jobs']} | {_fmt(r['total_img_per_s'])} | {_fmt(r['per_job_img_per_s'])} | "
                         f"{_fmt(r.get('speedup_vs_1'), '.2f')} | {_fmt(r.get('peak_mem_mb_max'), '.0f')} |")
        L += ["", f"recommended SEMIBENCH_JOBS_PER_GPU: {share.get('recommended_jobs_per_gpu')}", ""]
    else:
        L += ["no measurement", ""]
    L += [f"## {plan.dsb_epochs}-epoch runs ({plan.dsb_method} 1/{plan.dsb_ratio}, synthetic {plan.dsb_count} images "
          f"at {plan.dsb_size}², generated: not DSB), options off vs on, seeds {list(plan.dsb_seeds)}", ""]
    if "error" in dsb:
        L += [f"FAILED: {dsb['error']}", ""]
    else:
        L += ["| run | execution | val Dice per epoch | test Dice | train s per epoch |", "|---|---|---|---|---|"]
        for name, r in dsb["runs"].items():
            ex = r["execution"]
            L.append(f"| {name} | {ex.get('precision')}, cl={ex.get('channels_last')}, fused={ex.get('fused_adam')}, "
                     f"compile={ex.get('compile')} | {', '.join(f'{v:.4f}' for v in r['val_dice']) or '-'} | "
                     f"{_fmt(r['test_dice'], '.4f')} | {', '.join(map(str, r['train_s'])) or '-'} |")
        L += ["", "| epoch | mean off | mean on | on − off | seed spread | within spread |",
              "|---|---|---|---|---|---|"]
        for a in dsb["agreement"]:
            L.append(f"| {a['epoch']} | {a['mean_off']:.4f} | {a['mean_on']:.4f} | {a['difference']:+.4f} | "
                     f"{a['seed_spread']:.4f} | {'yes' if a['within_spread'] else 'NO'} |")
        L.append("")
    L += ["## Predicted wall time of the paper's grid (bench_grid)", ""]
    if grid and "error" not in grid:
        L += [grid["note"], "", "| variant | GPUs | jobs/GPU | S(k) | 1-GPU h | wall h |", "|---|---|---|---|---|---|"]
        for variant, v in grid["variants"].items():
            for p in v["predictions"]:
                L.append(f"| {variant} | {p['gpus']} | {p['jobs_per_gpu']} | {p['speedup']:.2f} | "
                         f"{p['single_gpu_hours']:.1f} | {p['wall_hours']:.1f} |")
        L.append("")
    else:
        L += [f"not computed: {(grid or {}).get('error', 'no suponly row')}", ""]
    text = "\n".join(L) + "\n"
    (out / "summary.md").write_text(text)
    results = {"plan": asdict(plan), "env": env, "stages": runner.results, "tests": tests,
               "bench_train": bench_rows, "share": share, "dsb": dsb, "grid": grid}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    return text


# ---------------------------------------------------------------------------- main

def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="every stage at toy size on the CPU")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole script")
    p.add_argument("--out", type=Path, help="results folder (default: $OUT, else ./device_check_out)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    p.add_argument("--methods", nargs="*", help="default: every registered method (GPU), three (smoke)")
    p.add_argument("--share-variant", choices=["off", "defaults", "on"], help="default: defaults")
    p.add_argument("--skip", nargs="*", default=[], choices=[s for s, _ in STAGES], help="stages to leave out")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--compile-on", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))  # the checkout's semibench, installed or not
    plan = smoke_plan(args.methods) if args.cpu_smoke else gpu_plan(args.methods)
    if args.share_variant:
        plan.share_variant = args.share_variant
    if args.stage:  # a child: one stage's in-process work
        work = Path(args.work)
        if args.stage == "env":
            return stage_env(work)
        if args.stage == "dsb":
            return stage_dsb(work, plan, args.compile_on)
        raise SystemExit(f"unknown stage {args.stage}")

    out = Path(args.out or os.environ.get("OUT") or "device_check_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="semibench-device-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [x for x in [os.environ.get("PYTHONPATH")] if x]),
               PYTHONUNBUFFERED="1", SEMIBENCH_NUM_GPUS="0", MPLBACKEND="Agg")
    if plan.compile_backend:
        env["SEMIBENCH_COMPILE_BACKEND"] = plan.compile_backend
    if plan.threads:
        env["OMP_NUM_THREADS"] = str(plan.threads)
    runner = Runner(out, work, args.budget_s, env)

    def on_signal(signum, frame):  # killed from outside: stop the stage, still write the summary
        if runner.current is not None:
            Runner.kill(runner.current)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    py, me = sys.executable, str(Path(__file__).resolve())
    threads = ["--threads", str(plan.threads)] if plan.threads else []
    common = ["--device", plan.device, "--backbones", plan.backbone, "--size", str(plan.size),
              "--batch", *map(str, plan.batch), "--warmup", str(plan.warmup), "--steps", str(plan.steps), *threads]
    stages = {
        "env": lambda: [py, me, "--stage", "env", "--work", str(work)],
        "tests": lambda: [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
                          *(["--timeout", "150"] if _has_module("pytest_timeout") else []), *gpu_test_files()],
        "bench": lambda: [py, str(BENCH / "bench_train.py"), *common, "--variants", "off", "defaults",
                          "--methods", *plan.methods, "--json", str(work / "bench.json")],
        "compile": lambda: [py, str(BENCH / "bench_train.py"), *common, "--variants", "on", "--no-count",
                            "--methods", *plan.methods, "--json", str(work / "bench_on.json")],
        "share": lambda: [py, str(BENCH / "bench_share.py"), "--device", plan.device, "--method", plan.share_method,
                          "--backbone", plan.backbone, "--size", str(plan.size), "--batch", *map(str, plan.batch),
                          "--jobs", *map(str, plan.share_jobs), "--seconds", str(plan.share_seconds),
                          "--variant", plan.share_variant, "--warmup", str(plan.warmup), *threads,
                          "--ready-timeout", str(max(30, int(runner.remaining() / 3))),
                          "--json", str(work / "share.json")],
        "dsb": lambda: [py, me, "--stage", "dsb", "--work", str(work), *(["--cpu-smoke"] if args.cpu_smoke else []),
                        *(["--compile-on"] if _compiled(work, plan.dsb_method) else [])],
    }
    try:
        for name, share in STAGES:
            if name in args.skip:
                runner.results[name] = {"stage": name, "status": "skipped (--skip)", "seconds": 0.0}
                continue
            runner.run(name, share, stages[name](), capture=out / "pytest_gpu.txt" if name == "tests" else None)
    except KeyboardInterrupt:
        runner._note("=== interrupted: writing the summary of what was measured")
    text = write_summary(out, work, plan, runner, args)
    print(text)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _compiled(work: Path, method: str) -> bool:
    """Did the compile stage train ``method`` compiled (so compiling works and its caches are
    warm), at least ``COMPILE_WORTH`` times faster than without? Else a run would not enable it."""
    rows = [r for r in (_read_json(work / "bench.json") or []) + (_read_json(work / "bench_on.json") or [])
            if r.get("method") == method and "error" not in r]
    ms = {r["variant"]: r["step_ms"] for r in rows}
    return "on" in ms and "defaults" in ms and ms["defaults"] / ms["on"] >= COMPILE_WORTH


if __name__ == "__main__":
    sys.exit(main())
