"""A user's folder of nuclei images as a dataset: the four layouts, their detection, validation
and reading (the recipe is ``datasets/folder.py``; the user-facing page is docs/your-data.md).

Layouts, each as its own tool writes it (``NAME``: the image's name, which becomes its id):

- ``stardist``:    ``images/NAME.EXT`` + ``masks/NAME.EXT``, instance labels (0 background, 1..N);
- ``cellpose``:    ``NAME_img.EXT`` + ``NAME_masks.EXT`` in one folder (or ``NAME.EXT`` when no
  file ends in ``_img``); cellpose's own outputs (``_cp_masks``, ``_flows``, ``_seg``) are ignored;
- ``nnunet``:      nnU-Net v2 raw data: ``dataset.json``, ``imagesTr/CASE_0000.EXT`` (further
  channels ``_0001``, ... stacked), ``labelsTr/CASE.EXT``; ``imagesTs`` + ``labelsTs`` are the
  test set. A semantic nucleus label: instances are its 8-connected components, so touching
  nuclei merge into one;
- ``per-nucleus``: DSB 2018's ``ID/images/ID.EXT`` + ``ID/masks/*.EXT``, one binary mask per
  nucleus, numbered 1..N in sorted file-name order (the later mask keeps shared pixels).

EXT: ``.tif``, ``.tiff``, ``.png``. Everything that can be checked from file headers (pairs,
names, sizes, mask types, readability) is checked by :func:`scan` before any work; pixel values
(negative labels) are checked when read.

Images become HxWx3 uint8: 8-bit greyscale repeated to three channels, RGB as is, RGBA and
grey+alpha without the alpha (as the DSB recipe); anything wider than 8 bits (16-bit fluorescence,
float) per channel to [0, 255] between its 1st and 99.8th percentile (StarDist's ``normalize``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from semibench.errors import DataError, describe

LAYOUTS = ("stardist", "cellpose", "nnunet", "per-nucleus")
EXTS = (".tif", ".tiff", ".png")
PERCENTILES = (1.0, 99.8)
CELLPOSE_OUTPUTS = ("_cp_masks", "_flows", "_cp_outlines", "_seg")
LAYOUT_HINT = ("stardist (images/ + masks/), cellpose (NAME_img + NAME_masks files), nnunet "
               "(dataset.json + imagesTr/ + labelsTr/), per-nucleus (ID/images/ID.png + ID/masks/)")
SUBSETS = ("train", "test", "unlabeled")


@dataclass(frozen=True)
class Entry:
    """One source image: its channel file(s), its mask file(s) and how to read them."""

    name: str
    image: tuple[Path, ...]  # nnU-Net: one file per channel; otherwise one
    masks: tuple[Path, ...]  # () for unlabeled images
    kind: str                # "labels" | "semantic" | "per-nucleus" | "none"
    subset: str              # "train" | "test" | "unlabeled"
    height: int
    width: int
    channels: int            # of the source image, before conversion to RGB
    nucleus_value: int = 1   # nnU-Net: the label value of "nucleus" in dataset.json


# ------------------------------------------------------------------ files and headers

def images_in(folder: Path) -> dict[str, Path]:
    """{stem: file} of the image files directly in ``folder``; one name in two formats is refused."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in EXTS:
            continue
        if p.stem in found:
            raise DataError(f"{found[p.stem]} and {p.name} name the same image {p.stem!r}; keep one")
        found[p.stem] = p
    return found


def _check_name(name: str, where: Path) -> str:
    if name.startswith(("_", ".")) or not name.strip():
        raise DataError(f"{where}: the name {name!r} cannot be a sample id (starts with '_' or '.')")
    return name


_PIL_MODES = {"1": (1, "b"), "L": (1, "u"), "P": (1, "u"), "LA": (2, "u"), "RGB": (3, "u"),
              "RGBA": (4, "u"), "I;16": (1, "u"), "I;16B": (1, "u"), "I;16L": (1, "u"),
              "I": (1, "i"), "F": (1, "f"), "CMYK": (4, "u")}


def _axes(shape: Sequence[int], path: Path) -> tuple[int, int, int, bool]:
    """(height, width, channels, channels first) of an array shape read from ``path``."""
    if len(shape) == 2:
        return shape[0], shape[1], 1, False
    if len(shape) == 3 and shape[2] <= 4:
        return shape[0], shape[1], shape[2], False
    if len(shape) == 3 and shape[0] <= 4:
        return shape[1], shape[2], shape[0], True
    raise DataError(f"{path}: shape {tuple(shape)} is not a 2-D image (a stack or volume?); "
                    "semibench reads 2-D greyscale, RGB or RGBA images")


