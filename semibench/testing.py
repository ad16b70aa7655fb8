"""What a method's tests need, for built-in methods and plugins alike (``semibench check-method``
uses it too): a tiny prepared dataset with a hand-written split, its run config, and
:class:`FakeContext`, the engine's own method context whose segmenters come from a test's
factory (a hand-set linear network, say) instead of the run's model config."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from semibench.config import RunConfig, TrainConfig
from semibench.data.prepared import PreparedWriter
from semibench.layout import split_path
from semibench.train.context import EngineContext

TOY = "toy"


def write_toy_dataset(root: Path, n_train=12, n_val=4, n_test=2, h=40, w=48, seeds=(0,)) -> None:
    """``root/data/prepared/toy`` (random images with bright discs as nuclei) and
    ``root/splits/toy/seed{S}.json`` with labeled subsets for ratios 1, 2, 4."""
    rng = np.random.default_rng(123)
    ids = [f"img{i:02d}" for i in range(n_train + n_val + n_test)]
    yy, xx = np.mgrid[:h, :w]
    with PreparedWriter(root / "data" / "prepared" / TOY, TOY) as writer:
        for sid in ids:
            label = np.zeros((h, w), np.uint16)
            for k in range(1, 4):
                cy, cx, r = rng.integers(6, h - 6), rng.integers(6, w - 6), rng.integers(3, 7)
                label[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
            image = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
            image[label > 0] += np.uint8(150)
            writer.add_image(sid, h, w, 3, "train")
            writer.add_sample(sid, image, label, "train")
        writer.commit()
    train_ids, val, test = ids[:n_train], ids[n_train:n_train + n_val], ids[n_train + n_val:]
    for seed in seeds:
        order = list(np.random.default_rng(seed).permutation(train_ids))
        split = {"dataset": TOY, "seed": seed, "train": train_ids, "val": val, "test": test,
                 "labeled": {"4": order[:3], "2": order[:6], "1": train_ids}}
        path = split_path(TOY, seed, root / "splits")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(split))


def toy_config(root: Path, method: str, ratio: int = 2, seed: int = 0, method_params=None,
               **train_kw) -> RunConfig:
    """A CPU run of ``method`` on :func:`write_toy_dataset`'s data: the tiny backbone at 64²,
    batches of 2 + 2, 3 epochs, unsupervised losses from the second; ``train_kw`` overrides."""
    t = dict(backbone="tiny", weights="none", input_size=64, batch_labeled=2, batch_unlabeled=2,
             epochs=3, unsup_start_epoch=1, eval_batch_size=4)
    t.update(train_kw)
    return RunConfig(dataset=TOY, method=method, ratio=ratio, seed=seed,
                     data_dir=str(root / "data"), splits_dir=str(root / "splits"), device="cpu",
                     train=TrainConfig(**t), method_params=dict(method_params or {}))


class FakeContext(EngineContext):
    """The engine's context (same EMA teachers, optimiser registration and checks) with
    segmenters from ``make_net``."""

    def __init__(self, make_net: Callable[[], nn.Module], lr: float = 1e-3, ema_alpha: float = 0.999):
        cfg = RunConfig(dataset=TOY, method="suponly", ratio=2, seed=0, device="cpu",
                        train=TrainConfig(backbone="tiny", weights="none", lr=lr, ema_alpha=ema_alpha))
        super().__init__(cfg, torch.device("cpu"))
        self.make_net, self.lr = make_net, lr

    def build_segmenter(self) -> nn.Module:
        net = self.make_net()
        self.segmenters.append(net)
        return net


def first_difference(a, b, where: str = "") -> str | None:
    """Where two nested structures of tensors, dicts, lists and plain values first differ (a
    tensor must match in shape, dtype and every bit), as a dotted path; None when identical.
    Checkpoints of an interrupted and an uninterrupted run are compared with it."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))
        return None if same else where or "<root>"
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys(), key=str):
            if k not in a or k not in b:
                return f"{where}.{k}"
            d = first_difference(a[k], b[k], f"{where}.{k}")
            if d is not None:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{where}[{i}]")
            if d is not None:
                return d
        return None
    return None if a == b else where or "<root>"
