"""2018 Data Science Bowl, stage 1 training set (BBBC038; Caicedo et al., Nat. Methods 2019).

Archive ``stage1_train.zip``: ``<id>/images/<id>.png`` (RGBA, constant alpha) and
``<id>/masks/<mask id>.png`` (one binary PNG per nucleus, the size of its image). The publisher
gives no sha256, so none is enforced unless ``sha256`` is configured.

Prepared samples: one per image (id = image id, subset ``train``): RGB image (alpha dropped),
instance labels 1..N in mask-file order (sorted names), binary mask. Masks of the original set do
not overlap; if some did, the later mask would keep the shared pixels. An all-zero mask gets no id.

Split policy: 7 : 1 : 2 of the 670 images (469 / 67 / 134).

Config keys (``datasets.dsb2018``): ``archive``, ``sha256``, ``url``, ``download_timeout``,
``workers`` -- see :mod:`semibench.data.obtain`.
"""
from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path
from typing import Mapping

import numpy as np

from semibench.data.obtain import (
    ArchiveSpec,
    Recipe,
    SampleRef,
    cached_zip,
    crc_check_zip,
    open_image,
    open_zip,
    parallel_map,
    read_member,
)
from semibench.data.prepared import PreparedWriter
from semibench.data.splits import SplitPolicy
from semibench.errors import DataError
from semibench.registry import register_dataset

ARCHIVE = ArchiveSpec("stage1_train.zip", "https://data.broadinstitute.org/bbbc/BBBC038/stage1_train.zip",
                      sha256=None, kind="http")


def archive_layout(zf, path: Path) -> dict[str, tuple[str, list[str]]]:
    """{image id: (image member, sorted mask members)}; a leading folder inside the zip is allowed."""
    images: dict[str, str] = {}
    masks: dict[str, list[str]] = {}
    for name in zf.namelist():
        parts = name.split("/")
        if name.endswith("/") or len(parts) < 3 or parts[0] == "__MACOSX":
            continue
        iid, folder, fname = parts[-3:]
        if folder == "images":
            if fname != f"{iid}.png":
                raise DataError(f"{path}: unexpected member {name!r} (want {iid}/images/{iid}.png)")
            images[iid] = name
        elif folder == "masks" and fname.endswith(".png"):
            masks.setdefault(iid, []).append(name)
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError(f"{path}: masks without an image for {len(orphans)} id(s), e.g. {orphans[0]}")
    return {i: (images[i], sorted(masks.get(i, []))) for i in sorted(images)}


def png_size(data: bytes, path: Path, member: str) -> tuple[int, int]:
    """(width, height) from the PNG header, without decoding."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise DataError(f"{path}: member {member!r} is not a PNG image")
    return struct.unpack(">II", data[16:24])


def _header(zf, path: Path, member: str) -> bytes:
    try:
        with zf.open(member) as f:
            return f.read(24)
    except Exception as e:
        raise DataError(f"{path}: member {member!r} cannot be read: {e}") from None


def load_image(task: tuple[str, str, str, list[str]]) -> tuple[str, np.ndarray, np.ndarray, int]:
    """Worker: decode one image and its masks -> (id, RGB uint8, instance labels, n instances)."""
    path, iid, image_member, mask_members = task
    zf = cached_zip(path)
    im = open_image(read_member(zf, path, image_member), path, image_member)
    rgb = np.asarray(im.convert("RGB"))  # RGBA -> RGB drops the (constant) alpha, no compositing
    dtype = np.uint16 if len(mask_members) < 65536 else np.int32
    label = np.zeros(rgb.shape[:2], dtype=dtype)
    k = 0
    for m in mask_members:
        mask = open_image(read_member(zf, path, m), path, m)
        if mask.size != im.size:
            raise DataError(f"{path}: mask {m!r} is {mask.size[0]}x{mask.size[1]} (w x h) but its "
                            f"image is {im.size[0]}x{im.size[1]}")
        if mask.mode not in ("1", "L"):
            mask = mask.convert("L")
        box = mask.getbbox()  # only touch the nucleus' bounding box: masks are mostly zeros
        if box is None:
            continue
        k += 1
        region = label[box[1]:box[3], box[0]:box[2]]
        region[np.asarray(mask.crop(box)) > 0] = k
    n = int(np.count_nonzero(np.bincount(label.ravel(), minlength=k + 1)[1:]))  # a fully covered mask is gone
    return iid, rgb, label, n


@register_dataset("dsb2018")
class DSB2018(Recipe):
    name = "dsb2018"
    archives = (ARCHIVE,)
    split_policy = SplitPolicy(val="0.1", test="0.2")
    expected_images = 670

    def _layout(self, archives: Mapping[str, Path]):
        path = Path(archives[ARCHIVE.file_name])
        with open_zip(path) as zf:
            return path, archive_layout(zf, path)

    def index(self, archives: Mapping[str, Path]) -> list[SampleRef]:
        _, layout = self._layout(archives)
        return [SampleRef(i, i, "train") for i in layout]

    def verify(self, archives: Mapping[str, Path]) -> dict:
        path = Path(archives[ARCHIVE.file_name])
        with open_zip(path) as zf:
            crc_check_zip(zf, path)
            layout = archive_layout(zf, path)
            if self.expected_images is not None and len(layout) != self.expected_images:
                raise DataError(f"{path}: {len(layout)} `<id>/images/<id>.png` found, "
                                f"expected {self.expected_images}")
            sizes: Counter = Counter()
            n_masks = 0
            for _iid, (image_member, mask_members) in layout.items():
                w, h = png_size(_header(zf, path, image_member), path, image_member)
                sizes[f"{h}x{w}"] += 1
                for m in mask_members:
                    mw, mh = png_size(_header(zf, path, m), path, m)
                    if (mw, mh) != (w, h):
                        raise DataError(f"{path}: mask {m!r} is {mw}x{mh} (w x h) but its image "
                                        f"is {w}x{h}")
                n_masks += len(mask_members)
        return dict(images=len(layout), masks=n_masks, sizes_hxw=dict(sorted(sizes.items())))

    def prepare(self, archives: Mapping[str, Path], writer: PreparedWriter) -> None:
        path, layout = self._layout(archives)
        tasks = [(str(path), iid, im, ms) for iid, (im, ms) in layout.items()]
        for iid, rgb, label, n in parallel_map(load_image, tasks, self.workers, desc="dsb2018"):
            writer.add_image(iid, rgb.shape[0], rgb.shape[1], n, "train")
            writer.add_sample(iid, rgb, label, "train", source_image=iid)
