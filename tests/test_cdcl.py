"""CDCL (methods/cdcl.py, methods/_cdcl_losses.py): each equation on hand-built tensors, the
vectorised L_contr against the per-patch reference, the banks, the schemes and a real step."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semibench.methods.cdcl as cdcl_mod
from semibench.errors import ConfigError
from semibench.method import Batch, StepInfo, make_hparams
from semibench.methods._cdcl_losses import (
    BDP,
    FDP,
    MP,
    BankEntries,
    FeatureBank,
    _NegativeLogSumExp,
    consistency_loss,
    contrastive_loss,
    entropy_loss,
    flatten_pixels,
    foreground_score,
    patch_category,
    patch_ids,
    pixel_categories,
    pseudo_labels,
    push_banks,
)
from semibench.network.model import SegOutput, build_model
from semibench.registry import METHODS
from semibench.testing import FakeContext
from tests.cdcl_reference import reference_l_contr

ACTIVE = StepInfo(epoch=6, epochs=11, iteration=60, iterations=110, unsup_active=True)
INACTIVE = StepInfo(epoch=2, epochs=11, iteration=20, iterations=110, unsup_active=False)
L = torch.long


def entries(features, labels, ids):
    return BankEntries(F.normalize(torch.tensor(features, dtype=torch.float64), dim=1),
                       torch.tensor(labels, dtype=L), torch.tensor(ids, dtype=L))


def empty(d=2):
    return BankEntries(torch.zeros(0, d, dtype=torch.float64), torch.zeros(0, dtype=L),
                       torch.zeros(0, dtype=L))


def softplus_loss(a, b_list):
    """−log(e^a / (e^a + Σ e^b)) by hand."""
    return -math.log(math.exp(a) / (math.exp(a) + sum(math.exp(b) for b in b_list)))


# ---------------------------------------------------------------- pseudo labels, FS, categories

def test_pseudo_labels_average_the_softmax_over_each_grid_cell():
    # One 8×8 block: 40 pixels at p(fg) = 0.9, 24 at p(fg) = 0.2 -> mean 0.6375 -> foreground,
    # although its top-left pixel (what strided slicing would pick) is background.
    p_fg = torch.full((8, 8), 0.9)
    p_fg.view(-1)[:24] = 0.2
    logit = torch.log(p_fg / (1 - p_fg))  # two-class logits (0, logit) give softmax p_fg
    logits = torch.stack([torch.zeros(8, 8), logit])[None]
    assert pseudo_labels(logits, (1, 1)).tolist() == [[[1]]]
    assert pseudo_labels(logits)[0, 0, 0].item() == 0  # full-resolution argmax (eq. 3–4)
    # a 16×16 map onto a 2×2 grid: one label per 8×8 block
    big = torch.zeros(1, 2, 16, 16)
    big[0, 1, 8:, :8] = 5.0
    assert pseudo_labels(big, (2, 2)).tolist() == [[[0, 0], [1, 0]]]


def test_foreground_score_and_categories_at_the_thresholds():
    # a 16×40 grid in 8×8 patches of 2×5 = 10 cells; N_f per patch set by hand
    n_f = [3, 4, 7, 6, 0, 10, 2, 8] + [5] * 56
    labels = torch.zeros(1, 16, 40, dtype=L)
    ids = patch_ids(16, 40, 8)
    for p, k in enumerate(n_f):
        cells = torch.nonzero(ids == p)[:k]
        labels[0, cells[:, 0], cells[:, 1]] = 1
    fs = foreground_score(labels, 8)
    assert fs[0, :8].tolist() == [0.3, 0.4, 0.7, 0.6, 0.0, 1.0, 0.2, 0.8]
    cat = patch_category(fs, 0.7, 0.3)
    assert cat[0, :8].tolist() == [BDP, MP, FDP, MP, BDP, FDP, BDP, FDP]  # 0.3 and 0.7 inclusive
    assert (cat[0, 8:] == MP).all()
    pix_cat, pix_patch = pixel_categories(labels, 8)
    assert pix_cat.view(16, 40)[0, 10].item() == FDP and pix_patch.view(16, 40)[0, 10].item() == 2
    assert pix_cat.view(16, 40)[15, 39].item() == MP and pix_patch.view(16, 40)[15, 39].item() == 63


def test_patch_grid_shapes_and_too_small_maps():
    ids = patch_ids(40, 40, 8)
    assert torch.bincount(ids.flatten()).tolist() == [25] * 64  # 320² input: 64 patches of 5×5
    assert ids[:5, :5].unique().tolist() == [0] and ids[35:, 35:].unique().tolist() == [63]
    assert torch.bincount(patch_ids(3, 2, 2).flatten()).tolist() == [2, 2, 1, 1]  # uneven split
    with pytest.raises(ConfigError, match="at least 8×8"):
        patch_ids(4, 40, 8)


# ---------------------------------------------------------------- eq. 7–12 by hand

def test_eq7_two_pixel_case_by_hand():
    # Student queries q0 = (1, 0), q1 = (0, 1); teacher k0 = (1, 0), k1 = (1, 1)/√2. Student labels
    # 0, 0 -> one BDP (P = 1); teacher labels 1, 1 -> one FDP: the FDB holds k0, k1 (this batch).
    # Each query's own location is its positive, the other teacher pixel its only negative.
    tau = 0.5
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    fdb = entries(k.tolist(), [1, 1], [0, 1])
    loss = contrastive_loss(q, k, torch.tensor([0, 0]), torch.tensor([BDP, BDP]), torch.tensor([0, 0]),
                            fdb, empty(), tau=tau)
    c = 1 / math.sqrt(2)
    l0 = softplus_loss(1 / tau, [c / tau])  # cos(q0,k0) = 1, cos(q0,k1) = 1/√2
    l1 = softplus_loss(c / tau, [0.0])  # cos(q1,k1) = 1/√2, cos(q1,k0) = 0
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-12)


def test_false_negative_mask_J():
    # One FDP query of label 1; the BDB holds a key of label 1 (a false negative) and one of
    # label 0. J(q, k) = 1{ỹ_q ≠ ỹ_k}: only the label-0 key is a negative.
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    kp = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    bdb = entries([[0.0, 1.0], [1.0, 1.0]], [1, 0], [-1, -1])
    args = (q, kp, torch.tensor([1]), torch.tensor([FDP]), torch.tensor([0]), empty(), bdb)
    with_j = contrastive_loss(*args, tau=1.0, pixel_negatives=True)
    without_j = contrastive_loss(*args, tau=1.0, pixel_negatives=False)
    c = 1 / math.sqrt(2)
    assert with_j.item() == pytest.approx(softplus_loss(1.0, [c]), rel=1e-12)
    assert without_j.item() == pytest.approx(softplus_loss(1.0, [0.0, c]), rel=1e-12)


@pytest.mark.parametrize("routing", [True, False])
def test_bank_routing_fdp_meets_bdb_and_bdp_meets_fdb(routing):
    # Query 0 in an FDP, query 1 in a BDP; all keys have the other label, so J keeps them all.
    # FDB key: cos 0.6 with both queries; BDB key: cos 0 with both (unit vectors).
    q = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    kp = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    fdb = entries([[0.6, 0.8, 0.0]], [0], [-1])  # label 0 ≠ query 0's label 1
    bdb = entries([[0.0, 0.0, 1.0]], [1], [-1])  # label 1 ≠ query 1's label 0
    loss = contrastive_loss(q, kp, torch.tensor([1, 0]), torch.tensor([FDP, BDP]), torch.tensor([0, 1]),
                            fdb, bdb, tau=1.0, patch_routing=routing, pixel_negatives=False)
    if routing:
        l_fdp = softplus_loss(1.0, [0.0])  # meets the BDB key only
        l_bdp = softplus_loss(1.0, [0.6])  # meets the FDB key only
    else:
        l_fdp = l_bdp = softplus_loss(1.0, [0.0, 0.6])  # merged bank
    assert loss.item() == pytest.approx((l_fdp + l_bdp) / 2, rel=1e-12)  # two one-pixel patches


def test_patch_then_batch_averaging_eq10_to_12():
    # Six query pixels in patches of 3, 2 and 1 pixels, plus one MP pixel (not a query). One BDB
    # key e0 = (1, 0) of the other label, so cos(q_i, e0) is q_i's first coordinate.
    torch.manual_seed(0)
    n = 7
    q = F.normalize(torch.randn(n, 2, dtype=torch.float64), dim=1)
    kp = F.normalize(torch.randn(n, 2, dtype=torch.float64), dim=1)
    patch = torch.tensor([0, 0, 0, 1, 1, 2, 3])
    cat = torch.tensor([FDP, FDP, FDP, FDP, FDP, FDP, MP])
    bdb = entries([[1.0, 0.0]], [0], [-1])
    loss = contrastive_loss(q, kp, torch.ones(n, dtype=L), cat, patch, empty(), bdb, tau=0.2)
    per_row = [softplus_loss((q[i] @ kp[i]).item() / 0.2, [q[i, 0].item() / 0.2]) for i in range(n)]
    patch_means = [sum(per_row[0:3]) / 3, sum(per_row[3:5]) / 2, per_row[5]]  # eq. 10
    assert loss.item() == pytest.approx(sum(patch_means) / 3, rel=1e-12)  # eq. 11–12
    assert loss.item() != pytest.approx(sum(per_row[:6]) / 6, rel=1e-6)  # not a plain pixel mean


def test_no_patch_qualifies_gives_zero_and_finite_gradients():
    q = torch.randn(4, 3, requires_grad=True)
    kp = torch.randn(4, 3)
    fdb = BankEntries(F.normalize(torch.randn(2, 3), dim=1), torch.tensor([0, 1]), torch.tensor([-1, -1]))
    loss = contrastive_loss(q, kp, torch.ones(4, dtype=L), torch.full((4,), MP), torch.arange(4), fdb, fdb)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    # queries but no negative at all (an empty routed bank): l = −log(s+/s+) = 0, no NaN
    q.grad = None
    loss = contrastive_loss(q, kp, torch.ones(4, dtype=L), torch.full((4,), FDP), torch.arange(4), fdb,
                            BankEntries(fdb.features[:0], fdb.labels[:0], fdb.ids[:0]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(q.grad).all()


def test_only_the_own_location_is_excluded_and_its_row_stays_finite():
    # The bank holds just the query's own teacher pixel: no negative, loss 0, gradient 0.
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    kp = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    fdb = entries([[0.0, 1.0]], [0], [0])
    loss = contrastive_loss(q, kp, torch.tensor([1]), torch.tensor([BDP]), torch.tensor([0]), fdb, empty(),
                            pixel_negatives=False)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(q.grad, torch.zeros_like(q))


# ---------------------------------------------------------------- vectorised == per-patch reference

def blobs(b, h, w, gen):
    """Smooth random 0/1 maps, so FDPs, BDPs and MPs all occur."""
    x = F.avg_pool2d(torch.randn(b, 1, h + 4, w + 4, generator=gen), 5, 1).squeeze(1)
    return (x > 0.0).long()


@pytest.mark.parametrize("pixel_negatives,patch_routing", list(itertools.product([False, True], repeat=2)))
def test_vectorised_equals_reference(pixel_negatives, patch_routing):
    gen = torch.Generator().manual_seed(7)
    b, d, h, w, p = 2, 6, 12, 12, 3
    fdb, bdb, previous = FeatureBank(2), FeatureBank(2), []
    for _step in range(3):  # the bank fills up: current only, then current + previous
        q = torch.randn(b, d, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
        t = torch.randn(b, d, h, w, generator=gen, dtype=torch.float64)
        y_q, y_t = blobs(b, h, w, gen), blobs(b, h, w, gen)
        cat_q, patch_q = pixel_categories(y_q, p)
        cat_t, _ = pixel_categories(y_t, p)
        assert {FDP, BDP, MP} <= set(cat_q.tolist())
        k = flatten_pixels(t)
        push_banks(fdb, bdb, k, y_t.flatten(), cat_t)
        fast = contrastive_loss(flatten_pixels(q), k, y_q.flatten(), cat_q, patch_q, fdb.keys(d, k),
                                bdb.keys(d, k), tau=0.1, pixel_negatives=pixel_negatives,
                                patch_routing=patch_routing, chunk=37)  # chunks cut through groups
        ref = reference_l_contr(q, t, y_q, y_t, previous[-1:], patches_per_side=p, tau=0.1,
                                pixel_negatives=pixel_negatives, patch_routing=patch_routing)
        g_fast, = torch.autograd.grad(fast, q)
        g_ref, = torch.autograd.grad(ref, q)
        assert abs(fast.item() - ref.item()) <= 1e-5 * abs(ref.item())
        assert (g_fast - g_ref).abs().max() <= 1e-5 * g_ref.abs().max()
        previous.append((t, y_t))


def test_vectorised_equals_reference_in_float32_and_at_small_tau():
    gen = torch.Generator().manual_seed(3)
    b, d, h, w, p = 2, 8, 8, 8, 2
    q = torch.randn(b, d, h, w, generator=gen, dtype=torch.float64)
    t = torch.randn(b, d, h, w, generator=gen, dtype=torch.float64)
    y_q, y_t = blobs(b, h, w, gen), blobs(b, h, w, gen)
    cat_q, patch_q = pixel_categories(y_q, p)
    cat_t, _ = pixel_categories(y_t, p)
    for dtype, tau in ((torch.float32, 0.1), (torch.float64, 0.02)):  # 0.02: the row-max path
        fdb, bdb = FeatureBank(2), FeatureBank(2)
        k = flatten_pixels(t.to(dtype))
        push_banks(fdb, bdb, k, y_t.flatten(), cat_t)
        fast = contrastive_loss(flatten_pixels(q.to(dtype)), k, y_q.flatten(), cat_q, patch_q,
                                fdb.keys(d, k), bdb.keys(d, k), tau=tau)
        ref = reference_l_contr(q, t, y_q, y_t, patches_per_side=p, tau=tau)
        assert fast.dtype == dtype
        assert abs(fast.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_half_precision_inputs_under_autocast_are_computed_in_float32():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(6, 4, generator=gen)
    kp = torch.randn(6, 4, generator=gen)
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    cat = torch.tensor([FDP] * 3 + [BDP] * 3)
    patch = torch.tensor([0] * 3 + [1] * 3)
    fdb, bdb = FeatureBank(), FeatureBank()
    push_banks(fdb, bdb, kp.bfloat16(), labels, cat)
    assert fdb.batches[0].features.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = contrastive_loss(q.bfloat16(), kp.bfloat16(), labels, cat, patch, fdb.keys(4, q),
                               bdb.keys(4, q))
    exact = contrastive_loss(q.bfloat16().float(), kp.bfloat16().float(), labels, cat, patch, fdb.keys(4, q),
                             bdb.keys(4, q))
    assert low.dtype == torch.float32 and low.item() == pytest.approx(exact.item(), rel=1e-6)


def test_negative_logsumexp_gradient():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    keys = F.normalize(torch.randn(6, 4, generator=gen, dtype=torch.float64), dim=1)
    self_col = torch.tensor([2, -1, 0, 5, -1])
    for bound in (None, 10.0):
        assert torch.autograd.gradcheck(lambda x, bound=bound: _NegativeLogSumExp.apply(x, keys, self_col, bound), (q,))
    lse = _NegativeLogSumExp.apply(q, keys, self_col, None)
    sims = q.detach() @ keys.T
    sims[torch.arange(5)[self_col >= 0], self_col[self_col >= 0]] = -math.inf
    assert torch.allclose(lse, torch.logsumexp(sims, 1))


# ---------------------------------------------------------------- L_cons, L_ent

def test_consistency_loss_by_hand():
    # 1 image, 2 pixels. Teacher argmax: pixel 0 -> class 1, pixel 1 -> class 0.
    teacher = torch.tensor([[[[0.0, 3.0]], [[2.0, 1.0]]]])  # (1, 2, 1, 2)
    student = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])
    ce0 = -math.log(math.exp(0.0) / (math.exp(1.0) + math.exp(0.0)))  # target 1, logits (1, 0)
    ce1 = -math.log(math.exp(0.0) / (math.exp(0.0) + math.exp(2.0)))  # target 0, logits (0, 2)
    assert consistency_loss(student, teacher).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)


def test_entropy_loss_by_hand():
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3.0)]]]])  # p = (½, ½) and (¼, ¾)
    h1 = math.log(2.0)
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_loss(logits).item() == pytest.approx((h1 + h2) / 2, rel=1e-6)


# ---------------------------------------------------------------- banks

def test_bank_holds_exactly_the_current_and_previous_batch_without_graph():
    bank = FeatureBank(2)
    feats = [torch.randn(3 + i, 4, requires_grad=True) for i in range(3)]
    for i, f in enumerate(feats):
        bank.push(f * 2.0, torch.full((3 + i,), i), torch.arange(3 + i))
    assert [len(e.labels) for e in bank.batches] == [4, 5] and len(bank) == 9
    keys = bank.keys(4, feats[0])
    assert not keys.features.requires_grad and keys.features.grad_fn is None
    assert torch.allclose(keys.features, F.normalize(torch.cat(feats[1:]).detach(), dim=1))
    assert keys.labels.tolist() == [1] * 4 + [2] * 5
    assert keys.ids.tolist() == [-1] * 4 + list(range(5))  # only the current batch owns positions


def test_push_banks_routes_fdp_and_bdp_pixels_and_drops_mp():
    fdb, bdb = FeatureBank(), FeatureBank()
    proj = torch.arange(5.0)[:, None] * torch.ones(1, 2) + torch.tensor([1.0, 0.0])
    push_banks(fdb, bdb, proj, torch.tensor([1, 0, 1, 1, 0]), torch.tensor([FDP, BDP, MP, FDP, BDP]))
    assert fdb.batches[0].ids.tolist() == [0, 3] and fdb.batches[0].labels.tolist() == [1, 1]
    assert bdb.batches[0].ids.tolist() == [1, 4] and bdb.batches[0].labels.tolist() == [0, 0]


# ---------------------------------------------------------------- the method and its schemes

class PatternNet(nn.Module):
    """A stand-in segmenter: the logits follow the red channel, so pseudo labels and FDP/BDP
    patches are set by the input; projections are a 1×1 conv of the 1/8-pooled image."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Conv2d(3, 2, 1)
        self.proj = nn.Conv2d(3, 8, 1)
        with torch.no_grad():
            self.cls.weight.zero_()
            self.cls.bias.copy_(torch.tensor([0.0, -2.0]))
            self.cls.weight[1, 0] = 4.0  # foreground where red > 0.5

    def forward(self, x, project=True):
        proj = self.proj(F.avg_pool2d(x, 8)) if project else None
        return SegOutput(x, self.cls(x), proj)


