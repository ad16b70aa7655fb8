"""``semibench check-method NAME``: a method, built-in or plugin, run through the engine on toy
data (:mod:`semibench.testing`) as a benchmark run would use it, in a few seconds on a CPU:

1. contract: its declarations (:func:`semibench.contract.method_class`);
2. build: the method built by the engine, optimisers and evaluated network checked;
3. train: two epochs of two steps, the second with the unsupervised losses on, every loss
   finite, and the evaluated network's weights moved;
4. resume: the same run killed after its first epoch and resumed ends bit for bit where the
   uninterrupted one does (state that must survive lives in ``state_dict``);
5. evaluate: the best checkpoint scored on the toy test split, every metric finite.

The first failure stops the check with one line naming the stage; :func:`check_method` raises
:class:`MethodCheckFailed` (a :class:`~semibench.errors.ConfigError`, so the CLI exits 2).
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from semibench.contract import method_class
from semibench.errors import ConfigError, SemibenchError, describe, first_line
from semibench.evaluate.score import evaluate_run
from semibench.testing import first_difference, toy_config, write_toy_dataset
from semibench.train.engine import Trainer, determinism, train

CHECK_RATIO = 2  # half the toy training images labeled


class MethodCheckFailed(ConfigError):
    pass


class _Killed(Exception):
    pass


def check_method(name: str, workdir: Path | None = None,
                 report: Callable[[str], None] = print) -> dict[str, float]:
    """Run the checks (module docstring) on method ``name`` in ``workdir`` (default: a temporary
    directory, removed afterwards); ``report`` gets one line per passed stage. Returns
    {stage: seconds}."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="semibench-check-") as tmp:
            return check_method(name, Path(tmp), report)
    root = Path(workdir)
    seconds: dict[str, float] = {}

    def stage(title: str, fn: Callable[[], str | None]):
        t0 = time.perf_counter()
        try:
            detail = fn()
        except MethodCheckFailed:
            raise
        except Exception as e:
            what = first_line(e) if isinstance(e, SemibenchError) else describe(e)
            raise MethodCheckFailed(f"check-method {name}: {title} failed: {what}") from None
        seconds[title] = time.perf_counter() - t0
        report(f"ok  {title:<9} {seconds[title]:5.1f} s  {detail or ''}".rstrip())

    def fail(title: str, message: str):
        raise MethodCheckFailed(f"check-method {name}: {title} failed: {message}")

    cls = None

    def contract():
        nonlocal cls
        cls = method_class(name)
        views = cls.unlabeled_views or "labeled data only"
        return f"{cls.__module__}.{cls.__qualname__}, views: {views}, unlabeled batches: {cls.unlabeled_batches}"

    stage("contract", contract)
    cfg = toy_config(root, name, ratio=CHECK_RATIO, epochs=2, iters_per_epoch=2, unsup_start_epoch=1)
    initial = {}

    def build():
        write_toy_dataset(root, seeds=(0,))
        with determinism(True, torch.device("cpu")):
            tr = Trainer(cfg, root / "build")
        net = tr.method.inference_model()
        initial.update({k: v.detach().clone() for k, v in net.state_dict().items()})
        return f"{len(tr.ctx.optimizers)} optimiser(s), {len(tr.ctx.emas)} EMA teacher(s)"

    stage("build", build)
    straight, resumed = root / "runs" / "straight", root / "runs" / "resumed"

    def train_straight():
        train(cfg, straight)
        best = torch.load(straight / "best.pt", map_location="cpu", weights_only=True)["model"]
        if all(torch.equal(best[k], v) for k, v in initial.items() if k in best):
            fail("train", "the evaluated network (inference_model()) did not change in training; "
                          "its parameters must be given to ctx.add_optimizer (or be its EMA teacher)")
        lines = (straight / "train.jsonl").read_text().splitlines()
        return f"{len(lines)} log lines, losses finite"

    stage("train", train_straight)

    def resume():
        def kill(epoch: int) -> None:
            raise _Killed()
        try:
            train(cfg, resumed, on_epoch_end=kill)
        except _Killed:
            pass
        train(cfg, resumed)
        a = torch.load(straight / "checkpoint.pt", map_location="cpu", weights_only=True)["method"]
        b = torch.load(resumed / "checkpoint.pt", map_location="cpu", weights_only=True)["method"]
        differ = sorted(k for k in a.keys() | b.keys() if first_difference(a.get(k), b.get(k)) is not None)
        if differ:
            fail("resume", f"a run resumed after epoch 0 differs from an uninterrupted one in "
                           f"{', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}; keep state "
                           f"that must survive a resume in the method's state_dict (buffers or "
                           f"get_extra_state) and draw randomness from the global generators")
        return "bit-identical to the uninterrupted run"

    stage("resume", resume)

    def evaluate():
        metrics = evaluate_run(straight)
        means = metrics.get("per_image_mean", metrics)
        bad = [k for k, v in means.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            fail("evaluate", f"non-finite test metrics {', '.join(bad)}")
        return f"test dice {means['dice']:.3f}"

    stage("evaluate", evaluate)
    return seconds

