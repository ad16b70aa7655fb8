"""Figures from hand-made runs: every file exists and is a non-empty PNG/PDF; a figure that cannot
be drawn becomes a placeholder instead of failing; the Figure 4 helpers by hand."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from semibench.data.prepared import PreparedWriter
from semibench.report import build, figures
from semibench.report.features import pca_rgb, silhouette
from tests.report_runs import CONFIG, make_runs


def _prepared(root, n=14):
    rng = np.random.default_rng(0)
    with PreparedWriter(root / "prepared" / "dsb2018", "dsb2018") as w:
        for i in range(n):
            label = np.zeros((16, 16), np.uint16)
            label[4:10, 3 + i % 5:9 + i % 5] = 1
            w.add_sample(f"img{i}", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), label, "train")
        w.commit()


def _predictions(files):
    for f in files:
        out = f.parent / "predictions"
        out.mkdir(exist_ok=True)
        for i in range(14):
            mask = np.zeros((16, 16), np.uint8)
            mask[5:11, 4:10] = 255
            Image.fromarray(mask).save(out / f"img{i}.png")


def test_every_figure_is_written(tmp_path):
    files = make_runs(tmp_path / "runs")
    _prepared(tmp_path / "data")
    _predictions(files)
    cfg = dict(CONFIG, data_dir=str(tmp_path / "data"))
    results, plan = build.load(files, cfg)
    build.write_stats(results, plan, tmp_path / "stats")
    paths = figures.write_figures(results, plan, tmp_path / "stats", tmp_path / "fig", cfg)
    assert sorted(p.name for p in paths) == sorted(f"{n}.{s}" for n in figures.FIGURES for s in ("png", "pdf"))
    for p in paths:
        head = p.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") or head.startswith(b"%PDF")
    # real drawings, not placeholders (a placeholder is a small 6 x 1.6 inch canvas)
    for name in figures.FIGURES:
        w, h = Image.open(tmp_path / "fig" / f"{name}.png").size
        assert h > 300, name
    assert not list((tmp_path / "fig").glob(".*tmp*"))


def test_missing_inputs_become_placeholders(tmp_path):
    files = make_runs(tmp_path / "runs")
    results, plan = build.load(files, CONFIG)  # no stats, no prepared data, no predictions
    paths = figures.write_figures(results, plan, tmp_path / "nostats", tmp_path / "fig", {"data_dir": str(tmp_path)})
    assert len(paths) == 2 * len(figures.FIGURES)
    for name in ("cd_diagram", "ranking_stability", "overlays"):
        assert Image.open(tmp_path / "fig" / f"{name}.png").size[1] < 300  # the placeholder
    assert Image.open(tmp_path / "fig" / "dice_vs_ratio.png").size[1] > 300


def test_palette_is_stable():
    a = figures.palette(["cdcl", "suponly"])
    b = figures.palette(["suponly", "meanteacher", "cdcl", "fullsup"])
    assert a["cdcl"] == b["cdcl"] and a["suponly"] == b["suponly"]
    assert len(set(b.values())) == 4


def test_pca_rgb_and_silhouette_by_hand():
    f = np.zeros((4, 2, 3))
    f[0] = np.arange(6).reshape(2, 3)  # all variance along channel 0
    rgb = pca_rgb(f)
    assert rgb.shape == (2, 3, 3) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb[..., 0].ravel()
    assert np.allclose(first, np.linspace(0, 1, 6)) or np.allclose(first, np.linspace(1, 0, 6))
    # two points per class on a line: 0, 1 | 10, 11 -> a = 1, b = 10 / 9.. by hand
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    lab = np.array([0, 0, 1, 1])
    s0 = (np.mean([10, 11]) - 1) / np.mean([10, 11])
    s1 = (np.mean([9, 10]) - 1) / np.mean([9, 10])
    assert silhouette(x, lab) == pytest.approx(np.mean([s0, s1, s1, s0]))
    assert np.isnan(silhouette(x, np.zeros(4)))


def test_feature_maps_from_real_checkpoints(tmp_path):
    """Figure 4 end to end: tiny random-init DenseUNets saved as best.pt, one test image."""
    import json

    import torch

    from semibench.config import RunConfig, TrainConfig
    from semibench.network.model import build_model
    from semibench.report import features

    files = make_runs(tmp_path / "runs")
    _prepared(tmp_path / "data")
    splits = tmp_path / "splits" / "dsb2018"
    splits.mkdir(parents=True)
    (splits / "seed0.json").write_text(json.dumps({"dataset": "dsb2018", "seed": 0, "train": [],
                                                   "val": [], "test": ["img3", "img1"], "labeled": {}}))
    torch.manual_seed(0)
    for f in files:
        if "/seed0/" not in f.as_posix() or "/r32/" not in f.as_posix():
            continue
        method = f.parts[-4]
        cfg = RunConfig("dsb2018", method, 32, 0, data_dir=str(tmp_path / "data"),
                        splits_dir=str(tmp_path / "splits"),
                        train=TrainConfig(backbone="tiny", weights="none", input_size=32))
        (f.parent / "config.json").write_text(json.dumps(cfg.to_dict()))
        torch.save({"model": build_model("tiny", "none").state_dict()}, f.parent / "best.pt")
    results, plan = build.load(files, CONFIG)
    paths = features.write_feature_maps(results, plan, tmp_path / "fig", threads=1)
    assert [p.name for p in paths] == ["feature_maps.png", "feature_maps.pdf"]
    w, h = Image.open(paths[0]).size
    assert h > 300 and w > 1000  # input, truth and suponly, scheme1, cdcl panels, not a placeholder


def test_report_built_twice_is_byte_identical(tmp_path):
    """Two `semibench report` processes (different hash seeds) on the same runs write the same
    bytes: stats, tables, every figure's PNG and PDF (seeded jitter, no creation date)."""
    import json
    import os
    import subprocess
    import sys

    files = make_runs(tmp_path / "runs")
    _prepared(tmp_path / "data")
    _predictions(files)
    (tmp_path / "c.json").write_text(json.dumps(dict(CONFIG, data_dir=str(tmp_path / "data"))))
    for out, hash_seed in (("a", "1"), ("b", "2")):
        r = subprocess.run([sys.executable, "-m", "semibench", "report", "--runs",
                            str(tmp_path / "runs/**/metrics.json"), "--config",
                            str(tmp_path / "c.json"), "--out", str(tmp_path / out)],
                           env=dict(os.environ, PYTHONHASHSEED=hash_seed), capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    written = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(written) == len(build.STATS_FILES) + len(build.TABLE_FILES) + 2 * len(figures.FIGURES)
    differ = [str(p) for p in written if (tmp_path / "a" / p).read_bytes() != (tmp_path / "b" / p).read_bytes()]
    assert differ == []
    assert b"CreationDate" not in (tmp_path / "a/figures/per_image_dice.pdf").read_bytes()


def test_readable_figures(tmp_path):
    """Overlays three panels wide at any method count; one ratio draws no curve and says so; an
    ablation scheme's training curve is drawn over CDCL's, dashed."""
    files = make_runs(tmp_path / "runs")
    _prepared(tmp_path / "data")
    _predictions(files)
    cfg = dict(CONFIG, data_dir=str(tmp_path / "data"))
    results, plan = build.load(files, cfg)
    build.write_stats(results, plan, tmp_path / "stats")
    figures.write_figures(results, plan, tmp_path / "stats", tmp_path / "fig", cfg,
                          names=["overlays"])
    w, h = Image.open(tmp_path / "fig" / "overlays.png").size
    assert 900 < w < 1300 and h > 1.8 * w  # 3 columns of ~330 px; 6 rows: image, 4 methods, FullSup
    one_ratio = dict(cfg, grid=dict(cfg["grid"], ratios=[32]))
    results, plan = build.load([f for f in files if "/r8/" not in f.as_posix()], one_ratio)
    fig = figures.dice_vs_ratio(results, plan, None, None)
    assert "a curve needs several ratios" in fig._suptitle.get_text()
    assert "(line)" not in fig._suptitle.get_text()
    results, plan = build.load(files, cfg)
    fig = figures.training_curves(results, plan, None, None)
    ax = fig.axes[0]  # dsb2018 1/32: SupOnly, MeanTeacher, Scheme.1, CDCL
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["Scheme.1"].get_zorder() > lines["CDCL"].get_zorder()
    assert lines["Scheme.1"].get_linestyle() == "--" and lines["CDCL"].get_linestyle() == "-"
