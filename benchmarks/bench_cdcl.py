"""CDCL cost (not a test): the vectorised L_contr against the per-patch reference, and a CDCL
training step against SupOnly's (and Mean Teacher's, the same framework without L_contr/L_ent).

1. Loss: forward + backward of L_contr at the paper's sizes — batch 8, 320² input → 40×40
   projection map, 128 dims, 8×8 patches, the bank holding a previous batch — on smooth random
   pseudo-label maps (about a quarter foreground, like nuclei). Both must agree (checked here).
2. Step: ``training_step`` + backward + Adam + EMA update with the tiny backbone on in-memory
   tensors (FakeContext; the bare method cost), and the engine's full ``train_step``
   (augmentation included, time only) through ``benchmarks/bench_train.py``. Each bare step runs
   in a fresh process; its peak memory is CUDA ``max_memory_allocated`` or, on the CPU, the
   process's peak resident set (the same baseline of interpreter, torch and model for all).
   Besides wall time, the bare step's process CPU time is printed: on a shared, loaded machine
   it is the steadier figure.

Goals (issue 4): CDCL step ≤ 2× SupOnly step; vectorised loss ≥ 5× faster than the reference.

    python benchmarks/bench_cdcl.py                      # everything, CPU (and CUDA if present)
    python benchmarks/bench_cdcl.py --skip-reference     # without the slow reference timing
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from semibench.method import Batch, StepInfo, make_hparams
from semibench.methods._cdcl_losses import (
    MP,
    FeatureBank,
    contrastive_loss,
    flatten_pixels,
    pixel_categories,
    push_banks,
)
from semibench.network.model import build_model
from semibench.registry import METHODS

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from semibench.testing import FakeContext  # noqa: E402
from tests.cdcl_reference import reference_l_contr  # noqa: E402


def _load_bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_BENCH_TRAIN = _load_bench_train()  # its CPU peak-memory helpers and the engine step benchmark


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def blob_labels(b: int, h: int, w: int, g: torch.Generator, fg: float = 0.25) -> torch.Tensor:
    x = F.avg_pool2d(torch.randn(b, 1, h + 10, w + 10, generator=g), 11, 1).squeeze(1)
    return (x > torch.quantile(x.flatten(), 1 - fg)).long()


def bench_loss(device: torch.device, repeats: int, reference: bool, chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    b, d, h, w, p = 8, 128, 40, 40, 8
    prev_t, prev_y = torch.randn(b, d, h, w, generator=g), blob_labels(b, h, w, g)
    q = torch.randn(b, d, h, w, generator=g).to(device).requires_grad_()
    t = torch.randn(b, d, h, w, generator=g).to(device)
    y_q, y_t = blob_labels(b, h, w, g).to(device), blob_labels(b, h, w, g).to(device)
    prev_t, prev_y = prev_t.to(device), prev_y.to(device)

    fdb, bdb = FeatureBank(2), FeatureBank(2)

    def fast():  # the method's work per batch: categories, bank update, loss
        for proj, y in ((prev_t, prev_y), (t, y_t)):
            push_banks(fdb, bdb, flatten_pixels(proj), y.flatten(), pixel_categories(y, p)[0])
        cat_q, patch_q = pixel_categories(y_q, p)
        k = flatten_pixels(t)
        return contrastive_loss(flatten_pixels(q), k, y_q.flatten(), cat_q, patch_q, fdb.keys(d, k),
                                bdb.keys(d, k), chunk=chunk)

    def timed(fn):
        q.grad = None
        _sync(device)
        t0 = time.perf_counter()
        loss = fn()
        loss.backward()
        _sync(device)
        return time.perf_counter() - t0, loss.item()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fast().backward()  # warm-up
    times = [timed(fast) for _ in range(repeats)]
    t_fast, v_fast = min(x[0] for x in times), times[0][1]
    n_q, n_k = int((pixel_categories(y_q, p)[0] != MP).sum()), len(fdb) + len(bdb)
    mem = f", peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda" else ""
    print(f"L_contr [{device}] batch {b}, {h}×{w}×{d}, {n_q} query pixels, {n_k} bank keys, chunk {chunk}:")
    print(f"  vectorised  fwd+bwd {1000 * t_fast:9.1f} ms (best of {repeats}){mem}")
    if reference:
        t_ref, v_ref = timed(lambda: reference_l_contr(q, t, y_q, y_t, [(prev_t, prev_y)],
                                                       patches_per_side=p))
        rel = abs(v_fast - v_ref) / abs(v_ref)
        speedup = t_ref / t_fast
        print(f"  reference   fwd+bwd {1000 * t_ref:9.1f} ms (one run); values agree to {rel:.1e} relative")
        print(f"  speed-up {speedup:.1f}×  (goal ≥ 5×: {'met' if speedup >= 5 else 'MISSED'})")


def _step_batch(device, size, n_lab, n_unl, g):
    def images(n):
        return torch.rand(n, 3, size, size, generator=g).to(device)

    lab_img, unl = images(n_lab), images(n_unl)
    mask = (F.interpolate(torch.rand(n_lab, 1, size // 16, size // 16, generator=g), size=(size, size),
                          mode="bilinear")[:, 0] > 0.6).long().to(device)
    return Batch(lab_img, mask, {"weak": unl, "strong": (unl + 0.05 * torch.randn(unl.shape, generator=g)
                                                         .to(device))})


def bare_step_worker(name: str, device: torch.device, size: int, batch: tuple[int, int], warmup: int,
                     steps: int) -> dict:
    """In a fresh process: one method on in-memory tensors, ``training_step`` + backward + Adam +
    EMA update; the best step time and the peak memory (CUDA max allocated, or the process's
    peak resident set, whose baseline — interpreter, torch, the model — is alike for all)."""
    torch.manual_seed(0)
    cls = METHODS.get(name)
    ctx = FakeContext(lambda: build_model("tiny", "none"))
    ctx.device = device
    method = cls(ctx, make_hparams(cls.Hparams, {})).to(device).train()
    data = _step_batch(device, size, *batch, torch.Generator().manual_seed(0))
    info = StepInfo(epoch=10, epochs=80, iteration=1000, iterations=8000, unsup_active=True)
    times, cpu_times = [], []
    for i in range(warmup + steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for opt in ctx.optimizers:
            opt.zero_grad(set_to_none=True)
        method.training_step(data, info)["loss"].backward()
        for opt in ctx.optimizers:
            opt.step()
        ctx.update_teachers(1000 + i)  # the engine's EMA step with each teacher's own settings
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else _BENCH_TRAIN._cpu_peak_mb())
    return {"ms": 1000 * min(times), "cpu_ms": 1000 * min(cpu_times), "peak_mb": peak}


def bench_steps(device: torch.device, size: int, batch: tuple[int, int], warmup: int, steps: int,
                rounds: int, engine: bool) -> None:
    """Each method in its own process, the methods interleaved round by round and the best step
    kept, so that load from other processes on a shared machine hits every method alike."""
    names = [n for n in ("suponly", "meanteacher", "cdcl") if n in METHODS.names()]
    print(f"\nStep, tiny backbone, {size}², batch {batch[0]}+{batch[1]} [{device}], "
          f"best step of {rounds} interleaved rounds × {steps} steps")
    bare: dict[str, list[dict]] = {n: [] for n in names}
    eng: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            cmd = [sys.executable, __file__, "--worker", n, "--device", device.type, "--size", str(size),
                   "--batch", *map(str, batch), "--warmup", str(warmup), "--steps", str(steps),
                   "--threads", str(torch.get_num_threads())]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            bare[n].append(json.loads(out.strip().splitlines()[-1]))
            if engine:
                eng[n].append(_BENCH_TRAIN.bench_one(n, "tiny", size, device.type, batch[0], batch[1],
                                                     warmup, steps))
    print(f"  {'method':<12} {'bare ms':>9} {'bare CPU ms':>12} {'peak MiB':>9} {'engine ms':>10}")
    best = {}
    for n in names:
        ms, peak = min(r["ms"] for r in bare[n]), max(r["peak_mb"] for r in bare[n])
        cpu_ms = min(r["cpu_ms"] for r in bare[n])
        e_ms = min((r["step_ms"] for r in eng[n]), default=float("nan"))
        best[n] = (ms, cpu_ms, e_ms)
        print(f"  {n:<12} {ms:9.1f} {cpu_ms:12.1f} {peak:9.0f} {e_ms:10.1f}", flush=True)
    if "suponly" in best and "cdcl" in best:
        for label, i in (("bare wall", 0), ("bare CPU", 1), ("engine wall", 2)):
            ratio = best["cdcl"][i] / best["suponly"][i]
            if ratio == ratio:  # not NaN
                mt = (f"; CDCL / Mean Teacher = {best['cdcl'][i] / best['meanteacher'][i]:.2f}×"
                      if "meanteacher" in best else "")
                goal = "met" if ratio <= 2 else "MISSED"
                print(f"  {label}: CDCL / SupOnly = {ratio:.2f}×  (goal ≤ 2×: {goal}){mt}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], action="append",
                    help="default: cpu, plus cuda when available")
    ap.add_argument("--repeats", type=int, default=3, help="vectorised loss timings (best is printed)")
    ap.add_argument("--skip-reference", action="store_true", help="do not time the per-patch reference")
    ap.add_argument("--chunk", type=int, default=2048, help="query chunk of the vectorised loss")
    ap.add_argument("--size", type=int, default=128, help="input size of the step benchmark")
    ap.add_argument("--batch", type=int, nargs=2, default=(8, 8), metavar=("LABELED", "UNLABELED"))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the step benchmark")
    ap.add_argument("--no-engine", action="store_true", help="only the bare method step, not the engine's")
    ap.add_argument("--skip-loss", action="store_true", help="only the step benchmark")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one bare step benchmark
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if args.worker:
        print(json.dumps(bare_step_worker(args.worker, torch.device(devices[0]), args.size, tuple(args.batch),
                                          args.warmup, args.steps)))
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    for dev in map(torch.device, devices):
        if not args.skip_loss:
            bench_loss(dev, args.repeats, not args.skip_reference, args.chunk)
        bench_steps(dev, args.size, tuple(args.batch), args.warmup, args.steps, args.rounds,
                    not args.no_engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
