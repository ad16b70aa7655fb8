"""The folder recipe against the dsb2018 recipe on real DSB images (marker ``realdata``; skipped
without the archive): a subset of the archive, unpacked as it is (the per-nucleus layout) and
written to the stardist layout by a helper here, gives the same prepared samples as the dsb2018
recipe on a zip of the same images."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from semibench.data.obtain import prepare
from semibench.data.prepared import PreparedDataset
from tests.test_realdata import SHARED

pytestmark = pytest.mark.realdata
N_IMAGES = 16


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> tuple[Path, list[str]]:
    archive = SHARED / "dsb2018" / "stage1_train.zip"
    if not archive.is_file():
        pytest.skip(f"real dsb2018 archive not found under {SHARED}")
    root = tmp_path_factory.mktemp("dsbsub")
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        ids = sorted({n.split("/")[-3] for n in names if n.count("/") >= 2 and "/images/" in n})
        chosen = ids[::len(ids) // N_IMAGES][:N_IMAGES]  # spread over the archive's sorted ids
        members = [n for n in names if n.split("/")[-3:-2] and n.split("/")[-3] in chosen
                   and not n.endswith("/")]
        with zipfile.ZipFile(root / "stage1_train.zip", "w") as out:
            for m in members:
                out.writestr(m, zf.read(m))
        zf.extractall(root / "per-nucleus", members)
    return root, chosen


def stardist_helper(src: Path, dest: Path, ids: list[str]) -> None:
    """images/ID.png: the archive's PNG as it is; masks/ID.tif: its masks painted in sorted order."""
    for iid in ids:
        (dest / "images").mkdir(parents=True, exist_ok=True)
        (dest / "masks").mkdir(exist_ok=True)
        (dest / "images" / f"{iid}.png").write_bytes((src / iid / "images" / f"{iid}.png").read_bytes())
        masks = sorted((src / iid / "masks").iterdir())
        label = None
        k = 0
        for m in masks:
            on = np.asarray(Image.open(io.BytesIO(m.read_bytes())).convert("L")) > 0
            label = np.zeros(on.shape, np.uint16) if label is None else label
            if on.any():
                k += 1
                label[on] = k
        tifffile.imwrite(dest / "masks" / f"{iid}.tif", label)


def test_dsb_subset_folder_equals_dsb2018_recipe(subset, tmp_path):
    root, ids = subset
    ref = PreparedDataset(prepare("dsb2018", tmp_path / "ref", {"archive": str(root / "stage1_train.zip"),
                                                                 "workers": 1}))
    assert ref.ids == ids
    unpacked = next(p.parents[2] for p in (root / "per-nucleus").rglob(f"{ids[0]}.png"))  # the ID folders' parent
    stardist_helper(unpacked, tmp_path / "stardist", ids)
    for layout, path in (("per-nucleus", unpacked), ("stardist", tmp_path / "stardist")):
        got = PreparedDataset(prepare("dsb2018", tmp_path / layout, {
            "recipe": "folder", "path": str(path), "layout": layout, "tile": 4096, "workers": 1}))
        assert got.ids == ref.ids, layout
        for i in ids:
            a, b = ref.load(i), got.load(i)
            assert np.array_equal(a.image, b.image), (layout, i)
            assert np.array_equal(a.label, b.label) and a.label.dtype == b.label.dtype, (layout, i)
        assert [r["n_nuclei"] for r in got.manifest["samples"]] == [r["n_nuclei"] for r in ref.manifest["samples"]]
