"""CDCL: cross-patch dense contrastive learning (Wu et al., CVPR 2022), with the ablation
Schemes 1–6 of the paper's Table 2 as named variants of one class.

A mean teacher: the student sees the strong view of an unlabeled image, the EMA teacher (the
engine's, α = 0.999, always in eval mode: no dropout) the pixel-aligned weak view. The objective

    L = w_sup·L_sup + w_contr·L_contr + w_cons(t)·L_cons + w_ent·L_ent,

w_sup = 1, w_contr = 0.1, w_ent = 0.01, w_cons(t) = exp(−5(1 − t/T)²) over the epochs; the three
unsupervised terms only once the engine's ``unsup_active`` is on (epoch 6). The loss math, with
the paper's equation numbers, is in ``methods/_cdcl_losses.py``.

Choices where the paper is silent (each also commented where it is made):
- Pseudo labels on the projection grid: the softmax is averaged over each 8×8 input block (one
  cell of the 1/8 map), then argmax. The *student's* labels on the strong view (eq. 3) give the
  queries' FS, category and J label; the *teacher's* on the weak view (eq. 4) give the bank
  entries' FS, category and label (the split of the official release).
- Banks: FDB/BDB hold the teacher's projections (detached, unit-norm) of the FDP/BDP pixels of
  the current and the previous batch (``bank_batches`` = 2): keys and positives then come from
  the same (teacher) network, as in MoCo; MP pixels are in no bank. The official release also
  stored the student's features; we do not (they would be stale keys with a graph).
- Queries: every pixel of every student FDP and BDP (MPs are not queries). The key at the
  query's own location is its positive k+, never one of its negatives.
- One student pass for the labeled and one for the strong views (as the official release), so
  BatchNorm statistics are per kind of batch.

Scheme switches (Table 2; L_sup is always on):

    variant        L_contr  J (pixel negatives)  FDB/BDB routing  L_cons  L_ent
    cdcl-scheme1   on       off (J ≡ 1)          off (merged)     off     off   random sampling
    cdcl-scheme2   on       on                   off (merged)     off     off   pixel sampling
    cdcl-scheme3   on       on                   on               off     off   pixel-patch sampling
    cdcl-scheme4   on       on                   on               on      off   scheme 3 + L_cons
    cdcl-scheme5   on       on                   on               off     on    scheme 3 + L_ent
    cdcl-scheme6   off      -                    -                on      on    L_cons + L_ent only
    cdcl           on       on                   on               on      on    all terms

Scheme 5 adds L_ent to Scheme 3 (not to Scheme 4, which would be the full method). The merged
bank of Schemes 1–2 is FDB ∪ BDB: the same stored pixels, only the routing differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from semibench.errors import ConfigError
from semibench.losses import cross_entropy
from semibench.method import Batch, Method, MethodContext, StepInfo
from semibench.registry import register_method
from semibench.train.schedules import gaussian_rampup

from ._cdcl_losses import (
    BankEntries,
    FeatureBank,
    consistency_loss,
    contrastive_loss,
    entropy_loss,
    flatten_pixels,
    pixel_categories,
    pseudo_labels,
    push_banks,
)


@dataclass
class CDCLHparams:
    """Paper defaults (Sec. 4.2); τ from the official code."""

    w_sup: float = 1.0
    w_contr: float = 0.1
    w_cons: float = 1.0  # value the Gaussian ramp-up reaches at the last epoch
    w_ent: float = 0.01
    tau: float = 0.1
    patches_per_side: int = 8  # 8×8 patches per image
    fdp_threshold: float = 0.7  # FS ≥ 0.7: FDP
    bdp_threshold: float = 0.3  # FS ≤ 0.3: BDP
    bank_batches: int = 2  # the current and the previous batch
    query_chunk: int = 2048  # queries per similarity block: memory ~ chunk × bank size

    def __post_init__(self):
        if not 0.0 <= self.bdp_threshold < self.fdp_threshold <= 1.0:
            raise ConfigError(f"CDCL needs 0 ≤ bdp_threshold < fdp_threshold ≤ 1, got "
                              f"{self.bdp_threshold} and {self.fdp_threshold}")
        if self.tau <= 0:
            raise ConfigError(f"CDCL temperature tau must be > 0, got {self.tau}")
        if self.patches_per_side < 1 or self.query_chunk < 1:
            raise ConfigError("CDCL patches_per_side and query_chunk must be ≥ 1")


@dataclass(frozen=True)
class Scheme:
    """Which parts of CDCL are on (see the module docstring's table)."""

    contr: bool  # L_contr
    pixel_negatives: bool  # J(q, k−) = 1{ỹ_q ≠ ỹ_k−} (eq. 9); off: J ≡ 1
    patch_routing: bool  # FDP queries meet the BDB only and BDP queries the FDB; off: merged bank
    cons: bool  # L_cons
    ent: bool  # L_ent


SCHEMES: dict[str, Scheme] = {
    "cdcl-scheme1": Scheme(contr=True, pixel_negatives=False, patch_routing=False, cons=False, ent=False),
    "cdcl-scheme2": Scheme(contr=True, pixel_negatives=True, patch_routing=False, cons=False, ent=False),
    "cdcl-scheme3": Scheme(contr=True, pixel_negatives=True, patch_routing=True, cons=False, ent=False),
    "cdcl-scheme4": Scheme(contr=True, pixel_negatives=True, patch_routing=True, cons=True, ent=False),
    "cdcl-scheme5": Scheme(contr=True, pixel_negatives=True, patch_routing=True, cons=False, ent=True),
    "cdcl-scheme6": Scheme(contr=False, pixel_negatives=False, patch_routing=False, cons=True, ent=True),
    "cdcl": Scheme(contr=True, pixel_negatives=True, patch_routing=True, cons=True, ent=True),
}


class CDCL(Method):
    display_name = "CDCL"
    report_rank = 90
    in_paper = True
    colour = "#d62728"
    Hparams: ClassVar[type] = CDCLHparams
    unlabeled_views: ClassVar[str | None] = "weak_strong"
    scheme: ClassVar[Scheme] = SCHEMES["cdcl"]

    def __init__(self, ctx: MethodContext, hp: CDCLHparams | None = None):
        super().__init__(hp)
        self.student = ctx.build_segmenter()
        self.teacher = ctx.ema_of(self.student)
        ctx.add_optimizer(self.student.parameters())
        self.fdb = FeatureBank(self.hp.bank_batches)  # FDB: pixels of foreground-dominant patches
        self.bdb = FeatureBank(self.hp.bank_batches)  # BDB: pixels of background-dominant patches

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, torch.Tensor]:
        hp, sc = self.hp, self.scheme
        out_l = self.student(batch.labeled_image, project=False)
        L_sup = cross_entropy(out_l.logits, batch.labeled_mask)
        zero = L_sup.new_zeros(())
        L_contr = L_cons = L_ent = zero
        if step.unsup_active and (sc.contr or sc.cons or sc.ent):
            out_s = self.student(batch.unlabeled["strong"], project=sc.contr)
            with torch.no_grad():
                out_t = self.teacher(batch.unlabeled["weak"], project=sc.contr)
            if sc.contr:
                L_contr = self.l_contr(out_s.proj, out_s.logits, out_t.proj, out_t.logits)
            if sc.cons:
                L_cons = consistency_loss(out_s.logits, out_t.logits)  # eq. 13–14
            if sc.ent:
                L_ent = entropy_loss(out_s.logits)  # eq. 15
        # w_cons(t) = exp(−5(1 − t/T)²) with t/T the fraction of epochs done
        w_cons = hp.w_cons * gaussian_rampup(step.progress, 1.0)
        loss = hp.w_sup * L_sup + hp.w_contr * L_contr + w_cons * L_cons + hp.w_ent * L_ent
        return {"loss": loss, "L_sup": L_sup.detach(), "L_contr": L_contr.detach(),
                "L_cons": L_cons.detach(), "L_ent": L_ent.detach()}

    def l_contr(self, proj_s: torch.Tensor, logits_s: torch.Tensor, proj_t: torch.Tensor,
                logits_t: torch.Tensor) -> torch.Tensor:
        """L_contr for one unlabeled batch; pushes the teacher's FDP/BDP pixels into the banks
        first, so the negatives come from the current and the previous batch."""
        hp, sc = self.hp, self.scheme
        grid = tuple(proj_s.shape[-2:])
        y_s = pseudo_labels(logits_s, grid)  # eq. 3: student, strong view, on the 1/8 grid
        y_t = pseudo_labels(logits_t, grid)  # eq. 4: teacher, weak view, on the 1/8 grid
        cat_s, patch_s = pixel_categories(y_s, hp.patches_per_side, hp.fdp_threshold, hp.bdp_threshold)
        cat_t, _ = pixel_categories(y_t, hp.patches_per_side, hp.fdp_threshold, hp.bdp_threshold)
        k = flatten_pixels(proj_t)
        push_banks(self.fdb, self.bdb, k, y_t.flatten(), cat_t)
        return contrastive_loss(flatten_pixels(proj_s), k, y_s.flatten(), cat_s, patch_s,
                                self.fdb.keys(k.shape[1], k), self.bdb.keys(k.shape[1], k), tau=hp.tau,
                                pixel_negatives=sc.pixel_negatives, patch_routing=sc.patch_routing,
                                chunk=hp.query_chunk)

    # The banks are training state: saved in the method's state dict, so a resumed run sees the
    # same negatives as an uninterrupted one.
    def get_extra_state(self) -> dict:
        return {name: [{"features": e.features.cpu(), "labels": e.labels.cpu(), "ids": e.ids.cpu()}
                       for e in bank.batches] for name, bank in (("FDB", self.fdb), ("BDB", self.bdb))}

    def set_extra_state(self, state: dict) -> None:
        device = next(self.student.parameters()).device
        for name, bank in (("FDB", self.fdb), ("BDB", self.bdb)):
            bank.batches.clear()
            for e in state.get(name, []):
                bank.batches.append(BankEntries(e["features"].to(device), e["labels"].to(device),
                                                e["ids"].to(device)))


