import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semibench.config import RunConfig, TrainConfig
from semibench.data import preprocess
from semibench.errors import DataError, TrainingError
from semibench.evaluate import CSV_COLUMNS, evaluate_run
from semibench.metrics import METRIC_NAMES, Counts, scores
from semibench.model import build_model
from semibench.prepared import PreparedDataset, PreparedWriter

SIZES = {"a": (20, 24), "b": (17, 30), "c": (32, 32), "d": (25, 19), "e": (16, 16), "f": (24, 28)}
TEST = ["b", "c", "d", "e", "f"]  # 5 test samples with eval batch 2: a partial last batch


def _disc_sample(rng, h, w):
    """Dark background with bright discs as nuclei, labels 1..n."""
    image = rng.integers(20, 60, size=(h, w, 3)).astype(np.uint8)
    label = np.zeros((h, w), np.uint16)
    yy, xx = np.mgrid[:h, :w]
    for n in range(1, int(rng.integers(1, 4)) + 1):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, 6)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        label[disc] = n
        image[disc] = rng.integers(180, 240, size=3)
    return image, label


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The prepared data, the split and a briefly trained tiny model, built once per module."""
    tmp = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    data_dir, splits_dir = tmp / "data", tmp / "splits"
    (data_dir / "prepared").mkdir(parents=True)
    with PreparedWriter(data_dir / "prepared" / "syn", "syn") as w:
        for sid, (h, w_) in SIZES.items():
            image, label = _disc_sample(rng, h, w_)
            w.add_image(sid, h, w_, int(label.max()), "train")
            w.add_sample(sid, image, label, "train")
        w.commit()
    (splits_dir / "syn").mkdir(parents=True)
    (splits_dir / "syn" / "seed3.json").write_text(json.dumps(
        {"dataset": "syn", "seed": 3, "train": ["a"], "val": [], "test": TEST,
         "labeled": {"1": ["a"]}}))
    # a briefly trained tiny model, so predictions hold both classes
    torch.manual_seed(0)
    model = build_model("tiny", "none")
    ds = PreparedDataset(data_dir / "prepared" / "syn")
    x = torch.stack([preprocess(ds.load(i).image, 32) for i in ds.ids])
    y = torch.stack([F.interpolate(torch.from_numpy(ds.load(i).mask)[None, None].float(), size=(32, 32))[0, 0]
                     for i in ds.ids]).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        loss = F.cross_entropy(model(x).logits, y)
        opt.zero_grad(); loss.backward(); opt.step()
    return data_dir, splits_dir, model, ds


@pytest.fixture
def run_dir(tmp_path, shared):
    data_dir, splits_dir, model, ds = shared
    cfg = RunConfig(dataset="syn", method="suponly", ratio=1, seed=3, data_dir=str(data_dir),
                    splits_dir=str(splits_dir), device="cpu",
                    train=TrainConfig(backbone="tiny", weights="none", input_size=32,
                                      eval_batch_size=2))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.save({"model": model.state_dict(), "epoch": 7, "val_dice": 0.5}, run / "best.pt")
    (run / "train_done.json").write_text(json.dumps(
        {"timings": {"train_seconds": 12.5}, "device": "cpu",
         "weights_info": {"requested": "none", "used": "random-init", "reason": "test"}}))
    return run, model, ds


def _direct_counts(model, ds, ids):
    model.eval()
    out = {}
    with torch.no_grad():
        for i in ids:
            s = ds.load(i)
            logits = model(preprocess(s.image, 32)[None]).logits
            pred = F.interpolate(logits, size=s.label.shape, mode="bilinear",
                                 align_corners=False)[0].argmax(0).numpy() == 1
            truth = s.label > 0
            out[i] = Counts(int((pred & truth).sum()), int((pred & ~truth).sum()),
                            int((~pred & ~truth).sum()), int((~pred & truth).sum()))
    return out


def test_evaluate_end_to_end(run_dir):
    run, model, ds = run_dir
    result = evaluate_run(run)
    expected = _direct_counts(model, ds, TEST)
    assert sum(c.tp + c.fp for c in expected.values()) > 0  # the model predicts some nuclei
    assert sum(c.tn + c.fn for c in expected.values()) > 0

    rows = list(csv.DictReader((run / "per_image.csv").open()))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["id"] for r in rows] == TEST
    for r in rows:
        c = expected[r["id"]]
        assert (int(r["height"]), int(r["width"])) == SIZES[r["id"]]
        assert Counts(int(r["tp"]), int(r["fp"]), int(r["tn"]), int(r["fn"])) == c
        assert c.total == SIZES[r["id"]][0] * SIZES[r["id"]][1]
        for k, v in scores(c).items():
            assert float(r[k]) == pytest.approx(v, abs=1e-12)

    written = json.loads((run / "metrics.json").read_text())
    assert written["pooled"] == result["pooled"]
    total = Counts(0, 0, 0, 0)
    for c in expected.values():
        total = total + c
    for k in METRIC_NAMES:
        assert written["pooled"][k] == pytest.approx(scores(total)[k], abs=1e-12)
        assert written["per_image_mean"][k] == pytest.approx(
            np.mean([scores(c)[k] for c in expected.values()]), abs=1e-12)
    meta = written["meta"]
    assert meta["n_test"] == 5 and meta["seed"] == 3
    assert meta["config"]["train"]["backbone"] == "tiny"
    assert set(meta["versions"]) == {"python", "torch", "torchvision", "numpy", "semibench"}
    assert meta["weights"]["used"] == "random-init"
    assert meta["timings"]["train"] == {"train_seconds": 12.5}
    assert meta["timings"]["eval_seconds"] > 0
    assert meta["device"]["eval"] == "cpu"
    assert meta["checkpoint"] == {"epoch": 7, "val_dice": 0.5}
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt", "config.json", "metrics.json", "per_image.csv", "train_done.json"]


def test_evaluate_is_deterministic(run_dir):
    run, _, _ = run_dir
    evaluate_run(run)
    first = (run / "per_image.csv").read_text()
    evaluate_run(run)
    assert (run / "per_image.csv").read_text() == first


@pytest.mark.parametrize("missing", ["best.pt", "train_done.json", "config.json"])
def test_missing_run_files(run_dir, missing):
    run, _, _ = run_dir
    (run / missing).unlink()
    with pytest.raises(DataError, match=missing.replace(".", r"\.")):
        evaluate_run(run)
    assert not (run / "metrics.json").exists() and not (run / "per_image.csv").exists()


def test_checkpoint_of_another_backbone(run_dir):
    run, _, _ = run_dir
    torch.save({"model": build_model("tiny", proj_dim=8).state_dict() | {"decoder.0.conv.weight": torch.zeros(1)}},
               run / "best.pt")
    with pytest.raises(TrainingError, match="does not fit"):
        evaluate_run(run)
    assert not (run / "metrics.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_requested_but_absent(run_dir):
    run, _, _ = run_dir
    with pytest.raises(TrainingError, match="no CUDA GPU"):
        evaluate_run(run, device="cuda")
    assert not (run / "metrics.json").exists()
