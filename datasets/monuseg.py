"""MoNuSeg 2018 (Kumar et al., IEEE TMI 2017/2019): 30 training + 14 official test H&E images,
1000x1000, with Aperio ImageScope XML annotations (Region -> Vertices -> Vertex X, Y; one Region
per nucleus).

Archives: "MoNuSeg 2018 Training Data.zip" (``.../Tissue Images/<id>.tif``,
``.../Annotations/<id>.xml``) and "MoNuSegTestData.zip" (``<id>.tif``, ``<id>.xml``), from Google
Drive. Images and XMLs are paired by file stem wherever they sit inside the zip. Repackaged copies
are found under their alias names too (``MoNuSegTrainingData.zip``).

Rasterisation (one convention, used everywhere):

- Vertex X/Y are 1-based pixel centres (the organisers' masks come from MATLAB poly2mask), so a
  vertex maps to (x, y) = (X − 1, Y − 1) on the 0-based grid where pixel (row r, col c) has its
  centre at (x = c, y = r).
- A pixel belongs to a region when its centre lies inside the polygon (even-odd rule) or on
  its boundary: the polygon is closed, as in ``skimage.draw.polygon``. Most original vertices
  are pixel centres on the nucleus outline, so boundary pixels are nucleus pixels; with this rule
  the fill matches the organisers' masks best (IoU 0.98 on the 13 original training XMLs, per
  the shared data's provenance notes; a half-open rule drops the bottom/right outline, ~10 % of
  a nucleus). Vertices are first snapped to a 1/256-pixel grid (a move of at most 1/512 px):
  then every edge crossing (x0·(y1 − r) + x1·(r − y0)) / (y1 − y0) is computed exactly in
  float64, so a centre on an edge is decided by the rule, not by rounding noise (XML values such
  as 386.8 are not binary fractions). The rule applies to every region alike: a 2-vertex region
  is a segment and keeps the pixel centres on it.
- Overlaps: regions are painted in XML order and a later region takes the shared pixels.
- Every region is one instance: a region left with no pixel (a segment or sliver between pixel
  centres, or covered by later regions) gets the pixel nearest its vertex mean
  (rounded half up) that is background or whose owner keeps another pixel. Hence instance count
  = region count per image. A Region without any Vertex has no location and is skipped (warned).

Samples: each image is cut into non-overlapping ``tile_size``² tiles (16 of 250² for 1000²), id
``<image id>_r<row>_c<col>``; labels are renumbered 1..n within each tile. The manifest keeps the
44 source images (``images``, with region counts) and the tiles (``samples``).

Split policy: 6 of the 30 training images (round(0.2·30)) to val as whole images; the 14
official test images are the test set.

Config keys (``datasets.monuseg``): ``archive`` (a directory or {file name: path}), ``sha256``
and ``url`` ({file name: value}), ``download_timeout``, ``workers`` -- see :mod:`semibench.data.obtain`.
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path, PurePosixPath
from typing import Mapping
from xml.parsers import expat

import numpy as np
from PIL import Image

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
from semibench.data.tiling import tile_grid, tile_id
from semibench.errors import DataError
from semibench.registry import register_dataset

TRAIN = ArchiveSpec("MoNuSeg 2018 Training Data.zip",
                    "https://drive.google.com/uc?export=download&id=1ZgqFJomqQGNnsx7w7QBzQQMVA16lbVCA",
                    sha256="25d3d3185bb2970b397cafa72eb664c9b4d24294aee382e7e3df9885affce742",
                    kind="gdrive", aliases=("MoNuSegTrainingData.zip",))
TEST = ArchiveSpec("MoNuSegTestData.zip",
                   "https://drive.google.com/uc?export=download&id=1NKkSQ5T0ZNQ8aUhh0a8Dt2YKYCQXIViw",
                   sha256="13e522387ae8b1bcc0530e13ff9c7b4d91ec74959ef6f6e57747368d7ee6f88a",
                   kind="gdrive")
SUBSETS = ((TRAIN, "train"), (TEST, "test"))


# ---------------------------------------------------------------- XML and rasterisation

def parse_regions(data: bytes, where: str) -> list[np.ndarray]:
    """Each Region's vertices as an (n, 2) array of (X, Y) in XML (1-based) coordinates.
    (expat with one start-element handler: about twice as fast as building an ElementTree.)"""
    xs: list[str] = []
    ys: list[str] = []
    starts: list[int] = []

    def start(name, attrs):
        if name == "Vertex":
            xs.append(attrs["X"])
            ys.append(attrs["Y"])
        elif name == "Region":
            starts.append(len(xs))

    parser = expat.ParserCreate()
    parser.StartElementHandler = start
    try:
        parser.Parse(data, True)
    except expat.ExpatError as e:
        raise DataError(f"{where}: XML does not parse: {e}") from None
    except KeyError as e:
        raise DataError(f"{where}: a Vertex has no {e} attribute (line {parser.CurrentLineNumber})") from None
    if xs and (not starts or starts[0] > 0):
        raise DataError(f"{where}: Vertex elements outside any Region")
    try:
        xy = np.stack([np.array(xs, dtype=np.float64), np.array(ys, dtype=np.float64)], axis=1)
    except ValueError as e:
        raise DataError(f"{where}: a Vertex coordinate is not a number ({e})") from None
    bounds = starts + [len(xs)]
    polygons = [xy[bounds[i]:bounds[i + 1]] for i in range(len(starts))]
    skipped = sum(len(p) == 0 for p in polygons)
    if skipped:
        warnings.warn(f"{where}: skipped {skipped} Region(s) without vertices", stacklevel=2)
    return [p for p in polygons if len(p)]


def fill_polygon(x: np.ndarray, y: np.ndarray, height: int, width: int):
    """Pixels whose centres lie inside the polygon or on its boundary (0-based coordinates; see
    the module docstring). Returns (top, left, bool mask) of the bounding box, or None."""
    x0, y0 = x, y
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    r_lo, r_hi = max(0, math.ceil(y.min())), min(height - 1, math.floor(y.max()))
    if r_lo > r_hi:
        return None
    rows = np.arange(r_lo, r_hi + 1, dtype=np.float64)[:, None]
    flat = y0 == y1
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = (x0 * (y1 - rows) + x1 * (rows - y0)) / (y1 - y0)
    # interior: even-odd pairs of crossings, each edge covering the rows y_low <= r < y_high
    active = (np.minimum(y0, y1) <= rows) & (rows < np.maximum(y0, y1))
    xs = np.sort(np.where(active, xc, np.inf), axis=1)
    n_pairs = xs.shape[1] // 2
    starts, ends = xs[:, 0:2 * n_pairs:2], xs[:, 1:2 * n_pairs:2]
    # boundary: sloped edges through a pixel centre, horizontal edges lying on the row
    touch = (np.minimum(y0, y1) <= rows) & (rows <= np.maximum(y0, y1)) & ~flat & (xc == np.floor(xc))
    on_row = flat & (y0 == rows)
    lo = np.concatenate([starts, np.where(touch, xc, np.inf), np.where(on_row, np.minimum(x0, x1), np.inf)], 1)
    hi = np.concatenate([ends, np.where(touch, xc, np.inf), np.where(on_row, np.maximum(x0, x1), np.inf)], 1)
    ok = np.isfinite(lo) & np.isfinite(hi)
    c_in = np.maximum(np.ceil(np.where(ok, lo, 0)), 0).astype(np.int64)  # closed interval [lo, hi]
    c_out = np.minimum(np.floor(np.where(ok, hi, -1)), width - 1).astype(np.int64)
    ok &= c_in <= c_out
    if not ok.any():
        return None
    row_idx = np.broadcast_to(np.arange(len(rows))[:, None], ok.shape)[ok]
    c_in, c_out = c_in[ok], c_out[ok]
    left = int(c_in.min())
    diff = np.zeros((len(rows), int(c_out.max()) - left + 2), dtype=np.int32)
    np.add.at(diff, (row_idx, c_in - left), 1)
    np.add.at(diff, (row_idx, c_out - left + 1), -1)
    return r_lo, left, np.cumsum(diff, axis=1)[:, :-1] > 0


def _half_up(v: float) -> int:
    return math.floor(v + 0.5)


SNAP = 256  # vertex grid (1/SNAP px); crossings stay exact for coordinates up to 2**18 px


def rasterise(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Instance label map (int32; region k of the list -> id k) of polygons in XML coordinates."""
    label = np.zeros((height, width), dtype=np.int32)
    polygons = [np.round((p - 1.0) * SNAP) / SNAP for p in polygons]  # 0-based, on the snap grid
    for k, poly in enumerate(polygons, 1):
        filled = fill_polygon(poly[:, 0], poly[:, 1], height, width)
        if filled is not None:
            top, left, mask = filled
            label[top:top + mask.shape[0], left:left + mask.shape[1]][mask] = k
    counts = np.bincount(label.ravel(), minlength=len(polygons) + 1)
    for k in np.flatnonzero(counts[1:] == 0) + 1:
        poly = polygons[k - 1]
        cr = min(max(_half_up(float(poly[:, 1].mean())), 0), height - 1)
        cc = min(max(_half_up(float(poly[:, 0].mean())), 0), width - 1)
        candidates = sorted(((dr * dr + dc * dc, cr + dr, cc + dc)
                             for dr in range(-2, 3) for dc in range(-2, 3)
                             if 0 <= cr + dr < height and 0 <= cc + dc < width))
        for _, r, c in candidates:
            owner = label[r, c]
            if owner == 0 or counts[owner] > 1:
                counts[owner] -= 1
                counts[k] += 1
                label[r, c] = k
                break
    return label


