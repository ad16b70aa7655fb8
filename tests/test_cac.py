"""CAC (methods/cac.py): stride-aligned crop pairs and their overlaps, directional masks, the
directional InfoNCE value and gradient, and the negative bank as resumable state."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semibench.data.augment import AugmentConfig, make_views, undo_flips
from semibench.method import StepInfo, batch_statistics_only
from semibench.methods.cac import directional_masks, directional_nce, overlap
from semibench.testing import toy_config
from semibench.train.engine import Trainer, train
from tests.toy import Killed, assert_same_runs, load_state

pytestmark = pytest.mark.usefixtures("one_thread")

NO_PHOTO = AugmentConfig(jitter_p=0.0, grey_p=0.0, blur_p=0.0)  # flips stay on (p 0.5 each)


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_overlaps_of_an_index_image_are_identical_and_on_the_stride_grid():
    n, size = 24, 128
    index = torch.arange(size * size, dtype=torch.long).view(1, 1, size, size)
    images = index.expand(n, 3, size, size).clone()  # every pixel's value is its index: unique
    v = make_views("two_crops", images, _gen(7), NO_PHOTO, stride=8, iou=(0.1, 1.0))
    assert (v["box1"] % 8 == 0).all() and (v["box2"] % 8 == 0).all()
    assert (v["flip1"] != v["flip2"]).any(dim=1).any()  # some pairs are flipped differently
    for i in range(n):
        t1, l1, b1, r1 = v["box1"][i].tolist()
        t2, l2, b2, r2 = v["box2"][i].tolist()
        a = undo_flips(v["crop1"][i:i + 1], v["flip1"][i:i + 1])[0, :, t1:b1, l1:r1]
        b = undo_flips(v["crop2"][i:i + 1], v["flip2"][i:i + 1])[0, :, t2:b2, l2:r2]
        assert torch.equal(a, b)
    # on the 1/8 "feature" map of the flipped crops (avg-pooled image), flipping back and then
    # slicing box // 8 (the method's overlap()) gives the same cells for both crops
    f1 = undo_flips(F.avg_pool2d(v["crop1"].double(), 8), v["flip1"])
    f2 = undo_flips(F.avg_pool2d(v["crop2"].double(), 8), v["flip2"])
    o1, o2 = overlap(f1, v["box1"]), overlap(f2, v["box2"])
    assert o1.shape == o2.shape and o1.shape[0] == int(((v["box1"][:, 2] - v["box1"][:, 0]) *
                                                        (v["box1"][:, 3] - v["box1"][:, 1])).sum()) // 64
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-9)
    neighbours = (o1[1:] - o1[:-1]).abs().amax(1)  # distinct cells really differ: no trivial match
    assert neighbours.min() > 1e-3


def test_directional_masks():
    k1 = torch.tensor([.9, .5, .8, .95])
    k2 = torch.tensor([.6, .8, .7, .96])
    m1, m2 = directional_masks(k1, k2, 0.75)
    assert m1.tolist() == [0, 1, 0, 1] and m2.tolist() == [1, 0, 1, 0]


def test_two_key_loss_value():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    bank = torch.cat([e2, e1])  # e2: the other pseudo-label (a negative), e1: same label (masked)
    loss = directional_nce(e1, e1, torch.tensor([0]), bank, torch.tensor([1, 0]), tau=0.1)
    expected = -math.log(math.exp(10) / (math.exp(10) + math.exp(0)))
    assert loss.item() == pytest.approx(expected, rel=1e-4) and expected == pytest.approx(4.54e-5, rel=1e-3)
    unmasked = directional_nce(e1, e1, torch.tensor([0]), bank, torch.tensor([1, 1]), tau=0.1)
    assert unmasked.item() == pytest.approx(-math.log(math.exp(10) / (2 * math.exp(10) + 1)), rel=1e-6)


def test_gradient_flows_only_through_the_anchor():
    g = _gen(0)
    anchor = F.normalize(torch.randn(5, 4, generator=g), dim=1).requires_grad_()
    positive = F.normalize(torch.randn(5, 4, generator=g), dim=1).requires_grad_()
    bank = F.normalize(torch.randn(7, 4, generator=g), dim=1).requires_grad_()
    labels = torch.tensor([0, 1, 0, 1, 0])
    bank_labels = torch.tensor([1, 0, 1, 0, 1, 0, 1])
    directional_nce(anchor, positive, labels, bank, bank_labels, 0.1).sum().backward()
    assert anchor.grad is not None and anchor.grad.abs().sum() > 0
    assert positive.grad is None and bank.grad is None


def test_an_anchor_without_negatives_has_zero_loss_and_a_finite_zero_gradient():
    anchor = F.normalize(torch.randn(3, 4, generator=_gen(1)), dim=1).requires_grad_()
    bank = F.normalize(torch.randn(5, 4, generator=_gen(2)), dim=1)
    loss = directional_nce(anchor, anchor.detach(), torch.tensor([0, 0, 1]), bank,
                           torch.zeros(5, dtype=torch.long), 0.1)  # anchors 0, 1: no other label
    assert loss[0] == 0 and loss[1] == 0 and loss[2] > 0
    loss.sum().backward()
    assert torch.isfinite(anchor.grad).all()
    assert torch.equal(anchor.grad[:2], torch.zeros(2, 4)) and anchor.grad[2].abs().sum() > 0


# ---------------------------------------------------------------------------- the bank

def test_bank_holds_exactly_the_last_two_steps_and_is_state(toy_root, tmp_path):  # noqa: F811
    cfg = toy_config(toy_root, "cac", unsup_start_epoch=0)
    tr = Trainer(cfg, tmp_path / "a")
    pushed = []
    push = tr.method.push_bank
    tr.method.push_bank = lambda f, y: (pushed.append((f.clone(), y.clone())), push(f, y))
    for it in range(3):
        tr.train_step(0, it)
    assert len(pushed) == 3 and len(tr.method.bank) == 2
    for (f, y), (bf, by) in zip(pushed[1:], tr.method.bank):
        assert torch.equal(f, bf) and torch.equal(y, by)
    b, h = 2, 32 // 8  # two crops of 32² (0.7 · 64 rounded down to 32): 4×4 cells per crop
    assert pushed[0][0].shape == (2 * int(0.5 * b * h * h), 128)  # selected_num per view, 2 views
    other = Trainer(cfg, tmp_path / "b")
    other.method.load_state_dict(tr.method.state_dict())
    assert len(other.method.bank) == 2
    for (f, y), (g, z) in zip(tr.method.bank, other.method.bank):
        assert torch.equal(f, g) and torch.equal(y, z)


def test_a_resumed_run_is_bit_identical(toy_root, tmp_path):  # noqa: F811
    cfg = toy_config(toy_root, "cac", epochs=2, unsup_start_epoch=0)
    train(cfg, tmp_path / "whole")

    def kill_after(epoch):
        if epoch == 0:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, tmp_path / "resumed", on_epoch_end=kill_after)
    assert len(load_state(tmp_path / "resumed" / "checkpoint.pt")["method"]["_extra_state"]["bank"]) == 2
    train(cfg, tmp_path / "resumed")
    assert_same_runs(tmp_path / "whole", tmp_path / "resumed")


def test_unsupervised_terms_wait_for_the_start_epoch(toy_root, tmp_path):  # noqa: F811
    tr = Trainer(toy_config(toy_root, "cac", unsup_start_epoch=1), tmp_path)
    assert set(tr.train_step(0, 0)) == {"loss", "L_s"} and len(tr.method.bank) == 0
    info = StepInfo(epoch=1, epochs=3, iteration=3, iterations=tr.total, unsup_active=True)
    losses = tr.method.training_step(tr.batches.batch(1, 0), info)
    assert {"L1", "L2"} <= set(losses) and len(tr.method.bank) == 1


def test_the_pooled_classifier_pass_leaves_the_running_statistics_alone(toy_root, tmp_path):  # noqa: F811
    """Per active step the classifier's BatchNorm is updated by the labeled pass and by the two
    crops' 1/4 passes (3), never by the pooled 1/8 passes; the pooled pass itself normalises with
    its batch's statistics, as in training."""
    tr = Trainer(toy_config(toy_root, "cac", unsup_start_epoch=0), tmp_path)
    bn = tr.method.student.classifier.bn
    before = (bn.num_batches_tracked.item(), bn.running_mean.clone())
    tr.train_step(0, 0)
    assert bn.num_batches_tracked.item() - before[0] == 3
    classifier = tr.method.student.classifier.train()
    x = torch.randn(2, classifier.conv1.in_channels, 4, 4)
    stats = (bn.num_batches_tracked.clone(), bn.running_mean.clone(), bn.running_var.clone())
    with batch_statistics_only(classifier):
        torch.manual_seed(0)
        inside = classifier(x)
    assert torch.equal(stats[0], bn.num_batches_tracked) and torch.equal(stats[1], bn.running_mean)
    assert torch.equal(stats[2], bn.running_var) and bn.momentum == 0.1
    torch.manual_seed(0)
    assert torch.equal(classifier(x), inside)  # the same batch-statistics forward
    assert not torch.equal(bn.running_mean, stats[1])  # a normal pass does update them
