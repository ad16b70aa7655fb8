"""benchmarks/diagnose_cac.py, the measurement behind docs/results-cpu-dsb.md "CAC at 1/128": its
gradient split is exact (the unsupervised part scales with λ, the supervised part does not), it
leaves the run it measures untouched, and its ground truth at 1/8 is the majority of each cell."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from semibench.testing import toy_config
from semibench.train.engine import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "diagnose_cac.py"


@pytest.fixture(scope="module")
def diag():
    spec = importlib.util.spec_from_file_location("diagnose_cac", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trainer(toy_root, path, weight):
    return Trainer(toy_config(toy_root, "cac", unsup_start_epoch=0, method_params={"weight_unsup": weight}), path)


def test_gradient_split_scales_with_lambda_and_leaves_the_run_untouched(diag, toy_root, tmp_path):  # noqa: F811
    heavy, light = _trainer(toy_root, tmp_path / "a", 0.1), _trainer(toy_root, tmp_path / "b", 0.01)
    heavy.train_step(0, 0)  # a bank entry and moved BatchNorm statistics, to be kept as they are
    light.method.load_state_dict(heavy.method.state_dict())
    state = {k: v.clone() for k, v in heavy.method.state_dict().items() if isinstance(v, torch.Tensor)}
    bank = [(f.clone(), y.clone()) for f, y in heavy.method.bank]

    h = diag.gradient_balance(heavy, 0, n_batches=2)
    g = diag.gradient_balance(light, 0, n_batches=2)

    assert h["grad_s"] == pytest.approx(g["grad_s"], rel=1e-6)  # L_s does not depend on λ
    assert h["grad_u"] == pytest.approx(10 * g["grad_u"], rel=1e-3) and h["grad_u"] > 0
    assert h["grad_cos"] == pytest.approx(g["grad_cos"], abs=1e-3)
    after = heavy.method.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    assert len(heavy.method.bank) == len(bank)
    assert all(torch.equal(f, bf) and torch.equal(y, by) for (f, y), (bf, by) in zip(bank, heavy.method.bank))


def test_truth_at_one_eighth_is_the_majority_of_each_cell(diag, toy_root, tmp_path):  # noqa: F811
    tr = _trainer(toy_root, tmp_path, 0.1)
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, :8, :8] = 1  # one whole cell of the 8×8 grid
    masks[0, 8:12, 8:16] = 1  # half a cell: not a majority
    masks[1, 16:21, 0:8] = 1  # 5 of 8 rows: a majority
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    q = diag.pseudo_label_quality(tr.method, images, masks, gamma=0.75)
    assert q["fg_true"] == pytest.approx(2 / (2 * 64))  # 2 of the 2·8·8 cells
    assert 0.0 <= q["acc_conf"] <= 1.0 and 0.0 <= q["conf_frac"] <= 1.0
