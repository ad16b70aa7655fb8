"""The prepared on-disk form shared by every dataset.

``<data_dir>/prepared/<dataset>/``::

    manifest.json          dataset, format version, sources (archive name -> sha256),
                           images (source images: id, height, width, n_nuclei, subset),
                           samples (what the model sees: id, image, height, width, n_nuclei,
                           subset, and for tiles row/col/top/left)
    samples/<id>.npz       uncompressed: image uint8 HxWx3 (RGB), label uint16/int32 HxW
                           (0 = background, 1..N one id per nucleus), mask uint8 HxW (label > 0)

Uncompressed .npz keeps reading cheap (no decode step in the data loader) at the cost of disk
(about 6 bytes per pixel). ``subset`` is the publisher's partition: ``train`` (the public
training set) or ``test`` (an official test set); splits decide train/val from ``train``.

Writing goes to a temporary sibling directory that is renamed into place only when complete, so
a failed preparation leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semibench.errors import DataError

FORMAT_VERSION = 1


def label_dtype(label: np.ndarray) -> np.dtype:
    return np.dtype(np.uint16) if int(label.max(initial=0)) < 65536 else np.dtype(np.int32)


@dataclass
class Sample:
    id: str
    image: np.ndarray  # HxWx3 uint8
    label: np.ndarray  # HxW instance ids

    @property
    def mask(self) -> np.ndarray:
        return (self.label > 0).astype(np.uint8)


class PreparedWriter:
    """Collects samples into a temporary directory; ``commit()`` renames it to ``root``."""

    def __init__(self, root: Path, dataset: str):
        self.root = Path(root)
        self.dataset = dataset
        self.tmp = self.root.parent / f".{self.root.name}.tmp-{uuid.uuid4().hex[:8]}"
        (self.tmp / "samples").mkdir(parents=True)
        self.images: list[dict] = []
        self.samples: list[dict] = []
        self.sources: dict[str, str] = {}

    def add_image(self, id: str, height: int, width: int, n_nuclei: int, subset: str) -> None:
        self.images.append(dict(id=id, height=int(height), width=int(width),
                                n_nuclei=int(n_nuclei), subset=subset))

    def add_sample(self, id: str, image: np.ndarray, label: np.ndarray, subset: str,
                   source_image: str | None = None, **extra) -> None:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(f"sample {id}: image must be HxWx3 uint8, got {image.shape} {image.dtype}")
        if label.shape != image.shape[:2]:
            raise DataError(f"sample {id}: label {label.shape} does not match image {image.shape[:2]}")
        label = label.astype(label_dtype(label), copy=False)
        with open(self.tmp / "samples" / f"{id}.npz", "wb") as f:
            np.savez(f, image=image, label=label, mask=(label > 0).astype(np.uint8))
        n = int(len(np.unique(label))) - int((label == 0).any())
        self.samples.append(dict(id=id, image=source_image or id, height=int(label.shape[0]),
                                 width=int(label.shape[1]), n_nuclei=n, subset=subset, **extra))

    def commit(self) -> Path:
        manifest = dict(dataset=self.dataset, format=FORMAT_VERSION, sources=self.sources,
                        images=self.images, samples=self.samples)
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if self.root.exists():
            shutil.rmtree(self.root)
        os.replace(self.tmp, self.root)
        return self.root

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "PreparedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class PreparedDataset:
    """Read access to a prepared dataset directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.exists():
            raise DataError(f"{path} not found: run `semibench prepare` first")
        self.manifest = json.loads(path.read_text())
        self.by_id = {s["id"]: s for s in self.manifest["samples"]}

    @property
    def ids(self) -> list[str]:
        return [s["id"] for s in self.manifest["samples"]]

    def load(self, id: str) -> Sample:
        if id not in self.by_id:
            raise DataError(f"sample {id!r} is not in {self.root}")
        with np.load(self.root / "samples" / f"{id}.npz") as z:
            return Sample(id=id, image=z["image"], label=z["label"])
