"""Training throughput, peak memory and arithmetic per method and backbone (not a test).

Each configuration runs the engine's real training step (augmentation, forward, backward, Adam,
EMA update, autocast on CUDA) on random in-memory data with unsupervised losses switched on, a
few warm-up steps (which pay torch.compile's compilation), then timed steps. Throughput counts
the labeled plus unlabeled images of a step (a labeled-only method counts its labeled images
only; CutMix-Seg counts both its unlabeled batches). cuDNN runs as in a run (``train.
deterministic``, default true: deterministic algorithms, no autotuning).

Variants of the execution options (semibench.train.execution), ``--variants``:

- ``off``: the engine before them: fp16 autocast with a GradScaler, NCHW, plain Adam, eager,
  and the losses read (a host synchronisation) after every step;
- ``defaults``: the config's defaults: ``precision: auto`` (bf16 where the GPU has it),
  channels-last, fused Adam, losses read every ``LOG_EVERY`` steps;
- ``on``: ``defaults`` plus ``compile: true``.

On the CPU the precision, channels-last and fused Adam options do not apply (fp32, NCHW, plain
Adam), so ``off`` and ``defaults`` run the same arithmetic there.

Three ratios to SupOnly (same backbone, size, device and variant; ``-`` without a suponly row):
``vs sup``, the measured step time over SupOnly's; ``passes``, the ratio implied by the
DenseUNet passes the method makes (forward hooks on every segmenter and EMA teacher: Σ images ×
(3 when the output carries gradient, a forward plus a backward of about twice its cost, else 1));
``flops``, the ratio of the FLOPs of the whole step counted by torch's FLOP counter
(``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix products, forward and
backward, of every network and head, in one extra eager step). A measured ratio above
``flops`` means overhead (launches, memory-bound kernels, host synchronisation), nothing else;
``passes`` leaves out the heads outside the DenseUNets (CCT's auxiliary decoders, GCT's flaw
detector). ``TFLOP/s`` is the counted FLOPs over the measured step time.

Peak memory: CUDA ``max_memory_allocated`` over the timed steps; on the CPU the process's peak
resident set (VmHWM) since the start of the configuration (Linux: reset through
/proc/self/clear_refs; elsewhere the peak since the process started).

    python benchmarks/bench_train.py                       # tiny 128², densenet121/161 at 128² on CPU,
                                                           # + densenet161 at 320² on CUDA when present
    python benchmarks/bench_train.py --backbones tiny --methods suponly meanteacher --threads 1
    python benchmarks/bench_train.py --device cuda --backbones densenet161 --variants off defaults on \\
        --json rows.json                                   # the options' speed-up per method
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import semibench.train.progress as progress
from semibench.config import RunConfig, TrainConfig
from semibench.data.loading import ImageSet, TrainData
from semibench.registry import METHODS
from semibench.train.engine import Trainer, determinism

VARIANTS = {  # train.<key> values of each variant (see the module docstring)
    "off": dict(precision="fp16", channels_last=False, fused_adam=False, compile=False),
    "defaults": dict(precision="auto", channels_last=True, fused_adam=True, compile=False),
    "on": dict(precision="auto", channels_last=True, fused_adam=True, compile=True),
}
READ_EVERY_STEP = {"off"}  # variants that read the losses after every step, as before the options


def _cpu_peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _cpu_peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fake_data(n_labeled: int, n_unlabeled: int, size: int, seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)

    def masks(n):  # blobs rather than noise, so predictions and pseudo labels have structure
        m = torch.rand(n, 1, max(1, size // 16), max(1, size // 16), generator=g)
        return (torch.nn.functional.interpolate(m, size=(size, size), mode="bilinear")[:, 0] > 0.6).to(torch.uint8)

    lab = ImageSet([f"l{i}" for i in range(n_labeled)], images(n_labeled), masks(n_labeled))
    unl = ImageSet([f"u{i}" for i in range(n_unlabeled)], images(n_unlabeled), masks(n_unlabeled))
    val = ImageSet(["v0"], images(1), masks(1))
    return TrainData(labeled=lab, unlabeled=unl, val=val, unlabeled_ids=unl.ids)


def make_trainer(method: str, backbone: str, size: int, device: str, batch_labeled: int,
                 batch_unlabeled: int, iterations: int, variant: str = "defaults",
                 deterministic: bool = True) -> Trainer:
    """A Trainer on random in-memory data with the unsupervised losses on from the start."""
    cfg = RunConfig(dataset="bench", method=method, ratio=8, seed=0, device=device,
                    train=TrainConfig(backbone=backbone, weights="none", input_size=size,
                                      batch_labeled=batch_labeled, batch_unlabeled=batch_unlabeled,
                                      epochs=1, iters_per_epoch=iterations, unsup_start_epoch=0,
                                      deterministic=deterministic, **VARIANTS[variant]))
    data = fake_data(2 * batch_labeled, 2 * batch_unlabeled, size)
    with tempfile.TemporaryDirectory() as tmp:
        return Trainer(cfg, Path(tmp), data=data)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_steps(tr: Trainer, first: int, n: int, read_every_step: bool) -> None:
    """``n`` training steps from iteration ``first``, reading the losses as the engine does
    (every ``LOG_EVERY`` steps) or, for the ``off`` variant, after every step."""
    for i in range(first, first + n):
        if read_every_step:
            tr.train_step(0, i)
        else:
            tr.run_step(0, i)
            if (i - first + 1) % progress.LOG_EVERY == 0:
                tr.read_losses()
    tr.read_losses()


def bench_one(method: str, backbone: str, size: int, device: str, batch_labeled: int,
              batch_unlabeled: int, warmup: int, steps: int, variant: str = "defaults",
              count: bool = True, deterministic: bool = True) -> dict:
    t0 = time.perf_counter()
    dev = torch.device(device)
    with determinism(deterministic, dev, compile=variant == "on"):
        tr = make_trainer(method, backbone, size, device, batch_labeled, batch_unlabeled,
                          warmup + steps + 2, variant, deterministic)
        dev = tr.device
        tr.method.train()
        build_s = time.perf_counter() - t0
        read_every = variant in READ_EVERY_STEP
        run_steps(tr, 0, warmup, read_every)
        _sync(dev)
        warmup_s = time.perf_counter() - t0 - build_s
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            _cpu_peak_reset()
        t1 = time.perf_counter()
        run_steps(tr, warmup, steps, read_every)
        _sync(dev)
        dt = time.perf_counter() - t1
        peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _cpu_peak_mb()
        row = {"method": method, "backbone": backbone, "size": size, "device": str(dev), "variant": variant,
               "batch": f"{batch_labeled}+{tr.batches.n_unlabeled_batches}x{batch_unlabeled}"
                        if tr.batches.n_unlabeled_batches > 1 else f"{batch_labeled}+{batch_unlabeled if tr.batches.views is not None else 0}",  # noqa: E501
               "images_per_step": tr.images_per_step, "steps": steps,
               "step_ms": 1000 * dt / steps, "img_per_s": tr.images_per_step * steps / dt, "peak_mem_mb": peak,
               "build_s": build_s, "warmup_s": warmup_s, "warmup_steps": warmup,
               "execution": tr.execution.record(), "deterministic": deterministic,
               "threads": torch.get_num_threads()}
        if count and not tr.execution.compile:  # hooks and the FLOP counter need eager modules
            row.update(step_costs(tr, warmup + steps, batch_labeled))
    return row


def step_costs(tr: Trainer, it: int, batch_labeled: int) -> dict:
    """The DenseUNet pass costs and the counted FLOPs of two more (eager) steps."""
    costs = pass_costs(tr, it)
    return {**costs, "passes_ratio": costs["pass_cost"] / (3 * batch_labeled), "flops": step_flops(tr, it + 1)}


def pass_costs(tr: Trainer, it: int) -> dict[str, float]:
    """Over the DenseUNet passes (every segmenter and EMA teacher) of one training step:
    ``pass_cost`` = Σ images × (3 if the output carries gradient else 1) (see the module
    docstring) and ``pixel_pass_cost``, the same with each image weighted by its pixels (a
    DenseUNet's work grows with them: CAC's crops are smaller than the images)."""
    cost = {"pass_cost": 0.0, "pixel_pass_cost": 0.0}

    def hook(module, inputs, output):
        logits = output.logits if hasattr(output, "logits") else output
        x, weight = inputs[0], (3.0 if logits.requires_grad else 1.0)
        cost["pass_cost"] += x.shape[0] * weight
        cost["pixel_pass_cost"] += x.shape[0] * x.shape[-2] * x.shape[-1] * weight

    nets = list(tr.ctx.segmenters) + [teacher for _, teacher, _ in tr.ctx.emas]
    handles = [net.register_forward_hook(hook) for net in nets]
    try:
        tr.train_step(0, it)
    finally:
        for h in handles:
            h.remove()
    return cost


def step_flops(tr: Trainer, it: int) -> float:
    """FLOPs of one whole training step (every network and head, forward and backward) as
    torch's FLOP counter counts them (convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        tr.train_step(0, it)
    return float(counter.get_total_flops())


