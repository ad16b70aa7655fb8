import csv
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import semibench.evaluate.score
from semibench.config import RunConfig, TrainConfig
from semibench.data.loading import preprocess
from semibench.data.prepared import PreparedDataset, PreparedWriter
from semibench.errors import ConfigError, DataError, TrainingError
from semibench.evaluate.instances import INSTANCE_METRIC_NAMES, components, instance_scores, match
from semibench.evaluate.metrics import METRIC_NAMES, Counts, scores
from semibench.evaluate.score import CSV_COLUMNS, evaluate_run, rescore_run
from semibench.network.model import build_model

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
        opt.zero_grad()
        loss.backward()
        opt.step()
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
    assert set(meta["versions"]) == {"python", "torch", "torchvision", "numpy", "scipy",
                                     "scikit-image", "semibench"}
    assert meta["evaluate"] == {"instances": "components", "min_object_size": 0, "from": "model"}
    assert meta["weights"]["used"] == "random-init"
    assert meta["timings"]["train"] == {"train_seconds": 12.5}
    assert meta["timings"]["eval_seconds"] > 0
    assert meta["device"]["eval"] == "cpu"
    assert meta["checkpoint"] == {"epoch": 7, "val_dice": 0.5}
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt", "config.json", "metrics.json", "per_image.csv", "predictions", "probabilities",
        "train_done.json"]


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


# ------------------------------------------------------------------ instances, saved predictions

def _direct_predictions(model, ds, ids):
    """Mask (argmax) and foreground probability at the original size, computed here directly."""
    model.eval()
    out = {}
    with torch.no_grad():
        for i in ids:
            s = ds.load(i)
            logits = F.interpolate(model(preprocess(s.image, 32)[None]).logits, size=s.label.shape,
                                   mode="bilinear", align_corners=False)[0]
            out[i] = (logits.argmax(0).numpy() == 1, torch.softmax(logits, 0)[1].numpy())
    return out


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im)


def test_predictions_saved_and_instance_columns(run_dir):
    run, model, ds = run_dir
    result = evaluate_run(run)
    direct = _direct_predictions(model, ds, TEST)
    rows = {r["id"]: r for r in csv.DictReader((run / "per_image.csv").open())}
    assert sorted(p.name for p in (run / "predictions").iterdir()) == \
        sorted([f"{i}.png" for i in TEST] + ["_inference.json"])
    for i in TEST:
        mask, prob = direct[i]
        saved = _png(run / "predictions" / f"{i}.png")
        assert saved.dtype == np.uint8 and saved.shape == SIZES[i]
        assert np.array_equal(saved, mask.astype(np.uint8) * 255)  # lossless, 0/255
        saved_p = _png(run / "probabilities" / f"{i}.png")
        assert saved_p.shape == SIZES[i]
        assert np.abs(saved_p.astype(int) - np.round(prob * 255).astype(int)).max() <= 1
        # the instance columns: 8-connected components of the mask against the label map
        st = match(ds.load(i).label, components(mask))
        r = rows[i]
        assert r["source_id"] == i  # no tiles: the sample is its own source image
        for k, v in st.as_dict().items():
            assert float(r[k]) == pytest.approx(v, abs=1e-12)
        for k, v in instance_scores(st).items():
            assert float(r[k]) == pytest.approx(v, abs=1e-12)
    # dataset level: the summed per-sample terms
    c = sum(int(r["aji_c"]) for r in rows.values())
    u = sum(int(r["aji_u"]) for r in rows.values())
    assert result["dataset_level"]["aji"] == pytest.approx(c / u, abs=1e-12)
    tp, fp, fn = (sum(int(r[k]) for r in rows.values()) for k in ("tp_obj", "fp_obj", "fn_obj"))
    iou = sum(float(r["iou_sum"]) for r in rows.values())
    dq = tp / (tp + 0.5 * fp + 0.5 * fn) if tp + fp + fn else 1.0
    sq = iou / tp if tp else (1.0 if fp + fn == 0 else 0.0)
    assert result["dataset_level"]["pq"] == pytest.approx(dq * sq, abs=1e-12)
    for k in INSTANCE_METRIC_NAMES:
        assert result["per_image_mean"][k] == pytest.approx(
            np.mean([float(r[k]) for r in rows.values()]), abs=1e-12)
    present = set(result["pooled"]) | set(result["per_image_mean"]) | set(result["dataset_level"])
    assert set(result["metric_info"]) == present
    assert result["metric_info"]["aji"] == {"abbrev": "AJI", "kind": "instance",
                                            "higher_is_better": True,
                                            "name": "Aggregated Jaccard Index (Kumar et al. 2017)"}
    assert set(result["pooled"]) == set(METRIC_NAMES)


def _metric_sections(doc):
    return {k: doc[k] for k in ("pooled", "per_image_mean", "dataset_level", "metric_info")}


