"""FixMatch and UniMatch: the smallest checks of each mechanism against hand values
(confidence gating, the pasted box, the all-pixel normalisation, the feature-perturbation
stream, eval-mode mix labels), gradients of the unlabeled terms alone, the defaults, and the
shared pieces (CutMix boxes, two strong views, the soft Dice)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semibench.methods._weak_to_strong as w2s
from semibench.data.augment import AugmentConfig, make_views
from semibench.losses import (
    cutmix_box_masks,
    masked_cross_entropy,
    masked_soft_dice,
    paste,
    pseudo_labels,
    supervised_loss,
)
from semibench.method import Batch, StepInfo, make_hparams, predicting
from semibench.network.model import SegOutput, build_model
from semibench.registry import METHODS
from semibench.testing import FakeContext, toy_config
from semibench.train.engine import Trainer
from tests.toy import LinearSeg

pytestmark = pytest.mark.usefixtures("one_thread")

ACTIVE = StepInfo(epoch=3, epochs=10, iteration=30, iterations=100, unsup_active=True)
METHOD_NAMES = ["fixmatch", "unimatch"]
STRONG = {"fixmatch": ("strong",), "unimatch": ("strong", "strong_2")}


class RedNet(LinearSeg):
    """A per-pixel 'segmenter': logits = (0, red channel); the feature-perturbation stream is
    the same map on channel-dropped inputs."""

    def forward(self, x, project=True, feature_dropout=0.0):
        fp = self.conv(F.dropout2d(x, feature_dropout, training=True)) if feature_dropout > 0 else None
        return SegOutput(x, self.conv(x), None, fp)


def make(name, make_net=RedNet, **hp):
    cls = METHODS.get(name)
    return cls(FakeContext(make_net), make_hparams(cls.Hparams, hp))


def red(value, n=1, h=4, w=4):
    x = torch.zeros(n, 3, h, w)
    x[:, 0] = torch.as_tensor(value, dtype=torch.float32)
    return x


def views(name, weak, strong):
    v = {"weak": weak, "strong": strong}
    if name == "unimatch":
        v["strong_2"] = strong.clone()
    return v


def batch_of(name, u, mix, n_l=1, h=4, w=4):
    return Batch(torch.zeros(n_l, 3, h, w), torch.zeros(n_l, h, w, dtype=torch.long), u, [mix])


def random_batch(name, g, n=2, size=32):
    def img():
        return torch.randn(n, 3, size, size, generator=g)
    u = {"weak": img(), "strong": img(), "strong_2": img()}
    mix = {"weak": img(), "strong": img(), "strong_2": img()}
    if name == "fixmatch":
        u.pop("strong_2"), mix.pop("strong_2")
    y = (torch.rand(n, size, size, generator=g) > 0.5).long()
    return Batch(img(), y, u, [mix])


def hand_boxes(monkeypatch, *boxes):
    """Replace the random CutMix boxes by ``boxes`` (one per strong view, in order)."""
    it = iter(boxes)
    monkeypatch.setattr(w2s, "cutmix_box_masks", lambda *a, **k: next(it))


def softplus(x):
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------------------- defaults

def test_defaults_are_the_official_values():
    fm, um = METHODS.get("fixmatch"), METHODS.get("unimatch")
    for cls in (fm, um):
        hp = make_hparams(cls.Hparams, None)
        assert (hp.conf_thresh, hp.cutmix_p, hp.cutmix_area, hp.unsup_loss) == (0.95, 0.5, (0.02, 0.4), "ce")
        assert hp.cutmix_ratio == pytest.approx((0.3, 1 / 0.3))
        assert cls.unlabeled_views == "weak_strong" and cls.unlabeled_batches == 2
    assert make_hparams(fm.Hparams, None).unsup_weight == 1.0
    hp = make_hparams(um.Hparams, None)
    assert (hp.strong_weight, hp.fp_weight, hp.fp_dropout) == (0.25, 0.5, 0.5)
    assert um.view_options == {"strong_views": 2} and fm.view_options == {}
    assert make_hparams(um.Hparams, {"cutmix_area": [0.1, 0.2]}).cutmix_area == (0.1, 0.2)


@pytest.mark.parametrize("override, message", [
    ({"conf_thresh": 1.5}, "conf_thresh must be in"), ({"unsup_loss": "mse"}, "unsup_loss must be one of"),
    ({"cutmix_area": [0.5, 0.1]}, "cutmix_area must satisfy"), ({"cutmix_ratio": 3}, "cutmix_ratio must be a pair"),
    ({"fp_dropout": 1.0}, "fp_dropout must be in"), ({"strong_weight": -1}, "must be >= 0"),
])
def test_bad_hyperparameters_are_one_line_errors(override, message):
    from semibench.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        make_hparams(METHODS.get("unimatch").Hparams, override)


# ---------------------------------------------------------------------------- smallest tests

@pytest.mark.parametrize("name", METHOD_NAMES)
def test_no_confident_pixel_means_zero_unlabeled_loss_and_half_the_suponly_gradient(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batch = random_batch(name, g)
    method = make(name, lambda: build_model("tiny", "none"), conf_thresh=1.0)  # max softmax < 1
    method.eval()  # BN running statistics: the joint forward's labeled logits are SupOnly's
    sup = copy.deepcopy(method.student)
    out = method.training_step(batch, ACTIVE)
    for key in ("L_s", "L_s1", "L_s2", "L_fp"):
        if key in out:
            assert out[key].item() == 0.0
    out["loss"].backward()
    supervised_loss(sup, batch).backward()  # loss = (L_x + 0) / 2
    pairs = [(p.grad, q.grad) for p, q in zip(method.student.parameters(), sup.parameters())]
    assert all((a is None) == (b is None) for a, b in pairs)  # the projector is unused by both
    pairs = [(a, b) for a, b in pairs if b is not None]
    assert len(pairs) > 10
    for a, b in pairs:
        assert torch.allclose(a, 0.5 * b, rtol=1e-4, atol=1e-7)
    # a threshold every pixel passes: the unlabeled terms add gradient (the check can fail)
    other = make(name, lambda: build_model("tiny", "none"), conf_thresh=0.0)
    other.load_state_dict(method.state_dict())
    other.eval()
    other.training_step(batch, ACTIVE)["loss"].backward()
    assert not all(torch.allclose(p.grad, 0.5 * q.grad, rtol=1e-4, atol=1e-7)
                   for p, q in zip(other.student.parameters(), sup.parameters()) if q.grad is not None)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_hand_built_box_pastes_the_mix_image_and_its_labels(name, monkeypatch):
    # weak view: red 4 (class 1, conf σ(4) = 0.982); mix weak: red −4 (class 0, conf 0.982);
    # strong view: red 1; mix strong: red 2; box: the top-left 2×2 of a 4×4 image
    box1 = torch.zeros(1, 1, 4, 4)
    box1[..., :2, :2] = 1
    box2 = torch.zeros(1, 1, 4, 4)
    box2[..., 3:, :] = 1  # UniMatch's second view: the bottom row
    hand_boxes(monkeypatch, box1, box2)
    method = make(name)
    seen = []
    method.student.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    u, mix = views(name, red(4.0), red(1.0)), views(name, red(-4.0), red(2.0))
    t = method.losses(batch_of(name, u, mix))
    strong_in = seen[-1][:, 0]  # the strong forward's red channel, view 1 (then view 2)
    assert torch.equal(strong_in[0], torch.where(box1[0, 0].bool(), 2.0, 1.0))
    # CE of logits (0, 1) against class 1 outside the box, of (0, 2) against class 0 inside;
    # both confident; the sum over 16 pixels divided by 16
    inside = box1.sum().item()
    expected1 = (inside * softplus(2.0) + (16 - inside) * softplus(-1.0)) / 16
    key = "L_s" if name == "fixmatch" else "L_s1"
    assert t[key].item() == pytest.approx(expected1, rel=1e-6)
    if name == "unimatch":
        assert torch.equal(strong_in[1], torch.where(box2[0, 0].bool(), 2.0, 1.0))
        inside2 = box2.sum().item()
        expected2 = (inside2 * softplus(2.0) + (16 - inside2) * softplus(-1.0)) / 16
        assert t["L_s2"].item() == pytest.approx(expected2, rel=1e-6)
    assert t["confident"].item() == 1.0


def test_paste_and_pasted_targets_by_hand():
    box = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    a, b = torch.full((1, 3, 2, 2), 5.0), torch.full((1, 3, 2, 2), 7.0)
    assert paste(box, a, b)[0, :, 0, 0].tolist() == [7.0] * 3 and paste(box, a, b)[0, :, 1].eq(5).all()
    y_w, c_w = torch.ones(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 0.9)
    y_m, c_m = torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 0.6)
    y, c = w2s.pasted_targets(box, (y_w, c_w), (y_m, c_m))
    assert y.tolist() == [[[0, 1], [1, 1]]] and y.dtype == torch.long
    assert torch.allclose(c, torch.tensor([[[0.6, 0.9], [0.9, 0.9]]]))


def test_masked_cross_entropy_divides_by_all_pixels():
    # 4 pixels, logits (0, a) against class 1: CE = softplus(−a); pixels 0 and 1 are kept
    a = torch.tensor([1.0, -2.0, 3.0, 0.5])
    logits = torch.stack([torch.zeros(4), a]).view(1, 2, 2, 2)
    target = torch.ones(1, 2, 2, dtype=torch.long)
    keep = torch.tensor([[[True, True], [False, False]]])
    ce = [softplus(-v) for v in a.tolist()]
    got = masked_cross_entropy(logits, target, keep).item()
    assert got == pytest.approx((ce[0] + ce[1]) / 4, rel=1e-6)
    assert got == pytest.approx(0.5 * (ce[0] + ce[1]) / 2, rel=1e-6)  # half the kept pixels' mean
    assert masked_cross_entropy(logits, target, torch.zeros_like(keep)).item() == 0.0


def test_masked_soft_dice_by_hand():
    # one image, 2 pixels, both kept: p1 = (0.8, 0.4), classes (1, 0)
    p1 = torch.tensor([0.8, 0.4])
    logits = torch.stack([torch.zeros(2), torch.log(p1 / (1 - p1))]).view(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    keep = torch.ones(1, 1, 2, dtype=torch.bool)
    eps = 1e-5
    d1 = 1 - (2 * 0.8 + eps) / (0.8 ** 2 + 0.4 ** 2 + 1 + eps)  # class 1: t = (1, 0)
    d0 = 1 - (2 * 0.6 + eps) / (0.2 ** 2 + 0.6 ** 2 + 1 + eps)  # class 0: p = (0.2, 0.6), t = (0, 1)
    assert masked_soft_dice(logits, target, keep).item() == pytest.approx((d0 + d1) / 2, rel=1e-5)
    only_first = torch.tensor([[[True, False]]])
    d1 = 1 - (2 * 0.8 + eps) / (0.8 ** 2 + 1 + eps)
    d0 = 1 - eps / (0.2 ** 2 + eps)
    assert masked_soft_dice(logits, target, only_first).item() == pytest.approx((d0 + d1) / 2, rel=1e-5)
    assert masked_soft_dice(logits, target, torch.zeros_like(keep)).item() == 0.0


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_feature_dropout_perturbs_the_second_half_only(mode):
    torch.manual_seed(0)
    net = build_model("tiny", "none")
    net.train(mode == "train")
    net.classifier.dropout.p = 0.0  # the head's own dropout would differ between the calls
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    out = net(x, project=False, feature_dropout=0.5)
    # the perturbed half by hand: the same Dropout2d masks (same RNG state, same order)
    torch.manual_seed(5)
    with torch.no_grad():
        skips, bottom = net.encoder(x)
        dropped = [F.dropout2d(e, 0.5, training=True) for e in (*skips, bottom)]
        assert all(((d == 0).all((2, 3)) | (d == 2 * e).all((2, 3))).all()  # whole channels, scaled
                   for d, e in zip(dropped, (*skips, bottom)))
        if mode == "eval":  # per-sample BN: each half decodes alone as in the joint batch
            clean = net(x, project=False).logits
            assert torch.allclose(out.logits, clean, atol=1e-5)
            fp = net.head_logits(net.decode(dropped[:-1], dropped[-1]), x.shape[-2:])
        else:  # train-mode BN normalises over both halves together, as the official need_fp
            both = [torch.cat([e, d]) for e, d in zip((*skips, bottom), dropped)]
            fp = net.head_logits(net.decode(both[:-1], both[-1]), x.shape[-2:])[2:]
        assert torch.allclose(out.fp_logits, fp, atol=1e-5)
        assert not torch.allclose(out.fp_logits, out.logits, atol=1e-3)
    assert out.features.shape[0] == 2 and net(x, project=False).fp_logits is None


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_mix_labels_come_from_eval_mode_and_weak_labels_from_the_train_forward(name, monkeypatch):
    torch.manual_seed(0)
    method = make(name, lambda: build_model("tiny", "none"))
    method.student.classifier.dropout.p = 0.0  # deterministic train-mode forward to compare with
    g = torch.Generator().manual_seed(3)
    batch = random_batch(name, g)
    # BN running statistics far from the batch's, so eval and train predictions differ
    for m in method.student.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(0.3)
            m.running_var.fill_(4.0)
    before = copy.deepcopy(method.student)
    captured = {}
    real = w2s.pasted_targets
    module = __import__(f"semibench.methods.{name}", fromlist=["x"])

    def spy(box, weak, mix):
        captured.setdefault("weak", weak)
        captured.setdefault("mix", mix)
        return real(box, weak, mix)
    monkeypatch.setattr(module, "pasted_targets", spy)
    no_box = torch.zeros(2, 1, 32, 32)
    hand_boxes(monkeypatch, no_box, no_box)  # no random draw before the forwards
    modes = []
    method.student.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    method.train()
    tracked = [m.num_batches_tracked.item() for m in method.student.modules() if isinstance(m, nn.BatchNorm2d)]
    torch.manual_seed(11)
    method.training_step(batch, ACTIVE)
    assert modes == [False, True, True] and method.student.training  # mode restored
    after = [m.num_batches_tracked.item() for m in method.student.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(a == t + 2 for a, t in zip(after, tracked))  # the eval pass updated no statistics
    fp = {"unimatch": {"feature_dropout": 0.5}, "fixmatch": {}}[name]
    torch.manual_seed(11)  # the same random state for the feature dropout of UniMatch's joint forward
    with torch.no_grad():
        y_mix, c_mix = pseudo_labels(before.eval()(batch.more_unlabeled[0]["weak"], project=False).logits)
        joint = before.train()(torch.cat([batch.labeled_image, batch.unlabeled["weak"]]), project=False, **fp)
        y_w, c_w = pseudo_labels(joint.logits[len(batch.labeled_image):])
        y_w_eval, c_w_eval = pseudo_labels(before.eval()(batch.unlabeled["weak"], project=False).logits)
    assert torch.equal(captured["mix"][0], y_mix) and torch.allclose(captured["mix"][1], c_mix)
    assert torch.equal(captured["weak"][0], y_w) and torch.allclose(captured["weak"][1], c_w, atol=1e-6)
    assert not torch.allclose(c_w, c_w_eval, atol=1e-3)  # the two modes are distinguishable here


# ---------------------------------------------------------------------------- gradients

def _grads(loss, tensors):
    gs = torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)
    return [0.0 if g is None else g.abs().sum().item() for g in gs]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_unlabeled_terms_alone_reach_the_network_through_their_own_views(name, monkeypatch):
    torch.manual_seed(0)
    half = torch.zeros(2, 1, 32, 32)
    half[..., :16] = 1
    hand_boxes(monkeypatch, half, half.flip(-1))
    method = make(name, lambda: build_model("tiny", "none"), conf_thresh=0.0)
    method.eval()  # per-sample BN: a view influences only its own predictions
    batch = random_batch(name, torch.Generator().manual_seed(4))
    inputs = [batch.labeled_image, *batch.unlabeled.values(), *batch.more_unlabeled[0].values()]
    for x in inputs:
        x.requires_grad_(True)
    names = ["labeled"] + [f"u.{k}" for k in batch.unlabeled] + [f"mix.{k}" for k in batch.more_unlabeled[0]]
    t = method.losses(batch)
    params = list(method.student.parameters())
    terms = {"fixmatch": {"L_s": {"u.strong", "mix.strong"}},
             "unimatch": {"L_s1": {"u.strong", "mix.strong"}, "L_s2": {"u.strong_2", "mix.strong_2"},
                          "L_fp": {"u.weak"}}}[name]
    for term, reached in terms.items():
        assert t[term].item() > 0
        assert sum(_grads(t[term], params)) > 0, f"{term} carries no gradient into the network"
        by_input = dict(zip(names, _grads(t[term], inputs)))
        assert {k for k, v in by_input.items() if v > 0} == reached, term  # targets are detached
    # the same check on a method whose unlabeled branch is detached finds no gradient
    real = w2s.confident_loss
    module = __import__(f"semibench.methods.{name}", fromlist=["x"])
    monkeypatch.setattr(module, "confident_loss", lambda hp, logits, tg: real(hp, logits.detach(), tg))
    hand_boxes(monkeypatch, half, half.flip(-1))
    detached = method.losses(batch)
    assert all(not detached[term].requires_grad for term in terms)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_total_loss_is_the_official_weighting(name):
    torch.manual_seed(0)
    method = make(name, lambda: build_model("tiny", "none"), conf_thresh=0.0)
    out = method.training_step(random_batch(name, torch.Generator().manual_seed(6)), ACTIVE)
    if name == "fixmatch":
        expected = (out["L_sup"] + out["L_s"]) / 2
    else:
        expected = (out["L_sup"] + 0.25 * out["L_s1"] + 0.25 * out["L_s2"] + 0.5 * out["L_fp"]) / 2
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    before = method.training_step(random_batch(name, torch.Generator().manual_seed(6)),
                                  StepInfo(0, 10, 0, 100, unsup_active=False))
    assert set(before) == {"loss", "L_sup"}  # before the start gate: the engine's L_sup only


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_missing_mix_batch_or_view_is_a_clear_error(name):
    from semibench.errors import TrainingError
    method = make(name)
    one = Batch(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), views(name, red(1.0), red(1.0)))
    with pytest.raises(TrainingError, match="needs two unlabeled batches"):
        method.training_step(one, ACTIVE)


# ---------------------------------------------------------------------------- shared pieces

def test_cutmix_boxes_follow_the_official_distribution():
    g = torch.Generator().manual_seed(0)
    m = cutmix_box_masks(4000, 32, 48, p=0.5, generator=g)
    present = m.flatten(1).any(1)
    assert abs(present.float().mean().item() - 0.5) < 0.03
    for mask in m[present][:, 0][:500]:
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        h, w = len(rows), len(cols)
        assert mask.sum().item() == h * w  # one rectangle
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w
        # w = ⌊√(s·HW/r)⌋, h = ⌊√(s·HW·r)⌋ with s ∈ [0.02, 0.4], r ∈ [0.3, 1/0.3]
        assert (h * w) / (32 * 48) <= 0.4 + 1e-9 and (h + 1) * (w + 1) / (32 * 48) >= 0.02
        assert 0.3 <= (h + 1) / w and h / (w + 1) <= 1 / 0.3  # h / w ≈ r
    assert not cutmix_box_masks(50, 8, 8, p=0.0, generator=g).any()
    a = cutmix_box_masks(8, 16, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, cutmix_box_masks(8, 16, 16, generator=torch.Generator().manual_seed(7)))


def test_a_box_that_can_never_fit_is_cut_to_the_image():
    # area 0.9 at aspect ratio 4: h = ⌊√(0.9·256·4)⌋ = 30 > 16 rows, never fits
    m = cutmix_box_masks(3, 16, 16, p=1.0, area=(0.9, 0.9), ratio=(4.0, 4.0),
                         generator=torch.Generator().manual_seed(1))
    for mask in m[:, 0]:
        assert mask.any(1).all()  # every row, cut to the image height
        assert mask.sum().item() == 16 * int(math.sqrt(0.9 * 256 / 4))


def test_two_strong_views_share_the_weak_geometry_and_keep_the_first_view():
    images = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)
    one = make_views("weak_strong", images, torch.Generator().manual_seed(2))
    two = make_views("weak_strong", images, torch.Generator().manual_seed(2), strong_views=2)
    assert set(two) == {"weak", "strong", "strong_2"}
    assert torch.equal(one["weak"], two["weak"]) and torch.equal(one["strong"], two["strong"])
    assert not torch.equal(two["strong"], two["strong_2"])
    # without photometric changes both strong views are the weak view: pixel-aligned
    flat = AugmentConfig(jitter_p=0.0, grey_p=0.0, blur_p=0.0)
    v = make_views("weak_strong", images, torch.Generator().manual_seed(2), flat, strong_views=2)
    assert torch.equal(v["strong"], v["weak"]) and torch.equal(v["strong_2"], v["weak"])
    from semibench.errors import ConfigError
    with pytest.raises(ConfigError, match="strong_views must be an integer >= 1"):
        make_views("weak_strong", images, torch.Generator(), strong_views=0)


def test_predicting_restores_the_mode_and_blocks_gradients():
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    net.train()
    with predicting(net) as n:
        assert not n.training and not n(torch.randn(2, 3, 4, 4)).requires_grad
    assert net.training and net[1].num_batches_tracked.item() == 0
    net.eval()
    with predicting(net):
        pass
    assert not net.training


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_engine_draws_the_mix_batch_with_the_methods_views(name, toy_root, tmp_path):  # noqa: F811
    tr = Trainer(toy_config(toy_root, name, ratio=2, batch_unlabeled=2, unsup_start_epoch=0), tmp_path)
    assert tr.images_per_step == 2 + 2 * 2
    b = tr.batches.batch(0, 0)
    assert set(b.unlabeled) == set(b.more_unlabeled[0]) == {"weak", *STRONG[name]}
    assert not torch.equal(b.unlabeled["weak"], b.more_unlabeled[0]["weak"])
    values = tr.train_step(0, 0)
    assert math.isfinite(values["loss"]) and 0.0 <= values["confident"] <= 1.0
