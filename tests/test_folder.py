"""The folder recipe (datasets/folder.py, semibench/data/folder.py) on hand-made folders: the four
layouts read to exact pixels and labels, detection, normalisation, tiling, the test set and the
unlabeled pool in the split, and every bad folder refused with one line before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from semibench.cli import main
from semibench.data.folder import percentile_normalise, scan
from semibench.data.obtain import get_recipe, prepare
from semibench.data.prepared import PreparedDataset
from semibench.data.splits import make_split

IMG = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4
LAB = np.array([[0, 1, 1, 0, 0],
                [0, 1, 0, 0, 2],
                [3, 0, 0, 2, 2],
                [3, 3, 0, 0, 0]], np.uint16)


def png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def tif(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array)
    return path


def stardist(root: Path, names=("a", "b")) -> Path:
    for n in names:
        png(root / "images" / f"{n}.png", IMG)
        tif(root / "masks" / f"{n}.tif", LAB)
    return root


def read_back(tmp_path: Path, options: dict, name: str = "mylab") -> PreparedDataset:
    return PreparedDataset(prepare(name, tmp_path / "data", dict(options, recipe="folder", workers=1)))


# ------------------------------------------------------------------ the four layouts

def test_stardist_layout_is_detected_and_read_exactly(tmp_path):
    src = stardist(tmp_path / "in")
    assert scan(src).layout == "stardist" and scan(src).detected
    ds = read_back(tmp_path, {"path": str(src)})
    assert ds.ids == ["a", "b"]
    s = ds.load("a")
    assert np.array_equal(s.image, IMG) and np.array_equal(s.label, LAB) and s.label.dtype == np.uint16
    assert [r["n_nuclei"] for r in ds.manifest["samples"]] == [3, 3]


def test_cellpose_layout_with_img_suffix_ignores_cellpose_outputs(tmp_path):
    src = tmp_path / "in"
    png(src / "x_img.png", IMG)
    png(src / "x_masks.png", LAB)  # 16-bit PNG
    png(src / "x_cp_masks.png", LAB * 0)  # cellpose's own prediction: not a mask to pair
    png(src / "x_flows.png", IMG)
    ds = read_back(tmp_path, {"path": str(src)})
    assert ds.ids == ["x"]
    assert np.array_equal(ds.load("x").label, LAB)


def test_cellpose_layout_without_img_suffix(tmp_path):
    src = tmp_path / "in"
    png(src / "y.png", IMG)
    tif(src / "y_masks.tif", LAB.astype(np.int32))
    assert scan(src).layout == "cellpose"
    assert np.array_equal(read_back(tmp_path, {"path": str(src)}).load("y").label, LAB)


def test_nnunet_layout_components_merge_touching_and_test_set(tmp_path):
    src = tmp_path / "in"
    (src).mkdir()
    (src / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "nucleus": 1},
                                                  "file_ending": ".png"}))
    semantic = (LAB > 0).astype(np.uint8)
    for sub, case in (("Tr", "c1"), ("Tr", "c2"), ("Ts", "t1")):
        png(src / f"images{sub}" / f"{case}_0000.png", IMG[..., 0])  # greyscale channel file
        png(src / f"labels{sub}" / f"{case}.png", semantic)
    ds = read_back(tmp_path, {"path": str(src)})
    assert [(r["id"], r["subset"]) for r in ds.manifest["samples"]] == \
        [("c1", "train"), ("c2", "train"), ("t1", "test")]
    s = ds.load("c1")
    # 8-connected components: nuclei 1 and 3 touch at a corner and merge; 2 stays apart
    assert np.array_equal(s.label, np.choose(LAB, [0, 1, 2, 1]).astype(np.uint16))
    assert np.array_equal(s.image, np.repeat(IMG[..., :1], 3, axis=2))
    assert get_recipe("mylab", {"recipe": "folder", "path": str(src)}).split_policy.official_test


def test_nnunet_channel_files_are_stacked(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "nuclei": 2}}))
    for ch in range(3):
        png(src / "imagesTr" / f"c_000{ch}.png", IMG[..., ch])
    png(src / "labelsTr" / "c.png", (LAB > 0).astype(np.uint8) * 2)
    s = read_back(tmp_path, {"path": str(src)}).load("c")
    assert np.array_equal(s.image, IMG) and int(s.label.max()) == 2  # label value 2 = "nuclei"


def test_per_nucleus_layout_numbers_masks_in_name_order(tmp_path):
    src = tmp_path / "in"
    png(src / "img1" / "images" / "img1.png", np.dstack([IMG, np.full((4, 5), 255, np.uint8)]))  # RGBA
    for k, name in ((1, "m_b"), (2, "m_a"), (3, "m_c")):
        png(src / "img1" / "masks" / f"{name}.png", ((LAB == k) * 255).astype(np.uint8))
    png(src / "img1" / "masks" / "m_empty.png", np.zeros((4, 5), np.uint8))  # gets no id
    s = read_back(tmp_path, {"path": str(src)}).load("img1")
    assert np.array_equal(s.image, IMG)  # alpha dropped
    # sorted names m_a (nucleus 2), m_b (1), m_c (3), m_empty -> ids 1, 2, 3
    assert np.array_equal(s.label, np.choose(LAB, [0, 2, 1, 3]).astype(np.uint16))


def test_explicit_layout_overrides_detection(tmp_path):
    src = stardist(tmp_path / "in")
    source = scan(src, layout="stardist")
    assert not source.detected and source.layout == "stardist"


# ------------------------------------------------------------------ normalisation, tiling

def test_16bit_images_are_percentile_normalised():
    x = np.arange(1000, dtype=np.uint16).reshape(25, 40) * 60
    y = percentile_normalise(x[..., None])[..., 0]
    lo, hi = np.percentile(x.astype(float), [1, 99.8])
    assert y.dtype == np.uint8 and y.min() == 0 and y.max() == 255
    assert y[12, 20] == np.uint8(np.clip(np.rint((x[12, 20] - lo) / (hi - lo) * 255), 0, 255))


def test_16bit_tiff_image_becomes_grey_rgb(tmp_path):
    src = tmp_path / "in"
    tif(src / "images" / "f.tif", (IMG[..., 0].astype(np.uint16) * 250))
    tif(src / "masks" / "f.tif", LAB)
    s = read_back(tmp_path, {"path": str(src)}).load("f")
    expect = percentile_normalise(IMG[..., :1].astype(np.uint16) * 250)
    assert np.array_equal(s.image, np.repeat(expect, 3, axis=2))


def test_large_images_are_tiled_and_tiles_stay_together(tmp_path):
    src = tmp_path / "in"
    big = np.random.default_rng(0).integers(0, 255, (40, 33, 3), dtype=np.uint8)
    label = np.zeros((40, 33), np.uint16)
    label[5:30, 3:20] = 7
    png(src / "images" / "big.png", big)
    tif(src / "masks" / "big.tif", label)
    for n in "cdefghij":
        png(src / "images" / f"{n}.png", big[:16, :16])
        tif(src / "masks" / f"{n}.tif", label[:16, :16])
    ds = read_back(tmp_path, {"path": str(src), "tile": 16})
    tiles = [r for r in ds.manifest["samples"] if r["image"] == "big"]
    assert [r["id"] for r in tiles] == [f"big_r{r}_c{c}" for r in range(3) for c in range(3)]
    t = ds.load("big_r1_c1")
    assert np.array_equal(t.image, big[16:32, 16:32]) and np.array_equal(t.label, label[16:32, 16:32])
    assert ds.load("big_r2_c2").image.shape == (8, 1, 3)
    for seed in range(4):
        split = make_split("mylab", seed, ds.manifest["samples"], get_recipe(
            "mylab", {"recipe": "folder", "path": str(src)}).split_policy)
        parts = [k for k in ("train", "val", "test") if any(i.startswith("big_") for i in split[k])]
        assert len(parts) == 1 and set(i for i in split[parts[0]] if i.startswith("big")) == \
            {r["id"] for r in tiles}


# ------------------------------------------------------------------ splits: test set, pool

def test_test_names_and_unlabeled_pool_in_the_split(tmp_path):
    src = stardist(tmp_path / "in", names=[f"n{i}" for i in range(10)])
    pool = tmp_path / "pool"
    png(pool / "u1.png", IMG)
    tif(pool / "u2.tif", IMG[..., 0].astype(np.uint16) * 100)
    options = {"path": str(src), "test": ["n3", "n7"], "unlabeled": str(pool), "val_fraction": 0.25}
    ds = read_back(tmp_path, options)
    assert {r["id"]: r["subset"] for r in ds.manifest["samples"]}["u2"] == "unlabeled"
    assert not ds.load("u1").label.any()
    recipe = get_recipe("mylab", dict(options, recipe="folder"))
    split = make_split("mylab", 0, ds.manifest["samples"], recipe.split_policy)
    assert split["test"] == ["n3", "n7"] and split["unlabeled"] == ["u1", "u2"]
    assert len(split["val"]) == 2 and len(split["train"]) == 6  # round(0.25 * 8)
    from semibench.data.loading import split_ids
    labeled, unlabeled, _ = split_ids(split, 1)  # all labels + the pool
    assert labeled == split["train"] and unlabeled == ["u1", "u2"]
    labeled, unlabeled, _ = split_ids(split, 8)
    assert len(labeled) == 1 and len(unlabeled) == 5 + 2


def test_test_folder_keeps_its_images_apart(tmp_path):
    src = stardist(tmp_path / "in", names=[f"n{i}" for i in range(5)])
    test = stardist(tmp_path / "held", names=["h1", "h2"])
    ds = read_back(tmp_path, {"path": str(src), "test": str(test)})
    policy = get_recipe("mylab", {"recipe": "folder", "path": str(src), "test": str(test)}).split_policy
    split = make_split("mylab", 1, ds.manifest["samples"], policy)
    assert split["test"] == ["h1", "h2"] and "unlabeled" not in split
    assert sorted(split["train"] + split["val"]) == [f"n{i}" for i in range(5)]


# ------------------------------------------------------------------ bad folders: one line, nothing written

def run_cli(tmp_path, monkeypatch, capsys, options: dict, verb: str = "obtain") -> str:
    monkeypatch.chdir(tmp_path)
    cfg = {"datasets": {"mylab": dict(options, recipe="folder")}}
    rc = main([verb, "--dataset", "mylab", "--config-json", json.dumps(cfg)])
    err = capsys.readouterr().err
    assert rc == 2
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("semibench: error: "), err
    return lines[0]


@pytest.mark.parametrize("verb", ["obtain", "verify", "prepare"])
def test_image_without_mask(tmp_path, monkeypatch, capsys, verb):
    src = stardist(tmp_path / "in")
    png(src / "images" / "c.png", IMG)
    line = run_cli(tmp_path, monkeypatch, capsys, {"path": str(src)}, verb)
    assert line.endswith(f"{src / 'images' / 'c.png'}: image without a mask "
                         "(no c.tif/.tiff/.png among the masks)")


def test_mask_without_image(tmp_path, monkeypatch, capsys):
    src = stardist(tmp_path / "in")
    tif(src / "masks" / "z.tif", LAB)
    line = run_cli(tmp_path, monkeypatch, capsys, {"path": str(src)})
    assert line.endswith(f"{src / 'masks' / 'z.tif'}: mask without an image")


def test_sizes_that_differ(tmp_path, monkeypatch, capsys):
    src = stardist(tmp_path / "in")
    tif(src / "masks" / "b.tif", LAB[:3])
    line = run_cli(tmp_path, monkeypatch, capsys, {"path": str(src)})
    assert line.endswith(f"{src / 'masks' / 'b.tif'}: the mask is 3x5 (h x w) but its image b.png is 4x5")


def test_float_mask_is_not_integer_labels(tmp_path, monkeypatch, capsys):
    src = stardist(tmp_path / "in")
    tif(src / "masks" / "b.tif", LAB.astype(np.float32) / 2)
    line = run_cli(tmp_path, monkeypatch, capsys, {"path": str(src)})
    assert line.endswith(f"{src / 'masks' / 'b.tif'}: not integer labels (floating-point values); "
                         "a mask is one channel, 0 background, 1..N")


def test_rgb_mask_is_not_integer_labels(tmp_path, monkeypatch, capsys):
    src = stardist(tmp_path / "in")
    (src / "masks" / "a.tif").unlink()
    png(src / "masks" / "a.png", IMG)
    line = run_cli(tmp_path, monkeypatch, capsys, {"path": str(src)})
    assert line.endswith(f"{src / 'masks' / 'a.png'}: not integer labels (3 channels); "
                         "a mask is one channel, 0 background, 1..N")


def test_empty_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "in").mkdir()
    line = run_cli(tmp_path, monkeypatch, capsys, {"path": str(tmp_path / "in")})
    assert line == f"semibench: error: {tmp_path / 'in'}: empty folder"


def test_empty_layout_folders(tmp_path, monkeypatch, capsys):
    (tmp_path / "in" / "images").mkdir(parents=True)
    (tmp_path / "in" / "masks").mkdir()
    line = run_cli(tmp_path, monkeypatch, capsys, {"path": str(tmp_path / "in")})
    assert line.endswith(f"{tmp_path / 'in' / 'images'}: no images (.tif, .tiff, .png)")


def test_missing_folder(tmp_path, monkeypatch, capsys):
    line = run_cli(tmp_path, monkeypatch, capsys, {"path": str(tmp_path / "nowhere")})
    assert line.endswith(f"datasets.mylab.path: {tmp_path / 'nowhere'} does not exist")


def test_duplicate_names_across_extensions(tmp_path, monkeypatch, capsys):
    src = stardist(tmp_path / "in")
    tif(src / "images" / "a.tif", IMG)
    line = run_cli(tmp_path, monkeypatch, capsys, {"path": str(src)})
    assert line.endswith(f"{src / 'images' / 'a.png'} and a.tif name the same image 'a'; keep one")


def test_unreadable_file(tmp_path, monkeypatch, capsys):
    src = stardist(tmp_path / "in")
    (src / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    line = run_cli(tmp_path, monkeypatch, capsys, {"path": str(src)})
    assert f"{src / 'images' / 'b.png'}: not a readable image: " in line


def test_undetectable_layout_lists_what_was_found(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in"
    for n in ("p", "q"):
        png(src / f"{n}.png", IMG)
    (src / "notes.txt").write_text("x")
    (src / "raw").mkdir()
    line = run_cli(tmp_path, monkeypatch, capsys, {"path": str(src)})
    assert line.startswith(f"semibench: error: {src}: cannot detect the layout; found 2 .png files, "
                           "1 .txt file, folder raw/; expected one of stardist (images/ + masks/)")


def test_pool_name_that_is_also_annotated(tmp_path, monkeypatch, capsys):
    src = stardist(tmp_path / "in")
    pool = tmp_path / "pool"
    png(pool / "a.png", IMG)
    line = run_cli(tmp_path, monkeypatch, capsys, {"path": str(src), "unlabeled": str(pool)})
    assert line.endswith(f"{pool / 'a.png'}: the name 'a' is taken by {src / 'images' / 'a.png'}; "
                         "image names must be unique across the annotated, test and unlabeled folders")


def test_unknown_test_name(tmp_path, monkeypatch, capsys):
    src = stardist(tmp_path / "in")
    line = run_cli(tmp_path, monkeypatch, capsys, {"path": str(src), "test": ["nope"]})
    assert line.endswith(f"{src}: test image 'nope' is not among its 2 images")


def test_config_errors_are_one_line(tmp_path, monkeypatch, capsys):
    src = stardist(tmp_path / "in")
    line = run_cli(tmp_path, monkeypatch, capsys, {"path": str(src), "layout": "imagej"})
    assert line == ("semibench: error: datasets.mylab.layout: unknown 'imagej'; known: stardist, "
                    "cellpose, nnunet, per-nucleus")
