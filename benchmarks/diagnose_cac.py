"""Why does CAC lose validation Dice once its unsupervised term starts? Trains one CAC run with
the rules' config (optionally with hyperparameter overrides) and, after every epoch, measures on
the run's own unlabeled images (whose masks the method never sees) what its contrastive term is
fed: the pseudo-labels ŷ and confidences κ at 1/8 that ``CAC._view`` computes (classifier on the
pooled features, dropout active, batch statistics), against the ground truth pooled to 1/8
(majority). Prints one line per epoch and writes them to ``<out>/diagnosis.jsonl``.

    python benchmarks/diagnose_cac.py --config config/config.yaml \\
        --config config/studies/paper-cpu.yaml --dataset dsb2018 --ratio 128 --seed 2 \\
        --out /tmp/cac-s2 [--set weight_unsup=0] [--epochs-max 6]

(the two configs merged as Snakemake merges them: the run's fingerprint is the study run's).

Columns: val_dice (the engine's model selection score), L_s / L1 / L2 (epoch means from the run
log), acc (pseudo-label accuracy over all 1/8 cells), acc_conf (over the cells with κ > γ, the ones
that can be a positive's source), conf_frac (their share), fg_true / fg_pred (nucleus share of
the truth and of ŷ), bg_pred_is_fg (share of background pseudo-labels whose truth is nucleus),
dice_u_eval / dice_u_bnbatch (pooled Dice of the evaluated full-resolution path on the same
images, BatchNorm with running / with batch statistics), grad_s / grad_u / grad_cos (norms of the
gradients L_s and λ·(L1 + L2) send into the extractor, and their cosine, on 4 of the epoch's
batches with the unsupervised term on, whatever the epoch).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from semibench.config import RunConfig, deep_merge, load_workflow_config
from semibench.data.augment import normalise, to_float
from semibench.method import batch_statistics_only
from semibench.train.engine import Trainer, determinism


class StopAfter(Exception):
    pass


@torch.no_grad()
def pseudo_label_quality(method, images_u8: torch.Tensor, masks: torch.Tensor, gamma: float,
                         batch: int = 16) -> dict[str, float]:
    net = method.student
    was = net.training
    net.train()  # CAC computes its pseudo-labels in train mode (dropout active)
    tot = {"n": 0, "right": 0, "conf": 0, "conf_right": 0, "fg_true": 0, "fg_pred": 0, "bg_pred_fg_true": 0,
           "bg_pred": 0}
    state = {k: v.clone() for k, v in net.state_dict().items()}  # BN running stats stay untouched
    for i in range(0, len(images_u8), batch):
        x = normalise(to_float(images_u8[i:i + batch]))
        out = net(x, project=True)
        with batch_statistics_only(net.classifier):
            logits = net.classifier(F.avg_pool2d(out.features, 2, 2)).float()
        conf, pred = logits.softmax(1).max(1)
        h, w = pred.shape[-2:]
        truth = (F.adaptive_avg_pool2d(masks[i:i + batch, None].float(), (h, w))[:, 0] > 0.5).long()
        confident = conf > gamma
        tot["n"] += pred.numel()
        tot["right"] += int((pred == truth).sum())
        tot["conf"] += int(confident.sum())
        tot["conf_right"] += int(((pred == truth) & confident).sum())
        tot["fg_true"] += int(truth.sum())
        tot["fg_pred"] += int(pred.sum())
        tot["bg_pred"] += int((pred == 0).sum())
        tot["bg_pred_fg_true"] += int(((pred == 0) & (truth == 1)).sum())
    net.load_state_dict(state)
    net.train(was)
    n = tot["n"]
    return {"acc": tot["right"] / n, "acc_conf": tot["conf_right"] / max(tot["conf"], 1),
            "conf_frac": tot["conf"] / n, "fg_true": tot["fg_true"] / n, "fg_pred": tot["fg_pred"] / n,
            "bg_pred_is_fg": tot["bg_pred_fg_true"] / max(tot["bg_pred"], 1)}


@torch.no_grad()
def full_res_dice(net, images_u8: torch.Tensor, masks: torch.Tensor, bn_batch_stats: bool,
                  batch: int = 16) -> float:
    """Pooled Dice of the full-resolution prediction (the evaluated path: 1/4 classifier,
    upsampled), dropout off; BatchNorm with its running statistics (as at test time) or, with
    ``bn_batch_stats``, with each batch's own (running statistics left unchanged)."""
    was = net.training
    net.eval()
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bn_batch_stats:
        for m in norms:
            m.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    tp = fp = fn = 0
    for i in range(0, len(images_u8), batch):
        pred = net(normalise(to_float(images_u8[i:i + batch])), project=False).logits.argmax(1)
        truth = masks[i:i + batch].long()
        tp += int(((pred == 1) & (truth == 1)).sum())
        fp += int(((pred == 1) & (truth == 0)).sum())
        fn += int(((pred == 0) & (truth == 1)).sum())
    net.load_state_dict(state)
    net.train(was)
    return 2 * tp / max(2 * tp + fp + fn, 1)


