"""Your own data through the workflow (marker ``workflow``): the synthetic dataset exported as a
stardist folder plus a separate folder of unlabeled images, run with config/examples/your-data.yaml
(paths replaced, quick-sized training): Table 1 for the user's dataset name, the paired tests,
the figures, the unlabeled images each run saw; then `semibench predict` on new images of two
sizes. And the dry run stops at a bad folder with one line, before any job."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from tests.workflow_tools import ROOT, copy_workflow, snakemake

QUICK_TRAIN = {"backbone": "tiny", "weights": "none", "input_size": 64, "batch_labeled": 4,
               "batch_unlabeled": 4, "lr": 3.0e-3, "epochs": 6, "iters_per_epoch": 10,
               "unsup_start_epoch": 2, "ema_alpha": 0.99, "precision": "fp32", "eval_batch_size": 16}


def semibench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semibench", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def user_config(workdir: Path, path: Path, pool: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "config" / "examples" / "your-data.yaml").read_text())
    cfg["datasets"]["mylab"].update(path=str(path), unlabeled=str(pool))
    cfg["grid"].update(methods=["suponly", "meanteacher"], ratios=[4, 1], seeds=[0, 1])
    cfg["report"].update(reference="meanteacher")
    cfg.update(device="cpu", train=QUICK_TRAIN, threads={"prepare": 1, "train": 1, "evaluate": 1})
    out = workdir / "mine.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.workflow
def test_your_data_end_to_end(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    # the user's folders: 40 annotated 64² images (stardist layout) and 16 unlabeled ones
    syn = {"count": 40, "size": 64, "nuclei": [40, 120], "workers": 1}
    assert semibench("prepare", "--dataset", "synthetic", "--data-dir", "src",
                     "--config-json", json.dumps({"datasets": {"synthetic": syn}}), cwd=tmp_path).returncode == 0
    assert semibench("export", "synthetic", "--layout", "stardist", "mylab", "--data-dir", "src",
                     cwd=tmp_path).returncode == 0
    other = dict(syn, count=16, seed=7)
    assert semibench("prepare", "--dataset", "synthetic", "--data-dir", "src2",
                     "--config-json", json.dumps({"datasets": {"synthetic": other}}), cwd=tmp_path).returncode == 0
    assert semibench("export", "synthetic", "--layout", "stardist", "pool-export", "--data-dir", "src2",
                     cwd=tmp_path).returncode == 0
    pool = tmp_path / "pool"
    pool.mkdir()
    for p in (tmp_path / "pool-export" / "images").iterdir():
        p.rename(pool / f"raw_{p.name}")
    config = user_config(work, tmp_path / "mylab", pool)

    t0 = time.perf_counter()
    out = snakemake("--cores", "2", "--configfile", str(config), cwd=work, timeout=1500)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"your-data workflow: {wall:.0f} s")
    assert "datasets.mylab: layout stardist (detected), 40 annotated images, 0 test, 16 unlabeled" in out.stderr

    split = json.loads((work / "results" / "splits" / "mylab" / "seed0.json").read_text())
    assert len(split["train"]) == 28 and len(split["val"]) == 4 and len(split["test"]) == 8
    assert split["unlabeled"] == sorted(f"raw_syn000{i:02d}" for i in range(16))
    runs = work / "results" / "runs" / "mylab"
    done = {p.parent.relative_to(runs).as_posix(): json.loads(p.read_text())
            for p in runs.glob("*/*/*/train_done.json")}
    assert len(done) == 2 * 2 * 2 + 2  # suponly, meanteacher at 1/4 and 1/1, fullsup; 2 seeds
    assert done["meanteacher/r4/seed0"]["n_unlabeled"] == 21 + 16  # hidden-label train + the pool
    assert done["meanteacher/r1/seed0"]["n_unlabeled"] == 16         # all labels + the pool

    table = (work / "results" / "tables" / "table1.md").read_text()
    assert "mylab" in table.lower()
    with open(work / "results" / "tables" / "table1.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["dataset"] for r in rows} == {"mylab"}
    assert {r["method"] for r in rows} >= {"suponly", "meanteacher", "fullsup"}
    assert "plus the unlabeled pool): mylab 1/4: 37, 100%: 16." in table
    comparisons = (work / "results" / "stats" / "comparisons.csv").read_text()
    assert "meanteacher" in comparisons and "suponly" in comparisons
    assert (work / "results" / "figures" / "dice_vs_ratio.png").is_file()

    # the best run segments new images of two sizes, one larger than the tiles it saw
    rng = np.random.default_rng(3)
    new = tmp_path / "new"
    new.mkdir()
    src = tmp_path / "mylab" / "images"
    a = tifffile.imread(src / "syn00001.tif")
    Image.fromarray(a).save(new / "small.png")
    big = np.concatenate([np.concatenate([tifffile.imread(src / f"syn000{i}{j}.tif") for j in range(3)], 1)
                          for i in range(2)], 0)[: 150 + int(rng.integers(0, 10))]
    tifffile.imwrite(new / "big.tif", big)
    t1 = time.perf_counter()
    pred = semibench("predict", "--run", str(runs / "fullsup" / "r1" / "seed0"), "--images", str(new),
                     "--out", str(tmp_path / "pred"), "--device", "cpu", cwd=work)
    assert pred.returncode == 0, pred.stderr
    print(f"predict: {time.perf_counter() - t1:.1f} s")
    for name, img in (("small", a), ("big", big)):
        labels = tifffile.imread(tmp_path / "pred" / f"{name}.tif")
        assert labels.shape == img.shape[:2] and labels.max() > 0


@pytest.mark.workflow
def test_bad_folder_stops_the_dry_run_before_any_job(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    bad = tmp_path / "mylab"
    (bad / "images").mkdir(parents=True)
    (bad / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad / "images" / "a.png")
    config = user_config(work, bad, bad)
    cfg = yaml.safe_load(config.read_text())
    del cfg["datasets"]["mylab"]["unlabeled"]
    config.write_text(yaml.safe_dump(cfg))
    out = snakemake("--cores", "1", "--configfile", str(config), cwd=work)
    assert out.returncode != 0
    assert f"semibench: error: {bad / 'images' / 'a.png'}: image without a mask" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (work / "data").exists() and not (work / "results").exists()


def test_unlabeled_note_only_for_datasets_with_a_pool():
    from types import SimpleNamespace

    from semibench.report.tables import unlabeled_note

    # (selected epoch, unsupervised start, unlabeled images available, unlabeled images per step)
    selected = {("mylab", "meanteacher", 4, 0): (3, 2, 37, 8), ("mylab", "fullsup", 1, 0): (5, 2, 16, 0),
                ("mylab", "meanteacher", 1, 1): (4, 2, 16, 8), ("synthetic", "cdcl", 8, 0): (2, 2, 40, 16),
                ("synthetic", "fullsup", 1, 0): (2, 2, 0, 0)}
    results = SimpleNamespace(selected=selected)
    assert unlabeled_note(results, ["synthetic", "mylab"]) == (
        " Unlabeled images available to the semi-supervised runs (hidden-label training images "
        "plus the unlabeled pool): mylab 1/4: 37, 100%: 16.")
    assert unlabeled_note(results, ["synthetic"]) == ""
