"""Per-optimiser losses under CUDA AMP (float16 autocast, one GradScaler for every optimiser):
an optimiser that gets no gradient in a step is skipped (GradScaler.step would raise "No inf
checks were recorded for this optimizer"), and GCT's three optimisers all step."""
from __future__ import annotations

import math

import pytest
import torch

from semibench.engine import Trainer
from tests.test_engine import one_thread, toy_config, toy_root  # noqa: F401 (fixtures)
from tests.test_optimizers import two_methods  # noqa: F401 (fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_trainer(root, tmp_path, method, **kw):
    cfg = toy_config(root, method, precision="fp16", unsup_start_epoch=0, **kw)
    cfg.device = "cuda"
    tr = Trainer(cfg, tmp_path)
    assert tr.amp and tr.scaler.is_enabled()
    return tr


def test_amp_skips_the_optimiser_without_gradient(toy_root, tmp_path, two_methods):  # noqa: F811
    tr = _cuda_trainer(toy_root, tmp_path, "_test_two", method_params={"mode": "only_a"})
    critic = [p.detach().clone() for p in tr.method.critic.parameters()]
    for it in range(3):
        values = tr.train_step(0, it)  # would raise in GradScaler.step without the skip
        assert math.isfinite(values["loss"])
    assert all(torch.equal(a, b) for a, b in zip(critic, tr.method.critic.parameters()))
    assert tr.ctx.named_optimizers()["b"].state == {}
    assert tr.ctx.named_optimizers()["a"].state != {}


def test_amp_two_optimisers_both_step(toy_root, tmp_path, two_methods):  # noqa: F811
    tr = _cuda_trainer(toy_root, tmp_path, "_test_two")
    before = [p.detach().clone() for p in tr.method.critic.parameters()]
    for it in range(3):
        tr.train_step(0, it)
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.method.critic.parameters()))


def test_amp_gct_steps_its_three_optimisers(toy_root, tmp_path):  # noqa: F811
    tr = _cuda_trainer(toy_root, tmp_path, "gct", method_params={"fd_channels": 8})
    m = tr.method
    nets = (m.task_l, m.task_r, m.flaw_detector)
    before = [[p.detach().clone() for p in n.parameters()] for n in nets]
    for it in range(3):
        values = tr.train_step(0, it)
        assert all(math.isfinite(values[k]) for k in ("loss/task_l", "loss/task_r", "loss/flaw"))
    for b, n in zip(before, nets):
        assert any(not torch.equal(x, y) for x, y in zip(b, n.parameters()))
    assert all(o.state != {} for o in tr.ctx.optimizers)
