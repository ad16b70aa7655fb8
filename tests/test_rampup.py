"""Ramp-ups of unsupervised weights start where the engine starts the unsupervised losses.

The originals train their unsupervised term from iteration 0 with a ramp over a fraction of
training; behind the engine's ``train.unsup_start_epoch`` gate a ramp counted from iteration 0
would be partly or wholly spent, and the weight would jump at the gate (CCT: 0 → 30).
"""
from __future__ import annotations

import math

import pytest

from semibench.method import StepInfo
from semibench.testing import toy_config
from semibench.train.engine import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unsup_rampup_by_hand():
    # 120 iterations, unsupervised from iteration 20: span 100, a 10 % ramp lasts 10 iterations
    at = lambda it: StepInfo(2, 12, it, 120, True, unsup_start_iteration=20).unsup_rampup(0.1)
    assert at(20) == pytest.approx(math.exp(-5))  # 0.006738: the ramp's first value, at the gate
    assert at(25) == pytest.approx(math.exp(-5 * 0.5 ** 2))  # 0.2865
    assert at(30) == 1.0 and at(119) == 1.0
    assert at(0) == pytest.approx(math.exp(-5))  # before the gate: clipped (the gate decides)
    # the whole remaining run: halfway through the 100 iterations after the gate
    assert StepInfo(6, 12, 70, 120, True, 20).unsup_rampup(1.0) == pytest.approx(math.exp(-1.25))
    # no gate: the old count from iteration 0
    assert StepInfo(0, 12, 6, 120, True).unsup_rampup(0.1) == pytest.approx(math.exp(-5 * 0.5 ** 2))
    assert StepInfo(0, 12, 6, 120, True).unsup_rampup(0.0) == 1.0  # no ramp-up


# method, its hyperparameters for a small test, its weight function, the full weight, the weight
# 2 iterations after the gate (by hand: 4 unsupervised iterations, T = fraction × 4), and the
# name under which training_step logs the weight
ONE_HEAD_EACH = dict(vat=1, drop=1, cutout=1, context_masking=1, object_masking=1, feature_drop=1,
                     feature_noise=1)
RAMPED = [
    ("meanteacher", {}, "consistency_weight", 0.1, 0.1 * math.exp(-5 * 0.5 ** 2), "w_cons"),  # T 4
    ("tcsmv2", {}, "consistency_weight", 1.0, math.exp(-5 / 9), "w_u"),  # T 3: 1 − 2/3 = 1/3
    ("cct", ONE_HEAD_EACH, "unsup_weight", 30.0, 30.0, "w_u"),  # T 0.4: done
    ("gct", {"fd_channels": 4}, "dc_weight", 100.0, 100.0, "w_dc"),  # T 0.44: done
]


@pytest.mark.parametrize("method, hp, weight_fn, full, after_two, logged", RAMPED,
                         ids=[r[0] for r in RAMPED])
def test_the_engine_starts_each_ramp_at_the_gate(method, hp, weight_fn, full, after_two, logged,
                                                 toy_root, tmp_path):  # noqa: F811
    # 4 epochs × 2 iterations, unsupervised from epoch 2 = iteration 4
    cfg = toy_config(toy_root, method, method_params=hp, epochs=4, iters_per_epoch=2,
                     unsup_start_epoch=2)
    tr = Trainer(cfg, tmp_path)
    assert (tr.iterations_per_epoch, tr.total) == (2, 8)
    weight = getattr(tr.method, weight_fn)
    gate = lambda it: StepInfo(it // 2, 4, it, 8, True, unsup_start_iteration=4)
    assert weight(gate(4)) == pytest.approx(full * math.exp(-5))
    assert weight(gate(6)) == pytest.approx(after_two)
    # the engine's own first unsupervised step logs the gate's value, not a spent ramp's
    values = tr.train_step(2, 0)
    assert values[logged] == pytest.approx(full * math.exp(-5), rel=1e-6)