@pytest.mark.parametrize("instances", ["components", "watershed"])
def test_metrics_only_round_trip_equals_full_evaluation(run_dir, instances):
    run, _, _ = run_dir
    full = evaluate_run(run, instances=instances, min_object_size=3)
    csv_full = (run / "per_image.csv").read_text()
    (run / "metrics.json").unlink()
    (run / "per_image.csv").unlink()
    (run / "best.pt").unlink()  # the model is not needed
    again = rescore_run(run, instances=instances, min_object_size=3)
    assert (run / "per_image.csv").read_text() == csv_full
    written = json.loads((run / "metrics.json").read_text())
    assert _metric_sections(written) == _metric_sections(full) == _metric_sections(again)
    assert written["meta"]["evaluate"] == {"instances": instances, "min_object_size": 3,
                                           "from": "predictions"}
    # the inference record travels with the predictions
    assert written["meta"]["checkpoint"] == full["meta"]["checkpoint"] == {"epoch": 7, "val_dice": 0.5}
    assert written["meta"]["timings"]["eval_seconds"] == full["meta"]["timings"]["eval_seconds"]


def test_metrics_only_options_change_only_the_instance_metrics(run_dir):
    run, _, _ = run_dir
    a = evaluate_run(run)
    b = rescore_run(run, min_object_size=10 ** 6)  # drops every predicted object
    assert a["pooled"] == b["pooled"]
    assert {k: a["per_image_mean"][k] for k in METRIC_NAMES} == \
        {k: b["per_image_mean"][k] for k in METRIC_NAMES}
    rows = list(csv.DictReader((run / "per_image.csv").open()))
    assert all(int(r["n_pred"]) == 0 for r in rows)


def test_metrics_only_without_predictions(run_dir):
    run, _, _ = run_dir
    with pytest.raises(DataError, match=r"no saved prediction for 5 of 5 test samples"):
        rescore_run(run)
    assert not (run / "metrics.json").exists() and not (run / "per_image.csv").exists()
    evaluate_run(run)
    (run / "predictions" / "c.png").unlink()
    with pytest.raises(DataError, match=r"no saved prediction for 1 of 5 test samples \(e\.g\. c\)"):
        rescore_run(run)


def test_metrics_only_rejects_a_non_mask_png(run_dir):
    run, _, _ = run_dir
    evaluate_run(run)
    Image.fromarray(np.full(SIZES["b"], 7, np.uint8)).save(run / "predictions" / "b.png")
    with pytest.raises(DataError, match=r"b\.png is not a 0/255 8-bit mask"):
        rescore_run(run)
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(run / "predictions" / "b.png")
    with pytest.raises(DataError, match=r"sample b: prediction \(3, 3\) differs from truth"):
        rescore_run(run)


@pytest.mark.parametrize("opts, message", [
    ({"instances": "blobs"}, "unknown evaluate.instances 'blobs'; known: components, watershed"),
    ({"min_object_size": -1}, "evaluate.min_object_size must be an integer >= 0"),
])
def test_unknown_instance_options(run_dir, opts, message):
    run, _, _ = run_dir
    for fn in (evaluate_run, rescore_run):
        with pytest.raises(ConfigError, match=re.escape(message)):
            fn(run, **opts)
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "train_done.json"]


def test_killed_while_saving_leaves_no_partial_predictions(run_dir, monkeypatch):
    run, _, _ = run_dir
    evaluate_run(run)
    before = {p.name: p.read_bytes() for p in (run / "predictions").iterdir()
              if p.suffix == ".png"}
    calls = []

    def failing_save(path, array):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as a kill would interrupt it
        Image.fromarray(array).save(path, format="PNG")

    monkeypatch.setattr(semibench.evaluate.score, "_save_png", failing_save)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run)
    # the previous complete predictions stay, no temporary directory is left
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pt", "config.json", "metrics.json", "per_image.csv", "predictions", "probabilities",
        "train_done.json"]
    assert {p.name: p.read_bytes() for p in (run / "predictions").iterdir()
            if p.suffix == ".png"} == before


def test_stale_temporary_directories_are_cleared(run_dir):
    run, _, _ = run_dir
    (run / ".predictions.tmp-deadbeef").mkdir()
    (run / ".predictions.tmp-deadbeef" / "b.png").write_bytes(b"partial")
    evaluate_run(run)
    assert not list(run.glob(".*"))


def test_cli_metrics_only_and_instance_options(run_dir, capsys, monkeypatch):
    from semibench import cli

    run, _, _ = run_dir
    monkeypatch.setenv("SEMIBENCH_NUM_GPUS", "0")
    assert cli.main(["evaluate", "--run", str(run), "--metrics-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no saved prediction for 5 of 5" in err
    assert cli.main(["evaluate", "--run", str(run), "--instances", "watershed",
                     "--min-object-size", "2"]) == 0
    assert json.loads((run / "metrics.json").read_text())["meta"]["evaluate"] == \
        {"instances": "watershed", "min_object_size": 2, "from": "model"}
    capsys.readouterr()
    assert cli.main(["evaluate", "--run", str(run), "--metrics-only"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"pooled", "per_image_mean", "dataset_level"}
    assert json.loads((run / "metrics.json").read_text())["meta"]["evaluate"] == \
        {"instances": "components", "min_object_size": 0, "from": "predictions"}
    assert cli.main(["evaluate", "--run", str(run), "--metrics-only", "--instances", "blob"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown evaluate.instances 'blob'" in err
