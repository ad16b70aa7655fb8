"""`semibench export` and the round trip: the synthetic dataset written in each folder layout and
read back by the folder recipe gives the same prepared samples (nnU-Net: the same after connected
components) and the same split files for the same seed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from semibench.cli import main
from semibench.data.folder import LAYOUTS
from semibench.data.obtain import prepare
from semibench.data.prepared import PreparedDataset
from semibench.evaluate.instances import components

SYNTHETIC = {"count": 12, "size": [40, 56], "nuclei": [40, 120], "workers": 1}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn")
    prepare("synthetic", root / "data", SYNTHETIC)
    return root


def cli(*args: str) -> int:
    return main(list(args))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip(synthetic, tmp_path, layout, capsys):
    data = synthetic / "data"
    assert cli("export", "synthetic", "--layout", layout, str(tmp_path / "out"), "--data-dir", str(data)) == 0
    # read back under the source's own name, so the seeded split orders are comparable
    cfg = {"datasets": {"synthetic": {"recipe": "folder", "path": str(tmp_path / "out"), "workers": 1}}}
    back = tmp_path / "data"
    assert cli("prepare", "--dataset", "synthetic", "--data-dir", str(back), "--config-json", json.dumps(cfg)) == 0
    ref, got = PreparedDataset(data / "prepared" / "synthetic"), PreparedDataset(back / "prepared" / "synthetic")
    assert got.ids == ref.ids and len(ref.ids) == 12
    merged = 0
    for i in ref.ids:
        a, b = ref.load(i), got.load(i)
        assert np.array_equal(a.image, b.image)
        want = components(a.label > 0).astype(a.label.dtype) if layout == "nnunet" else a.label
        assert np.array_equal(b.label, want) and b.label.dtype == a.label.dtype
        merged += int(a.label.max()) - int(want.max())
    if layout == "nnunet":
        assert merged > 0  # touching synthetic nuclei merge: the comparison above is not vacuous
    for seed in (0, 1):
        for root in (data.parent, back.parent):
            out = root / f"split{seed}-{root.name}.json"
            assert cli("split", "--dataset", "synthetic", "--seed", str(seed), "--data-dir", str(root / "data"),
                       "--out", str(out), "--config-json", json.dumps(cfg if root == back.parent else {})) == 0
        assert (data.parent / f"split{seed}-{data.parent.name}.json").read_bytes() == \
            (back.parent / f"split{seed}-{back.parent.name}.json").read_bytes()
    capsys.readouterr()


def test_export_layouts_on_disk(synthetic, tmp_path):
    data = str(synthetic / "data")
    for layout in LAYOUTS:
        assert cli("export", "synthetic", "--layout", layout, str(tmp_path / layout), "--data-dir", data) == 0
    assert sorted(p.name for p in (tmp_path / "stardist").iterdir()) == ["images", "masks"]
    assert (tmp_path / "stardist" / "masks" / "syn00003.tif").is_file()
    assert (tmp_path / "cellpose" / "syn00000_img.png").is_file()
    assert (tmp_path / "cellpose" / "syn00000_masks.png").is_file()
    meta = json.loads((tmp_path / "nnunet" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "nucleus": 1} and meta["numTraining"] == 12
    assert (tmp_path / "nnunet" / "imagesTr" / "syn00011_0000.png").is_file()
    label = PreparedDataset(synthetic / "data" / "prepared" / "synthetic").load("syn00002").label
    masks = sorted((tmp_path / "per-nucleus" / "syn00002" / "masks").iterdir())
    assert len(masks) == int(label.max()) and masks[0].name == "syn00002_0001.png"


def test_export_refuses_a_non_empty_folder(synthetic, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    rc = cli("export", "synthetic", "--layout", "stardist", str(tmp_path / "out"), "--data-dir",
             str(synthetic / "data"))
    assert rc == 2 and capsys.readouterr().err.strip() == \
        f"semibench: error: {tmp_path / 'out'} already exists and is not an empty folder"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
