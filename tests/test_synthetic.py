"""The synthetic dataset: generated nuclei with exact masks, deterministic by seed."""
import json

import numpy as np
import pytest
from scipy import ndimage

from semibench.data import obtain as ob
from semibench.data.prepared import PreparedDataset
from semibench.datasets.synthetic import STYLES, Synthetic, generate
from semibench.errors import ConfigError


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


def test_synthetic_variation_widens_appearance_and_keeps_the_truth():
    """``variation`` scales the per-image appearance spread only: the label maps stay draw for
    draw the same, the default (1) is the generator as it was (fingerprint included), and at 3
    the images' mean nucleus colour and background level spread wider across images."""
    def nucleus_means(v, style):
        out = []
        for i in range(30):
            s = generate(i, seed=5, size=(64, 64), style=style, variation=v)
            out.append((s.image[s.label > 0].mean(axis=0), s.image[s.label == 0].mean(axis=0), s.label))
        return out
    for style in STYLES:
        base, wide = nucleus_means(1.0, style), nucleus_means(3.0, style)
        assert all(np.array_equal(a[2], b[2]) for a, b in zip(base, wide))
        for part in (0, 1) if style == "he" else (1,):  # H&E: stain of nuclei and tissue; fluorescence: background
            spread = [np.std([m[part] for m in ms], axis=0).mean() for ms in (base, wide)]
            assert spread[1] > 1.5 * spread[0], (style, part, spread)
    plain = generate(3, seed=5, size=(64, 64), style="he")
    assert np.array_equal(plain.image, generate(3, seed=5, size=(64, 64), style="he", variation=1.0).image)
    assert Synthetic({}).source_fingerprint() == Synthetic({"variation": 1}).source_fingerprint()
    assert Synthetic({}).source_fingerprint() != Synthetic({"variation": 2}).source_fingerprint()


@pytest.mark.parametrize("cfg,message", [
    ({"colour": 1}, "unknown key.*colour.*known: .*count"),
    ({"variation": 0}, "variation must be a number in \\(0, 10\\]"),
    ({"variation": "more"}, "variation"),
    ({"styles": ["ihc"]}, "styles"),
    ({"count": 0}, "count"),
    ({"radius": [5, 2]}, "radius"),
    ({"workers": 0}, "workers"),
])
def test_synthetic_bad_options(cfg, message):
    with pytest.raises(ConfigError, match=message):
        Synthetic(cfg)


def test_unknown_dataset_names_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'dsb'; known: dsb2018, folder, monuseg, synthetic"):
        ob.prepare("dsb", tmp_path, {})