# ---------------------------------------------------------------- archives

def archive_pairs(zf, path: Path) -> dict[str, tuple[str, str]]:
    """{image id: (tif member, xml member)}, sorted by id."""
    tifs: dict[str, str] = {}
    xmls: dict[str, str] = {}
    for name in zf.namelist():
        p = PurePosixPath(name)
        if name.endswith("/") or "__MACOSX" in p.parts:
            continue
        ext = p.suffix.lower()
        target = tifs if ext in (".tif", ".tiff") else xmls if ext == ".xml" else None
        if target is None:
            continue
        if p.stem in target:
            raise DataError(f"{path}: two members for image {p.stem}: {target[p.stem]!r} and {name!r}")
        target[p.stem] = name
    unpaired = sorted(set(tifs) ^ set(xmls))
    if unpaired:
        u = unpaired[0]
        raise DataError(f"{path}: image {u} has {'no annotation XML' if u in tifs else 'no TIFF image'}"
                        + (f" (and {len(unpaired) - 1} more unpaired)" if len(unpaired) > 1 else ""))
    return {i: (tifs[i], xmls[i]) for i in sorted(tifs)}


def load_image(task: tuple[str, str, str, str, str]) -> tuple[str, str, np.ndarray, np.ndarray, int]:
    """Worker: decode one TIFF and rasterise its XML -> (id, subset, RGB, labels, n regions)."""
    path, subset, iid, tif, xml = task
    zf = cached_zip(path)
    rgb = np.asarray(open_image(read_member(zf, path, tif), path, tif).convert("RGB"))
    polygons = parse_regions(read_member(zf, path, xml), f"{path}: {xml}")
    label = rasterise(polygons, rgb.shape[0], rgb.shape[1])
    return iid, subset, rgb, label, len(polygons)


