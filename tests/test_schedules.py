import math

import pytest

from semibench.train.schedules import gaussian_rampup, poly_lr


@pytest.mark.parametrize("it, total, expected", [
    (0, 100, 1e-4),
    (50, 100, 1e-4 * 0.5358867312681466),  # 0.5 ** 0.9 by hand: exp(0.9 * ln 0.5)
    (90, 100, 1e-4 * 0.12589254117941673),  # 0.1 ** 0.9 = 10 ** -0.9
    (99, 100, 1e-4 * 0.015848931924611134),  # 0.01 ** 0.9 = 10 ** -1.8
    (100, 100, 0.0),
    (150, 100, 0.0),  # clipped past the end
])
def test_poly_lr_at_chosen_steps(it, total, expected):
    assert poly_lr(1e-4, it, total) == pytest.approx(expected, rel=1e-12, abs=1e-20)


def test_poly_lr_power_and_monotone():
    assert poly_lr(2.0, 25, 100, power=1.0) == pytest.approx(1.5)
    assert poly_lr(2.0, 25, 100, power=2.0) == pytest.approx(2.0 * 0.75 ** 2)
    lrs = [poly_lr(1e-4, i, 40) for i in range(41)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert poly_lr(1e-4, 3, 0) == 1e-4  # no iterations: no decay


@pytest.mark.parametrize("current, length, expected", [
    (0, 10, math.exp(-5.0)),  # 0.006737946999085467
    (5, 10, math.exp(-5.0 * 0.25)),  # 0.28650479686019015
    (8, 10, math.exp(-5.0 * 0.04)),  # 0.8187307530779818
    (10, 10, 1.0),
    (25, 10, 1.0),  # clipped above
    (-3, 10, math.exp(-5.0)),  # clipped below
    (0.5, 1.0, math.exp(-1.25)),  # fractional progress
    (0, 0, 1.0),  # no ramp-up
    (7, 0, 1.0),
])
def test_gaussian_rampup(current, length, expected):
    assert gaussian_rampup(current, length) == pytest.approx(expected, rel=1e-12)


def test_gaussian_rampup_hand_values():
    assert gaussian_rampup(0, 4) == pytest.approx(0.006737946999085467, rel=1e-12)
    assert gaussian_rampup(2, 4) == pytest.approx(0.28650479686019015, rel=1e-12)
    assert gaussian_rampup(3, 4) == pytest.approx(0.7316156289466418, rel=1e-12)  # exp(-5/16)
