"""Dataset recipes on synthetic and tiny hand-built archives (no network, no real data)."""
import hashlib
import io
import json
import shutil
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from semibench import obtain as ob
from semibench.datasets.dsb2018 import DSB2018
from semibench.datasets.monuseg import MoNuSeg, fill_polygon, parse_regions, rasterise
from semibench.datasets.synthetic import STYLES, Synthetic, generate
from semibench.errors import ConfigError, DataError
from semibench.prepared import PreparedDataset
from semibench.tiling import reassemble, tile_grid

# ---------------------------------------------------------------- builders


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def tif(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF", compression="tiff_lzw")
    return buf.getvalue()


def write_zip(path: Path, members: dict, stored: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def dsb_members(specs: dict) -> dict:
    """specs: {id: (rgba HxWx4, [mask HxW bool, ...])} -> zip members in the official layout."""
    members = {}
    for iid, (rgba, masks) in specs.items():
        members[f"{iid}/images/{iid}.png"] = png(rgba)
        for k, m in enumerate(masks):
            members[f"{iid}/masks/m{k:02d}.png"] = png((m * 255).astype(np.uint8))
    return members


def tiny_dsb(tmp_path: Path, mismatch: bool = False, stored: bool = False) -> Path:
    rng = np.random.default_rng(1)
    rgba_a = np.concatenate([rng.integers(0, 256, (6, 8, 3), dtype=np.uint8),
                             np.full((6, 8, 1), 255, np.uint8)], axis=2)
    m0 = np.zeros((6, 8), bool)
    m0[1:3, 1:4] = True
    m1 = np.zeros((6, 8), bool)
    m1[4:6, 5:8] = True
    rgba_b = np.concatenate([rng.integers(0, 256, (5, 5, 3), dtype=np.uint8),
                             np.full((5, 5, 1), 255, np.uint8)], axis=2)
    m2 = np.zeros((4, 5) if mismatch else (5, 5), bool)
    m2[0, 0] = True
    specs = {"aaa": (rgba_a, [m0, m1]), "bbb": (rgba_b, [m2])}
    write_zip(tmp_path / "stage1_train.zip", dsb_members(specs), stored=stored)
    return tmp_path / "stage1_train.zip"


XML_HEAD = '<?xml version="1.0"?>\n<Annotations><Annotation Id="1"><Regions>'
XML_TAIL = "</Regions></Annotation></Annotations>"


def region_xml(vertices) -> str:
    vs = "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in vertices)
    return f'<Region Id="1"><Attributes/><Vertices>{vs}</Vertices></Region>'


def xml(regions) -> bytes:
    return (XML_HEAD + "".join(region_xml(r) for r in regions) + XML_TAIL).encode()


def square(x0, y0, x1, y1):  # in XML (1-based) coordinates
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def tiny_monuseg(root: Path, bad_xml: bool = False, size: int = 40) -> dict:
    """Two training and one test image of size² with a few square nuclei each."""
    rng = np.random.default_rng(2)
    train, test = {}, {}
    for k, (members, prefix, iid) in enumerate([
            (train, "MoNuSeg 2018 Training Data/", "TCGA-AA"), (train, "MoNuSeg 2018 Training Data/", "TCGA-BB"),
            (test, "MoNuSegTestData/", "TCGA-CC")]):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        regions = [square(3 + k, 3, 9 + k, 8), square(18, 18, 24, 30), square(30, 5, 36, 12)]
        data = xml(regions)
        if bad_xml and iid == "TCGA-BB":
            data = data[:-20]  # cut off mid-element
        if prefix.startswith("MoNuSeg 2018"):
            members[f"{prefix}Tissue Images/{iid}.tif"] = tif(image)
            members[f"{prefix}Annotations/{iid}.xml"] = data
        else:
            members[f"{prefix}{iid}.tif"] = tif(image)
            members[f"{prefix}{iid}.xml"] = data
    return {"MoNuSeg 2018 Training Data.zip": write_zip(root / "MoNuSegTrainingData.zip", train),
            "MoNuSegTestData.zip": write_zip(root / "MoNuSegTestData.zip", test)}


@pytest.fixture
def small_monuseg(monkeypatch):
    monkeypatch.setattr(MoNuSeg, "tile_size", 20)
    monkeypatch.setattr(MoNuSeg, "image_size", (40, 40))
    monkeypatch.setattr(MoNuSeg, "expected_images", {"train": 2, "test": 1})


def assert_no_prepared_output(data_dir: Path, name: str):
    prepared = data_dir / "prepared"
    assert not (prepared / name).exists()
    assert not prepared.exists() or not any(prepared.iterdir()), list(prepared.iterdir())


# ---------------------------------------------------------------- synthetic


def test_synthetic_prepared_labels_equal_the_generator_truth(tmp_path):
    cfg = {"count": 5, "size": [40, 56], "seed": 3, "workers": 2}
    root = ob.prepare("synthetic", tmp_path, cfg)
    data = PreparedDataset(root)
    recipe = Synthetic(cfg)
    assert data.ids == [r.id for r in recipe.index({})] == [f"syn{i:05d}" for i in range(5)]
    for i, sid in enumerate(data.ids):
        truth = generate(i, **recipe.params(i))
        sample = data.load(sid)
        assert np.array_equal(sample.label, truth.label)
        assert np.array_equal(sample.image, truth.image)
        assert sample.image.shape == (40, 56, 3)
        assert data.by_id[sid]["n_nuclei"] == len(truth.nuclei)
        with np.load(root / "samples" / f"{sid}.npz") as z:
            assert np.array_equal(z["mask"], (truth.label > 0).astype(np.uint8))
    assert [s["id"] for s in data.manifest["images"]] == data.ids


def test_synthetic_truth_is_consistent_with_nuclei_and_image():
    touching = 0
    for i in range(6):
        s = generate(i, seed=0, size=(96, 96), style=STYLES[i % 2])
        n = len(s.nuclei)
        assert n > 0 and set(np.unique(s.label)) == set(range(n + 1))  # ids 1..N, all present
        for nuc in s.nuclei:
            assert s.label[int(nuc.cy), int(nuc.cx)] == nuc.id  # the centre belongs to its nucleus
            _, parts = ndimage.label(s.label == nuc.id)
            assert parts == 1  # one connected region per instance
        # touching: horizontally or vertically adjacent pixels of two different nuclei
        a, b = s.label[:, :-1], s.label[:, 1:]
        touching += int(((a > 0) & (b > 0) & (a != b)).sum())
        grey = s.image.astype(float).mean(axis=2)
        inside, outside = grey[s.label > 0].mean(), grey[s.label == 0].mean()
        if s.style == "fluorescence":
            assert inside > outside + 30  # bright nuclei on dark
        else:
            assert inside < outside - 30  # dark purple nuclei on pink
            assert s.image[s.label > 0][:, 2].mean() > s.image[s.label > 0][:, 1].mean()  # purple: B > G
    assert touching > 0


def test_synthetic_is_deterministic_by_seed_and_independent_of_count():
    a = generate(4, seed=1, size=(64, 64), style="he")
    b = generate(4, seed=1, size=(64, 64), style="he")
    c = generate(4, seed=2, size=(64, 64), style="he")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.label, c.label)
    few, many = Synthetic({"count": 3}), Synthetic({"count": 300})
    assert few.params(2) == many.params(2)
    assert many.sample_id(2) == few.sample_id(2) == "syn00002"


def test_synthetic_density_follows_options():
    sparse = generate(0, size=(256, 256), nuclei=(2, 2))
    dense = generate(0, size=(256, 256), nuclei=(60, 60), radius=(3, 4))
    assert len(sparse.nuclei) == 2
    assert len(dense.nuclei) > 5 * len(sparse.nuclei)


def test_synthetic_obtain_and_verify_are_trivial(tmp_path):
    assert ob.obtain("synthetic", tmp_path, {"count": 4}) == {}
    assert json.loads((tmp_path / "raw" / "synthetic" / "archives.json").read_text()) == {}
    result = ob.verify("synthetic", tmp_path, {"count": 4})
    assert result["summary"]["images"] == 4
    assert (tmp_path / "raw" / "synthetic" / "verified.json").exists()


@pytest.mark.parametrize("cfg,message", [
    ({"colour": 1}, "unknown key.*colour.*known: .*count"),
    ({"styles": ["ihc"]}, "styles"),
    ({"count": 0}, "count"),
    ({"radius": [5, 2]}, "radius"),
    ({"workers": 0}, "workers"),
])
def test_synthetic_bad_options(cfg, message):
    with pytest.raises(ConfigError, match=message):
        Synthetic(cfg)


def test_unknown_dataset_names_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'dsb'; known: dsb2018, monuseg, synthetic"):
        ob.prepare("dsb", tmp_path, {})


# ---------------------------------------------------------------- DSB 2018


def test_dsb_prepare_tiny_archive(tmp_path, monkeypatch):
    archive = tiny_dsb(tmp_path)
    cfg = {"archive": str(archive), "workers": 1}
    root = ob.prepare("dsb2018", tmp_path / "data", cfg)
    data = PreparedDataset(root)
    assert data.ids == ["aaa", "bbb"]
    with zipfile.ZipFile(archive) as zf:
        rgba = np.asarray(Image.open(io.BytesIO(zf.read("aaa/images/aaa.png"))))
    a = data.load("aaa")
    assert np.array_equal(a.image, rgba[..., :3])  # alpha dropped, colours untouched
    expected = np.zeros((6, 8), int)
    expected[1:3, 1:4] = 1  # m00 -> id 1
    expected[4:6, 5:8] = 2  # m01 -> id 2
    assert np.array_equal(a.label, expected)
    assert [s["n_nuclei"] for s in data.manifest["samples"]] == [2, 1]
    assert data.manifest["sources"] == {"stage1_train.zip": ob.sha256_file(archive)}
    monkeypatch.setattr(DSB2018, "expected_images", 2)
    summary = ob.verify("dsb2018", tmp_path / "data", cfg)["summary"]
    assert summary == {"images": 2, "masks": 3, "sizes_hxw": {"5x5": 1, "6x8": 1}}


def test_dsb_verify_counts_images(tmp_path):
    archive = tiny_dsb(tmp_path)
    with pytest.raises(DataError, match=r"2 `<id>/images/<id>.png` found, expected 670"):
        ob.verify("dsb2018", tmp_path / "data", {"archive": str(archive)})
    assert not (tmp_path / "data" / "raw" / "dsb2018" / "verified.json").exists()


def test_dsb_mask_size_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(DSB2018, "expected_images", 2)
    cfg = {"archive": str(tiny_dsb(tmp_path, mismatch=True)), "workers": 1}
    with pytest.raises(DataError, match=r"bbb/masks/m00.png.* is 5x4 \(w x h\) but its image is 5x5"):
        ob.verify("dsb2018", tmp_path / "data", cfg)
    with pytest.raises(DataError, match=r"bbb/masks/m00.png.* is 5x4 \(w x h\) but its image is 5x5"):
        ob.prepare("dsb2018", tmp_path / "data", cfg)
    assert_no_prepared_output(tmp_path / "data", "dsb2018")


def test_dsb_truncated_zip(tmp_path):
    good = tiny_dsb(tmp_path)
    bad = tmp_path / "cut" / "stage1_train.zip"
    bad.parent.mkdir()
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cfg = {"archive": str(bad), "workers": 1}
    for step in (ob.verify, ob.prepare):
        with pytest.raises(DataError, match=f"{bad}: not a readable zip archive"):
            step("dsb2018", tmp_path / "data", cfg)
    assert_no_prepared_output(tmp_path / "data", "dsb2018")


def test_dsb_corrupt_member(tmp_path, monkeypatch):
    monkeypatch.setattr(DSB2018, "expected_images", 2)
    archive = tiny_dsb(tmp_path, stored=True)
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("aaa/images/aaa.png")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 40] ^= 0xFF  # flip one byte inside the stored image data
    archive.write_bytes(bytes(raw))
    cfg = {"archive": str(archive), "workers": 1}
    with pytest.raises(DataError, match=r"member 'aaa/images/aaa.png' is corrupt \(CRC mismatch\)"):
        ob.verify("dsb2018", tmp_path / "data", cfg)
    with pytest.raises(DataError, match=r"member 'aaa/images/aaa.png' cannot be read"):
        ob.prepare("dsb2018", tmp_path / "data", cfg)
    assert_no_prepared_output(tmp_path / "data", "dsb2018")


