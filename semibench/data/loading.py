"""Reading prepared samples for training and evaluation: preprocessing, split loading, loaders."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from semibench.data.prepared import PreparedDataset, Sample
from semibench.errors import ConfigError, DataError
from semibench.layout import split_path
from semibench.train.execution import to_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(image: np.ndarray, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """HxWx3 uint8 -> (3, size, size) float, bilinearly resized (antialiased) and normalised
    with ImageNet statistics. Training and evaluation both go through here. With ``device`` the
    uint8 image is moved there first and resized there (the same operations as on the CPU)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"expected an HxWx3 image, got shape {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image))
    if device is not None:
        x = to_device(x, torch.device(device))
    x = x.permute(2, 0, 1).float().div_(255.0)
    if x.shape[1:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    if x.device.type != "cpu":
        mean, std = to_device(mean, x.device), to_device(std, x.device)
    return (x - mean) / std


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """HxW {0,1} -> (size, size) long, nearest neighbour."""
    m = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    return F.interpolate(m, size=(size, size), mode="nearest")[0, 0].long()


def load_split(splits_dir: str | Path, dataset: str, seed: int) -> dict:
    path = split_path(dataset, seed, splits_dir)
    if not path.exists():
        raise DataError(f"split file {path} not found: run `semibench split --dataset {dataset} --seed {seed}`")
    return json.loads(path.read_text())


def labeled_ids(split: dict, ratio: int) -> list[str]:
    """The labeled ids of 1/``ratio`` (stored in the split file, or derived nested in it:
    :func:`semibench.data.splits.labeled_subset`)."""
    from semibench.data.splits import labeled_subset
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ConfigError(f"label ratio must be an integer k >= 1 (1/k labeled), got {ratio!r}")
    return labeled_subset(split, ratio)


# ---------------------------------------------------------------------------- training data
#
# Training samples are resized once to the input size and kept in memory as uint8 tensors
# (DSB's 469 training images at 320² take 144 MB); augmentation then runs batched on the
# training device (semibench.data.augment), so no loader workers are needed (hence no
# ``train.num_workers`` key).
#
# Determinism: which samples a step sees and the seeds of its augmentation depend only on
# (seed, epoch, iteration), never on earlier steps, so a resumed run replays exactly.

STREAM_LABELED, STREAM_UNLABELED = 1, 2  # independent random streams of one run


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers, identical on every machine and Python version
    (numpy's SeedSequence hashing; no ``hash()``)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) >> 1


def make_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed`."""
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


def resize_image_uint8(image: np.ndarray, size: int) -> torch.Tensor:
    """HxWx3 uint8 -> (3, size, size) uint8, resized as :func:`preprocess` does (antialiased
    bilinear), rounded back to uint8 for a compact in-memory cache."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"expected an HxWx3 image, got shape {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if x.shape[1:] == (size, size):
        return x.contiguous()
    y = F.interpolate(x.float()[None], size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True)[0]
    return y.round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class ImageSet:
    ids: list[str]
    images: torch.Tensor  # (N, 3, S, S) uint8
    masks: torch.Tensor  # (N, S, S) uint8, 0/1

    def __len__(self) -> int:
        return len(self.ids)


def load_image_set(prepared: PreparedDataset, ids: list[str], size: int, desc: str = "") -> ImageSet:
    images = torch.empty((len(ids), 3, size, size), dtype=torch.uint8)
    masks = torch.empty((len(ids), size, size), dtype=torch.uint8)
    for i, sid in enumerate(tqdm(ids, desc=f"loading {desc}".strip(), leave=False, disable=len(ids) < 50)):
        s = prepared.load(sid)
        images[i] = resize_image_uint8(s.image, size)
        masks[i] = resize_mask(s.mask, size).to(torch.uint8)
    return ImageSet(list(ids), images, masks)


@dataclass
class TrainData:
    labeled: ImageSet
    unlabeled: ImageSet  # empty when the method uses labeled data only (ids still listed)
    val: ImageSet
    unlabeled_ids: list[str]
    # the val samples at their original size: model selection scores them exactly as the test
    # set is scored (semibench.evaluate.score.predict_counts), not at the input size
    val_samples: list[Sample] = field(default_factory=list)


class SampleCache:
    """A :class:`PreparedDataset` look-alike (``load(id)``) over samples kept in memory."""

    def __init__(self, samples: list[Sample]):
        self.by_id = {s.id: s for s in samples}

    def load(self, id: str) -> Sample:
        return self.by_id[id]


def split_ids(split: dict, ratio: int) -> tuple[list[str], list[str], list[str]]:
    """(labeled, unlabeled, val) ids: labeled from ``split["labeled"][str(ratio)]``, unlabeled
    = train minus labeled in the split's train order, then the split's ``unlabeled`` pool (images
    without masks, a folder dataset's), at every ratio."""
    labeled = labeled_ids(split, ratio)
    chosen = set(labeled)
    unlabeled = [i for i in split["train"] if i not in chosen] + list(split.get("unlabeled") or [])
    if not labeled:
        raise DataError(f"split of {split.get('dataset')} seed {split.get('seed')} has no labeled samples at 1/{ratio}")
    if not split.get("val"):
        raise DataError(f"split of {split.get('dataset')} seed {split.get('seed')} has no val samples")
    return labeled, unlabeled, list(split["val"])


def load_train_data(data_dir: str | Path, splits_dir: str | Path, dataset: str, seed: int,
                    ratio: int, size: int, with_unlabeled: bool = True) -> TrainData:
    """Read the split and the prepared samples of one run into memory at ``size``."""
    split = load_split(splits_dir, dataset, seed)
    prepared = PreparedDataset(Path(data_dir) / "prepared" / dataset)
    lab, unlab, val = split_ids(split, ratio)
    return TrainData(
        labeled=load_image_set(prepared, lab, size, "labeled"),
        unlabeled=load_image_set(prepared, unlab if with_unlabeled else [], size, "unlabeled"),
        val=load_image_set(prepared, val, size, "val"),
        unlabeled_ids=unlab,
        val_samples=[prepared.load(i) for i in val],
    )


def iterations_per_epoch(n_labeled: int, n_unlabeled: int, batch_labeled: int,
                         batch_unlabeled: int, override: int | None = None) -> int:
    """One epoch = one pass over the unlabeled set (the last batch topped up from the next
    shuffle), also for methods that ignore unlabeled data (SupOnly): the same number of steps as
    the semi-supervised runs at that ratio, for a fair comparison. With no unlabeled data
    (FullSup, ratio 1): one pass over the labeled set."""
    if override is not None:
        if override < 1:
            raise ConfigError(f"iters_per_epoch must be >= 1, got {override}")
        return int(override)
    if n_unlabeled > 0:
        return math.ceil(n_unlabeled / batch_unlabeled)
    return math.ceil(n_labeled / batch_labeled)


class BatchSchedule:
    """Sample indices of every step, as a pure function of (seed, epoch, iteration).

    Labeled: one endless stream of shuffles (shuffle k seeded by (seed, labeled, k)), so the
    labeled loader cycles across epochs. Unlabeled: per epoch a stream of shuffles seeded by
    (seed, unlabeled, epoch, r); an epoch reads its first ``iterations_per_epoch * batch`` entries."""

    def __init__(self, n_labeled: int, n_unlabeled: int, batch_labeled: int, batch_unlabeled: int,
                 seed: int, iterations_per_epoch: int):
        if n_labeled < 1:
            raise DataError("no labeled training samples")
        self.n_l, self.n_u = n_labeled, n_unlabeled
        self.b_l, self.b_u = batch_labeled, batch_unlabeled
        self.seed, self.iterations_per_epoch = seed, iterations_per_epoch
        self._perms: dict[tuple, torch.Tensor] = {}

    def _perm(self, n: int, *key: int) -> torch.Tensor:
        if key not in self._perms:
            if len(self._perms) > 64:  # bounded cache; values are recomputable
                self._perms.clear()
            self._perms[key] = torch.randperm(n, generator=make_generator(self.seed, *key))
        return self._perms[key]

    def _take(self, n: int, start: int, count: int, *key: int) -> torch.Tensor:
        out = []
        for q in range(start, start + count):
            out.append(int(self._perm(n, *key, q // n)[q % n]))
        return torch.tensor(out, dtype=torch.long)

    def labeled(self, epoch: int, iteration: int) -> torch.Tensor:
        start = (epoch * self.iterations_per_epoch + iteration) * self.b_l
        return self._take(self.n_l, start, self.b_l, STREAM_LABELED)

    def unlabeled(self, epoch: int, iteration: int) -> torch.Tensor:
        if self.n_u < 1:
            raise DataError("no unlabeled training samples")
        return self._take(self.n_u, iteration * self.b_u, self.b_u, STREAM_UNLABELED, epoch)
