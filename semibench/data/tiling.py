"""Non-overlapping tiles of an image, their ids, and reassembly.

Tiles are laid out row-major from the top-left corner; ``row``/``col`` are 0-based tile indices.
When the image size is not a multiple of the tile size, the last row/column of tiles is smaller,
so every pixel still lies in exactly one tile. Tile ids are ``<image_id>_r<row>_c<col>``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np

_TILE_ID = re.compile(r"^(?P<image>.+)_r(?P<row>\d+)_c(?P<col>\d+)$")


@dataclass(frozen=True)
class Tile:
    row: int
    col: int
    top: int
    left: int
    height: int
    width: int

    def cut(self, array: np.ndarray) -> np.ndarray:
        """The tile's view of ``array`` (HxW or HxWxC)."""
        return array[self.top:self.top + self.height, self.left:self.left + self.width]


def tile_grid(height: int, width: int, tile: int) -> list[Tile]:
    if tile < 1 or height < 1 or width < 1:
        raise ValueError(f"bad tiling: {height}x{width} image, tile {tile}")
    return [Tile(r, c, top, left, min(tile, height - top), min(tile, width - left))
            for r, top in enumerate(range(0, height, tile))
            for c, left in enumerate(range(0, width, tile))]


def tile_id(image_id: str, row: int, col: int) -> str:
    return f"{image_id}_r{row}_c{col}"


def parse_tile_id(tid: str) -> tuple[str, int, int]:
    m = _TILE_ID.match(tid)
    if not m:
        raise ValueError(f"{tid!r} is not a tile id (<image>_r<row>_c<col>)")
    return m["image"], int(m["row"]), int(m["col"])


def reassemble(pieces: Iterable[tuple[Tile, np.ndarray]], height: int, width: int) -> np.ndarray:
    """Inverse of cutting: place each tile's array back; every pixel must be covered once."""
    pieces = list(pieces)
    first = pieces[0][1]
    out = np.zeros((height, width) + first.shape[2:], dtype=first.dtype)
    covered = np.zeros((height, width), dtype=np.int32)
    for t, arr in pieces:
        if arr.shape[:2] != (t.height, t.width):
            raise ValueError(f"tile r{t.row} c{t.col}: array {arr.shape[:2]} != {(t.height, t.width)}")
        t.cut(out)[...] = arr
        t.cut(covered)[...] += 1
    if not (covered == 1).all():
        raise ValueError("tiles do not cover the image exactly once")
    return out
