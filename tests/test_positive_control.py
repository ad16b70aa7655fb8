"""The property a user relies on when they change the engine, a loss or a plugin: where one
labeled image leaves room to win, FixMatch at its official defaults beats SupOnly on every seed.

``config/studies/positive-control.yaml``'s regime, read from it (one labeled H&E image of a wide
appearance spread, 1/512 of the training images), on fewer seeds and methods: SupOnly and
FixMatch are trained on seeds 0-2 and evaluated on the test images, and every seed's
FixMatch − SupOnly test Dice must be positive. Setting FixMatch's unlabeled weight to 0 makes
it fail (checked by hand: docs/results-positive-control.md). Minutes on a CPU: marked slow."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from semibench.cli import main as semibench_main

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)
STUDY = Path(__file__).resolve().parents[1] / "config" / "studies" / "positive-control.yaml"


def _regime() -> dict:
    """The study's data and training settings, read from its config (one regime, not two copies)."""
    study = yaml.safe_load(STUDY.read_text())
    return {"device": study["device"], "datasets": {"synthetic": study["datasets"]["synthetic"]},
            "train": study["train"]}


REGIME = _regime()


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
