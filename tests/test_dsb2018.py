"""The DSB 2018 recipe and archive handling on tiny hand-built zips: verify, prepare, corrupt,
truncated and missing archives, checksums."""
import hashlib
import io
import json
import shutil
import urllib.error
import zipfile

import numpy as np
import pytest
from PIL import Image

from semibench.data import obtain as ob
from semibench.data.prepared import PreparedDataset
from semibench.datasets.dsb2018 import DSB2018
from semibench.errors import DataError
from tests.archives import assert_no_prepared_output, tiny_dsb


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
