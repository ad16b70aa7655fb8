"""CCT (methods/cct.py) and its perturbations (methods/_cct_perturbations.py), values by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from semibench.errors import ConfigError, TrainingError
from semibench.method import Batch, StepInfo, make_hparams
from semibench.methods import _cct_perturbations as P
from semibench.network.model import Classifier, build_model
from semibench.registry import METHODS
from semibench.testing import FakeContext, toy_config
from semibench.train.engine import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

ACTIVE = StepInfo(epoch=6, epochs=10, iteration=50, iterations=100, unsup_active=True)
INACTIVE = StepInfo(epoch=0, epochs=10, iteration=3, iterations=100, unsup_active=False)
ONE_EACH = dict(vat=1, drop=1, cutout=1, context_masking=1, object_masking=1, feature_drop=1,
                feature_noise=1)


def make(**hp):
    cls = METHODS.get("cct")
    ctx = FakeContext(lambda: build_model("tiny", "none"))
    return cls(ctx, make_hparams(cls.Hparams, hp)), ctx


def batch(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(2, 3, size, size, generator=g),
                 (torch.rand(2, size, size, generator=g) > 0.6).long(),
                 {"image": torch.randn(2, 3, size, size, generator=g)})


# ---------------------------------------------------------------------------- hyperparameters

def test_official_defaults_and_head_order():
    cls = METHODS.get("cct")
    assert cls.unlabeled_views == "single"
    hp = make_hparams(cls.Hparams, None)
    assert (hp.weight_u, hp.rampup, hp.xi, hp.eps, hp.drop_rate, hp.erase, hp.uniform_range) == \
        (30.0, 0.1, 1e-6, 2.0, 0.5, 0.4, 0.3)
    assert (hp.feature_drop_low, hp.feature_drop_high, hp.vat_iterations) == (0.7, 0.9, 1)
    kinds = hp.kinds()
    assert len(kinds) == 30
    assert kinds == (["vat"] * 2 + ["drop"] * 6 + ["cutout"] * 6 + ["context_masking"] * 2
                     + ["object_masking"] * 2 + ["feature_drop"] * 6 + ["feature_noise"] * 6)


@pytest.mark.parametrize("bad, match", [
    ({"drop": -1}, "integers >= 0"), ({"vat": 1.5}, "integers >= 0"),
    ({k: 0 for k in ONE_EACH}, "at least one auxiliary head"),
    ({"drop_rate": 1.0}, "drop_rate"), ({"erase": 1.5}, "erase"), ({"eps": -1.0}, "eps"),
    ({"feature_drop_low": 0.9, "feature_drop_high": 0.7}, "feature_drop_low"),
    ({"vat_iterations": 0}, "vat_iterations"), ({"weight": 1.0}, "unknown hyperparameter"),
])
def test_bad_hyperparameters_are_one_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        make_hparams(METHODS.get("cct").Hparams, bad)


def test_aux_heads_are_fresh_classifiers_outside_the_evaluated_network():
    torch.manual_seed(0)
    method, ctx = make(**ONE_EACH)
    assert len(method.aux_heads) == 7
    assert all(type(h) is Classifier for h in method.aux_heads)
    main = method.student.classifier
    for head in method.aux_heads:  # same shapes as the main head, independent weights
        assert head.conv1.weight.shape == main.conv1.weight.shape
        assert head.conv2.weight.shape == main.conv2.weight.shape
        assert head.dropout.p == main.dropout.p
        assert not torch.equal(head.conv1.weight, main.conv1.weight)
    assert method.inference_model() is method.student
    assert not any(k.startswith("aux_heads") for k in method.inference_model().state_dict())
    assert any(k.startswith("aux_heads.") for k in method.state_dict())  # checkpointed
    (opt,) = ctx.optimizers  # one optimiser, aux heads at the student's lr
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in method.aux_heads.parameters())
    assert all(id(p) in in_opt for p in method.student.parameters())


def test_fresh_head_of_another_architecture_is_reinitialised():
    from semibench.methods.cct import fresh_head
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        head[1].weight.fill_(5.0)
    new = fresh_head(head)
    assert [p.shape for p in new.parameters()] == [p.shape for p in head.parameters()]
    assert not torch.equal(new[0].weight, head[0].weight)
    assert torch.equal(new[1].weight, torch.ones(4))  # BN reset to its initial affine


# ---------------------------------------------------------------------------- L_u

def test_identical_unperturbed_heads_give_zero_loss():
    torch.manual_seed(0)
    # every perturbation that has a neutral setting, set to it: VAT ε 0, dropout p 0, noise 0
    method, _ = make(vat=1, drop=2, cutout=0, context_masking=0, object_masking=0, feature_drop=0,
                     feature_noise=2, eps=0.0, drop_rate=0.0, uniform_range=0.0)
    method.eval()  # the heads' own Dropout2d off, BN on running statistics
    x = batch().unlabeled["image"]
    out = method.student(x, project=False)
    assert method.unsupervised_loss(out.features, out.logits).item() > 0  # fresh heads differ
    for head in method.aux_heads:
        head.load_state_dict(method.student.classifier.state_dict())
    assert method.unsupervised_loss(out.features, out.logits).item() == 0.0


def test_loss_is_mean_over_heads_of_softmax_mse_to_main_prediction():
    torch.manual_seed(1)
    method, _ = make(vat=0, drop=0, cutout=0, context_masking=0, object_masking=1, feature_drop=0,
                     feature_noise=1, uniform_range=0.0)
    method.eval()
    out = method.student(batch().unlabeled["image"], project=False)
    p_main = out.logits.softmax(1)
    h = out.features
    obj = (out.logits.argmax(1, keepdim=True) > 0).float()
    obj = nn.functional.interpolate(obj, size=h.shape[-2:], mode="nearest")
    per_head = []
    for h_k, head in zip([h * (1 - obj), h], method.aux_heads):  # object masking, zero noise
        logits_k = nn.functional.interpolate(head(h_k), size=out.logits.shape[-2:], mode="bilinear",
                                             align_corners=False)
        per_head.append(((logits_k.softmax(1) - p_main) ** 2).mean())
    expected = (per_head[0] + per_head[1]) / 2
    assert method.unsupervised_loss(h, out.logits).item() == pytest.approx(expected.item(), rel=1e-6)


def test_unsup_loss_trains_encoder_and_aux_heads_never_the_main_head():
    torch.manual_seed(2)
    method, _ = make(**ONE_EACH)
    method.train()
    out = method.student(batch().unlabeled["image"], project=False)
    L_u = method.unsupervised_loss(out.features, out.logits)
    L_u.backward()
    assert all(p.grad is None for p in method.student.classifier.parameters())
    enc = [p.grad for p in method.student.encoder.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in enc)
    for head in method.aux_heads:  # every aux head, whatever its perturbation
        assert head.conv2.weight.grad is not None and head.conv2.weight.grad.abs().sum() > 0


def test_main_head_gradient_of_the_total_loss_is_that_of_L_sup_alone():
    torch.manual_seed(3)
    method, _ = make(**ONE_EACH)
    method.eval()  # deterministic student, so the two passes see the same logits
    b = batch(4)
    out = method.training_step(b, ACTIVE)
    assert out["L_u"].item() > 0 and out["w_u"].item() > 0
    out["loss"].backward()
    total = [p.grad.clone() for p in method.student.classifier.parameters()]
    aux_grads = [p.grad for p in method.aux_heads.parameters()]
    method.zero_grad(set_to_none=True)
    method.training_step(b, INACTIVE)["loss"].backward()  # L_sup only
    sup = [p.grad for p in method.student.classifier.parameters()]
    assert all(torch.equal(a, s) for a, s in zip(total, sup))
    assert all(p.grad is None for p in method.aux_heads.parameters())  # aux heads: no L_sup
    assert any(g is not None for g in aux_grads)


def test_weight_ramps_over_the_first_tenth_and_inactive_skips_unlabeled():
    method, _ = make(**ONE_EACH)
    w = lambda it: method.unsup_weight(StepInfo(0, 10, it, 1000, True))
    assert w(0) == pytest.approx(30 * math.exp(-5))
    assert w(50) == pytest.approx(30 * math.exp(-5 * 0.5 ** 2))
    assert w(100) == pytest.approx(30.0) and w(900) == pytest.approx(30.0)
    calls = []
    method.aux_heads[0].register_forward_hook(lambda *a: calls.append(1))
    out = method.training_step(batch(), INACTIVE)
    assert set(out) == {"loss", "L_sup"} and calls == []
    b = batch()
    with pytest.raises(TrainingError, match="'image'"):
        method.training_step(Batch(b.labeled_image, b.labeled_mask, {"weak": b.labeled_image}), ACTIVE)


# ---------------------------------------------------------------------------- perturbations

def test_context_and_object_masking_are_complementary():
    h = torch.ones(1, 1, 2, 2)
    # class-1 logit above class 0 only at the top-left pixel
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 0] = 1.0
    con, obj = P.context_masking(h, logits), P.object_masking(h, logits)
    assert con[0, 0].tolist() == [[1, 0], [0, 0]]
    assert obj[0, 0].tolist() == [[0, 1], [1, 1]]
    assert torch.equal(con + obj, h)
    # masks computed at the logits' resolution, nearest-resized: a 4×4 prediction onto 2×2
    # features takes each block's top-left pixel
    big = torch.zeros(1, 2, 4, 4)
    big[0, 1, 0, 2] = 1.0  # top-right block's top-left pixel: kept by context masking
    big[0, 1, 1, 1] = 1.0  # inside the top-left block but not its top-left pixel: ignored
    h = torch.arange(1.0, 9.0).view(1, 2, 2, 2)
    con, obj = P.context_masking(h, big), P.object_masking(h, big)
    assert con[0, 0].tolist() == [[0, 2], [0, 0]] and con[0, 1].tolist() == [[0, 6], [0, 0]]
    assert torch.equal(con + obj, h)


def test_feature_drop_zeroes_exactly_the_positions_at_or_above_the_threshold():
    # sample 0: channel mean a = [[1, 2], [3, 10]], u = 0.8: thr 8, only the 10 goes
    # sample 1: a = [[5, 4], [1, 1]], thr 4: 5 and 4 go (a ≥ thr)
    a = torch.tensor([[[1.0, 2.0], [3.0, 10.0]], [[5.0, 4.0], [1.0, 1.0]]])
    h = torch.stack([2 * a, torch.zeros_like(a)], dim=1)  # (2, 2, 2, 2), mean over channels = a
    out = P.feature_drop(h, u=0.8)
    assert out[0, 0].tolist() == [[2, 4], [6, 0]]
    assert out[1, 0].tolist() == [[0, 0], [2, 2]]
    assert torch.equal(out[:, 1], h[:, 1])
    # drawn u ∈ [0.7, 0.9]: on a = 0..99 (max 99) the threshold lies in [69.3, 89.1], so the
    # dropped positions are exactly {a ≥ thr}: between 11 and 30 of them, a top range
    torch.manual_seed(0)
    ramp = torch.arange(100.0).view(1, 1, 10, 10)
    for _ in range(20):
        kept = P.feature_drop(ramp) != 0
        dropped = (~kept).sum().item() - 1  # the 0 at position 0 is zero either way
        assert 10 <= dropped <= 30
        first = int(ramp[~kept & (ramp > 0)].min())
        assert torch.equal(~kept & (ramp > 0), ramp >= first)


def test_feature_noise_is_multiplicative_and_shared_by_the_batch():
    h = torch.tensor([1.0, -2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
    noise = torch.tensor([[[0.1, -0.3], [0.0, 0.2]]])
    out = P.feature_noise(h, noise=noise)
    assert torch.allclose(out[0, 0], torch.tensor([[1.1, 0.7], [1.0, 1.2]]))
    assert torch.allclose(out[1, 0], torch.tensor([[-2.2, -1.4], [-2.0, -2.4]]))
    torch.manual_seed(0)
    h = torch.ones(3, 4, 5, 5)
    out = P.feature_noise(h, 0.3)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # one N for the batch
    assert (out - 1).abs().max() <= 0.3 and (out - 1).abs().max() > 0.2


def test_dropout_is_channel_wise():
    torch.manual_seed(0)
    h = torch.ones(4, 64, 3, 3)
    out = P.dropout(h, 0.5)
    per_channel = out.flatten(2)
    assert torch.equal(per_channel.amin(2), per_channel.amax(2))  # whole channels kept or dropped
    assert set(per_channel[..., 0].unique().tolist()) == {0.0, 2.0}  # kept ones scaled by 1/(1-p)
    assert 0.3 < (per_channel[..., 0] == 0).float().mean() < 0.7


def test_guided_cutout_erases_a_box_of_04_of_each_object():
    logits = torch.zeros(1, 2, 40, 40)
    logits[0, 1, 5:16, 5:16] = 1.0  # an 11×11 object: extent 10 → a 4×4 box
    logits[0, 1, 25:27, 25:27] = 1.0  # a 2×2 object: extent 1 → int(0.4) = 0, nothing cut
    logits[0, 1, 30:35, 30:35] = 1.0  # a 5×5 object at 30..34 and a single pixel touching it
    logits[0, 1, 35, 35] = 1.0  # diagonally: one 8-connected object of extent 5 → a 2×2 box
    boxes = P.object_boxes(logits)
    assert sorted(boxes[0]) == [(5, 5, 15, 15), (25, 25, 26, 26), (30, 30, 35, 35)]
    torch.manual_seed(0)
    for _ in range(20):
        keep = P.cutout_keep_mask(boxes, (40, 40), (40, 40), 0.4)[0, 0]
        holes = (keep == 0).nonzero()
        big = holes[holes[:, 0] < 20]
        assert len(big) == 16 and len(holes) == 20
        top, left = big.min(0).values.tolist()
        assert big.max(0).values.tolist() == [top + 3, left + 3]
        assert 5 <= top <= 5 + 6 and 5 <= left <= 5 + 6  # offset in [0, int(0.6·10)]
        small = holes[holes[:, 0] >= 20]
        assert 30 <= small[:, 0].min() and small[:, 0].max() <= 35
    feats = torch.ones(1, 3, 10, 10)  # the mask built at 40² and nearest-resized to the features
    out = P.guided_cutout(feats, logits, 0.4, boxes)
    assert out.shape == feats.shape and (out == 0).any() and torch.equal(out[:, 0], out[:, 2])


def test_vat_perturbation_has_norm_eps_per_sample_and_follows_the_head():
    torch.manual_seed(0)
    h = torch.randn(3, 4, 6, 6)
    head = nn.Conv2d(4, 2, 1)
    with torch.no_grad():  # only feature channel 0 reaches the logits
        head.weight[:, 1:] = 0
    r = P.vat_perturbation(h, head, xi=1e-6, eps=2.0)
    assert r.shape == h.shape and not r.requires_grad
    norms = r.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full((3,), 2.0), rtol=1e-5)
    assert torch.equal(r[:, 1:], torch.zeros_like(r[:, 1:]))  # the gradient ignores dead channels
    assert all(p.grad is None for p in head.parameters())  # autograd.grad, no .backward()
    # a head blind to its input has zero gradient: the random start direction is kept, norm ε
    blind = lambda f: torch.zeros(f.shape[0], 2, *f.shape[-2:]) + f.sum() * 0
    r = P.vat_perturbation(h, blind, eps=0.5)
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((3,), 0.5), rtol=1e-5)
    # under autocast the probe still runs in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = P.vat_perturbation(h, head, eps=2.0)
    assert r.dtype == torch.float32
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((3,), 2.0), rtol=1e-5)


def test_l2_normalise_survives_tiny_gradients():
    d = torch.tensor([[3e-30, 4e-30], [0.0, 0.0]]).view(2, 2, 1, 1)
    out = P.l2_normalise(d, fallback=torch.ones_like(d))
    assert torch.allclose(out[0].flatten(), torch.tensor([0.6, 0.8]))
    assert torch.allclose(out[1].flatten(), torch.full((2,), 1 / math.sqrt(2)))


# ---------------------------------------------------------------------------- through the engine

def test_training_step_through_the_engine(toy_root, tmp_path):
    cfg = toy_config(toy_root, "cct", ratio=2, unsup_start_epoch=0, method_params=ONE_EACH)
    tr = Trainer(cfg, tmp_path)
    assert tr.batches.views == "single"
    method = tr.method
    aux0 = [p.detach().clone() for p in method.aux_heads.parameters()]
    stu0 = {k: v.detach().clone() for k, v in method.student.state_dict().items()}
    values = tr.train_step(epoch=0, it=0)
    assert set(values) == {"loss", "L_sup", "L_u", "w_u"}
    assert all(np.isfinite(v) for v in values.values())
    assert values["w_u"] == pytest.approx(30 * math.exp(-5 * (1 - 0 / (0.1 * tr.total)) ** 2))
    assert values["loss"] == pytest.approx(values["L_sup"] + values["w_u"] * values["L_u"], rel=1e-5)
    moved = [not torch.equal(a, p) for a, p in zip(aux0, method.aux_heads.parameters())]
    assert all(moved)  # every aux head parameter got an L_u gradient and an Adam step
    changed = {k for k, v in method.student.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, stu0[k])}
    assert any(k.startswith("encoder.") for k in changed)
    assert any(k.startswith("classifier.") for k in changed)
    state = tr.checkpoints.state(0)["method"]
    assert any(k.startswith("aux_heads.") for k in state)
