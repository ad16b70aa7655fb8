"""CutMix-Seg: the mixed target, zero loss for a pixelwise net with teacher = student, the box
masks, the batch confidence scalar, gradients, defaults, and the engine's two unlabeled batches."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from semibench.method import Batch, StepInfo, make_hparams
from semibench.methods.cutmix import CutMixHparams, confidence, cutmix_loss
from semibench.network.model import build_model
from semibench.registry import METHODS
from semibench.testing import FakeContext, toy_config
from semibench.train.ema import TeacherSettings
from semibench.train.engine import Trainer
from tests.toy import LinearSeg

pytestmark = pytest.mark.usefixtures("one_thread")

ACTIVE = StepInfo(epoch=6, epochs=10, iteration=50, iterations=100, unsup_active=True)


def make(make_net=LinearSeg, **hp):
    cls = METHODS.get("cutmix")
    ctx = FakeContext(make_net)
    return cls(ctx, make_hparams(cls.Hparams, hp)), ctx


def two_batch(x_a, x_b):
    b, _, h, w = x_a.shape
    return Batch(torch.zeros(b, 3, h, w), torch.zeros(b, h, w, dtype=torch.long), {"image": x_a},
                 [{"image": x_b}])


def red(values):
    """Images whose red channel holds ``values`` (LinearSeg's class-1 logit), others 0."""
    v = torch.as_tensor(values, dtype=torch.float32)
    x = torch.zeros(1, 3, *v.shape)
    x[0, 0] = v
    return x


def logit(p):
    return torch.log(torch.as_tensor(p) / (1 - torch.as_tensor(p)))


def test_defaults_and_teacher_settings():
    hp = make_hparams(CutMixHparams, None)
    assert (hp.cons_weight, hp.conf_thresh, hp.mask_area, hp.ema_alpha) == (1.0, 0.97, 0.5, 0.99)
    method, ctx = make()
    (_, teacher, settings), = ctx.emas
    assert settings == TeacherSettings(alpha=0.99, average_buffers=True, warmup=False, mode="train")
    cls = METHODS.get("cutmix")
    assert cls.unlabeled_batches == 2 and cls.unlabeled_views == "single"


def test_mixed_target_is_m_pb_plus_one_minus_m_pa():
    method, _ = make()
    m = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    pa = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    pb = torch.tensor([[0.9, 0.8], [0.7, 0.6]])
    p_t = method.teacher_target(red(logit(pa)), red(logit(pb)), m)
    assert torch.allclose(p_t[0, 1], torch.tensor([[0.9, 0.2], [0.3, 0.4]]), atol=1e-6)
    assert torch.allclose(p_t[0, 1], m[0, 0] * pb + (1 - m[0, 0]) * pa, atol=1e-6)
    assert torch.allclose(p_t.sum(1), torch.ones(1, 2, 2))


def test_pixelwise_net_with_teacher_equal_student_gives_zero_loss():
    torch.manual_seed(0)  # the box masks come from the global RNG
    method, _ = make()
    g = torch.Generator().manual_seed(1)
    x_a, x_b = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    out = method.training_step(two_batch(x_a, x_b), ACTIVE)
    assert out["L_u"].item() == 0.0
    # a different teacher: the loss is no longer zero (the test can fail)
    with torch.no_grad():
        method.teacher.conv.bias[1] = 2.0
    assert method.training_step(two_batch(x_a, x_b), ACTIVE)["L_u"].item() > 0


def test_student_sees_the_mixed_image():
    torch.manual_seed(3)
    method, _ = make()
    seen = []
    method.student.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    x_a, x_b = torch.zeros(2, 3, 16, 16), torch.ones(2, 3, 16, 16)
    method.training_step(two_batch(x_a, x_b), ACTIVE)
    mixed = seen[-1]  # [labeled pass, mixed pass]: x_mix is 1 inside the box (image b)
    frac = mixed[:, 0].mean((1, 2))
    assert bool(((frac - 0.5).abs() < 0.05).all()) and bool(mixed.eq(mixed[:, :1]).all())
    assert set(mixed.unique().tolist()) == {0.0, 1.0}


def test_confidence_scalar_and_loss_by_hand():
    # 3 of 4 teacher pixels at max prob 0.99, 1 at 0.5: c = 0.75
    p1 = torch.tensor([[0.99, 0.99], [0.99, 0.5]])
    p_t = torch.stack([1 - p1, p1])[None]
    assert confidence(p_t, 0.97).item() == 0.75
    assert confidence(p_t, 0.995).item() == 0.0
    # student p = (1/2, 1/2) everywhere: Σ_c Δp² = 2·0.49² on the confident pixels, 0 on the other
    L_u = cutmix_loss(torch.zeros(1, 2, 2, 2), p_t, confidence(p_t, 0.97))
    assert L_u.item() == pytest.approx(0.75 * (3 * 2 * 0.49 ** 2) / 4, rel=1e-6)


def test_loss_weight_and_gradient_reach_the_student_only(monkeypatch):
    torch.manual_seed(0)
    method, _ = make(lambda: build_model("tiny", "none"), cons_weight=2.0, conf_thresh=0.0)
    method.train()
    g = torch.Generator().manual_seed(2)
    batch = two_batch(torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g))
    out = method.training_step(batch, ACTIVE)
    assert out["conf"].item() == 1.0  # threshold 0: every pixel counts
    assert out["loss"].item() == pytest.approx(out["L_sup"].item() + 2.0 * out["L_u"].item(), rel=1e-5)
    # only the unlabeled term back-propagated: L_sup replaced by a constant zero, so the labeled
    # pass is off the graph and any gradient comes through the student's pass on the mixed image
    import semibench.methods.cutmix as cutmix
    monkeypatch.setattr(cutmix, "supervised_loss", lambda student, batch: torch.zeros(()))
    grads = {}
    for w in (1.0, 2.0):
        method.hp = dataclasses.replace(method.hp, cons_weight=w)
        method.student.zero_grad(set_to_none=True)
        torch.manual_seed(4)  # the same box masks for both weights
        out = method.training_step(batch, ACTIVE)
        assert out["L_u"].item() > 0 and out["loss"].requires_grad
        out["loss"].backward()
        grads[w] = [p.grad for p in method.student.parameters()]
        assert all(p.grad is None for p in method.teacher.parameters())
    assert sum(g.abs().sum() for g in grads[1.0] if g is not None) > 0
    for g1, g2 in zip(grads[1.0], grads[2.0]):
        assert (g1 is None) == (g2 is None)
        if g1 is not None:
            assert torch.allclose(g2, 2 * g1, rtol=1e-4, atol=1e-8)


