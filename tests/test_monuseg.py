"""The MoNuSeg recipe: polygon rasterisation by hand-made cases, prepare and tiling on a tiny
archive, and its error cases."""
import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from semibench.data import obtain as ob
from semibench.data.prepared import PreparedDataset
from semibench.data.tiling import reassemble, tile_grid
from semibench.datasets.monuseg import MoNuSeg, fill_polygon, parse_regions, rasterise
from semibench.errors import ConfigError, DataError
from tests.archives import assert_no_prepared_output, square, tif, tiny_monuseg, write_zip, xml


@pytest.fixture
def small_monuseg(monkeypatch):
    monkeypatch.setattr(MoNuSeg, "tile_size", 20)
    monkeypatch.setattr(MoNuSeg, "image_size", (40, 40))
    monkeypatch.setattr(MoNuSeg, "expected_images", {"train": 2, "test": 1})


def test_hand_made_polygons_rasterise_to_the_expected_pixels():
    # XML coordinates are 1-based: (X, Y) -> 0-based (x, y) = (X - 1, Y - 1); a pixel is in a
    # region when its centre (x = col, y = row) is inside the polygon or on its boundary.
    regions = [
        # 1: square -> x 1..4, y 2..4: rows 2..4, cols 1..4 (edges included)
        square(2, 3, 5, 5),
        # 2: triangle (0,0), (4,0), (0,4): row r spans cols 0 .. 4 - r (the hypotenuse is included)
        [(1, 1), (5, 1), (1, 5)],
        # 3: a segment between pixel centres, (7.3, 6.2)-(8.4, 7.6): crosses row 7 at x = 7.93, so no
        #    pixel; it takes the pixel at its vertex mean (7.85, 6.9) rounded half up: row 7, col 8
        [(8.3, 7.2), (9.4, 8.6)],
        # 4: x 6.2..8.8, y 1..2.5: rows 1, 2 and cols 7, 8
        [(7.2, 2), (9.8, 2), (9.8, 3.5), (7.2, 3.5)],
        # 5: a horizontal segment through pixel centres, (0, 7)-(2, 7): row 7, cols 0..2
        [(1, 8), (3, 8)],
    ]
    label = rasterise(parse_regions(xml(regions), "hand.xml"), 9, 10)
    expected = np.array([
        [2, 2, 2, 2, 2, 0, 0, 0, 0, 0],
        [2, 2, 2, 2, 0, 0, 0, 4, 4, 0],
        [2, 2, 2, 1, 1, 0, 0, 4, 4, 0],  # (2, 1), (2, 2) are in 1 and 2: the later region 2 wins
        [2, 2, 1, 1, 1, 0, 0, 0, 0, 0],
        [2, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [5, 5, 5, 0, 0, 0, 0, 0, 3, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ])
    assert np.array_equal(label, expected), label


def test_covered_region_keeps_one_pixel_and_clipping():
    big = square(1, 1, 6, 6)  # 0-based 0..5: the whole 6x6 image
    inner = square(3, 3, 4, 4)  # 0-based 2..3: rows/cols 2, 3
    label = rasterise([np.array(inner, float), np.array(big, float)], 6, 6)
    # the big square (later) covers the inner one, which then takes the pixel at its vertex
    # mean: 0-based (2.5, 2.5) rounded half up -> (3, 3)
    assert label[3, 3] == 1 and (label == 2).sum() == 35 and (label == 1).sum() == 1
    off_image = rasterise([np.array(square(-5, -5, -2, -2), float)], 4, 4)
    assert off_image[0, 0] == 1 and off_image.sum() == 1  # clipped onto the nearest pixel


def test_fill_polygon_closed_rule_on_diagonal_and_vertical_edges():
    # the diamond |x - 5| + |y - 5| <= 3: its edges pass through pixel centres
    top, left, mask = fill_polygon(np.array([5.0, 8.0, 5.0, 2.0]), np.array([2.0, 5.0, 8.0, 5.0]), 20, 20)
    got = {(top + r, left + c) for r, c in zip(*np.nonzero(mask))}
    assert got == {(r, c) for r in range(20) for c in range(20) if abs(c - 5) + abs(r - 5) <= 3}


def test_decimal_vertices_decide_ties_by_the_rule_not_rounding():
    # A rectangle with X = 176 (x = 175 exactly) and Y values like 21.8 that are not binary
    # fractions: column 175 lies on the right edge, so it is in on every row. (Unsnapped, the
    # crossing on row 21 evaluates to 174.99999999999997 and the pixel would be lost.)
    poly = np.array([[170.6, 21.8], [176.0, 21.8], [176.0, 31.2], [170.6, 31.2]])
    label = rasterise([poly], 40, 200)
    expected = np.zeros((40, 200), int)
    expected[21:31, 170:176] = 1  # x 169.6..175, y 20.8..30.2
    assert np.array_equal(label, expected)


def test_monuseg_prepare_tiny(tmp_path, small_monuseg):
    archives = tiny_monuseg(tmp_path / "src")
    cfg = {"archive": str(tmp_path / "src"), "workers": 1}
    root = ob.prepare("monuseg", tmp_path / "data", cfg)
    data = PreparedDataset(root)
    images = data.manifest["images"]
    assert [(i["id"], i["subset"], i["n_nuclei"]) for i in images] == [
        ("TCGA-AA", "train", 3), ("TCGA-BB", "train", 3), ("TCGA-CC", "test", 3)]
    assert len(data.ids) == 12 and data.ids[:4] == ["TCGA-AA_r0_c0", "TCGA-AA_r0_c1", "TCGA-AA_r1_c0", "TCGA-AA_r1_c1"]
    with zipfile.ZipFile(archives["MoNuSegTestData.zip"]) as zf:
        source = np.asarray(Image.open(io.BytesIO(zf.read("MoNuSegTestData/TCGA-CC.tif"))).convert("RGB"))
        regions = parse_regions(zf.read("MoNuSegTestData/TCGA-CC.xml"), "cc")
    tiles = [t for t in tile_grid(40, 40, 20)]
    samples = [data.load(f"TCGA-CC_r{t.row}_c{t.col}") for t in tiles]
    assert np.array_equal(reassemble([(t, s.image) for t, s in zip(tiles, samples)], 40, 40), source)
    masks = reassemble([(t, s.label > 0) for t, s in zip(tiles, samples)], 40, 40)
    assert np.array_equal(masks, rasterise(regions, 40, 40) > 0)
    # square (18,18)-(24,30) spans tiles r0_c0 / r1_c0 boundary: rows 17..28, cols 17..22 (0-based)
    assert samples[0].label.max() == 2 and samples[2].label.max() == 1  # renumbered 1..n per tile
    assert [data.by_id[f"TCGA-CC_r{t.row}_c{t.col}"]["n_nuclei"] for t in tiles] == [2, 2, 1, 1]
    assert data.by_id["TCGA-CC_r1_c0"]["top"] == 20 and data.by_id["TCGA-CC_r1_c0"]["left"] == 0
    summary = ob.verify("monuseg", tmp_path / "data", cfg)["summary"]
    assert (summary["train"]["images"], summary["train"]["regions"], summary["test"]["regions"]) == (2, 6, 3)


def test_monuseg_aliases_found_in_data_dir(tmp_path, small_monuseg):
    tiny_monuseg(tmp_path / "data" / "raw" / "monuseg")
    records = ob.obtain("monuseg", tmp_path / "data", {})
    assert set(records) == {"MoNuSeg 2018 Training Data.zip", "MoNuSegTestData.zip"}
    assert records["MoNuSeg 2018 Training Data.zip"]["path"].endswith("MoNuSegTrainingData.zip")
    assert records["MoNuSegTestData.zip"]["matches_official"] is False
    assert "differs from the official download" in records["MoNuSegTestData.zip"]["note"]


def test_monuseg_xml_that_does_not_parse(tmp_path, small_monuseg):
    tiny_monuseg(tmp_path / "src", bad_xml=True)
    cfg = {"archive": str(tmp_path / "src"), "workers": 1}
    pattern = r"MoNuSegTrainingData.zip: MoNuSeg 2018 Training Data/Annotations/TCGA-BB.xml: XML does not parse"
    with pytest.raises(DataError, match=pattern):
        ob.verify("monuseg", tmp_path / "data", cfg)
    with pytest.raises(DataError, match=pattern):
        ob.prepare("monuseg", tmp_path / "data", cfg)
    assert_no_prepared_output(tmp_path / "data", "monuseg")


def test_monuseg_image_without_annotation(tmp_path, small_monuseg):
    write_zip(tmp_path / "src" / "MoNuSegTrainingData.zip", {"a/x.tif": tif(np.zeros((40, 40, 3), np.uint8))})
    write_zip(tmp_path / "src" / "MoNuSegTestData.zip", {})
    with pytest.raises(DataError, match="image x has no annotation XML"):
        ob.prepare("monuseg", tmp_path / "data", {"archive": str(tmp_path / "src")})
    assert_no_prepared_output(tmp_path / "data", "monuseg")


def test_monuseg_archive_mapping_must_use_known_names(tmp_path):
    with pytest.raises(ConfigError, match="unknown archive name"):
        ob.verify("monuseg", tmp_path, {"archive": {"train.zip": "x"}})
