import math

import pytest
import torch

from semibench.errors import ConfigError
from semibench.method import Batch, StepInfo, make_hparams
from semibench.network.model import build_model
from semibench.registry import METHODS
from semibench.testing import FakeContext
from tests.toy import LinearSeg

pytestmark = pytest.mark.usefixtures("one_thread")

ACTIVE = StepInfo(epoch=6, epochs=10, iteration=50, iterations=100, unsup_active=True)
INACTIVE = StepInfo(epoch=0, epochs=10, iteration=3, iterations=100, unsup_active=False)


def pixel(r):
    return torch.tensor([r, 0.0, 0.0]).view(1, 3, 1, 1)


def make(name, make_net, **hp):
    cls = METHODS.get(name)
    ctx = FakeContext(make_net)
    method = cls(ctx, make_hparams(cls.Hparams, hp))
    return method, ctx


def tiny_net():
    return build_model("tiny", "none")


def tiny_batch(gen, with_unlabeled=True):
    img = lambda: torch.randn(2, 3, 32, 32, generator=gen)
    mask = (torch.rand(2, 32, 32, generator=gen) > 0.6).long()
    unl = {"weak": img(), "strong": img()} if with_unlabeled else {}
    return Batch(labeled_image=img(), labeled_mask=mask, unlabeled=unl)


def test_registered_with_paper_roles():
    names = METHODS.names()
    assert {"suponly", "fullsup", "meanteacher"} <= set(names)
    assert METHODS.get("suponly").unlabeled_views is None
    assert METHODS.get("fullsup").unlabeled_views is None
    assert METHODS.get("fullsup").fixed_ratio == 1
    assert METHODS.get("suponly").fixed_ratio is None
    assert METHODS.get("meanteacher").unlabeled_views == "weak_strong"


def test_meanteacher_hparams():
    cls = METHODS.get("meanteacher").Hparams
    hp = make_hparams(cls, None)
    assert (hp.consistency, hp.rampup) == (0.1, 1.0)
    assert make_hparams(cls, {"consistency": 2.0}).consistency == 2.0
    with pytest.raises(ConfigError, match="known: consistency, rampup"):
        make_hparams(cls, {"weight": 1.0})
    with pytest.raises(ConfigError):
        make_hparams(cls, {"consistency": -1.0})