register_method("cdcl")(CDCL)


# The ablation names and how the report shows them (one green ramp: variants of one method), as
# semibench.registry reads them from this file without importing it (the loop below registers
# them with these attributes; the registry checks on import that both agree).
REGISTERED_NAMES = {
    "cdcl-scheme1": {"display_name": "Scheme.1", "report_rank": 81, "in_paper": True, "colour": "#bce395"},
    "cdcl-scheme2": {"display_name": "Scheme.2", "report_rank": 82, "in_paper": True, "colour": "#90d083"},
    "cdcl-scheme3": {"display_name": "Scheme.3", "report_rank": 83, "in_paper": True, "colour": "#5fba6c"},
    "cdcl-scheme4": {"display_name": "Scheme.4", "report_rank": 84, "in_paper": True, "colour": "#379e54"},
    "cdcl-scheme5": {"display_name": "Scheme.5", "report_rank": 85, "in_paper": True, "colour": "#1a7d40"},
    "cdcl-scheme6": {"display_name": "Scheme.6", "report_rank": 86, "in_paper": True, "colour": "#006435"},
}


def _variant(name: str, scheme: Scheme) -> type:
    cls_name = "CDCL" + name.removeprefix("cdcl-").replace("scheme", "Scheme")
    cls = type(cls_name, (CDCL,), {"name": name, "scheme": scheme, "__module__": __name__,
                                   "__doc__": f"CDCL ablation {name} (Table 2): {scheme}.",
                                   **REGISTERED_NAMES[name]})
    globals()[cls_name] = cls  # importable by name, so instances pickle
    return register_method(name)(cls)


for _name, _scheme in SCHEMES.items():
    if _name != "cdcl":
        _variant(_name, _scheme)