def test_configured_sha256_is_enforced(tmp_path, monkeypatch):
    monkeypatch.setattr(DSB2018, "expected_images", 2)
    archive = tiny_dsb(tmp_path)
    wrong = {"archive": str(archive), "sha256": "0" * 64, "workers": 1}
    for step in (ob.obtain, ob.verify, ob.prepare):
        with pytest.raises(DataError, match=f"{archive}: sha256 [0-9a-f]{{64}} does not match the configured"):
            step("dsb2018", tmp_path / "data", wrong)
    assert_no_prepared_output(tmp_path / "data", "dsb2018")
    right = dict(wrong, sha256=hashlib.sha256(archive.read_bytes()).hexdigest().upper())
    record = ob.obtain("dsb2018", tmp_path / "data", right)["stage1_train.zip"]
    assert record["source"] == "config" and record["matches_official"] is None
    assert "gives no sha256" in record["note"]
    assert ob.prepare("dsb2018", tmp_path / "data", right).is_dir()


def test_archive_found_in_data_dir(tmp_path):
    data_dir = tmp_path / "data"
    tiny_dsb(data_dir / "raw" / "dsb2018")
    record = ob.obtain("dsb2018", data_dir, {})["stage1_train.zip"]
    assert record["source"] == "data_dir"
    stored = json.loads((data_dir / "raw" / "dsb2018" / "archives.json").read_text())
    assert stored["stage1_train.zip"]["sha256"] == ob.sha256_file(data_dir / "raw" / "dsb2018" / "stage1_train.zip")


