"""CDCL's loss math (paper Sec. 3), free of any network: pseudo labels on the projection grid,
foreground scores and patch categories, the two feature banks and the vectorised cross-patch
dense contrastive loss, plus the consistency and entropy terms. Equation numbers are the paper's.

Layout conventions: a projection map is (B, D, h, w) at 1/8 of the input; the 8×8 patch grid
splits it into P×P patches (P = ``patches_per_side``). Per-pixel tensors are flattened in
(b, y, x) order, so pixel ``i`` of the batch is ``b*h*w + y*w + x``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from semibench.errors import ConfigError
from semibench.losses import cross_entropy

BDP, FDP, MP = 0, 1, 2  # background- / foreground-dominant patch, mixed patch


def pseudo_labels(logits: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Eq. 3–4: ỹ = argmax_c p_c with p = softmax(logits), (B, C, H, W) -> (B, H, W) long.

    With ``grid`` = (h, w) of the projection map, p is first averaged over the block of input
    pixels that each grid cell covers (8×8 for the 1/8 map), so the labels live on exactly the
    grid the projections are sliced on (the official release sliced 1/4-grid labels with
    1/8-grid patch sizes)."""
    prob = logits.detach().float().softmax(1)
    if grid is not None and tuple(prob.shape[-2:]) != tuple(grid):
        prob = F.adaptive_avg_pool2d(prob, grid)
    return prob.argmax(1)


def patch_ids(h: int, w: int, patches_per_side: int, device=None) -> torch.Tensor:
    """(h, w) long map of each cell's patch index in [0, P²), row-major over the P×P grid.
    Equal patches when P divides h and w; otherwise sizes differ by at most one cell."""
    p = patches_per_side
    if h < p or w < p:
        raise ConfigError(f"CDCL needs a projection map of at least {p}×{p} cells for {p}×{p} "
                          f"patches, got {h}×{w}; use an input size of at least {8 * p}")
    rows = torch.arange(h, device=device) * p // h
    cols = torch.arange(w, device=device) * p // w
    return rows[:, None] * p + cols[None, :]


def foreground_score(labels: torch.Tensor, patches_per_side: int) -> torch.Tensor:
    """Eq. 5–6: FS = N_f / N for each patch, from (B, h, w) 0/1 pseudo labels -> (B, P²) float64."""
    _, h, w = labels.shape
    ids = patch_ids(h, w, patches_per_side, labels.device).flatten()
    # one-hot sums rather than index_add_/bincount: exact and deterministic on CUDA too
    member = F.one_hot(ids, patches_per_side ** 2).double()  # (h*w, P²)
    n_f = (labels.flatten(1) == 1).double() @ member  # N_f: foreground pixels per patch
    n = member.sum(0)  # N: pixels per patch
    return n_f / n


def patch_category(fs: torch.Tensor, fdp_threshold: float = 0.7,
                   bdp_threshold: float = 0.3) -> torch.Tensor:
    """FDP if FS ≥ 0.7, BDP if FS ≤ 0.3 (both inclusive), MP otherwise. The tolerance keeps
    ratios like 7/10 on the inclusive side whatever their float rounding."""
    tol = 1e-9
    cat = torch.full_like(fs, MP, dtype=torch.long)
    cat[fs <= bdp_threshold + tol] = BDP
    cat[fs >= fdp_threshold - tol] = FDP
    return cat


