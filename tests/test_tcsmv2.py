"""TCSMv2: exact inverse of flip/rot, equivariance of a pixelwise net (L_u = 0), gradient only
into the student (the release's bug B1), the scale round trip and its valid mask, the noise
level, defaults and teacher settings."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from semibench.data.loading import IMAGENET_STD
from semibench.method import Batch, StepInfo, make_hparams
from semibench.methods.tcsmv2 import (
    TCSMv2Hparams,
    Transform,
    apply_transform,
    invert_transform,
    scale_images,
    scaled_sizes,
    unscale_logits,
)
from semibench.network.model import build_model
from semibench.registry import METHODS
from semibench.testing import FakeContext
from semibench.train.ema import TeacherSettings
from tests.toy import LinearSeg

ACTIVE = StepInfo(epoch=6, epochs=10, iteration=50, iterations=100, unsup_active=True)
COMBOS = list(itertools.product([False, True], range(4)))


def make(make_net=LinearSeg, **hp):
    cls = METHODS.get("tcsmv2")
    ctx = FakeContext(make_net)
    return cls(ctx, make_hparams(cls.Hparams, hp)), ctx


def batch_with(x_u, gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    b, _, h, w = x_u.shape
    return Batch(torch.randn(b, 3, h, w, generator=gen), (torch.rand(b, h, w, generator=gen) > 0.5).long(),
                 {"image": x_u})


def test_defaults_are_the_release_values_and_reach_the_engine():
    hp = make_hparams(TCSMv2Hparams, None)
    assert (hp.consistency, hp.rampup, hp.ema_alpha, hp.noise_grey_levels) == (1.0, 0.75, 0.999, 0.5)
    assert (hp.scale_min, hp.scale_max, hp.ema_warmup, hp.teacher_mode, hp.teacher_average_buffers) == \
        (0.9, 1.1, True, "train", False)
    method, ctx = make()
    (student, teacher, settings), = ctx.emas
    assert student is method.student and teacher is method.teacher
    assert settings == TeacherSettings(alpha=0.999, average_buffers=False, warmup=True, mode="train")
    assert METHODS.get("tcsmv2").unlabeled_views == "single"


def test_ramp_up_over_75_percent_of_the_iterations():
    method, _ = make(consistency=2.0)
    # t = 30 of 100, R = 75: 2 · exp(−5 (1 − 30/75)²) = 2 · exp(−1.8)
    assert method.consistency_weight(StepInfo(3, 10, 30, 100, True)) == pytest.approx(2 * math.exp(-1.8))
    assert method.consistency_weight(StepInfo(0, 10, 0, 100, True)) == pytest.approx(2 * math.exp(-5))
    assert method.consistency_weight(StepInfo(8, 10, 80, 100, True)) == 2.0  # flat after 75 %


def test_inverse_is_exact_for_all_8_flip_rot_combinations():
    x = torch.randn(len(COMBOS), 2, 6, 6)
    tf = Transform(torch.tensor([f for f, _ in COMBOS]), torch.tensor([k for _, k in COMBOS]), [6] * 8)
    y = apply_transform(x, tf)
    back, valid = invert_transform(y, tf)
    assert back.equal(x) and bool((valid == 1).all())
    assert all(not y[i].equal(x[i]) for i in range(1, 8))  # every combination but the identity moves


@pytest.mark.parametrize("flip, k", COMBOS)
def test_pixelwise_net_teacher_equals_student_zero_noise_gives_zero_loss(flip, k):
    method, _ = make(noise_grey_levels=0.0, scale_min=1.0, scale_max=1.0, rampup=0.0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(k))
    method.sample_transform = lambda x: Transform(torch.tensor([flip, not flip]), torch.tensor([k, 3 - k]), [8, 8])
    out = method.training_step(batch_with(x), ACTIVE)
    assert out["L_u"].item() == 0.0 and out["valid_frac"].item() == 1.0
    assert out["loss"].item() == pytest.approx(out["L_sup"].item(), abs=0)


def test_nonzero_loss_when_the_teacher_differs_by_hand():
    # a 1-pixel image: no transform matters; student logits (0, r), teacher (0, r + 1) after
    # shifting the teacher's bias; L_u = mean over the 2 classes of (σ(r) − σ(r+1))²
    method, _ = make(noise_grey_levels=0.0, scale_min=1.0, scale_max=1.0)
    with torch.no_grad():
        method.teacher.conv.bias[1] = 1.0
    r = 0.3
    x = torch.tensor([r, 0.0, 0.0]).view(1, 3, 1, 1)
    out = method.training_step(batch_with(x), ACTIVE)
    s = lambda z: 1 / (1 + math.exp(-z))
    assert out["L_u"].item() == pytest.approx((s(r) - s(r + 1)) ** 2, rel=1e-5)


def test_student_gets_gradient_the_teacher_none(monkeypatch):
    """Only the unlabeled term is back-propagated (L_sup replaced by a constant zero, so no
    labeled pass is on the graph): the student's unlabeled pass must carry the gradient (the
    release's no_grad bug B1), scaled by the consistency weight; the teacher gets none."""
    import semibench.methods.tcsmv2 as tcsmv2
    monkeypatch.setattr(tcsmv2, "supervised_loss", lambda student, batch: torch.zeros(()))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grads = {}
    for w in (1.0, 2.0):
        torch.manual_seed(0)
        method, _ = make(lambda: build_model("tiny", "none"), rampup=0.0, consistency=w)
        method.train()
        torch.manual_seed(5)  # the same noise and transform for both weights
        out = method.training_step(batch_with(x), ACTIVE)
        assert out["L_u"].item() > 0 and out["loss"].requires_grad
        out["loss"].backward()
        grads[w] = [p.grad for p in method.student.parameters()]
        assert all(p.grad is None for p in method.teacher.parameters())
        assert method.teacher.training  # the release's teacher mode while training
    assert sum(g.abs().sum() for g in grads[1.0] if g is not None) > 0
    for g1, g2 in zip(grads[1.0], grads[2.0]):
        assert (g1 is None) == (g2 is None)
        if g1 is not None:
            assert torch.allclose(g2, 2 * g1, rtol=1e-4, atol=1e-8)