@pytest.mark.parametrize("name", ["suponly", "fullsup", "meanteacher"])
def test_one_step_changes_the_student_only(name):
    torch.manual_seed(0)
    method, ctx = make(name, tiny_net)
    method.train()
    before = {k: v.clone() for k, v in method.student.state_dict().items()}
    teacher_before = ({k: v.clone() for k, v in method.teacher.state_dict().items()}
                      if hasattr(method, "teacher") else None)
    losses = method.training_step(tiny_batch(torch.Generator().manual_seed(1)), ACTIVE)
    assert torch.isfinite(losses["loss"])
    (opt,) = ctx.optimizers
    opt.zero_grad()
    losses["loss"].backward()
    opt.step()
    changed = [k for k, v in method.student.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") for k in changed)
    assert any(k.startswith("classifier.") for k in changed)
    if teacher_before is not None:  # the teacher only moves by the engine's EMA, never by the optimiser
        for k, v in method.teacher.state_dict().items():
            assert torch.equal(v, teacher_before[k]), k
        assert all(p.grad is None for p in method.teacher.parameters())


def test_suponly_loss_by_hand_and_ignores_unlabeled():
    method, _ = make("suponly", LinearSeg)
    calls = []
    method.student.register_forward_hook(lambda *a: calls.append(1))
    batch = Batch(pixel(1.0), torch.tensor([[[1]]]), {"weak": pixel(5.0), "strong": pixel(-5.0)})
    out = method.training_step(batch, ACTIVE)
    # logits (0, 1), class 1: CE = -log(e / (1 + e))
    expected = -math.log(math.e / (1 + math.e))
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["L_sup"].item() == pytest.approx(expected, rel=1e-6)
    assert set(out) == {"loss", "L_sup"} and len(calls) == 1


def test_fullsup_same_loss_as_suponly():
    batch = tiny_batch(torch.Generator().manual_seed(2), with_unlabeled=False)
    torch.manual_seed(3)
    a, _ = make("suponly", tiny_net)
    torch.manual_seed(3)
    b, _ = make("fullsup", tiny_net)
    a.eval()
    b.eval()
    assert a.training_step(batch, ACTIVE)["loss"].item() == b.training_step(batch, ACTIVE)["loss"].item()


def test_meanteacher_losses_by_hand():
    method, _ = make("meanteacher", LinearSeg, consistency=0.4, rampup=1.0)
    batch = Batch(pixel(1.0), torch.tensor([[[1]]]), {"strong": pixel(1.0), "weak": pixel(-1.0)})
    out = method.training_step(batch, ACTIVE)
    e = math.e
    sup = -math.log(e / (1 + e))
    # student on strong: logits (0, 1) -> p = (1, e)/(1+e); teacher on weak: (0, -1) -> (e, 1)/(1+e);
    # both classes differ by (e - 1)/(1 + e): MSE = that squared
    cons = ((e - 1) / (1 + e)) ** 2
    w = 0.4 * math.exp(-5 * (1 - 50 / 100) ** 2)  # iteration 50 of 100, ramp-up over the run
    assert out["L_sup"].item() == pytest.approx(sup, rel=1e-6)
    assert out["L_cons"].item() == pytest.approx(cons, rel=1e-6)
    assert out["w_cons"].item() == pytest.approx(w, rel=1e-6)
    assert out["loss"].item() == pytest.approx(sup + w * cons, rel=1e-6)
    # ramp-up end points: 0.4·e^-5 at the start, the full weight at the end
    start = StepInfo(0, 10, 0, 100, True)
    end = StepInfo(9, 10, 100, 100, True)
    assert method.consistency_weight(start) == pytest.approx(0.4 * math.exp(-5))
    assert method.consistency_weight(end) == pytest.approx(0.4)


def test_meanteacher_consistency_gradient_reaches_student_only():
    method, _ = make("meanteacher", LinearSeg, consistency=1.0, rampup=0.0)
    batch = Batch(pixel(0.0), torch.tensor([[[0]]]), {"strong": pixel(1.0), "weak": pixel(-1.0)})
    out = method.training_step(batch, ACTIVE)
    out["loss"].backward()
    g = method.student.conv.weight.grad
    # d/dw of (sup + cons); sup at logits (0, 0) with class 0 gives dL/dz1 = 1/2 times r=0 -> 0,
    # so the red-channel gradient of class 1 comes from L_cons alone:
    # cons = 2/2·(p1 - q1)², p1 = σ(w·1), q1 = σ(-1): dcons/dw = 2 (p1 - q1) p1 (1 - p1) · 1
    s = lambda z: 1 / (1 + math.exp(-z))
    p1, q1 = s(1.0), s(-1.0)
    assert g[1, 0, 0, 0].item() == pytest.approx(2 * (p1 - q1) * p1 * (1 - p1), rel=1e-5)
    assert method.teacher.conv.weight.grad is None


def test_meanteacher_unsup_inactive_uses_labeled_only():
    method, _ = make("meanteacher", LinearSeg)
    calls = {"student": 0, "teacher": 0}
    method.student.register_forward_hook(lambda *a: calls.__setitem__("student", calls["student"] + 1))
    method.teacher.register_forward_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1))
    batch = Batch(pixel(1.0), torch.tensor([[[1]]]), {"strong": pixel(1.0), "weak": pixel(-1.0)})
    out = method.training_step(batch, INACTIVE)
    assert set(out) == {"loss", "L_sup"}
    assert out["loss"].item() == pytest.approx(-math.log(math.e / (1 + math.e)), rel=1e-6)
    assert calls == {"student": 1, "teacher": 0}


def test_meanteacher_teacher_predicts_without_dropout():
    torch.manual_seed(0)
    method, _ = make("meanteacher", tiny_net)
    method.train()  # switches every submodule to train mode, the fake teacher included
    modes = []
    method.teacher.classifier.dropout.register_forward_hook(lambda m, i, o: modes.append(m.training))
    method.student.classifier.dropout.register_forward_hook(lambda m, i, o: modes.append(("s", m.training)))
    method.training_step(tiny_batch(torch.Generator().manual_seed(4)), ACTIVE)
    assert False in modes  # teacher: eval mode, dropout off
    assert ("s", True) in modes  # student: train mode, dropout on
    assert not any(m.training for m in method.teacher.modules())