def test_archives_json_follows_a_replaced_archive(tmp_path, monkeypatch):
    """obtain records a truncated download; the user puts the real file in its place; verify
    (which the workflow reruns, as the first verify failed) records the real file in both."""
    monkeypatch.setattr(DSB2018, "expected_images", 2)
    data_dir = tmp_path / "data"
    good = tiny_dsb(tmp_path / "good")
    archive = data_dir / "raw" / "dsb2018" / "stage1_train.zip"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cut_sha = ob.obtain("dsb2018", data_dir, {})["stage1_train.zip"]["sha256"]
    with pytest.raises(DataError, match="not a readable zip archive"):
        ob.verify("dsb2018", data_dir, {})
    shutil.copyfile(good, archive)
    verified = ob.verify("dsb2018", data_dir, {})["archives"]["stage1_train.zip"]
    stored = json.loads((data_dir / "raw" / "dsb2018" / "archives.json").read_text())
    real_sha = ob.sha256_file(good)
    assert cut_sha != real_sha
    assert verified["sha256"] == stored["stage1_train.zip"]["sha256"] == real_sha
    assert stored["stage1_train.zip"]["source"] == "data_dir"
    # a verify of an unchanged archive leaves archives.json as it was (the workflow's mtimes)
    before = (data_dir / "raw" / "dsb2018" / "archives.json").stat().st_mtime_ns
    ob.verify("dsb2018", data_dir, {})
    assert (data_dir / "raw" / "dsb2018" / "archives.json").stat().st_mtime_ns == before


