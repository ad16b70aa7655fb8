"""Downloads against a fake network: resume, restart, checksum, Google Drive's confirm form."""
import hashlib
import io

import numpy as np
import pytest

from semibench.data import obtain as ob
from semibench.errors import DataError
from tests.archives import dsb_members, write_zip


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
