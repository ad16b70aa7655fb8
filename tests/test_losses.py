"""semibench.losses: the shared loss pieces, against hand-computed values."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from semibench.losses import (
    box_boxes,
    box_masks,
    cross_entropy,
    flip_rot,
    flip_rot_inverse,
    mix,
    sample_flip_rot,
    softmax_mse,
)


def test_cross_entropy_hand_value():
    # one pixel, logits (0, ln 3): p = (1/4, 3/4); target 1 -> −ln 3/4, target 0 -> −ln 1/4
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).repeat(1, 1, 1, 2)
    target = torch.tensor([[[1, 0]]])
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    assert cross_entropy(logits.half(), target).dtype == torch.float32
    assert cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_softmax_mse_hand_value_and_teacher_detached():
    # student pixel p = (1/4, 3/4), teacher p = (1/2, 1/2): squared diffs 1/16 per class, mean 1/16
    s = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).requires_grad_()
    t = torch.zeros(1, 2, 1, 1, requires_grad=True)
    loss = softmax_mse(s, t)
    assert loss.item() == pytest.approx(1 / 16, rel=1e-6)
    loss.backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_flip_rot_hand_case():
    # flip=1, k=1 on [[1,2],[3,4]]: flip(H) -> [[3,4],[1,2]], rot90 -> [[4,2],[3,1]]
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    y = flip_rot(x, torch.tensor([True]), torch.tensor([1]))
    assert y.view(2, 2).tolist() == [[4.0, 2.0], [3.0, 1.0]]
    assert flip_rot_inverse(y, torch.tensor([True]), torch.tensor([1])).equal(x)
    assert x.view(2, 2).tolist() == [[1.0, 2.0], [3.0, 4.0]]  # input untouched (official B6)


def test_flip_rot_inverse_exact_for_all_8_combinations_per_sample():
    combos = list(itertools.product([False, True], range(4)))
    x = torch.randn(len(combos), 3, 5, 5)
    flip = torch.tensor([f for f, _ in combos])
    k = torch.tensor([kk for _, kk in combos])
    y = flip_rot(x, flip, k)
    assert flip_rot_inverse(y, flip, k).equal(x)
    images = {y[i].flatten().tolist().__repr__() for i in range(len(combos))}
    # with one image repeated, the 8 transforms are the 8 distinct symmetries of the square
    z = flip_rot(x[:1].expand(8, -1, -1, -1), flip, k)
    assert len({repr(z[i].flatten().tolist()) for i in range(8)}) == 8 and len(images) == 8


def test_flip_rot_needs_square_and_one_param_per_sample():
    with pytest.raises(ValueError, match="square"):
        flip_rot(torch.zeros(1, 1, 2, 3), torch.tensor([False]), torch.tensor([0]))
    with pytest.raises(ValueError, match="one flip"):
        flip_rot(torch.zeros(2, 1, 2, 2), torch.tensor([False]), torch.tensor([0]))


def test_sample_flip_rot_reproducible_and_covers_all():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    f1, k1 = sample_flip_rot(400, g1)
    f2, k2 = sample_flip_rot(400, g2)
    assert f1.equal(f2) and k1.equal(k2)
    assert set(zip(f1.tolist(), k1.tolist())) == set(itertools.product([False, True], range(4)))


def test_box_masks_area_single_rectangle_in_bounds():
    g = torch.Generator().manual_seed(0)
    n, size = 1000, 224
    boxes = box_boxes(n, size, size, 0.5, g)
    masks = box_masks(n, size, size, 0.5, torch.Generator().manual_seed(0))
    assert masks.shape == (n, 1, size, size)
    assert 0.49 <= masks.mean().item() <= 0.51
    top, left, h, w = boxes.T
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= size).all() and (left + w <= size).all())
    for i in range(0, n, 37):  # exactly the rectangle, nothing else
        m = masks[i, 0].bool()
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert rows.min() == top[i] and rows.max() == top[i] + h[i] - 1
        assert cols.min() == left[i] and cols.max() == left[i] + w[i] - 1
        assert int(m.sum()) == int(h[i] * w[i])  # filled: one rectangle
    per_mask = masks.mean((1, 2, 3))
    assert bool(((per_mask - 0.5).abs() < 0.02).all())  # each one ~50 %, not only on average
    assert len({tuple(b) for b in boxes[:, 2:].tolist()}) > 20  # random aspect ratios


def test_mix_hand_case():
    m = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    pa = torch.tensor([[0.1, 0.2], [0.3, 0.4]]).view(1, 1, 2, 2)
    pb = torch.tensor([[0.9, 0.8], [0.7, 0.6]]).view(1, 1, 2, 2)
    assert torch.allclose(mix(m, pa, pb).view(2, 2), torch.tensor([[0.9, 0.2], [0.3, 0.4]]))


def test_softmax_mse_over_valid_pixels_only():
    # pixel 0: Δp = (−1/4, 1/4) -> 1/16 per class; pixel 1 differs a lot but is invalid
    s = torch.tensor([[0.0, 0.0], [math.log(3.0), 5.0]]).view(1, 2, 1, 2)
    t = torch.tensor([[0.0, 0.0], [0.0, -5.0]]).view(1, 2, 1, 2)
    valid = torch.tensor([[[1.0, 0.0]]])
    assert softmax_mse(s, t, valid).item() == pytest.approx(1 / 16, rel=1e-6)
    assert softmax_mse(s, t, valid[:, None]).item() == pytest.approx(1 / 16, rel=1e-6)
    assert softmax_mse(s, t, torch.ones(1, 1, 2)).item() == pytest.approx(softmax_mse(s, t).item(), rel=1e-6)
    none = softmax_mse(s.requires_grad_(), t, torch.zeros(1, 1, 2))
    assert none.item() == 0.0 and none.requires_grad
