"""Reading prepared samples for training and evaluation: preprocessing, split loading, loaders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """HxWx3 uint8 -> (3, size, size) float, bilinearly resized (antialiased) and normalised
    with ImageNet statistics. Training and evaluation both go through here."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"expected an HxWx3 image, got shape {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    if x.shape[1:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """HxW {0,1} -> (size, size) long, nearest neighbour."""
    m = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    return F.interpolate(m, size=(size, size), mode="nearest")[0, 0].long()


def load_split(splits_dir: str | Path, dataset: str, seed: int) -> dict:
    path = Path(splits_dir) / dataset / f"seed{seed}.json"
    if not path.exists():
        raise DataError(f"split file {path} not found: run `semibench split --dataset {dataset} --seed {seed}`")
    return json.loads(path.read_text())


def labeled_ids(split: dict, ratio: int) -> list[str]:
    key = str(ratio)
    if key not in split["labeled"]:
        raise ConfigError(f"unknown label ratio 1/{ratio}; known: "
                          + ", ".join(f"1/{k}" for k in sorted(split["labeled"], key=int)))
    return list(split["labeled"][key])
