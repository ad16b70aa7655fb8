"""Per-optimiser losses under CUDA AMP (float16 autocast with one GradScaler for every
optimiser; bfloat16 autocast without one), with the fused Adam of the defaults: an optimiser that
gets no gradient in a step is skipped (GradScaler.step would raise "No inf checks were recorded
for this optimizer"), and GCT's three optimisers all step."""
from __future__ import annotations

import math

import pytest
import torch

from semibench.testing import toy_config
from semibench.train.engine import Trainer

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(params=["fp16", "bf16"])
def precision(request):
    if request.param == "bf16" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no native bf16 on this GPU")
    return request.param


def _cuda_trainer(root, tmp_path, method, precision="fp16", **kw):
    cfg = toy_config(root, method, precision=precision, unsup_start_epoch=0, **kw)
    cfg.device = "cuda"
    tr = Trainer(cfg, tmp_path)
    assert tr.amp and tr.execution.precision == precision
    assert tr.update.scaler.is_enabled() == (precision == "fp16")  # bf16 needs no loss scaling
    assert all(o.defaults.get("fused") for o in tr.ctx.optimizers)
    return tr


def test_amp_skips_the_optimiser_without_gradient(toy_root, tmp_path, two_methods, precision):  # noqa: F811
    tr = _cuda_trainer(toy_root, tmp_path, "_test_two", precision, method_params={"mode": "only_a"})
    critic = [p.detach().clone() for p in tr.method.critic.parameters()]
    for it in range(3):
        values = tr.train_step(0, it)  # would raise in GradScaler.step without the skip
        assert math.isfinite(values["loss"])
    assert all(torch.equal(a, b) for a, b in zip(critic, tr.method.critic.parameters()))
    assert tr.ctx.named_optimizers()["b"].state == {}
    assert tr.ctx.named_optimizers()["a"].state != {}


def test_amp_two_optimisers_both_step(toy_root, tmp_path, two_methods, precision):  # noqa: F811
    tr = _cuda_trainer(toy_root, tmp_path, "_test_two", precision)
    before = [p.detach().clone() for p in tr.method.critic.parameters()]
    for it in range(3):
        tr.train_step(0, it)
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.method.critic.parameters()))


def test_amp_gct_steps_its_three_optimisers(toy_root, tmp_path, precision):  # noqa: F811
    tr = _cuda_trainer(toy_root, tmp_path, "gct", precision, method_params={"fd_channels": 8})
    m = tr.method
    nets = (m.task_l, m.task_r, m.flaw_detector)
    before = [[p.detach().clone() for p in n.parameters()] for n in nets]
    for it in range(3):
        values = tr.train_step(0, it)
        assert all(math.isfinite(values[k]) for k in ("loss/task_l", "loss/task_r", "loss/flaw"))
    for b, n in zip(before, nets):
        assert any(not torch.equal(x, y) for x, y in zip(b, n.parameters()))
    assert all(o.state != {} for o in tr.ctx.optimizers)
