"""`semibench export`: a prepared dataset written in one of the folder layouts
(:mod:`semibench.data.folder`), so the folder path can be tried without data of one's own and the
folder recipe can be tested by a round trip.

Each prepared sample becomes one image named by its id (a MoNuSeg tile is an image of its own);
samples of the publisher's ``test`` subset go to nnU-Net's ``imagesTs``/``labelsTs``, and in the
other layouts to ``OUT/test/`` in the same layout (give it as the dataset's ``test``). Files:

- ``stardist``:    ``images/ID.tif`` (RGB uint8) + ``masks/ID.tif`` (uint16/int32 labels);
- ``cellpose``:    ``ID_img.png`` + ``ID_masks.png`` (16-bit PNG; ``.tif`` beyond 65535 nuclei);
- ``nnunet``:      ``dataset.json``, ``imagesTr/ID_0000.png`` (RGB), ``labelsTr/ID.png``
  (0 background, 1 nucleus: instances are lost, the folder recipe recovers components);
- ``per-nucleus``: ``ID/images/ID.png`` + ``ID/masks/ID_<k>.png`` (0/255), one per nucleus, in
  label order.

The folder is written under a temporary sibling name and renamed into place when complete; an
existing ``OUT`` that is not empty is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from semibench.atomic import new_folder
from semibench.data.folder import LAYOUTS
from semibench.data.prepared import PreparedDataset
from semibench.errors import ConfigError, DataError


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _tif(path: Path, array: np.ndarray) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, photometric="rgb" if array.ndim == 3 else "minisblack")


def _write(layout: str, root: Path, sid: str, image: np.ndarray, label: np.ndarray) -> None:
    if layout == "stardist":
        _tif(root / "images" / f"{sid}.tif", image)
        _tif(root / "masks" / f"{sid}.tif", label)
    elif layout == "cellpose":
        _png(root / f"{sid}_img.png", image)
        if label.dtype == np.uint16:
            _png(root / f"{sid}_masks.png", label)
        else:
            _tif(root / f"{sid}_masks.tif", label)
    elif layout == "nnunet":
        sub = "Ts" if root.name == "test" else "Tr"
        base = root.parent if sub == "Ts" else root
        _png(base / f"images{sub}" / f"{sid}_0000.png", image)
        _png(base / f"labels{sub}" / f"{sid}.png", (label > 0).astype(np.uint8))
    else:  # per-nucleus
        _png(root / sid / "images" / f"{sid}.png", image)
        ids = [int(i) for i in np.unique(label) if i]
        width = max(4, len(str(ids[-1]))) if ids else 4
        (root / sid / "masks").mkdir(parents=True, exist_ok=True)
        for i in ids:
            _png(root / sid / "masks" / f"{sid}_{i:0{width}d}.png", ((label == i) * 255).astype(np.uint8))


def export(dataset: str, layout: str, out: str | Path, data_dir: str | Path = "data") -> Path:
    """Write ``<data_dir>/prepared/<dataset>`` to ``out`` in ``layout``."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not an empty folder")
    prepared = PreparedDataset(Path(data_dir) / "prepared" / dataset)
    rows = [r for r in prepared.manifest["samples"] if r.get("subset") in ("train", "test")]
    with new_folder(out) as tmp:
        if layout == "nnunet":
            n_train = sum(r["subset"] == "train" for r in rows)
            (tmp / "dataset.json").write_text(json.dumps({
                "channel_names": {"0": "R", "1": "G", "2": "B"},
                "labels": {"background": 0, "nucleus": 1},
                "numTraining": n_train, "file_ending": ".png",
                "name": dataset, "description": f"semibench export of {dataset}"}, indent=1) + "\n")
        for r in tqdm(rows, desc=f"export {layout}", unit="img"):
            s = prepared.load(r["id"])
            root = tmp / "test" if r["subset"] == "test" else tmp
            _write(layout, root, r["id"], s.image, s.label)
    return out
