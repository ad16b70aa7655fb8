"""GCT (methods/gct.py): dynamic-consistency targets, flaw targets, and the phase routing of its
three optimisers through the engine's per-optimiser losses."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from semibench.method import StepInfo
from semibench.methods.gct import GCTHparams, dc_targets, flaw_target, handle_flawmap
from semibench.testing import toy_config
from semibench.train.engine import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"fd_channels": 4}  # a narrow flaw detector keeps the tests fast; the stack is the same


def test_dc_targets_toy_case():
    h_l = torch.tensor([.1, .7, .2, .9]).view(1, 1, 1, 4)
    h_r = torch.tensor([.3, .2, .8, .95]).view(1, 1, 1, 4)
    keep_l, keep_r, fc = dc_targets(h_l, h_r, 0.6)
    assert keep_l.flatten().tolist() == [1, 0, 1, 1]
    assert keep_r.flatten().tolist() == [0, 1, 0, 1]
    assert fc.flatten().tolist() == [0, 0, 0, 1]
    p_l = torch.tensor([[.9, .8, .7, .6], [.1, .2, .3, .4]]).view(1, 2, 1, 4)
    p_r = 1 - p_l
    t_l = keep_l * p_l + (1 - keep_l) * p_r  # as in GCT.training_step
    assert torch.allclose(t_l[0, 0, 0], torch.tensor([.9, .2, .7, .6]))  # [p_l0, p_r1, p_l2, p_l3]


def test_perfect_or_uniformly_wrong_prediction_gives_a_zero_flaw_target():
    hp = GCTHparams()
    y = torch.zeros(2, 64, 64, dtype=torch.long)
    y[:, 20:30, 10:40] = 1
    perfect = F.one_hot(y, 2).permute(0, 3, 1, 2).float()
    assert torch.equal(flaw_target(perfect, y, hp), torch.zeros(2, 1, 64, 64))
    uniform = torch.full_like(perfect, 0.5)  # |onehot − p| constant: relative target is 0 (G3)
    assert flaw_target(uniform, y, hp).abs().max() < 1e-6
    wrong = perfect.clone()
    wrong[0, :, 40:44, 40:44] = wrong[0, :, 40:44, 40:44].flip(0)  # one wrong 4×4 block
    g = flaw_target(wrong, y, hp)
    assert g[0].max() == pytest.approx(1.0, abs=1e-6) and g[0].min() == 0
    peak = torch.nonzero(g[0, 0] == g[0, 0].max())[0].tolist()
    assert 38 <= peak[0] <= 45 and 38 <= peak[1] <= 45  # the target peaks on the error
    assert torch.equal(g[1], torch.zeros(1, 64, 64))  # sample 1 is perfect


def test_flawmap_handler_clamps_a_copy_and_zeroes_flat_maps():
    m = torch.zeros(2, 1, 32, 32)
    m[0, 0, 10:14, 10:14] = 3.0
    m[0, 0, 0, 0] = -5.0
    m[1] = 0.05  # max ≤ 0.1: "no flaw", exactly 0 (G2 fixed)
    before = m.clone()
    h = handle_flawmap(m, 5)
    assert torch.equal(m, before)  # F's output is not clamped in place (G1: clean variant)
    assert h[0].max() == pytest.approx(1.0, abs=1e-6) and h[0].min() == 0
    assert torch.equal(h[1], torch.zeros(1, 32, 32))


# ---------------------------------------------------------------------------- routing

def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return [not torch.equal(a, b) for a, b in zip(before, module.parameters())]


@pytest.fixture()
def trainer(toy_root, tmp_path):  # noqa: F811
    cfg = toy_config(toy_root, "gct", method_params=SMALL, unsup_start_epoch=0)
    return Trainer(cfg, tmp_path)


def _losses(tr):
    info = StepInfo(epoch=0, epochs=3, iteration=0, iterations=tr.total, unsup_active=True)
    return tr.method.training_step(tr.batches.batch(0, 0), info)


def test_phase_1_moves_only_its_task_model_and_phase_2_only_the_flaw_detector(trainer):
    m = trainer.method
    nets = {"task_l": m.task_l, "task_r": m.task_r, "flaw": m.flaw_detector}
    for phase in ("task_l", "task_r", "flaw"):
        before = {k: _params(n) for k, n in nets.items()}
        losses = _losses(trainer)
        trainer.update.apply(None, [(phase, losses[f"loss/{phase}"])])
        for k, net in nets.items():
            changed = _changed(before[k], net)
            if k == phase:
                assert sum(changed) > len(changed) // 2, phase  # the stepped part moved
            else:
                assert not any(changed), (phase, k)  # everything else is untouched
        for k, net in nets.items():
            if k != phase:  # and got no gradient at all (frozen for this loss)
                assert all(p.grad is None for p in net.parameters()), (phase, k)


def test_fc_loss_reaches_the_task_model_through_the_frozen_flaw_detector(trainer):
    m = trainer.method
    x = trainer.batches.batch(0, 0).labeled_image
    p = m.task_l(x, project=False).logits.float().softmax(1)
    L_fc = (torch.ones(1) * m.flaw_detector(x, p) ** 2).mean()  # fc_mask = 1 everywhere
    L_fc.backward(inputs=[q for q in m.task_l.parameters()])  # what the engine does for task_l
    used = [q for n, q in m.task_l.named_parameters() if not n.startswith("projector.")]
    assert all(q.grad is not None for q in used) and sum(float(q.grad.abs().sum()) for q in used) > 0
    assert m.task_l.encoder.features.conv0.weight.grad.abs().sum() > 0  # all the way down
    assert all(q.grad is None for q in m.flaw_detector.parameters())


def test_a_full_step_moves_all_three_and_the_flaw_optimiser_has_its_own_adam(trainer):
    m = trainer.method
    names = trainer.ctx.optimizer_names
    assert names == ["task_l", "task_r", "flaw"]
    flaw_opt = trainer.ctx.named_optimizers()["flaw"]
    assert flaw_opt.param_groups[0]["initial_lr"] == 1e-4 and flaw_opt.param_groups[0]["betas"] == (0.9, 0.99)
    assert trainer.ctx.named_optimizers()["task_l"].param_groups[0]["initial_lr"] == trainer.cfg.train.lr
    before = [_params(n) for n in (m.task_l, m.task_r, m.flaw_detector)]
    values = trainer.train_step(0, 0)
    for b, net in zip(before, (m.task_l, m.task_r, m.flaw_detector)):
        assert any(_changed(b, net))
    total = values["loss/task_l"] + values["loss/task_r"] + values["loss/flaw"]
    assert values["loss"] == pytest.approx(total, rel=1e-6)


def test_run_logs_both_task_models_validation_dice(toy_root, tmp_path):  # noqa: F811
    cfg = toy_config(toy_root, "gct", method_params=SMALL, epochs=1, iters_per_epoch=2)
    train(cfg, tmp_path / "run")
    epochs = [json.loads(x) for x in (tmp_path / "run" / "train.jsonl").read_text().splitlines()
              if json.loads(x)["event"] == "epoch"]
    assert len(epochs) == 1
    e = epochs[0]
    assert 0 <= e["val_dice/task_l"] <= 1 and 0 <= e["val_dice/task_r"] <= 1
    assert e["val_dice/task_l"] == e["val_dice"]  # task_l is the evaluated model
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert sorted(ck["optimizers"]) == ["flaw", "task_l", "task_r"]