def pattern_batch(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(2, 3, size, size, generator=g) * 0.3
    img[:, 0, :, : size // 2] += 0.7  # left half foreground: FDPs; right half: BDPs
    strong = img + 0.05 * torch.randn(img.shape, generator=g)
    mask = (img[:, 0] > 0.5).long()
    return Batch(img, mask, {"weak": img, "strong": strong})


def make(name, make_net=PatternNet, **hp):
    cls = METHODS.get(name)
    ctx = FakeContext(make_net)
    return cls(ctx, make_hparams(cls.Hparams, hp)), ctx


TABLE2 = {  # (L_contr, J, FDB/BDB routing, L_cons, L_ent), paper Table 2 as issue 4 lists it
    "cdcl-scheme1": (True, False, False, False, False),
    "cdcl-scheme2": (True, True, False, False, False),
    "cdcl-scheme3": (True, True, True, False, False),
    "cdcl-scheme4": (True, True, True, True, False),
    "cdcl-scheme5": (True, True, True, False, True),
    "cdcl-scheme6": (False, None, None, True, True),
    "cdcl": (True, True, True, True, True),
}


def test_all_variants_are_registered_with_paper_defaults():
    assert set(TABLE2) <= set(METHODS.names())
    for name in TABLE2:
        cls = METHODS.get(name)
        assert cls.name == name and issubclass(cls, cdcl_mod.CDCL) and cls.unlabeled_views == "weak_strong"
    hp = cdcl_mod.CDCLHparams()
    assert (hp.w_sup, hp.w_contr, hp.w_ent, hp.w_cons, hp.tau) == (1.0, 0.1, 0.01, 1.0, 0.1)
    assert (hp.patches_per_side, hp.fdp_threshold, hp.bdp_threshold, hp.bank_batches) == (8, 0.7, 0.3, 2)


@pytest.mark.parametrize("name", list(TABLE2))
def test_each_scheme_switches_exactly_its_parts(name, monkeypatch):
    contr, j, routing, cons, ent = TABLE2[name]
    calls = []
    real = cdcl_mod.contrastive_loss

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(cdcl_mod, "contrastive_loss", spy)
    method, _ = make(name)
    out = method.training_step(pattern_batch(), ACTIVE)
    assert set(out) == {"loss", "L_sup", "L_contr", "L_cons", "L_ent"}
    assert (out["L_contr"].item() != 0.0) == contr
    assert (out["L_cons"].item() != 0.0) == cons
    assert (out["L_ent"].item() != 0.0) == ent
    assert len(calls) == int(contr)
    if contr:
        assert calls[0]["pixel_negatives"] == j and calls[0]["patch_routing"] == routing
    w_cons = math.exp(-5 * (1 - 6 / 10) ** 2)  # epoch 6 of 0..10
    expected = (out["L_sup"] + 0.1 * out["L_contr"] + w_cons * out["L_cons"] + 0.01 * out["L_ent"]).item()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_before_unsup_start_only_l_sup_and_no_bank_update():
    method, _ = make("cdcl")
    batch = pattern_batch()
    out = method.training_step(batch, INACTIVE)
    assert out["L_contr"].item() == out["L_cons"].item() == out["L_ent"].item() == 0.0
    assert out["loss"].item() == pytest.approx(F.cross_entropy(method.student(batch.labeled_image).logits,
                                                               batch.labeled_mask).item(), rel=1e-6)
    assert len(method.fdb) == len(method.bdb) == 0


def test_method_banks_hold_teacher_pixels_of_the_last_two_batches():
    method, _ = make("cdcl", query_chunk=7)
    batches = [pattern_batch(seed) for seed in range(3)]
    for b in batches:
        method.training_step(b, ACTIVE)
    assert len(method.fdb.batches) == len(method.bdb.batches) == 2
    for k, b in enumerate(batches[1:]):  # previous batch first, then the current one
        proj = flatten_pixels(method.teacher(b.unlabeled["weak"]).proj).detach()
        fdp = torch.zeros(len(proj), dtype=torch.bool)
        fdp.view(2, 8, 8)[:, :, :4] = True  # left half of each 8×8 map: FDPs (1 cell each)
        assert torch.allclose(method.fdb.batches[k].features, F.normalize(proj[fdp], dim=1))
        assert torch.allclose(method.bdb.batches[k].features, F.normalize(proj[~fdp], dim=1))
        assert not method.fdb.batches[k].features.requires_grad


def test_banks_survive_a_state_dict_round_trip():
    method, _ = make("cdcl")
    for seed in range(2):
        method.training_step(pattern_batch(seed), ACTIVE)
    clone, _ = make("cdcl")
    clone.load_state_dict(method.state_dict())
    for a, b in ((method.fdb, clone.fdb), (method.bdb, clone.bdb)):
        assert len(a.batches) == len(b.batches) == 2
        for x, y in zip(a.batches, b.batches):
            assert torch.equal(x.features, y.features) and torch.equal(x.labels, y.labels)
            assert torch.equal(x.ids, y.ids)


def test_bad_hparams_are_clear_errors():
    with pytest.raises(ConfigError, match="bdp_threshold"):
        make("cdcl", bdp_threshold=0.8)
    with pytest.raises(ConfigError, match="tau"):
        make("cdcl", tau=0.0)


def test_one_full_step_with_the_tiny_backbone_changes_the_student():
    torch.manual_seed(0)
    method, ctx = make("cdcl", make_net=lambda: build_model("tiny", "none"))
    method.train()
    before = [p.detach().clone() for p in method.student.parameters()]
    teacher_before = [p.detach().clone() for p in method.teacher.parameters()]
    batch = pattern_batch(size=64)
    out = method.training_step(batch, ACTIVE)
    assert all(torch.isfinite(v) for v in out.values())
    assert out["L_cons"].item() > 0 and out["L_ent"].item() > 0
    out["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    ctx.optimizers[0].step()
    assert any(not torch.equal(a, p) for a, p in zip(before, method.student.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(teacher_before, method.teacher.parameters()))
    assert not method.teacher.training  # the teacher's dropout stays off