def test_missing_second_batch_is_a_clear_error():
    from semibench.errors import TrainingError
    method, _ = make()
    batch = Batch(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), {"image": torch.zeros(1, 3, 4, 4)})
    with pytest.raises(TrainingError, match="two unlabeled batches"):
        method.training_step(batch, ACTIVE)


def test_engine_draws_two_independent_reproducible_batches(toy_root, tmp_path):  # noqa: F811
    cfg = toy_config(toy_root, "cutmix", ratio=2, batch_unlabeled=2)
    tr = Trainer(cfg, tmp_path)
    assert tr.images_per_step == 2 + 2 * 2  # labeled + both unlabeled batches (img/s counts them)
    a, b = tr.batches.batch(1, 0), tr.batches.batch(1, 0)
    assert len(a.more_unlabeled) == 1 and a.more_unlabeled[0]["image"].shape == a.unlabeled["image"].shape
    assert a.more_unlabeled[0]["image"].equal(b.more_unlabeled[0]["image"])  # a function of the step
    assert not a.more_unlabeled[0]["image"].equal(a.unlabeled["image"])
    # each batch has its own stream: a shuffle of the unlabeled set per epoch, different orders
    n_u = len(tr.data.unlabeled)
    first = [tr.batches.schedule.unlabeled(0, i) for i in range(tr.iterations_per_epoch)]
    second = [tr.batches.more_schedules[0].unlabeled(0, i) for i in range(tr.iterations_per_epoch)]
    assert sorted(torch.cat(second)[:n_u].tolist()) == list(range(n_u))
    assert torch.cat(first).tolist() != torch.cat(second).tolist()
    # batch 0 is what a one-batch method gets at the same step (unchanged streams)
    mt = Trainer(toy_config(toy_root, "meanteacher", ratio=2, batch_unlabeled=2), tmp_path / "mt")
    assert mt.batches.schedule.unlabeled(1, 0).equal(tr.batches.schedule.unlabeled(1, 0))
    assert mt.images_per_step == 2 + 2 and mt.batches.batch(1, 0).more_unlabeled == []
