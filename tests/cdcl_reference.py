"""A straightforward per-patch implementation of CDCL's L_contr (eq. 5–12), written from the
paper's text with loops and explicit exponentials, independent of ``methods/_cdcl_losses.py``.
The vectorised loss must equal it; the benchmark times both."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _category(patch_labels: torch.Tensor, fdp: float, bdp: float) -> str | None:
    fs = patch_labels.sum().item() / patch_labels.numel()  # eq. 5–6: FS = N_f / N
    if fs >= fdp:
        return "FDP"
    if fs <= bdp:
        return "BDP"
    return None  # MP


def _patches(h: int, w: int, p: int):
    ph, pw = h // p, w // p
    for i in range(p):
        for j in range(p):
            yield slice(i * ph, (i + 1) * ph), slice(j * pw, (j + 1) * pw)


def reference_l_contr(q_proj, t_proj, q_labels, t_labels, previous=(), *, patches_per_side=8,
                      tau=0.1, pixel_negatives=True, patch_routing=True, fdp=0.7, bdp=0.3):
    """``q_proj``/``t_proj``: (B, D, h, w) student / teacher projections (h, w divisible by the
    patch count); ``q_labels``/``t_labels``: (B, h, w) their pseudo labels; ``previous``: earlier
    batches still in the bank, as (t_proj, t_labels) pairs. Returns L_contr."""
    b, d, h, w = q_proj.shape
    p = patches_per_side
    # The bank: FDP and BDP pixels of the teacher, previous batches and the current one.
    feats, labels, banks, owner = [], [], [], []
    batches = list(previous) + [(t_proj, t_labels)]
    for n, (tp, tl) in enumerate(batches):
        current = n == len(batches) - 1
        for img in range(tp.shape[0]):
            for ys, xs in _patches(h, w, p):
                cat = _category(tl[img, ys, xs], fdp, bdp)
                if cat is None:
                    continue
                feats.append(tp[img, :, ys, xs].reshape(d, -1).T.detach())
                labels.append(tl[img, ys, xs].reshape(-1))
                banks.append([cat] * labels[-1].numel())
                yy, xx = torch.meshgrid(torch.arange(h)[ys], torch.arange(w)[xs], indexing="ij")
                pixel = (img * h * w + yy * w + xx).reshape(-1)
                owner.append(pixel if current else torch.full_like(pixel, -1))
    if feats:
        keys = F.normalize(torch.cat(feats), dim=1)
        key_labels, key_owner = torch.cat(labels), torch.cat(owner)
        key_bank = [c for cs in banks for c in cs]
    else:
        keys, key_labels, key_owner, key_bank = q_proj.new_zeros(0, d), torch.zeros(0, dtype=torch.long), \
            torch.zeros(0, dtype=torch.long), []
    key_in = {c: torch.tensor([kb == c for kb in key_bank], dtype=torch.bool) for c in ("FDP", "BDP")}

    patch_losses = []
    for img in range(b):
        for ys, xs in _patches(h, w, p):
            cat = _category(q_labels[img, ys, xs], fdp, bdp)
            if cat is None:
                continue  # MPs are not queries
            q = F.normalize(q_proj[img, :, ys, xs].reshape(d, -1).T, dim=1)
            k_pos = F.normalize(t_proj[img, :, ys, xs].reshape(d, -1).T.detach(), dim=1)
            y_q = q_labels[img, ys, xs].reshape(-1)
            yy, xx = torch.meshgrid(torch.arange(h)[ys], torch.arange(w)[xs], indexing="ij")
            q_pixel = (img * h * w + yy * w + xx).reshape(-1)
            s_pos = torch.exp((q * k_pos).sum(1) / tau)  # eq. 8
            s_neg = torch.exp(q @ keys.T / tau)
            mask = torch.ones_like(s_neg)
            if patch_routing:  # FDP queries: BDB keys only; BDP queries: FDB keys only
                mask = mask * key_in["BDP" if cat == "FDP" else "FDP"].to(mask.dtype)[None, :]
            if pixel_negatives:  # eq. 9: J(q, k−) = 1{ỹ_q ≠ ỹ_k−}
                mask = mask * (y_q[:, None] != key_labels[None, :]).to(mask.dtype)
            mask = mask * (q_pixel[:, None] != key_owner[None, :]).to(mask.dtype)  # k+ is no negative
            loss_i = -torch.log(s_pos / (s_pos + (mask * s_neg).sum(1)))  # eq. 7
            patch_losses.append(loss_i.mean())  # eq. 10
    if not patch_losses:
        return q_proj.sum() * 0.0
    return torch.stack(patch_losses).mean()  # eq. 11–12
