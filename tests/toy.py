"""What the engine-level tests share besides :mod:`semibench.testing`'s toy data and fake
context: test-local methods (independent of methods/), a hand-set linear segmenter, and
bit-for-bit comparison of two run directories. Fixtures that use them are in conftest.py."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from semibench.method import Method
from semibench.network.model import SegOutput
from semibench.testing import first_difference


@dataclass
class LocalMTHparams:
    w_cons: float = 1.0
    nan_at: int = -1  # global iteration at which the consistency loss becomes NaN


class LocalMeanTeacher(Method):
    """A test-local mean teacher (independent of methods/): CE + MSE(softmax) consistency."""

    name = "_test_mt"
    Hparams = LocalMTHparams
    unlabeled_views = "weak_strong"

    def __init__(self, ctx, hp):
        super().__init__()
        self.hp = hp
        self.student = ctx.build_segmenter()
        self.teacher = ctx.ema_of(self.student)
        ctx.add_optimizer(self.student.parameters())

    def training_step(self, batch, step):
        sup = F.cross_entropy(self.student(batch.labeled_image, project=False).logits, batch.labeled_mask)
        cons = sup.new_zeros(())
        if step.unsup_active:
            p_s = self.student(batch.unlabeled["strong"], project=False).logits.softmax(1)
            with torch.no_grad():
                p_t = self.teacher(batch.unlabeled["weak"], project=False).logits.softmax(1)
            cons = F.mse_loss(p_s, p_t)
        if step.iteration == self.hp.nan_at:
            cons = cons * float("nan")
        return {"loss": sup + self.hp.w_cons * cons, "loss_sup": sup.detach(), "loss_cons": cons.detach()}


class LocalSupOnly(Method):
    name = "_test_sup"
    Hparams = type(None)
    unlabeled_views = None

    def __init__(self, ctx, hp):
        super().__init__()
        self.student = ctx.build_segmenter()
        ctx.add_optimizer(self.student.parameters())

    def training_step(self, batch, step):
        assert batch.unlabeled == {}
        return {"loss": F.cross_entropy(self.student(batch.labeled_image, project=False).logits,
                                        batch.labeled_mask)}


class LocalFullSup(LocalSupOnly):
    name = "_test_full"
    fixed_ratio = 1


LOCAL_METHODS = (LocalMeanTeacher, LocalSupOnly, LocalFullSup)


class LinearSeg(nn.Module):
    """A 1×1-conv 'segmenter' with hand-set weights: logits = (0, red channel)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[1, 0] = 1.0

    def forward(self, x, project=True):
        return SegOutput(x, self.conv(x), None)


# ---------------------------------------------------------------------------- two optimisers

@dataclass
class TwoHp:
    mode: str = "split"  # split: loss/a + loss/b; total: one "loss"; only_a: loss/b has no gradient


class TwoNets(Method):
    """A segmenter ("a") and a 1×1-conv critic ("b") on its softmax; each loss depends on both
    networks, so routing is visible: loss/a must not reach b, loss/b must not reach a."""

    name = "_test_two"
    Hparams = TwoHp
    unlabeled_views = None

    def __init__(self, ctx, hp):
        super().__init__()
        self.hp = hp
        self.student = ctx.build_segmenter()
        self.critic = nn.Conv2d(2, 1, 1)
        ctx.add_optimizer(self.student.parameters(), name="a")
        ctx.add_optimizer(self.critic.parameters(), name="b", lr=5e-3, betas=(0.5, 0.9))

    def parts(self, batch):
        logits = self.student(batch.labeled_image, project=False).logits
        c = self.critic(logits.float().softmax(1))
        loss_a = F.cross_entropy(logits.float(), batch.labeled_mask) + (c ** 2).mean()
        loss_b = ((c - 1) ** 2).mean()
        return loss_a, loss_b

    def training_step(self, batch, step):
        loss_a, loss_b = self.parts(batch)
        if self.hp.mode == "total":
            return {"loss": loss_a + loss_b}
        if self.hp.mode == "only_a":
            return {"loss/a": loss_a, "loss/b": loss_b.detach()}  # b gets no gradient this step
        return {"loss/a": loss_a, "loss/b": loss_b, "La": loss_a.detach()}


class RogueOptimizer(LocalSupOnly):
    name = "_test_rogue"

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.head = nn.Linear(2, 2)
        self.head_opt = torch.optim.SGD(self.head.parameters(), lr=0.1)  # bypasses the engine

    def training_step(self, batch, step):
        raise AssertionError("never reached")


TWO_OPTIMISER_METHODS = (TwoNets, RogueOptimizer)


# ---------------------------------------------------------------------------- kill and compare

class Killed(Exception):
    """Stands in for SIGKILL: nothing after the raise point runs."""


def load_state(path):
    return torch.load(path, weights_only=True)


def assert_same_tensors(a, b, where=""):
    difference = first_difference(a, b, where)
    assert difference is None, difference


def without_timing(lines):
    drop = {"img_per_s", "peak_mem_mb", "train_s", "val_s"}
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]


def assert_same_runs(a, b):
    best_a, best_b = load_state(a / "best.pt"), load_state(b / "best.pt")
    assert best_a["epoch"] == best_b["epoch"] and best_a["val_dice"] == best_b["val_dice"]
    assert_same_tensors(best_a["model"], best_b["model"], "best")
    ck_a, ck_b = load_state(a / "checkpoint.pt"), load_state(b / "checkpoint.pt")
    for key in ("method", "optimizers", "epoch", "best"):
        assert_same_tensors(ck_a[key], ck_b[key], key)
    assert without_timing((a / "train.jsonl").read_text().splitlines()) == \
        without_timing((b / "train.jsonl").read_text().splitlines())
    done_a, done_b = (json.loads((d / "train_done.json").read_text()) for d in (a, b))
    assert done_a["best_val_dice"] == done_b["best_val_dice"] and done_a["best_epoch"] == done_b["best_epoch"]