def test_configured_archive_that_does_not_exist(tmp_path):
    with pytest.raises(DataError, match="datasets.dsb2018.archive: .*nowhere.zip does not exist"):
        ob.obtain("dsb2018", tmp_path, {"archive": str(tmp_path / "nowhere.zip")})


def test_missing_archive_offline_names_url_and_path(tmp_path, monkeypatch):
    seen = []

    def offline(request, timeout, opener=None):
        seen.append((request.full_url, timeout))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(ob, "_open", offline)
    dest = (tmp_path / "raw" / "dsb2018" / "stage1_train.zip").resolve()
    with pytest.raises(DataError) as err:
        ob.obtain("dsb2018", tmp_path, {"download_timeout": 0.5})
    msg = str(err.value)
    assert "https://data.broadinstitute.org/bbbc/BBBC038/stage1_train.zip" in msg
    assert f"place it at {dest}" in msg and "name resolution" in msg
    assert seen == [("https://data.broadinstitute.org/bbbc/BBBC038/stage1_train.zip", 0.5)]
    with pytest.raises(DataError, match=f"Download it from .*stage1_train.zip and place it at {dest}"):
        ob.verify("dsb2018", tmp_path, {})
    assert_no_prepared_output(tmp_path, "dsb2018")


# ---------------------------------------------------------------- downloads (fake network)