def default_plan(cuda: bool) -> list[tuple[str, int, str]]:
    plan = [("tiny", 128, "cpu"), ("densenet121", 128, "cpu"), ("densenet161", 128, "cpu")]
    if cuda:
        plan += [("tiny", 128, "cuda"), ("densenet161", 320, "cuda")]
    return plan


def add_ratios(rows: list[dict]) -> None:
    """vs_suponly, passes_vs_suponly, flops_vs_suponly, tflop_per_s and speedup_vs_off of each
    row, from the rows of the same configuration (the FLOP and pass counts of a compiled row are
    those of an eager row of the same method: they are properties of the method)."""
    ok = [r for r in rows if "error" not in r]
    counts = {(r["method"], r["backbone"], r["size"], r["device"]): r for r in ok if "flops" in r}
    for r in ok:
        c = counts.get((r["method"], r["backbone"], r["size"], r["device"]))
        if c is not None and "flops" not in r:
            r.update({k: c[k] for k in ("pass_cost", "pixel_pass_cost", "passes_ratio", "flops")})
    by_cfg = {(r["method"], r["backbone"], r["size"], r["device"], r["variant"]): r for r in ok}
    for r in ok:
        sup = by_cfg.get(("suponly", r["backbone"], r["size"], r["device"], r["variant"]))
        off = by_cfg.get((r["method"], r["backbone"], r["size"], r["device"], "off"))
        r["vs_suponly"] = r["step_ms"] / sup["step_ms"] if sup else None
        for cost, ratio in (("pass_cost", "passes_vs_suponly"), ("pixel_pass_cost", "pixel_passes_vs_suponly")):
            r[ratio] = r[cost] / sup[cost] if sup and cost in r and cost in sup else None
        r["flops_vs_suponly"] = r["flops"] / sup["flops"] if sup and r.get("flops") and sup.get("flops") else None
        r["tflop_per_s"] = r["flops"] / (r["step_ms"] / 1000) / 1e12 if r.get("flops") else None
        r["speedup_vs_off"] = off["step_ms"] / r["step_ms"] if off else None


