import math

import pytest
import torch
from torch import nn

from semibench.errors import ConfigError, TrainingError
from semibench.method import Batch, StepInfo, make_hparams
from semibench.model import SegOutput, build_model
from semibench.registry import METHODS
from tests.fakes import FakeContext
from tests.toy import toy_config, LinearSeg

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
    a.eval(); b.eval()
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


def test_meanteacher_missing_views():
    method, _ = make("meanteacher", LinearSeg)
    batch = Batch(pixel(1.0), torch.tensor([[[1]]]), {"image": pixel(1.0)})
    with pytest.raises(TrainingError, match="weak"):
        method.training_step(batch, ACTIVE)


# ---------------------------------------------------------------------------- engine mechanisms

from semibench.ema import TeacherSettings, ema_update, make_teacher  # noqa: E402
from semibench.method import check_method_class  # noqa: E402
from semibench.augment import VIEW_KINDS  # noqa: E402


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, project=True):
        return SegOutput(x, self.drop(self.bn(self.conv(x))), None)


def test_teacher_settings_alpha_warmup_by_hand():
    s = TeacherSettings(alpha=0.99, warmup=True, average_buffers=False, mode="train")
    # min(1 − 1/(t+1), α): t = 0 -> 0 (a copy), 1 -> 1/2, 9 -> 0.9, 99 -> 0.99, then α
    assert [s.alpha_at(t) for t in (0, 1, 9)] == [0.0, 0.5, 0.9]
    assert s.alpha_at(99) == pytest.approx(0.99) and s.alpha_at(10_000) == 0.99
    assert TeacherSettings(alpha=0.9).alpha_at(0) == 0.9  # no warm-up: fixed α from the start
    with pytest.raises(ConfigError, match="eval-mode teacher must average"):
        TeacherSettings(alpha=0.9, average_buffers=False, mode="eval")
    with pytest.raises(ConfigError, match="teacher mode"):
        TeacherSettings(alpha=0.9, mode="sometimes")


def test_parameters_only_ema_leaves_the_buffers():
    torch.manual_seed(0)
    student = BNNet()
    teacher = make_teacher(student, "train")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student.bn.running_mean.fill_(5.0)
        student.bn.num_batches_tracked.fill_(7)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.75, average_buffers=False)
    s = student.state_dict()
    for k, v in teacher.state_dict().items():
        if k in dict(teacher.named_parameters()):
            assert torch.allclose(v, 0.75 * t_before[k] + 0.25 * s[k]), k
        else:  # running stats and the counter: untouched
            assert torch.equal(v, t_before[k]), k
    ema_update(teacher, student, 0.5)  # averaged buffers: the mean half-way, the counter copied
    assert torch.allclose(teacher.bn.running_mean, torch.full((2,), 2.5))
    assert int(teacher.bn.num_batches_tracked) == 7


def test_teacher_mode_train_follows_the_parent_eval_mode_never():
    torch.manual_seed(0)
    for mode, expect_train in (("train", True), ("eval", False)):
        ctx = FakeContext(BNNet)
        parent = nn.Module()
        parent.student = ctx.build_segmenter()
        parent.teacher = ctx.ema_of(parent.student, alpha=0.9, mode=mode)
        parent.train()
        assert parent.teacher.training is expect_train
        assert all(m.training is expect_train for m in parent.teacher.modules())
        parent.eval()
        assert not parent.teacher.training  # evaluated: always eval
        assert all(not p.requires_grad for p in parent.teacher.parameters())
        (_, _, settings), = ctx.emas
        assert settings.mode == mode and settings.alpha == 0.9


def test_fake_context_is_the_engines_context():
    from semibench.engine import EngineContext
    ctx = FakeContext(LinearSeg, ema_alpha=0.95)
    assert isinstance(ctx, EngineContext)
    student = ctx.build_segmenter()
    ctx.ema_of(student)
    ctx.add_optimizer(student.parameters())
    assert ctx.emas[0][2] == TeacherSettings(alpha=0.95)  # the defaults of Mean Teacher and CDCL
    with pytest.raises(ConfigError, match="shares parameters"):
        ctx.add_optimizer(student.parameters(), name="again")


def test_declared_views_and_batches_are_checked_once():
    class Bad:
        name, unlabeled_views, unlabeled_batches = "bad", "weak_strongg", 1
    with pytest.raises(ConfigError, match="unlabeled_views='weak_strongg', not a view kind; known: "):
        check_method_class(Bad, VIEW_KINDS)
    Bad.unlabeled_views, Bad.unlabeled_batches = "single", 0
    with pytest.raises(ConfigError, match="unlabeled_batches=0; it must be an integer >= 1"):
        check_method_class(Bad, VIEW_KINDS)
    Bad.unlabeled_views, Bad.unlabeled_batches = None, 2
    with pytest.raises(ConfigError, match="unlabeled_batches=2 but no unlabeled_views"):
        check_method_class(Bad, VIEW_KINDS)
    for name in METHODS.names():  # every registered method passes
        check_method_class(METHODS.get(name), VIEW_KINDS)


from semibench.engine import Trainer  # noqa: E402
from semibench.method import Method  # noqa: E402


class ThreeBatches(Method):
    name = "_test_three"
    Hparams = type(None)
    unlabeled_views = "single"
    unlabeled_batches = 3

    def __init__(self, ctx, hp):
        super().__init__()
        self.student = ctx.build_segmenter()
        ctx.add_optimizer(self.student.parameters())

    def training_step(self, batch, step):
        assert len(batch.unlabeled_batches()) == 3
        return {"loss": self.student(batch.labeled_image, project=False).logits.mean()}


def test_engine_refuses_bad_declarations_at_construction(toy_root, tmp_path, monkeypatch):  # noqa: F811
    METHODS.names()
    bad = type("BadViews", (ThreeBatches,), {"name": "_test_bad", "unlabeled_views": "nope"})
    monkeypatch.setitem(METHODS._items, "_test_bad", bad)
    with pytest.raises(ConfigError, match="method '_test_bad' declares unlabeled_views='nope'"):
        Trainer(toy_config(toy_root, "_test_bad"), tmp_path)


def test_engine_draws_n_unlabeled_batches(toy_root, tmp_path, monkeypatch):  # noqa: F811
    METHODS.names()
    monkeypatch.setitem(METHODS._items, "_test_three", ThreeBatches)
    tr = Trainer(toy_config(toy_root, "_test_three", batch_labeled=2, batch_unlabeled=2), tmp_path)
    assert tr.images_per_step == 2 + 3 * 2
    batch = tr.make_batch(0, 1)
    views = [v["image"] for v in batch.unlabeled_batches()]
    assert len(views) == 3 and all(v.shape == (2, 3, 64, 64) for v in views)
    assert not views[1].equal(views[2])  # independent draws
    assert all(a.equal(b) for a, b in zip(views, [v["image"] for v in tr.make_batch(0, 1).unlabeled_batches()]))
    tr.train_step(0, 0)
