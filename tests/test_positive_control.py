"""The property a user relies on when they change the engine, a loss or a plugin: where one
labeled image leaves room to win, FixMatch at its official defaults beats SupOnly on every seed.

A small version of ``config/studies/positive-control.yaml`` (same regime: one labeled H&E image of
a wide appearance spread, 1/512 of the training images; fewer images and seeds): SupOnly and
FixMatch are trained on seeds 0-2 and evaluated on the test images, and every seed's
FixMatch − SupOnly test Dice must be positive. Setting FixMatch's unlabeled weight to 0 makes
it fail (checked by hand: docs/results-positive-control.md). Minutes on a CPU: marked slow."""
from __future__ import annotations

import json

import pytest

from semibench.cli import main as semibench_main

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)
REGIME = {
    "device": "cpu",
    "datasets": {"synthetic": {"count": 600, "size": 64, "nuclei": [20, 60], "radius": [3, 12],
                               "styles": ["he"], "variation": 3}},
    "train": {"backbone": "tiny", "weights": "none", "input_size": 64, "batch_labeled": 8,
              "batch_unlabeled": 8, "lr": 3.0e-3, "epochs": 8, "iters_per_epoch": 40,
              "unsup_start_epoch": 1, "ema_alpha": 0.99, "precision": "fp32", "eval_batch_size": 32},
}


def _test_dice(tmp_path, method: str, seed: int, extra: dict) -> float:
    cfg = json.dumps({**REGIME, **extra, "data_dir": str(tmp_path / "data"),
                      "splits_dir": str(tmp_path / "splits")})
    run = tmp_path / "runs" / method / f"seed{seed}"
    assert semibench_main(["train", "--config-json", cfg, "--dataset", "synthetic", "--method", method,
                           "--ratio", "512", "--seed", str(seed), "--out", str(run), "--threads", "1"]) in (0, None)
    assert semibench_main(["evaluate", "--run", str(run), "--threads", "1"]) in (0, None)
    return json.loads((run / "metrics.json").read_text())["per_image_mean"]["dice"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("positive_control")
    cfg = json.dumps({**REGIME, "data_dir": str(root / "data"), "splits_dir": str(root / "splits")})
    assert semibench_main(["prepare", "--dataset", "synthetic", "--config-json", cfg]) in (0, None)
    for seed in SEEDS:
        assert semibench_main(["split", "--dataset", "synthetic", "--seed", str(seed),
                               "--config-json", cfg]) in (0, None)
    return root


@pytest.mark.parametrize("seed", SEEDS)
def test_fixmatch_beats_suponly_on_every_seed(prepared, seed):
    sup = _test_dice(prepared, "suponly", seed, {})
    fix = _test_dice(prepared, "fixmatch", seed, {})
    assert fix - sup > 0, f"seed {seed}: FixMatch {fix:.4f} <= SupOnly {sup:.4f}: the unlabeled path adds nothing"