HEADER = (f"{'method':<14} {'backbone':<12} {'size':>4} {'device':<7} {'variant':<8} {'batch':>7} {'step ms':>9} "
          f"{'img/s':>8} {'peak MB':>8} {'vs sup':>7} {'passes':>7} {'flops':>7} {'GFLOP':>8} {'TFLOP/s':>8} "
          f"{'vs off':>7} {'warm s':>7}")


def _num(v, width: int, prec: int) -> str:
    return f"{v:>{width}.{prec}f}" if v is not None else f"{'-':>{width}}"


def format_row(r: dict) -> str:
    head = f"{r['method']:<14} {r['backbone']:<12} {r['size']:>4} {r['device']:<7} {r['variant']:<8}"
    if "error" in r:
        return f"{head} FAILED: {r['error']}"
    gflop = r["flops"] / 1e9 if r.get("flops") else None
    return (f"{head} {r['batch']:>7} {r['step_ms']:>9.1f} {r['img_per_s']:>8.2f} {r['peak_mem_mb']:>8.0f} "
            f"{_num(r.get('vs_suponly'), 7, 2)} {_num(r.get('passes_vs_suponly'), 7, 2)} "
            f"{_num(r.get('flops_vs_suponly'), 7, 2)} {_num(gflop, 8, 1)} {_num(r.get('tflop_per_s'), 8, 3)} "
            f"{_num(r.get('speedup_vs_off'), 7, 2)} {r['warmup_s']:>7.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", help="default: every registered method")
    p.add_argument("--backbones", nargs="*", help="restrict the default plan to these backbones")
    p.add_argument("--size", type=int, help="override the input size of every configuration")
    p.add_argument("--device", choices=["cpu", "cuda"], help="restrict the plan to one device")
    p.add_argument("--batch", type=int, nargs=2, default=(8, 8), metavar=("LABELED", "UNLABELED"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=["defaults"], choices=sorted(VARIANTS),
                   help="execution-option variants, each method in each (default: defaults)")
    p.add_argument("--no-deterministic", action="store_true", help="train.deterministic: false "
                   "(cuDNN autotuning; runs are then not reproducible on a GPU)")
    p.add_argument("--no-count", action="store_true", help="skip the pass and FLOP counts")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file (after every row)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods or METHODS.names()
    plan = [c for c in default_plan(torch.cuda.is_available())
            if (not args.backbones or c[0] in args.backbones) and (not args.device or c[2] == args.device)]
    rows: list[dict] = []
    counted: set[tuple] = set()  # pass and FLOP counts are the method's: once per configuration
    print(HEADER, flush=True)
    # SupOnly first in each configuration, so the others' ratios can be printed as they come
    methods = sorted(methods, key=lambda m: m != "suponly")
    for backbone, size, device in plan:
        for method in methods:  # each method's variants together: a cut-off run keeps whole comparisons
            for variant in args.variants:
                size_ = args.size or size
                cfg_key = (method, backbone, size_, device)
                count = not args.no_count and cfg_key not in counted and not VARIANTS[variant]["compile"]
                try:
                    r = bench_one(method, backbone, size_, device, args.batch[0], args.batch[1],
                                  args.warmup, args.steps, variant, count=count,
                                  deterministic=not args.no_deterministic)
                    if "flops" in r:
                        counted.add(cfg_key)
                except Exception as e:  # one failing configuration does not end the table
                    traceback.print_exc(file=sys.stderr)
                    r = {"method": method, "backbone": backbone, "size": size_, "device": device,
                         "variant": variant, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                rows.append(r)
                add_ratios(rows)
                print(format_row(r), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1) + "\n")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