def gradient_balance(tr: Trainer, epoch: int, n_batches: int = 4) -> dict[str, float]:
    """On ``n_batches`` of the epoch's own batches, with the unsupervised term on: the norms of
    the gradients that L_s and λ·(L1 + L2) send into the extractor (encoder + decoder, the part
    both terms train), and their cosine. The method's state (weights, BatchNorm statistics, the
    negatives bank) is restored afterwards, and the global RNG is reseeded by the next epoch."""
    from semibench.losses import supervised_loss
    method, net = tr.method, tr.method.student
    params = [p for n, p in net.named_parameters() if n.startswith(("encoder.", "decoder."))]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    bank = list(method.bank)
    was = method.training
    method.train()
    g_s_sum = g_u_sum = cos_sum = 0.0
    for it in range(n_batches):
        batch = tr.batches.batch(epoch, it)
        info = dataclasses.replace(tr.step_info(epoch, it), unsup_active=True)
        torch.manual_seed(it)
        L_s = supervised_loss(net, batch)
        g_s = torch.autograd.grad(L_s, params)
        torch.manual_seed(it)  # the same dropout draws for L_s inside the full step
        out = method.training_step(batch, info)
        if abs(float(out["L_s"]) - L_s.item()) > 1e-5:
            raise RuntimeError(f"L_s differs between the two passes: {float(out['L_s'])} vs {L_s.item()}")
        g_t = torch.autograd.grad(out["loss"], params)
        vs = torch.cat([g.flatten() for g in g_s])
        vu = torch.cat([(t - g).flatten() for t, g in zip(g_t, g_s)])
        g_s_sum += float(vs.norm())
        g_u_sum += float(vu.norm())
        cos_sum += float(F.cosine_similarity(vs, vu, dim=0))
        method.bank.clear()
        method.bank.extend(bank)
    net.load_state_dict(state)
    method.train(was)
    return {"grad_s": g_s_sum / n_batches, "grad_u": g_u_sum / n_batches, "grad_cos": cos_sum / n_batches}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--dataset", required=True)
    p.add_argument("--ratio", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], help="cac hyperparameter override k=v")
    p.add_argument("--epochs-max", type=int, default=None, help="stop after this many epochs")
    p.add_argument("--n-images", type=int, default=64, help="unlabeled images measured per epoch")
    a = p.parse_args(argv)
    params = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    wf = deep_merge(load_workflow_config(a.config), {"method_params": {"cac": params}})
    cfg = RunConfig.from_workflow(wf, a.dataset, "cac", a.ratio, a.seed, "cpu")
    torch.set_num_threads((wf.get("threads") or {}).get("train") or 1)
    a.out.mkdir(parents=True, exist_ok=True)
    with determinism(cfg.train.deterministic, torch.device("cpu")):
        tr = Trainer(cfg, a.out)
        u = tr.data.unlabeled
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(u), generator=g)[:a.n_images]
        images, masks = u.images[pick], u.masks[pick]
        gamma = tr.method.hp.pos_thresh
        log = (a.out / "diagnosis.jsonl").open("a")

        def on_epoch_end(epoch: int) -> None:
            lines = [json.loads(s) for s in (a.out / "train.jsonl").read_text().splitlines()]
            ep = [r for r in lines if r.get("event") == "epoch" and r["epoch"] == epoch][-1]
            row = {"epoch": epoch, "val_dice": ep["val_dice"], **ep["losses"],
                   **pseudo_label_quality(tr.method, images, masks, gamma),
                   "dice_u_eval": full_res_dice(tr.method.student, images, masks, False),
                   "dice_u_bnbatch": full_res_dice(tr.method.student, images, masks, True),
                   **gradient_balance(tr, epoch)}
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
            if a.epochs_max is not None and epoch + 1 >= a.epochs_max:
                raise StopAfter

        try:
            tr.run(on_epoch_end=on_epoch_end)
        except StopAfter:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