def pixel_categories(labels: torch.Tensor, patches_per_side: int, fdp_threshold: float = 0.7,
                     bdp_threshold: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's patch category and batch-global patch id, both (B*h*w,) in (b, y, x) order."""
    b, h, w = labels.shape
    fs = foreground_score(labels, patches_per_side)
    cat = patch_category(fs, fdp_threshold, bdp_threshold)  # (B, P²)
    ids = patch_ids(h, w, patches_per_side, labels.device).flatten()  # (h*w,)
    gid = ids[None, :] + torch.arange(b, device=labels.device)[:, None] * patches_per_side ** 2
    return cat.gather(1, ids.expand(b, -1)).flatten(), gid.flatten()


def flatten_pixels(proj: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B*h*w, D) in (b, y, x) order."""
    return proj.permute(0, 2, 3, 1).reshape(-1, proj.shape[1])


@dataclass
class BankEntries:
    """Pixel keys of a feature bank: detached, L2-normalised features (N, D), their pseudo
    labels (N,) and ``ids`` (N,): the pixel's index in the current batch, or -1 for entries of a
    previous batch (they can never be a query's own positive)."""

    features: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor

    @staticmethod
    def cat(parts: list["BankEntries"], dim: int, like: torch.Tensor) -> "BankEntries":
        if not parts:
            return BankEntries(like.new_zeros((0, dim)), torch.zeros(0, dtype=torch.long, device=like.device),
                               torch.zeros(0, dtype=torch.long, device=like.device))
        return BankEntries(torch.cat([p.features for p in parts]), torch.cat([p.labels for p in parts]),
                           torch.cat([p.ids for p in parts]))


class FeatureBank:
    """FDB or BDB: the pixel keys of the FDPs (or BDPs) of the last ``capacity`` batches
    (paper: the current and the previous batch, capacity 2)."""

    def __init__(self, capacity: int = 2):
        if capacity < 1:
            raise ConfigError(f"feature bank capacity must be ≥ 1 batch, got {capacity}")
        self.batches: deque[BankEntries] = deque(maxlen=capacity)

    def push(self, features: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """Store a batch's keys; older batches lose their ids and the oldest beyond capacity goes.
        ``detach`` here, not at the caller: bank entries must never carry a graph (the official
        release stored them with theirs)."""
        for old in self.batches:
            old.ids = torch.full_like(old.ids, -1)
        dtype = torch.promote_types(features.dtype, torch.float32)  # fp16 under AMP -> float32
        self.batches.append(BankEntries(F.normalize(features.detach().to(dtype), dim=1),
                                        labels.detach().long(), ids.detach().long()))

    def keys(self, dim: int, like: torch.Tensor) -> BankEntries:
        return BankEntries.cat(list(self.batches), dim, like)

    def __len__(self) -> int:
        return sum(len(b.labels) for b in self.batches)


def push_banks(fdb: FeatureBank, bdb: FeatureBank, proj_t: torch.Tensor, labels_t: torch.Tensor,
               category_t: torch.Tensor) -> None:
    """Route a batch's (teacher) pixel features to FDB (FDP pixels) and BDB (BDP pixels); MP
    pixels are stored in neither. ``proj_t`` is (N, D), labels and categories (N,)."""
    ids = torch.arange(len(labels_t), device=labels_t.device)
    for bank, cat in ((fdb, FDP), (bdb, BDP)):
        sel = category_t == cat
        bank.push(proj_t[sel], labels_t[sel], ids[sel])


def _zero_self(sim: torch.Tensor, self_col: torch.Tensor) -> None:
    rows = torch.nonzero(self_col >= 0).squeeze(1)
    sim[rows, self_col[rows]] = 0.0


class _NegativeLogSumExp(torch.autograd.Function):
    """lse_i = log Σ_k exp(q_i · keys_k) over every key except column ``self_col[i]`` (the
    query's own location, −1 if absent), for one chunk of queries; gradient for ``q`` only (keys
    are detached bank entries). Nothing of size chunk × keys is kept between forward and
    backward: the backward recomputes the similarities, so memory stays bounded by one chunk."""

    @staticmethod
    def forward(ctx, q, keys, self_col, bound):
        sim = q @ keys.T
        # ``bound`` ≥ every q·k (1/τ for unit vectors) makes exp overflow-free without a max pass;
        # None (very small τ, where exp(−2/τ) could underflow) takes the row maximum instead.
        shift = sim.amax(1, keepdim=True) if bound is None else sim.new_full((len(q), 1), bound)
        sim.sub_(shift).exp_()
        _zero_self(sim, self_col)
        lse = sim.sum(1).log_().add_(shift.squeeze(1))
        ctx.save_for_backward(q, keys, self_col, lse)
        return lse

    @staticmethod
    def backward(ctx, grad):
        q, keys, self_col, lse = ctx.saved_tensors
        finite = torch.isfinite(lse)  # −inf: no negative at all, no gradient
        # d lse / dq = Σ_k p_k k with p_k = exp(q·k − lse), the softmax over the negatives
        p = torch.addmm(torch.where(finite, -lse, 0.0)[:, None], q, keys.T).exp_()
        _zero_self(p, self_col)
        p.mul_((grad * finite)[:, None])
        return p @ keys, None, None, None


def _pixel_losses(q: torch.Tensor, k_pos: torch.Tensor, keys: torch.Tensor, self_col: torch.Tensor,
                  tau: float) -> torch.Tensor:
    """Eq. 7–8 for a chunk of unit-norm queries against the keys that are their negatives:
    l(q) = −log( s+ / (s+ + Σ s−) ) with sim(q, k) = exp(cos(q, k)/τ) (eq. 8), computed as
    softplus(log Σ s− − log s+) so that nothing overflows."""
    q = q / tau
    pos = (q * k_pos).sum(1)  # log s+
    bound = 1.0 / tau if 2.0 / tau < 80.0 else None  # exp(−2/τ) representable in float32
    return F.softplus(_NegativeLogSumExp.apply(q, keys, self_col, bound) - pos)


def contrastive_loss(q: torch.Tensor, k_pos: torch.Tensor, q_labels: torch.Tensor,
                     q_category: torch.Tensor, q_patch: torch.Tensor, fdb: BankEntries,
                     bdb: BankEntries, *, tau: float = 0.1, pixel_negatives: bool = True,
                     patch_routing: bool = True, chunk: int = 2048) -> torch.Tensor:
    """L_contr (eq. 7–12), vectorised over all query pixels of the batch.

    ``q`` (N, D): the student's projections (queries, with gradient); ``k_pos`` (N, D): the
    teacher's at the same locations (positives k+); ``q_labels``, ``q_category``, ``q_patch``
    (N,): each query's pseudo label, patch category and batch-global patch id; ``fdb``, ``bdb``:
    the banks' keys (ids = pixel index in this batch, or -1).

    Negatives of a query: with ``patch_routing`` an FDP query meets BDB keys only and a BDP query
    FDB keys only, else both banks (merged); with ``pixel_negatives`` only keys of another pseudo
    label count (eq. 9, J(q, k−) = 1{ỹ_q ≠ ỹ_k−}), else J ≡ 1. The key at the query's own
    location (its positive k+, when the bank holds it) is never a negative. MP pixels are no
    queries. Queries are grouped by (category, label): every query of a group has the same
    negative set, so each group is a few chunked matrix products against just the selected keys
    instead of a masked product against all of them; ``chunk`` queries at a time bound memory by
    ``chunk`` × keys, in the backward too.
    """
    is_query = q_category != MP
    if not bool(is_query.any()):
        return q.sum() * 0.0  # no FDP/BDP in the batch: L_contr = 0, still on the graph (no 0/0)
    with torch.autocast(q.device.type, enabled=False):  # exp(cos/τ) sums need float32 at least
        dtype = torch.promote_types(q.dtype, torch.float32)
        qi = torch.nonzero(is_query).squeeze(1)
        q_n = F.normalize(q[qi].to(dtype), dim=1)
        k_n = F.normalize(k_pos[qi].detach().to(dtype), dim=1)
        lab, cat = q_labels[qi], q_category[qi]
        merged = None if patch_routing else BankEntries.cat([fdb, bdb], q.shape[1], q_n)
        col_of_pixel = torch.full((len(q),), -1, dtype=torch.long, device=q.device)
        losses, order = [], []
        for c in (FDP, BDP):
            # FDP queries take their negatives from the BDB, BDP queries from the FDB (or one merged bank)
            bank = merged if merged is not None else (bdb if c == FDP else fdb)
            label_values = torch.unique(lab[cat == c]) if pixel_negatives else [None]
            for y in label_values:
                members = torch.nonzero((cat == c) & (lab == y if y is not None else True)).squeeze(1)
                if members.numel() == 0:
                    continue
                keep = bank.labels != y if y is not None else slice(None)  # eq. 9: J(q, k−)
                keys, key_ids = bank.features[keep].to(dtype), bank.ids[keep]
                if keys.shape[0] == 0:  # no negative at all: l = −log(s+/s+) = 0 (on the graph)
                    losses.append(q_n[members, 0] * 0.0)
                    order.append(members)
                    continue
                current = key_ids >= 0  # column of each current-batch pixel among these keys
                col_of_pixel.fill_(-1)
                col_of_pixel[key_ids[current]] = torch.nonzero(current).squeeze(1)
                for start in range(0, members.numel(), chunk):
                    m = members[start:start + chunk]
                    losses.append(_pixel_losses(q_n[m], k_n[m], keys, col_of_pixel[qi[m]], tau))
                    order.append(m)
        pixel_loss = torch.cat(losses)
        patch = q_patch[qi][torch.cat(order)]
        # Eq. 10: a patch's loss is the mean over its pixels; eq. 11–12: L_contr is the mean over
        # the batch's FDPs and BDPs. Together: pixel weight 1 / (pixels in its patch × patches).
        _, inverse, counts = torch.unique(patch, return_inverse=True, return_counts=True)
        weight = 1.0 / (counts[inverse].to(dtype) * counts.numel())
        return (pixel_loss * weight).sum()


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """L_cons (eq. 13–14): cross-entropy of the student's logits on the strong view against the
    teacher's pseudo labels ỹ^t = argmax of its prediction on the weak view, mean over pixels."""
    return cross_entropy(student_logits, pseudo_labels(teacher_logits))


def entropy_loss(student_logits: torch.Tensor) -> torch.Tensor:
    """L_ent (eq. 15): mean over pixels of −Σ_c p_c log p_c of the student's prediction."""
    logp = F.log_softmax(student_logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1).mean()