def probe(path: Path) -> tuple[int, int, int, str]:
    """(height, width, channels, dtype kind) from the file's header only."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile
            with tifffile.TiffFile(path) as tf:
                series = tf.series[0]
                shape, kind = tuple(series.shape), np.dtype(series.dtype).kind
        else:
            with Image.open(path) as im:
                channels, kind = _PIL_MODES.get(im.mode, (len(im.getbands()), "u"))
                shape = (im.height, im.width) + ((channels,) if channels > 1 else ())
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable image: {describe(e)}") from None
    h, w, c, _ = _axes(shape, path)
    return h, w, c, kind


def read_array(path: Path) -> np.ndarray:
    """The pixels of ``path``, channels last (HxW or HxWxC)."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile
            arr = tifffile.imread(path)
        else:
            with Image.open(path) as im:
                im.load()
                if im.mode == "CMYK":
                    im = im.convert("RGB")
                arr = np.asarray(im)
    except Exception as e:
        raise DataError(f"{path}: not a readable image: {describe(e)}") from None
    _, _, _, first = _axes(arr.shape, path)
    return np.moveaxis(arr, 0, -1) if first else arr


def to_rgb8(arr: np.ndarray, path: Path) -> np.ndarray:
    """The network's input form (module doc): HxWx3 uint8."""
    if arr.ndim == 2:
        arr = arr[..., None]
    c = arr.shape[2]
    if c == 2 and path.suffix.lower() in (".tif", ".tiff"):
        raise DataError(f"{path}: 2 channels; save the nuclear channel alone (greyscale) or as RGB")
    if c in (2, 4):  # grey + alpha, RGBA: the alpha is dropped
        arr = arr[..., :c - 1]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = percentile_normalise(arr)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def percentile_normalise(arr: np.ndarray) -> np.ndarray:
    """Per channel: 1st percentile -> 0, 99.8th -> 255, clipped, rounded."""
    x = arr.astype(np.float64)
    lo, hi = np.percentile(x, PERCENTILES, axis=(0, 1), keepdims=True)
    scaled = (x - lo) / np.where(hi > lo, hi - lo, 1.0)
    return np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8)


def read_image(entry: Entry) -> np.ndarray:
    """The entry's image as HxWx3 uint8 (nnU-Net channel files stacked first)."""
    if len(entry.image) == 1:
        return to_rgb8(read_array(entry.image[0]), entry.image[0])
    planes = [read_array(p) for p in entry.image]
    for p, a in zip(entry.image, planes):
        if a.ndim != 2:
            raise DataError(f"{p}: an nnU-Net channel file must hold one channel, found {a.shape}")
    return to_rgb8(np.stack(planes, axis=2), entry.image[0])


def read_label(entry: Entry) -> np.ndarray:
    """The entry's instance labels (0 background, 1..N), uint16 or int32."""
    from semibench.evaluate.instances import components

    if entry.kind == "none":
        return np.zeros((entry.height, entry.width), np.uint16)
    if entry.kind == "per-nucleus":
        return _per_nucleus_label(entry)
    path = entry.masks[0]
    arr = read_array(path)
    if arr.ndim != 2:
        raise DataError(f"{path}: {arr.shape[2]} channels; a mask must be one channel of integer labels")
    if arr.dtype.kind not in "uib":
        raise DataError(f"{path}: not integer labels ({arr.dtype}); a mask is 0 background, 1..N")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind == "i" and arr.min(initial=0) < 0:
        raise DataError(f"{path}: negative label {int(arr.min())}; labels are 0 (background), 1..N")
    if entry.kind == "semantic":
        return components(arr == entry.nucleus_value)
    if int(arr.max(initial=0)) >= 2 ** 31:
        raise DataError(f"{path}: label {int(arr.max())} is too large (at most 2^31 - 1)")
    return arr.astype(np.uint16 if arr.max(initial=0) < 65536 else np.int32)


def _per_nucleus_label(entry: Entry) -> np.ndarray:
    """As the DSB recipe: masks in sorted name order, ids 1..N over the non-empty ones."""
    label = np.zeros((entry.height, entry.width), np.uint16 if len(entry.masks) < 65536 else np.int32)
    k = 0
    for p in entry.masks:
        m = read_array(p)
        if m.ndim != 2:
            m = m[..., 0]
        on = m > 0
        if not on.any():
            continue
        k += 1
        label[on] = k
    return label


# ------------------------------------------------------------------ layouts

