"""`semibench predict` (semibench/evaluate/predict.py): a briefly trained tiny model on folders of
new images of two sizes; whole images match the evaluation's prediction exactly; refusals are one
line and leave nothing behind."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

from semibench.cli import main
from semibench.config import RunConfig, TrainConfig
from semibench.data.loading import preprocess
from semibench.data.obtain import prepare
from semibench.evaluate.instances import components
from semibench.evaluate.predict import windows
from semibench.evaluate.score import full_size_logits
from semibench.network.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def discs(rng, h: int, w: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:h, :w]
    label = np.zeros((h, w), np.uint16)
    for k in range(1, n + 1):
        cy, cx = rng.integers(5, h - 5), rng.integers(5, w - 5)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = k
    grey = np.where(label > 0, 200, 20).astype(np.uint8) + rng.integers(0, 20, (h, w), dtype=np.uint8)
    return grey, label


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A greyscale folder dataset (32² images) and a tiny model trained on it for 40 steps."""
    tmp = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    for i in range(6):
        grey, label = discs(rng, 32, 32, 3)
        Image.fromarray(grey).save((tmp / "in" / "images").mkdir(parents=True, exist_ok=True) or
                                   tmp / "in" / "images" / f"g{i}.png")
        (tmp / "in" / "masks").mkdir(exist_ok=True)
        tifffile.imwrite(tmp / "in" / "masks" / f"g{i}.tif", label)
    prepared = prepare("grey", tmp / "data", {"recipe": "folder", "path": str(tmp / "in"), "workers": 1})
    from semibench.data.prepared import PreparedDataset
    ds = PreparedDataset(prepared)
    torch.manual_seed(0)
    model = build_model("tiny", "none")
    x = torch.stack([preprocess(ds.load(i).image, 32) for i in ds.ids])
    y = torch.stack([torch.from_numpy(ds.load(i).mask).long() for i in ds.ids])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = F.cross_entropy(model(x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cfg = RunConfig(dataset="grey", method="suponly", ratio=1, seed=0, data_dir=str(tmp / "data"),
                    splits_dir=str(tmp / "splits"), device="cpu",
                    train=TrainConfig(backbone="tiny", weights="none", input_size=32, eval_batch_size=4))
    rd = tmp / "run"
    rd.mkdir()
    (rd / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.save({"model": model.state_dict(), "epoch": 1, "val_dice": 0.5}, rd / "best.pt")
    return rd


def new_images(folder: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    small, _ = discs(rng, 30, 26, 3)
    big, _ = discs(rng, 90, 75, 20)  # larger than the 32 px window: tiled with overlap
    Image.fromarray(small).save((folder.mkdir() or folder) / "small.png")
    tifffile.imwrite(folder / "big.tif", big.astype(np.uint16) * 100)  # 16-bit
    return {"small": small, "big": big}


def test_windows_overlap_and_reach_the_edge():
    assert windows(30, 32) == [0]
    assert windows(90, 32) == [0, 24, 48, 58]
    assert windows(33, 32) == [0, 1]


def test_predict_two_sizes(run, tmp_path, capsys):
    images = new_images(tmp_path / "new")
    assert main(["predict", "--run", str(run), "--images", str(tmp_path / "new"), "--out",
                 str(tmp_path / "out"), "--device", "cpu"]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["big.tif", "big_overlay.png", "nuclei.csv",
                                                     "small.tif", "small_overlay.png"]
    rows = list(csv.DictReader(open(out / "nuclei.csv")))
    for name, img in images.items():
        labels = tifffile.imread(out / f"{name}.tif")
        assert labels.shape == img.shape and labels.dtype == np.uint16 and labels.max() > 0
        assert Image.open(out / f"{name}_overlay.png").size == (img.shape[1], img.shape[0])
        mine = [r for r in rows if r["image"] == name]
        assert [int(r["label"]) for r in mine] == list(range(1, int(labels.max()) + 1))
        assert [int(r["area"]) for r in mine] == np.bincount(labels.ravel())[1:].tolist()
    # the small image goes through whole, as the evaluation predicts a test sample
    model = build_model("tiny", "none")
    model.load_state_dict(torch.load(run / "best.pt")["model"])
    model.eval()
    with torch.no_grad():
        x = preprocess(np.repeat(images["small"][..., None], 3, 2), 32)[None]
        mask = (full_size_logits(model, x, [(30, 26)])[0].argmax(0) == 1).numpy()
    assert np.array_equal(tifffile.imread(out / "small.tif"), components(mask))
    capsys.readouterr()


def refused(run, tmp_path, capsys, images: Path, out: Path, expect: str) -> None:
    rc = main(["predict", "--run", str(run), "--images", str(images), "--out", str(out), "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and lines == [f"semibench: error: {expect}"]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_refuses_colour_images_for_a_greyscale_run(run, tmp_path, capsys):
    (tmp_path / "new").mkdir()
    Image.fromarray(np.full((20, 20, 3), [200, 10, 90], np.uint8)).save(tmp_path / "new" / "he.png")
    refused(run, tmp_path, capsys, tmp_path / "new", tmp_path / "out",
            f"{tmp_path / 'new' / 'he.png'}: a colour (RGB) image (3 channels), but run {run} was trained "
            "on greyscale images of grey; use a run trained on colour (RGB) images")


def test_refuses_an_empty_folder_and_an_unreadable_image(run, tmp_path, capsys):
    (tmp_path / "new").mkdir()
    refused(run, tmp_path, capsys, tmp_path / "new", tmp_path / "out",
            f"--images {tmp_path / 'new'}: no images (.tif, .tiff, .png)")
    (tmp_path / "new" / "x.png").write_bytes(b"nope")
    rc = main(["predict", "--run", str(run), "--images", str(tmp_path / "new"), "--out",
               str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{tmp_path / 'new' / 'x.png'}: not a readable image" in err[0]
    assert not (tmp_path / "out").exists()


def test_refuses_an_unfinished_run(run, tmp_path, capsys):
    new_images(tmp_path / "new")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((run / "config.json").read_text())
    refused(tmp_path / "half", tmp_path, capsys, tmp_path / "new", tmp_path / "out",
            f"{tmp_path / 'half' / 'best.pt'} not found: the run has not finished training")