class FakeResponse(io.BytesIO):
    def __init__(self, body: bytes, status: int = 200, headers: dict | None = None):
        super().__init__(body)
        self.status = status
        self.headers = {"Content-Length": str(len(body)), **(headers or {})}

    def getcode(self):
        return self.status


def serve(payload: bytes, honour_range: bool = True, pages: dict | None = None, log: list | None = None):
    """An _open replacement: serves ``payload`` (with Range when asked) and fixed ``pages``."""
    def _open(request, timeout, opener=None):
        if log is not None:
            log.append((request.full_url, request.headers.get("Range")))
        if pages and request.full_url in pages:
            return FakeResponse(pages[request.full_url], headers={"Content-Type": "text/html; charset=utf-8"})
        rng = request.headers.get("Range")
        if rng and honour_range:
            start = int(rng.split("=")[1].rstrip("-"))
            return FakeResponse(payload[start:], status=206)
        return FakeResponse(payload, headers={"Content-Type": "application/zip"})
    return _open


def test_download_resumes_from_part_file(tmp_path, monkeypatch):
    payload = bytes(range(256)) * 5000
    dest = tmp_path / "f.zip"
    dest.with_name("f.zip.part").write_bytes(payload[:300000])
    log = []
    monkeypatch.setattr(ob, "_open", serve(payload, log=log))
    ob.download_file("http://example.test/f.zip", dest, hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload and not dest.with_name("f.zip.part").exists()
    assert log == [("http://example.test/f.zip", "bytes=300000-")]


def test_download_restarts_when_range_is_ignored(tmp_path, monkeypatch):
    payload = b"abcdef" * 1000
    dest = tmp_path / "f.zip"
    dest.with_name("f.zip.part").write_bytes(b"garbage")
    monkeypatch.setattr(ob, "_open", serve(payload, honour_range=False))
    ob.download_file("http://example.test/f.zip", dest, hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload


def test_download_with_wrong_sha256_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ob, "_open", serve(b"not the archive"))
    with pytest.raises(DataError, match="has sha256 .* expected 1111"):
        ob.download_file("http://example.test/f.zip", tmp_path / "f.zip", "1111")
    assert list(tmp_path.iterdir()) == []


def test_google_drive_confirm_form(tmp_path, monkeypatch):
    payload = b"zipbytes" * 100
    first = "https://drive.google.com/uc?export=download&id=FILEID"
    page = (b'<html><form id="download-form" action="https://drive.usercontent.google.com/download" '
            b'method="get"><input type="hidden" name="id" value="FILEID">'
            b'<input type="hidden" name="export" value="download">'
            b'<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-1">'
            b"</form></html>")
    log = []
    monkeypatch.setattr(ob, "_open", serve(payload, pages={first: page}, log=log))
    ob.download_file(first, tmp_path / "x.zip", hashlib.sha256(payload).hexdigest(), kind="gdrive")
    assert (tmp_path / "x.zip").read_bytes() == payload
    assert log[1][0] == "https://drive.usercontent.google.com/download?id=FILEID&export=download&confirm=t&uuid=u-1"


def test_official_download_must_match_official_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(ob, "_open", serve(b"a different file"))
    with pytest.raises(DataError, match="MoNuSeg 2018 Training Data.zip.*expected 25d3d318"):
        ob.obtain("monuseg", tmp_path, {})
    assert not (tmp_path / "raw" / "monuseg" / "MoNuSeg 2018 Training Data.zip").exists()


def test_downloaded_archive_is_recorded(tmp_path, monkeypatch):
    members = dsb_members({"aaa": (np.zeros((4, 4, 4), np.uint8), [np.eye(4, dtype=bool)])})
    payload = write_zip(tmp_path / "src.zip", members).read_bytes()
    monkeypatch.setattr(ob, "_open", serve(payload))
    record = ob.obtain("dsb2018", tmp_path / "data", {})["stage1_train.zip"]
    assert record["source"] == "download"
    assert (tmp_path / "data" / "raw" / "dsb2018" / "stage1_train.zip").read_bytes() == payload


# ---------------------------------------------------------------- MoNuSeg


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