def detect(path: Path) -> str:
    """The layout of ``path``, or a DataError that lists what was found."""
    if (path / "dataset.json").is_file() and (path / "imagesTr").is_dir():
        return "nnunet"
    if (path / "images").is_dir() and (path / "masks").is_dir():
        return "stardist"
    subdirs = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if any((d / "images").is_dir() and (d / "masks").is_dir() for d in subdirs):
        return "per-nucleus"
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(p.suffix.lower() in EXTS and p.stem.endswith("_masks")
           and not p.stem.endswith("_cp_masks") for p in files):
        return "cellpose"
    if not files and not subdirs:
        raise DataError(f"{path}: empty folder")
    exts: dict[str, int] = {}
    for p in files:
        exts[p.suffix.lower() or "(no extension)"] = exts.get(p.suffix.lower() or "(no extension)", 0) + 1
    found = [f"{n} {e} file{'s' * (n > 1)}" for e, n in sorted(exts.items())]
    found += [f"folder {d.name}/" for d in subdirs[:4]] + ([f"{len(subdirs) - 4} more folders"]
                                                           if len(subdirs) > 4 else [])
    raise DataError(f"{path}: cannot detect the layout; found {', '.join(found)}; expected one of "
                    f"{LAYOUT_HINT}; or set its layout")


def _pair(images: dict[str, Path], masks: dict[str, Path], where: Path) -> list[tuple[str, Path, Path]]:
    for name in sorted(set(images) - set(masks)):
        raise DataError(f"{images[name]}: image without a mask (no {name}.tif/.tiff/.png among the masks)")
    for name in sorted(set(masks) - set(images)):
        raise DataError(f"{masks[name]}: mask without an image")
    if not images:
        raise DataError(f"{where}: no images (.tif, .tiff, .png)")
    return [(_check_name(n, images[n]), images[n], masks[n]) for n in sorted(images)]


def _stardist(path: Path) -> list[tuple[str, tuple, tuple, str]]:
    for sub in ("images", "masks"):
        if not (path / sub).is_dir():
            raise DataError(f"{path}: no {sub}/ folder (stardist layout: images/ + masks/)")
    pairs = _pair(images_in(path / "images"), images_in(path / "masks"), path / "images")
    return [(n, (i,), (m,), "labels") for n, i, m in pairs]


def _cellpose(path: Path) -> list[tuple[str, tuple, tuple, str]]:
    files = images_in(path)
    masks = {s[:-len("_masks")]: p for s, p in files.items()
             if s.endswith("_masks") and not s.endswith("_cp_masks")}
    rest = {s: p for s, p in files.items() if not s.endswith("_masks")
            and not any(s.endswith(o) for o in CELLPOSE_OUTPUTS)}
    tagged = {s[:-len("_img")]: p for s, p in rest.items() if s.endswith("_img")}
    images = tagged if tagged else rest
    pairs = _pair(images, masks, path)
    return [(n, (i,), (m,), "labels") for n, i, m in pairs]


def _nnunet_labels(path: Path) -> int:
    import json
    try:
        labels = json.loads((path / "dataset.json").read_text()).get("labels") or {}
    except (OSError, ValueError) as e:
        raise DataError(f"{path / 'dataset.json'}: not readable JSON: {describe(e)}") from None
    fg = {k: v for k, v in labels.items() if k != "background" and isinstance(v, int)}
    if len(fg) == 1:
        return next(iter(fg.values()))
    nuc = [v for k, v in fg.items() if "nucle" in k.lower()]
    if len(nuc) == 1:
        return nuc[0]
    raise DataError(f"{path / 'dataset.json'}: labels {labels} name no single nucleus label")


def _nnunet_cases(images_dir: Path, labels_dir: Path, path: Path) -> list[tuple[str, tuple, tuple, str]]:
    channels: dict[str, dict[int, Path]] = {}
    for stem, p in images_in(images_dir).items():
        case, sep, ch = stem.rpartition("_")
        if not sep or len(ch) != 4 or not ch.isdigit():
            raise DataError(f"{p}: an nnU-Net image is named CASE_0000{p.suffix} (channel suffix missing)")
        channels.setdefault(case, {})[int(ch)] = p
    for case, chs in channels.items():
        if sorted(chs) != list(range(len(chs))):
            raise DataError(f"{images_dir}: case {case!r} has channels {sorted(chs)}, expected 0..{len(chs) - 1}")
    firsts = {c: chs[0] for c, chs in channels.items()}
    pairs = _pair(firsts, images_in(labels_dir), images_dir)
    return [(n, tuple(channels[n][k] for k in sorted(channels[n])), (m,), "semantic") for n, _, m in pairs]


def _per_nucleus(path: Path) -> list[tuple[str, tuple, tuple, str]]:
    out = []
    for d in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = images_in(d / "images") if (d / "images").is_dir() else {}
        if d.name not in images:
            raise DataError(f"{d}: no images/{d.name}.png (per-nucleus layout: ID/images/ID.png + ID/masks/)")
        masks = images_in(d / "masks") if (d / "masks").is_dir() else {}
        if not masks:
            raise DataError(f"{images[d.name]}: image without a mask (no {d.name}/masks/*.png)")
        out.append((_check_name(d.name, d), (images[d.name],), tuple(masks[k] for k in sorted(masks)),
                    "per-nucleus"))
    if not out:
        raise DataError(f"{path}: no images")
    return out


