"""Training throughput and peak memory per method and backbone (not a test).

Each configuration runs the engine's real training step (augmentation, forward, backward, Adam,
EMA update, AMP on CUDA) on random in-memory data with unsupervised losses switched on, a few
warm-up steps, then timed steps. Throughput counts the labeled plus unlabeled images of a step
(a labeled-only method counts its labeled images only; CutMix-Seg counts both its unlabeled
batches).

Two ratios to SupOnly (same backbone, size and device; ``-`` when suponly is not benchmarked):
``vs sup``, the measured step time over SupOnly's; ``passes``, the ratio implied by the
DenseUNet passes the method makes, counted in one extra step by forward hooks on every
segmenter and EMA teacher: Σ images × (3 when the pass's output carries gradient — forward plus
a backward of about twice its cost — else 1), over SupOnly's 3 × labeled batch. Small heads
outside the DenseUNets (CCT's auxiliary decoders, GCT's flaw detector) are not counted, so a
measured ratio above the implied one points at them or at overheads (augmentation, losses).

Peak memory: CUDA ``max_memory_allocated`` over the timed steps; on the CPU the process's peak
resident set (VmHWM) since the start of the configuration (Linux: reset through
/proc/self/clear_refs; elsewhere the peak since the process started).

    python benchmarks/bench_train.py                       # tiny 128², densenet121/161 at 128² on CPU,
                                                           # + densenet161 at 320² on CUDA when present
    python benchmarks/bench_train.py --backbones tiny --methods suponly meanteacher --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from semibench.config import RunConfig, TrainConfig
from semibench.data import ImageSet, TrainData
from semibench.engine import Trainer
from semibench.registry import METHODS


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


def bench_one(method: str, backbone: str, size: int, device: str, batch_labeled: int,
              batch_unlabeled: int, warmup: int, steps: int) -> dict:
    cfg = RunConfig(dataset="bench", method=method, ratio=8, seed=0, device=device,
                    train=TrainConfig(backbone=backbone, weights="none", input_size=size,
                                      batch_labeled=batch_labeled, batch_unlabeled=batch_unlabeled,
                                      epochs=1, iters_per_epoch=warmup + steps, unsup_start_epoch=0))
    data = fake_data(2 * batch_labeled, 2 * batch_unlabeled, size)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp), data=data)
    dev = tr.device
    tr.method.train()
    for i in range(warmup):
        tr.train_step(0, i)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        _cpu_peak_reset()
    t0 = time.perf_counter()
    for i in range(steps):
        tr.train_step(0, warmup + i)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _cpu_peak_mb()
    n_img = tr.images_per_step * steps
    cost = pass_cost(tr, warmup + steps)
    return {"method": method, "backbone": backbone, "size": size, "device": str(dev),
            "batch": f"{batch_labeled}+{tr.n_unlabeled_batches}x{batch_unlabeled}"
                     if tr.n_unlabeled_batches > 1 else f"{batch_labeled}+{batch_unlabeled if tr.views is not None else 0}",
            "step_ms": 1000 * dt / steps, "img_per_s": n_img / dt, "peak_mem_mb": peak,
            "pass_cost": cost, "passes_ratio": cost / (3 * batch_labeled),
            "amp": tr.amp, "threads": torch.get_num_threads()}


def pass_cost(tr: Trainer, it: int) -> float:
    """Σ images × (3 if the output carries gradient else 1) over the DenseUNet passes (every
    segmenter and EMA teacher) of one training step (see the module docstring)."""
    cost = [0.0]

    def hook(module, inputs, output):
        logits = output.logits if hasattr(output, "logits") else output
        cost[0] += inputs[0].shape[0] * (3.0 if logits.requires_grad else 1.0)

    nets = list(tr.ctx.segmenters) + [teacher for _, teacher, _ in tr.ctx.emas]
    handles = [net.register_forward_hook(hook) for net in nets]
    try:
        tr.train_step(0, it)
    finally:
        for h in handles:
            h.remove()
    return cost[0]


def default_plan(cuda: bool) -> list[tuple[str, int, str]]:
    plan = [("tiny", 128, "cpu"), ("densenet121", 128, "cpu"), ("densenet161", 128, "cpu")]
    if cuda:
        plan += [("tiny", 128, "cuda"), ("densenet161", 320, "cuda")]
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", help="default: every registered method")
    p.add_argument("--backbones", nargs="*", help="restrict the default plan to these backbones")
    p.add_argument("--size", type=int, help="override the input size of every configuration")
    p.add_argument("--device", choices=["cpu", "cuda"], help="restrict the plan to one device")
    p.add_argument("--batch", type=int, nargs=2, default=(8, 8), metavar=("LABELED", "UNLABELED"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods or METHODS.names()
    plan = [c for c in default_plan(torch.cuda.is_available())
            if (not args.backbones or c[0] in args.backbones) and (not args.device or c[2] == args.device)]
    rows = []
    header = (f"{'method':<14} {'backbone':<12} {'size':>4} {'device':<7} {'batch':>7} {'step ms':>9} "
              f"{'img/s':>8} {'peak MB':>8} {'vs sup':>7} {'passes':>7}")
    print(header, flush=True)
    # SupOnly first in each configuration, so the others' ratios can be printed as they come
    methods = sorted(methods, key=lambda m: m != "suponly")
    for backbone, size, device in plan:
        sup = None
        for method in methods:
            r = bench_one(method, backbone, args.size or size, device, args.batch[0], args.batch[1],
                          args.warmup, args.steps)
            if method == "suponly":
                sup = r
            r["vs_suponly"] = r["step_ms"] / sup["step_ms"] if sup else None
            r["passes_vs_suponly"] = r["pass_cost"] / sup["pass_cost"] if sup else None
            rows.append(r)
            vs = f"{r['vs_suponly']:>7.2f}" if sup else f"{'-':>7}"
            passes = f"{r['passes_vs_suponly']:>7.2f}" if sup else f"{'-':>7}"
            print(f"{r['method']:<14} {r['backbone']:<12} {r['size']:>4} {r['device']:<7} {r['batch']:>7} "
                  f"{r['step_ms']:>9.1f} {r['img_per_s']:>8.2f} {r['peak_mem_mb']:>8.0f} {vs} {passes}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
