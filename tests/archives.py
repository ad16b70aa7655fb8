"""Tiny hand-built archives in the official layouts of DSB 2018 and MoNuSeg, for the dataset
recipe tests (no network, no real data)."""
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


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


def assert_no_prepared_output(data_dir: Path, name: str):
    prepared = data_dir / "prepared"
    assert not (prepared / name).exists()
    assert not prepared.exists() or not any(prepared.iterdir()), list(prepared.iterdir())