def list_layout(path: Path, layout: str) -> list[tuple]:
    """(subset, name, image files, mask files, kind[, nucleus value]) of every annotated image."""
    if layout == "stardist":
        return [("train", *e) for e in _stardist(path)]
    if layout == "cellpose":
        return [("train", *e) for e in _cellpose(path)]
    if layout == "per-nucleus":
        return [("train", *e) for e in _per_nucleus(path)]
    if layout == "nnunet":
        value = _nnunet_labels(path)
        if not (path / "labelsTr").is_dir():
            raise DataError(f"{path}: no labelsTr/ folder (nnU-Net layout)")
        rows = [("train", *e) for e in _nnunet_cases(path / "imagesTr", path / "labelsTr", path)]
        if (path / "imagesTs").is_dir() and (path / "labelsTs").is_dir():
            rows += [("test", *e) for e in _nnunet_cases(path / "imagesTs", path / "labelsTs", path)]
        return [(*r, value) for r in rows]
    raise DataError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")


# ------------------------------------------------------------------ the whole source

def _folder(value, what: str) -> Path:
    p = Path(str(value)).expanduser()
    if not p.exists():
        raise DataError(f"{what}: {p} does not exist")
    if not p.is_dir():
        raise DataError(f"{what}: {p} is not a folder")
    return p


def _entry(subset: str, name: str, image: tuple, masks: tuple, kind: str, value: int = 1) -> Entry:
    h, w, c, _ = probe(image[0])
    for extra in image[1:]:
        eh, ew, ec, _ = probe(extra)
        if (eh, ew) != (h, w) or ec != 1:
            raise DataError(f"{extra}: {eh}x{ew}x{ec} (h x w x channels) but channel 0 {image[0].name} is {h}x{w}x1")
        c += 1
    for m in masks:
        mh, mw, mc, mk = probe(m)
        if (mh, mw) != (h, w):
            raise DataError(f"{m}: the mask is {mh}x{mw} (h x w) but its image {image[0].name} is {h}x{w}")
        if kind != "per-nucleus" and (mc != 1 or mk not in "uib"):
            what = f"{mc} channels" if mc != 1 else "floating-point values"
            raise DataError(f"{m}: not integer labels ({what}); a mask is one channel, 0 background, 1..N")
    return Entry(name, image, masks, kind, subset, h, w, c, value)


@dataclass(frozen=True)
class Source:
    layout: str
    detected: bool
    entries: tuple[Entry, ...]

    @property
    def has_test(self) -> bool:
        return any(e.subset == "test" for e in self.entries)

    def count(self, subset: str) -> int:
        return sum(e.subset == subset for e in self.entries)


def scan(path, layout: str | None = None, test=None, unlabeled=None, where: str = "path") -> Source:
    """Every image of the configured folders, checked from headers (module doc). ``test``: a
    folder (read in its own detected layout) or a list of names in ``path``; ``unlabeled``: a
    folder of images without masks."""
    root = _folder(path, where)
    detected = layout is None
    layout = detect(root) if detected else layout
    rows = list_layout(root, layout)
    if isinstance(test, (list, tuple)):
        names = {r[1] for r in rows}
        unknown = [str(t) for t in test if t not in names]
        if unknown:
            raise DataError(f"{root}: test image {unknown[0]!r} is not among its {len(names)} images")
        chosen = set(test)
        rows = [("test" if r[1] in chosen else r[0], *r[1:]) for r in rows]
    elif test is not None:
        test_root = _folder(test, where.rsplit(".", 1)[0] + ".test")
        rows += [("test", *r[1:]) for r in list_layout(test_root, detect(test_root))]
    if unlabeled is not None:
        pool_root = _folder(unlabeled, where.rsplit(".", 1)[0] + ".unlabeled")
        pool = images_in(pool_root)
        if not pool:
            raise DataError(f"{pool_root}: no images (.tif, .tiff, .png)")
        rows += [("unlabeled", _check_name(n, p), (p,), (), "none") for n, p in sorted(pool.items())]
    seen: dict[str, Path] = {}
    for r in rows:
        if r[1] in seen:
            raise DataError(f"{r[2][0]}: the name {r[1]!r} is taken by {seen[r[1]]}; image names "
                            "must be unique across the annotated, test and unlabeled folders")
        seen[r[1]] = r[2][0]
    return Source(layout, detected, tuple(_entry(*r) for r in rows))


def describe_source(source: Source) -> dict:
    """What ``verify`` records and says."""
    return dict(layout=source.layout, layout_detected=source.detected,
                images=source.count("train"), test_images=source.count("test"),
                unlabeled_images=source.count("unlabeled"),
                channels=sorted({e.channels for e in source.entries}))


def names(entries: Iterable[Entry]) -> list[str]:
    return [e.name for e in entries]