def test_scale_round_trip_and_valid_mask():
    h = 32
    ramp = torch.linspace(0, 1, h)
    x = (ramp.view(1, 1, 1, h) + 2 * ramp.view(1, 1, h, 1)).expand(2, 2, h, h).contiguous()
    sizes = [28, 36]  # zoom-in (s < 1) and zoom-out (s > 1)
    back, valid = unscale_logits(scale_images(x, sizes), sizes)
    # zoom-in: the teacher saw the centre 28×28 only: a ring of 2 pixels is invalid (and zero)
    expected = torch.zeros(h, h)
    expected[2:30, 2:30] = 1
    assert valid[0, 0].equal(expected) and valid[1].eq(1).all()
    assert back[0][:, expected == 0].eq(0).all()
    # inside the valid region: x up to the bilinear resampling error (values span 0..3)
    assert (back - x).mul(valid).abs().max() < 0.03
    # scale once, invert once, with flips and turns around it
    tf = Transform(torch.tensor([True, False]), torch.tensor([1, 3]), sizes)
    back, valid = invert_transform(apply_transform(x, tf), tf)
    assert valid[0, 0].equal(expected) and (back - x).mul(valid).abs().max() < 0.03


def test_scaled_sizes_keep_the_parity():
    assert scaled_sizes(torch.tensor([0.95, 1.05, 0.9, 1.0]), 224) == [212, 234, 200, 224]
    assert scaled_sizes(torch.tensor([0.9, 1.1]), 64) == [56, 70]
    assert scaled_sizes(torch.tensor([0.9]), 33) == [29]


def test_noise_sigma_is_half_a_grey_level_in_normalised_units():
    method, _ = make()
    xi = method.noise(torch.zeros(4, 3, 128, 128))
    for c, std in enumerate(IMAGENET_STD):
        assert xi[:, c].std().item() == pytest.approx(0.5 / 255 / std, rel=0.02)


def test_sampled_transforms_cover_the_combinations_and_the_scale_range():
    method, _ = make()
    torch.manual_seed(0)
    tf = method.sample_transform(torch.zeros(400, 3, 64, 64))
    assert set(zip(tf.flip.tolist(), tf.k.tolist())) == set(COMBOS)
    assert min(tf.sizes) >= 56 and max(tf.sizes) <= 70 and len(set(tf.sizes)) > 4


def test_inactive_before_the_unsup_start():
    method, _ = make()
    calls = []
    method.teacher.register_forward_hook(lambda *a: calls.append(1))
    out = method.training_step(batch_with(torch.randn(1, 3, 4, 4)), StepInfo(0, 10, 0, 100, False))
    assert set(out) == {"loss", "L_sup"} and not calls
