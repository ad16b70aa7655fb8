"""Tests on the real archives (``../shared/data`` next to the repository, or
$SEMIBENCH_SHARED_DATA); skipped when they are absent. Each dataset is prepared once per session."""
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semibench.data import obtain as ob
from semibench.data.prepared import PreparedDataset
from semibench.data.splits import make_split, split_to_json, write_split
from semibench.data.tiling import reassemble, tile_grid

pytestmark = pytest.mark.realdata

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SEMIBENCH_SHARED_DATA", REPO.parent / "shared" / "data"))
CONFIGS = {
    "dsb2018": {"archive": str(SHARED / "dsb2018" / "stage1_train.zip")},
    "monuseg": {"archive": {"MoNuSeg 2018 Training Data.zip": str(SHARED / "monuseg" / "MoNuSegTrainingData.zip"),
                            "MoNuSegTestData.zip": str(SHARED / "monuseg" / "MoNuSegTestData.zip")}},
}


def _config(name: str) -> dict:
    cfg = CONFIGS[name]
    paths = [cfg["archive"]] if isinstance(cfg["archive"], str) else list(cfg["archive"].values())
    if not all(Path(p).is_file() for p in paths):
        pytest.skip(f"real {name} archives not found under {SHARED}")
    return cfg


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("realdata")


@pytest.fixture(scope="session")
def dsb(data_dir):
    return PreparedDataset(ob.prepare("dsb2018", data_dir, _config("dsb2018")))


@pytest.fixture(scope="session")
def monuseg(data_dir):
    return PreparedDataset(ob.prepare("monuseg", data_dir, _config("monuseg")))


def test_dsb_prepare_gives_670_images_and_29461_nuclei(dsb):
    assert len(dsb.manifest["images"]) == len(dsb.ids) == 670
    assert sum(s["n_nuclei"] for s in dsb.manifest["samples"]) == 29461
    sample = dsb.load(dsb.ids[0])
    assert sample.image.shape[2] == 3 and sample.image.dtype == np.uint8
    assert sample.label.max() == dsb.by_id[dsb.ids[0]]["n_nuclei"]  # ids 1..N


def test_dsb_verify(data_dir):
    summary = ob.verify("dsb2018", data_dir, _config("dsb2018"))["summary"]
    assert (summary["images"], summary["masks"]) == (670, 29461)


def test_monuseg_images_tiles_and_instance_counts(monuseg):
    images = monuseg.manifest["images"]
    assert [sum(i["subset"] == s for i in images) for s in ("train", "test")] == [30, 14]
    samples = monuseg.manifest["samples"]
    assert [sum(s["subset"] == k for s in samples) for k in ("train", "test")] == [480, 224]
    assert {(s["height"], s["width"]) for s in samples} == {(250, 250)}
    # instances of one test image vs the Region elements of its XML, counted independently
    iid = "TCGA-2Z-A9J9-01A-01-TS1"
    with zipfile.ZipFile(SHARED / "monuseg" / "MoNuSegTestData.zip") as zf:
        n_regions = zf.read(f"MoNuSegTestData/{iid}.xml").count(b"<Region ")
        source = np.asarray(Image.open(io.BytesIO(zf.read(f"MoNuSegTestData/{iid}.tif"))).convert("RGB"))
    image = next(i for i in images if i["id"] == iid)
    assert image["n_nuclei"] == n_regions == 575
    tiles = tile_grid(1000, 1000, 250)
    pieces = [(t, monuseg.load(f"{iid}_r{t.row}_c{t.col}").image) for t in tiles]
    assert np.array_equal(reassemble(pieces, 1000, 1000), source)


def test_monuseg_verify(data_dir):
    summary = ob.verify("monuseg", data_dir, _config("monuseg"))["summary"]
    assert (summary["train"]["images"], summary["test"]["images"]) == (30, 14)
    assert summary["test"]["regions"] == 6697


@pytest.mark.parametrize("name", ["dsb2018", "monuseg"])
def test_shipped_splits_regenerate_byte_identical_from_index(name, data_dir):
    cfg = _config(name)
    recipe = ob.get_recipe(name, cfg)
    archives = {fn: Path(loc["path"]) for fn, loc in ob.locate(recipe, data_dir, download=False).items()}
    refs = recipe.index(archives)
    for seed in (0, 1, 2):
        shipped = (REPO / "results" / "splits" / name / f"seed{seed}.json").read_text()
        assert split_to_json(make_split(name, seed, refs, recipe.split_policy)) == shipped


@pytest.mark.parametrize("name", ["dsb2018", "monuseg"])
def test_shipped_splits_regenerate_byte_identical_from_prepared(name, request, data_dir, tmp_path):
    request.getfixturevalue("dsb" if name == "dsb2018" else "monuseg")
    for seed in (0, 1, 2):
        out = write_split(name, data_dir, seed, tmp_path / f"seed{seed}.json")
        shipped = REPO / "results" / "splits" / name / f"seed{seed}.json"
        assert out.read_bytes() == shipped.read_bytes()
        assert json.loads(out.read_text())["seed"] == seed


def _test_ids(name: str) -> list[str]:
    return json.loads((REPO / "results" / "splits" / name / "seed0.json").read_text())["test"]


@pytest.mark.parametrize("name, n_test, n_sources", [("dsb2018", 134, 134), ("monuseg", 224, 14)])
def test_ground_truth_scored_as_prediction_gives_aji_pq_one(name, n_test, n_sources, request):
    from semibench.evaluate.instances import instance_scores, match
    from semibench.evaluate.score import score_sample, source_id, summarize

    ds = request.getfixturevalue("dsb" if name == "dsb2018" else "monuseg")
    ids = _test_ids(name)
    assert len(ids) == n_test
    rows = []
    for i in ids:
        label = ds.load(i).label
        s = match(label, label)  # the ground-truth instance map as the predicted one
        assert (s.aji_c, s.tp_obj, s.fp_obj, s.fn_obj) == (s.aji_u, s.n_true, 0, 0), i
        assert s.n_true == ds.by_id[i]["n_nuclei"]
        row = score_sample(i, source_id(ds, i), label, label > 0)
        assert (row["dice"], row["n_true"]) == (1.0, s.n_true)
        # (the row's instance metrics use the mask's components, which merge touching nuclei)
        assert row["aji"] <= 1.0
        rows.append(row | instance_scores(s) | s.as_dict())  # score the label map itself
    result = summarize(rows)
    for k in ("aji", "aji_plus", "pq", "sq", "dq", "obj_f1"):
        assert result["dataset_level"][k] == 1.0 and result["per_image_mean"][k] == 1.0, k
    sources = {r["source_id"] for r in rows}
    assert len(sources) == n_sources
    if name == "monuseg":  # 16 tiles of each 1000² test image share its id
        assert all(r["id"].startswith(r["source_id"] + "_r") for r in rows)
        assert sorted(sum(r["source_id"] == s for r in rows) for s in sources) == [16] * 14
    else:
        assert all(r["source_id"] == r["id"] for r in rows)
