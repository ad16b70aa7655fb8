"""Named optimisers and per-optimiser losses (``semibench.train.update.Update``, semibench.method
'Update steps'): routing, skipping optimisers without gradient, refusals, checkpoints by name."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from semibench.errors import ConfigError, TrainingError
from semibench.testing import toy_config
from semibench.train.engine import Trainer, train
from tests.toy import Killed, assert_same_runs, load_state

pytestmark = pytest.mark.usefixtures("one_thread")


def _clone(module):
    return [p.detach().clone() for p in module.parameters()]


def test_each_loss_reaches_only_its_optimisers_parameters(toy_root, tmp_path, two_methods):  # noqa: F811
    tr = Trainer(toy_config(toy_root, "_test_two"), tmp_path)
    m = tr.method
    batch = tr.batches.batch(0, 0)
    # the reference: gradients of loss/a w.r.t. the segmenter, of loss/b w.r.t. the critic
    torch.manual_seed(5)
    loss_a, loss_b = m.parts(batch)
    g_a = torch.autograd.grad(loss_a, [p for n, p in m.student.named_parameters() if "projector" not in n],
                              retain_graph=True)
    g_b = torch.autograd.grad(loss_b, list(m.critic.parameters()))
    g_b_from_a = torch.autograd.grad(m.parts(batch)[0], list(m.critic.parameters()))
    assert sum(float(g.abs().sum()) for g in g_b_from_a) > 0  # loss/a does depend on the critic
    torch.manual_seed(5)
    loss_a, loss_b = m.parts(batch)
    tr.update.apply(None, [("a", loss_a), ("b", loss_b)])
    got_a = [p.grad for n, p in m.student.named_parameters() if "projector" not in n]
    for g, ref in zip(got_a, g_a):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
    for p, ref in zip(m.critic.parameters(), g_b):  # loss/a's share did not leak in
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-7)
    b = tr.ctx.named_optimizers()["b"]
    assert b.param_groups[0]["initial_lr"] == 5e-3 and b.param_groups[0]["betas"] == (0.5, 0.9)


def test_an_optimiser_without_gradient_is_not_stepped(toy_root, tmp_path, two_methods):  # noqa: F811
    tr = Trainer(toy_config(toy_root, "_test_two", method_params={"mode": "only_a"}), tmp_path)
    critic = _clone(tr.method.critic)
    student = _clone(tr.method.student)
    values = tr.train_step(0, 0)
    assert all(torch.equal(a, b) for a, b in zip(critic, tr.method.critic.parameters()))
    assert tr.ctx.named_optimizers()["b"].state == {}  # never stepped: no Adam state at all
    assert any(not torch.equal(a, b) for a, b in zip(student, tr.method.student.parameters()))
    assert values["loss"] == pytest.approx(values["loss/a"] + values["loss/b"], rel=1e-6)


def test_single_loss_methods_step_exactly_as_one_backward_and_every_optimiser(toy_root, tmp_path, two_methods):  # noqa: F811
    tr = Trainer(toy_config(toy_root, "_test_two", method_params={"mode": "total"}), tmp_path)
    ref_method = copy.deepcopy(tr.method)
    ref_opts = [torch.optim.Adam(ref_method.student.parameters(), lr=tr.cfg.train.lr),
                torch.optim.Adam(ref_method.critic.parameters(), lr=5e-3, betas=(0.5, 0.9))]
    tr.update.set_lr(0)
    lrs = (tr.ctx.optimizers[0].param_groups[0]["lr"], tr.ctx.optimizers[1].param_groups[0]["lr"])
    for o, lr in zip(ref_opts, lrs):
        o.param_groups[0]["lr"] = lr
    batch = tr.batches.batch(0, 0)
    rng = torch.get_rng_state()
    loss_a, loss_b = ref_method.parts(batch)  # today's path: one backward, then every step
    (loss_a + loss_b).backward()
    for o in ref_opts:
        o.step()
    torch.set_rng_state(rng)
    losses = tr.method.training_step(batch, None)
    tr.update.apply(losses["loss"], tr.update.route(losses))
    for a, b in zip(ref_method.parameters(), tr.method.parameters()):
        assert torch.equal(a, b)  # bit-identical on the CPU


def test_bad_loss_keys_are_refused(toy_root, tmp_path, two_methods):  # noqa: F811
    tr = Trainer(toy_config(toy_root, "_test_two"), tmp_path)
    one = torch.ones((), requires_grad=True)
    with pytest.raises(TrainingError, match="unknown optimiser.*'c'.*registered: 'a', 'b'"):
        tr.update.route({"loss/a": one, "loss/c": one})
    with pytest.raises(TrainingError, match="both 'loss' and per-optimiser"):
        tr.update.route({"loss": one, "loss/a": one})
    with pytest.raises(TrainingError, match="no 'loss' and no 'loss/<optimiser>'"):
        tr.update.route({"L_sup": one})


def test_optimiser_registration_is_checked(toy_root, tmp_path, two_methods):  # noqa: F811
    with pytest.raises(ConfigError, match=r"'_test_rogue' built an optimiser itself \(head_opt: SGD\).*ctx.add_optimizer"):  # noqa: E501
        Trainer(toy_config(toy_root, "_test_rogue"), tmp_path)
    tr = Trainer(toy_config(toy_root, "_test_two"), tmp_path)
    ctx = tr.ctx
    with pytest.raises(ConfigError, match="'a' is registered twice"):
        ctx.add_optimizer(nn.Linear(1, 1).parameters(), name="a")
    with pytest.raises(ConfigError, match="'c' shares parameters with optimiser\\(s\\) 'b'"):
        ctx.add_optimizer(tr.method.critic.parameters(), name="c")
    with pytest.raises(ConfigError, match="'d': bad Adam options"):
        ctx.add_optimizer(nn.Linear(1, 1).parameters(), name="d", momentum=0.9)
    with pytest.raises(ConfigError, match="got no parameters"):
        ctx.add_optimizer([], name="e")


def test_checkpoint_by_name_and_resume_bit_identical(toy_root, tmp_path, two_methods):  # noqa: F811
    cfg = toy_config(toy_root, "_test_two", epochs=2)
    train(cfg, tmp_path / "whole")

    def kill_after(epoch):
        if epoch == 0:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, tmp_path / "resumed", on_epoch_end=kill_after)
    saved = load_state(tmp_path / "resumed" / "checkpoint.pt")["optimizers"]
    assert sorted(saved) == ["a", "b"] and saved["b"]["param_groups"][0]["initial_lr"] == 5e-3
    train(cfg, tmp_path / "resumed")
    assert_same_runs(tmp_path / "whole", tmp_path / "resumed")


def test_checkpoint_with_other_optimiser_names_is_refused(toy_root, tmp_path, two_methods):  # noqa: F811
    tr = Trainer(toy_config(toy_root, "_test_two"), tmp_path)
    state = tr.checkpoints.state(0)
    state["optimizers"] = {"a": state["optimizers"]["a"], "critic": state["optimizers"]["b"]}
    torch.save(state, tmp_path / "ck.pt")
    with pytest.raises(TrainingError, match=r"optimiser states \['a', 'critic'\], the method has \['a', 'b'\]"):
        tr.checkpoints.load(tmp_path / "ck.pt")


def test_a_real_grad_scaler_meets_no_optimiser_without_gradient(toy_root, tmp_path, two_methods):  # noqa: F811
    # The CPU GradScaler raises exactly as the CUDA one ("No inf checks were recorded") when it
    # steps an optimiser without gradient; the engine's skip keeps it from ever doing so.
    # (tests/test_gpu_amp.py runs the same under CUDA autocast.)
    tr = Trainer(toy_config(toy_root, "_test_two", method_params={"mode": "only_a"}), tmp_path)
    tr.update.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    for it in range(2):
        tr.train_step(0, it)
    assert tr.ctx.named_optimizers()["b"].state == {} and tr.ctx.named_optimizers()["a"].state != {}
    with pytest.raises(AssertionError, match="No inf checks were recorded"):
        tr.update.scaler.step(tr.ctx.named_optimizers()["b"])
