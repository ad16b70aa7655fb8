"""Your own nuclei images: a folder is a dataset, under any name the config gives it.

::

    datasets:
      mylab:
        recipe: folder
        path: /data/mylab            # annotated images
        layout: stardist             # stardist | cellpose | nnunet | per-nucleus; default: detected
        unlabeled: /data/mylab-raw   # optional: images without masks, added to the unlabeled pool

Layouts, reading and normalisation: :mod:`semibench.data.folder` (docs/your-data.md).

Config keys (``datasets.<name>``): ``recipe: folder``; ``path`` (required); ``layout``;
``unlabeled`` (a folder); ``test`` (a folder in any layout, or a list of image names in
``path``; nnU-Net's ``imagesTs`` + ``labelsTs`` otherwise); ``val_fraction`` (default 0.1) and
``test_fraction`` (default 0.2, only without a given test set) of the annotated images;
``tile`` (default 512: an image larger in either side is cut into tiles of at most tile² as
MoNuSeg is, ids ``<name>_r<row>_c<col>``; the tiles of one image stay in one split part and keep
the image's label ids), ``workers``.

Samples: subset ``train`` (annotated), ``test`` (a given test set) or ``unlabeled`` (the pool,
label all zero, never read as truth: the split lists them under ``unlabeled``).
"""
from __future__ import annotations

import hashlib
import json
import sys
from fractions import Fraction
from pathlib import Path
from typing import Mapping

import numpy as np

from semibench.data import folder as f
from semibench.data.obtain import Recipe, SampleRef, parallel_map
from semibench.data.prepared import PreparedWriter
from semibench.data.splits import SplitPolicy
from semibench.data.tiling import tile_grid, tile_id
from semibench.errors import ConfigError
from semibench.registry import register_dataset

DEFAULT_TILE = 512


def _fraction(value, key: str, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"datasets.{name}.{key} must be a number in [0, 1), got {value!r}")
    try:
        frac = Fraction(str(value))
    except ValueError:
        raise ConfigError(f"datasets.{name}.{key} must be a number in [0, 1), got {value!r}") from None
    if not 0 <= frac < 1:
        raise ConfigError(f"datasets.{name}.{key} must be in [0, 1), got {value!r}")
    return str(value)


def _load(entry: f.Entry) -> tuple[f.Entry, np.ndarray, np.ndarray]:
    return entry, f.read_image(entry), f.read_label(entry)


@register_dataset("folder")
class Folder(Recipe):
    archives = ()
    option_keys = frozenset({"path", "layout", "unlabeled", "test", "val_fraction",
                             "test_fraction", "tile"})

    def __init__(self, options: Mapping | None = None):
        super().__init__(options)
        o, n = self.options, self.name
        if not o.get("path"):
            raise ConfigError(f"datasets.{n}.path is required: the folder of annotated images")
        self.layout = o.get("layout")
        if self.layout is not None and self.layout not in f.LAYOUTS:
            raise ConfigError(f"datasets.{n}.layout: unknown {self.layout!r}; known: {', '.join(f.LAYOUTS)}")
        test = o.get("test")
        if test is not None and not isinstance(test, (str, list)):
            raise ConfigError(f"datasets.{n}.test must be a folder or a list of image names, got {test!r}")
        if test is not None and "test_fraction" in o:
            raise ConfigError(f"datasets.{n}: test and test_fraction exclude each other")
        self.val = _fraction(o.get("val_fraction", "0.1"), "val_fraction", n)
        self.test = _fraction(o.get("test_fraction", "0.2"), "test_fraction", n)
        if Fraction(self.val) + Fraction(self.test) >= 1 or Fraction(self.val) == 0:
            raise ConfigError(f"datasets.{n}: val_fraction must be > 0 and val_fraction + "
                              f"test_fraction < 1, got {self.val} and {self.test}")
        self.tile = o.get("tile", DEFAULT_TILE)
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 16:
            raise ConfigError(f"datasets.{n}.tile must be an integer >= 16, got {self.tile!r}")
        self._source: f.Source | None = None

    def source(self) -> f.Source:
        """The checked listing (headers only), once per recipe object."""
        if self._source is None:
            o = self.options
            self._source = f.scan(o["path"], self.layout, o.get("test"), o.get("unlabeled"),
                                  where=f"datasets.{self.name}.path")
            s = self._source
            print(f"semibench: note: datasets.{self.name}: layout {s.layout}"
                  f"{' (detected)' if s.detected else ''}, {s.count('train')} annotated images, "
                  f"{s.count('test')} test, {s.count('unlabeled')} unlabeled", file=sys.stderr)
        return self._source

    check_source = source  # the workflow checks a folder before any job (rules/common.smk)

    @property
    def split_policy(self) -> SplitPolicy:
        """A given test set (``test``, nnU-Net's labelsTs) is the test part; else test_fraction.
        Decided without reading the folder, so a split needs only the prepared manifest."""
        root = Path(str(self.options["path"])).expanduser()
        nnunet_test = self.layout in (None, "nnunet") and (root / "dataset.json").is_file() \
            and (root / "labelsTs").is_dir()
        given = self.options.get("test") is not None or nnunet_test
        return SplitPolicy(val=self.val, test="official" if given else self.test)

    def _tiles(self, e: f.Entry):
        if e.height <= self.tile and e.width <= self.tile:
            return None
        return tile_grid(e.height, e.width, self.tile)

    def index(self, archives: Mapping[str, Path] | None = None) -> list[SampleRef]:
        refs = []
        for e in self.source().entries:
            tiles = self._tiles(e)
            refs += [SampleRef(e.name, e.name, e.subset)] if tiles is None else \
                [SampleRef(tile_id(e.name, t.row, t.col), e.name, e.subset) for t in tiles]
        return refs

    def verify(self, archives: Mapping[str, Path] | None = None) -> dict:
        return dict(f.describe_source(self.source()), samples=len(self.index()), tile=self.tile)

    def source_fingerprint(self) -> dict[str, str]:
        """The files read (names and sizes): a changed folder is a different dataset."""
        h = hashlib.sha256()
        for e in self.source().entries:
            for p in e.image + e.masks:
                h.update(json.dumps([e.subset, e.name, str(p), p.stat().st_size]).encode())
        return {f"folder:{self.source().layout}": h.hexdigest()}

    def prepare(self, archives: Mapping[str, Path], writer: PreparedWriter) -> None:
        entries = list(self.source().entries)
        for e, rgb, label in parallel_map(_load, entries, self.workers, desc=self.name):
            n = int(np.count_nonzero(np.bincount(label.ravel())[1:])) if label.size else 0
            writer.add_image(e.name, e.height, e.width, n, e.subset)
            writer.images[-1]["channels"] = e.channels  # `semibench predict` compares new images
            tiles = self._tiles(e)
            if tiles is None:
                writer.add_sample(e.name, rgb, label, e.subset, source_image=e.name)
                continue
            for t in tiles:
                writer.add_sample(tile_id(e.name, t.row, t.col), np.ascontiguousarray(t.cut(rgb)),
                                  np.ascontiguousarray(t.cut(label)), e.subset, source_image=e.name,
                                  row=t.row, col=t.col, top=t.top, left=t.left)