def _image_size(zf, path: Path, member: str) -> tuple[int, int]:
    """(height, width) from the TIFF header (no pixel decoding)."""
    try:
        w, h = Image.open(io.BytesIO(read_member(zf, path, member))).size
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: member {member!r} is not a readable image: {e}") from None
    return h, w


@register_dataset("monuseg")
class MoNuSeg(Recipe):
    name = "monuseg"
    archives = (TRAIN, TEST)
    split_policy = SplitPolicy(val="0.2", test="official")
    tile_size = 250
    image_size: tuple[int, int] | None = (1000, 1000)
    expected_images: dict[str, int] | None = {"train": 30, "test": 14}

    def _pairs(self, archives: Mapping[str, Path]):
        """[(subset, path, {id: (tif, xml)})], checking that no id is in both subsets."""
        out, seen = [], {}
        for spec, subset in SUBSETS:
            path = Path(archives[spec.file_name])
            with open_zip(path) as zf:
                pairs = archive_pairs(zf, path)
            for iid in pairs:
                if iid in seen:
                    raise DataError(f"image {iid} is in both {seen[iid]} and {path}")
                seen[iid] = path
            out.append((subset, path, pairs))
        return out

    def index(self, archives: Mapping[str, Path]) -> list[SampleRef]:
        refs = []
        for subset, path, pairs in self._pairs(archives):
            with open_zip(path) as zf:
                for iid, (tif, _) in pairs.items():
                    h, w = _image_size(zf, path, tif)
                    refs += [SampleRef(tile_id(iid, t.row, t.col), iid, subset)
                             for t in tile_grid(h, w, self.tile_size)]
        return refs

    def verify(self, archives: Mapping[str, Path]) -> dict:
        summary = {}
        for subset, path, pairs in self._pairs(archives):
            want = (self.expected_images or {}).get(subset)
            if want is not None and len(pairs) != want:
                raise DataError(f"{path}: {len(pairs)} image/XML pairs, expected {want}")
            regions = {}
            with open_zip(path) as zf:
                crc_check_zip(zf, path)
                for iid, (tif, xml) in pairs.items():
                    size = _image_size(zf, path, tif)
                    if self.image_size is not None and size != tuple(self.image_size):
                        raise DataError(f"{path}: {tif!r} is {size[0]}x{size[1]} (h x w), "
                                        f"expected {self.image_size[0]}x{self.image_size[1]}")
                    regions[iid] = len(parse_regions(read_member(zf, path, xml), f"{path}: {xml}"))
            summary[subset] = dict(archive=str(path), images=len(pairs),
                                   regions=sum(regions.values()), regions_per_image=regions)
        return summary

    def prepare(self, archives: Mapping[str, Path], writer: PreparedWriter) -> None:
        tasks = [(str(path), subset, iid, tif, xml)
                 for subset, path, pairs in self._pairs(archives)
                 for iid, (tif, xml) in pairs.items()]
        for iid, subset, rgb, label, n_regions in parallel_map(load_image, tasks, self.workers,
                                                               desc="monuseg"):
            h, w = label.shape
            n_instances = int(np.count_nonzero(np.bincount(label.ravel())[1:]))
            if n_instances != n_regions:
                warnings.warn(f"{iid}: {n_regions} regions gave {n_instances} instances", stacklevel=2)
            writer.add_image(iid, h, w, n_instances, subset)
            for t in tile_grid(h, w, self.tile_size):
                tile_label = renumber(t.cut(label))
                writer.add_sample(tile_id(iid, t.row, t.col), np.ascontiguousarray(t.cut(rgb)),
                                  tile_label, subset, source_image=iid,
                                  row=t.row, col=t.col, top=t.top, left=t.left)


def renumber(label: np.ndarray) -> np.ndarray:
    """Ids 1..n in increasing order of the original ids, 0 stays background."""
    ids, inverse = np.unique(label, return_inverse=True)
    inverse = inverse.reshape(label.shape)
    return inverse if ids[0] == 0 else inverse + 1
