"""EMA teachers (semibench.train.ema) as the engine's context builds them: the α schedule, averaging
buffers or parameters only, a teacher's mode, and the fake context being the engine's."""
import pytest
import torch
from torch import nn

from semibench.errors import ConfigError
from semibench.network.model import SegOutput
from semibench.testing import FakeContext
from semibench.train.ema import TeacherSettings, ema_update, make_teacher
from tests.toy import LinearSeg


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
    from semibench.train.context import EngineContext
    ctx = FakeContext(LinearSeg, ema_alpha=0.95)
    assert isinstance(ctx, EngineContext)
    student = ctx.build_segmenter()
    ctx.ema_of(student)
    ctx.add_optimizer(student.parameters())
    assert ctx.emas[0][2] == TeacherSettings(alpha=0.95)  # the defaults of Mean Teacher and CDCL
    with pytest.raises(ConfigError, match="shares parameters"):
        ctx.add_optimizer(student.parameters(), name="again")
