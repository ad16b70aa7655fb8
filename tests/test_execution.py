"""Execution options (semibench.train.execution): precision, channels-last, fused Adam, compile and the
deferred reading of losses. With every option at its default the CPU engine computes exactly what
the straightforward loop below computes (main's engine before these options: a loss read per
step, per-tensor EMA, per-sample validation), bit for bit."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import semibench.train.execution as execution
import semibench.train.progress as progress
from semibench.config import RunConfig, TrainConfig
from semibench.data.loading import SampleCache, derive_seed, preprocess
from semibench.errors import ConfigError, TrainingError
from semibench.evaluate.metrics import confusion, per_image_mean
from semibench.method import StepInfo
from semibench.testing import toy_config
from semibench.train.batches import BatchSource
from semibench.train.engine import STREAM_EPOCH, Trainer, determinism, seed_everything, train
from semibench.train.execution import Execution, LossQueue, prepare_networks, resolve_execution
from semibench.workflow.grid import check_schema
from tests.toy import Killed, assert_same_runs, load_state

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- options

def test_resolve_execution_per_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    base = TrainConfig()
    ex = resolve_execution(base, cpu)  # the defaults on the CPU: fp32, NCHW, plain Adam, eager
    assert (ex.precision, ex.channels_last, ex.fused_adam, ex.compile, ex.dtype) == ("fp32", False, False, False, None)
    assert not ex.grad_scaling and ex.record()["requested"] == {
        "precision": "auto", "channels_last": True, "fused_adam": True, "compile": False}
    for precision in ("bf16", "fp16"):  # CUDA only: the CPU computes in fp32 whatever is asked
        assert resolve_execution(_with(base, precision=precision), cpu).precision == "fp32"
    assert resolve_execution(_with(base, compile=True), cpu).compile  # compile applies anywhere
    # CUDA: auto is bf16 where the GPU has it natively, else fp16 with a GradScaler
    ex = resolve_execution(base, cuda, bf16_supported=True)
    assert (ex.precision, ex.dtype, ex.grad_scaling, ex.channels_last, ex.fused_adam) == \
        ("bf16", torch.bfloat16, False, True, True)
    ex = resolve_execution(base, cuda, bf16_supported=False)
    assert (ex.precision, ex.dtype, ex.grad_scaling) == ("fp16", torch.float16, True)
    assert resolve_execution(_with(base, precision="fp32"), cuda, bf16_supported=True).dtype is None
    ex = resolve_execution(_with(base, channels_last=False, fused_adam=False), cuda, bf16_supported=True)
    assert not ex.channels_last and not ex.fused_adam
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    with pytest.raises(ConfigError, match=r"train.precision bf16: this GPU \(Tesla V100\) has no native bf16; "
                                          r"use auto or fp16"):
        resolve_execution(_with(base, precision="bf16"), cuda, bf16_supported=False)
    with pytest.raises(ConfigError, match="train.precision must be one of auto, bf16, fp16, fp32, got 'half'"):
        resolve_execution(_with(base, precision="half"), cpu)
    with pytest.raises(ConfigError, match="train.compile must be true or false, got 'yes'"):
        resolve_execution(_with(base, compile="yes"), cpu)


def _with(train_cfg, **kw):
    import dataclasses
    return dataclasses.replace(train_cfg, **kw)


def test_amp_is_refused_naming_its_replacement_and_old_files_read_as_its_precision():
    wf = {"data_dir": "d", "splits_dir": "s", "grid": {"datasets": ["synthetic"], "methods": ["suponly"],
                                                       "ratios": [8], "seeds": [0]},
          "datasets": {}, "train": {"amp": True}}
    check_schema(wf)  # the schema lets it through, so the dry run shows the line below
    with pytest.raises(ConfigError, match=r"train.amp was replaced by train.precision: for amp: true write "
                                          r"precision: fp16 .* for amp: false precision: fp32, and delete the amp line"):  # noqa: E501
        RunConfig.from_workflow(wf, "toy", "suponly", 8, 0)
    d = RunConfig(dataset="d", method="suponly", ratio=8, seed=0).to_dict()
    for amp, precision in ((True, "fp16"), (False, "fp32")):
        old = {**d, "train": {k: v for k, v in d["train"].items()
                              if k not in ("precision", "channels_last", "fused_adam", "compile")} | {"amp": amp}}
        assert RunConfig.from_dict(old).train.precision == precision
    with pytest.raises(ConfigError, match="invalid config at train.precision"):
        check_schema({**wf, "train": {"precision": "half"}})
    root = Path(__file__).resolve().parent.parent / "config"
    for path in [*root.glob("*.yaml"), *(root / "studies").glob("*.yaml")]:  # the shipped ones load
        assert not re.search(r"^\s*amp:", path.read_text(), re.M), path


def test_execution_options_are_not_in_the_fingerprint(toy_root):  # noqa: F811
    a = toy_config(toy_root, "suponly")
    b = toy_config(toy_root, "suponly", precision="fp16", channels_last=False, fused_adam=False, compile=True)
    assert a.fingerprint_items() == b.fingerprint_items() and a.fingerprint() == b.fingerprint()
    assert not any(k in a.fingerprint_items() for k in ("train.precision", "train.compile", "train.amp"))
    assert a.fingerprint_items() != toy_config(toy_root, "suponly", lr=1.0).fingerprint_items()


def test_an_old_run_directory_with_amp_resumes(toy_root, tmp_path, local_methods):  # noqa: F811
    """A run killed under the engine before train.precision (config.json and the checkpoint's
    fingerprint hold train.amp, no execution keys) resumes, exactly as an uninterrupted run."""
    cfg = toy_config(toy_root, "_test_mt", epochs=2, unsup_start_epoch=0)
    train(cfg, tmp_path / "whole")

    def kill(epoch):
        raise Killed

    out = tmp_path / "old"
    with pytest.raises(Killed):
        train(cfg, out, on_epoch_end=kill)
    execution_keys = ("precision", "channels_last", "fused_adam", "compile")
    conf = json.loads((out / "config.json").read_text())
    conf["train"] = {k: v for k, v in conf["train"].items() if k not in execution_keys} | {"amp": True}
    (out / "config.json").write_text(json.dumps(conf))
    ck = load_state(out / "checkpoint.pt")
    ck["config_items"] = {k: v for k, v in ck["config_items"].items()
                          if k not in {f"train.{k}" for k in execution_keys}} | {"train.amp": True}
    del ck["execution_history"]
    torch.save(ck, out / "checkpoint.pt")
    train(cfg, out)
    assert_same_runs(tmp_path / "whole", out)
    # another real difference is still refused, and the legacy key is not named
    (out / "train_done.json").unlink()
    with pytest.raises(TrainingError, match=r"differing keys: train\.lr \(0\.0001 → 0\.001\)\. Use"):
        train(toy_config(toy_root, "_test_mt", epochs=2, unsup_start_epoch=0, lr=1e-3), out)


def test_metadata_records_the_execution_of_each_process(toy_root, tmp_path, local_methods):  # noqa: F811
    out = tmp_path / "run"
    cfg = toy_config(toy_root, "_test_mt", epochs=2)

    def kill(epoch):
        raise Killed

    with pytest.raises(Killed):
        train(cfg, out, on_epoch_end=kill)
    # resumed under other execution options: accepted (not in the fingerprint), and recorded
    train(toy_config(toy_root, "_test_mt", epochs=2, precision="bf16", channels_last=False), out)
    done = json.loads((out / "train_done.json").read_text())
    ex = done["execution"]
    assert ex["requested"] == {"precision": "bf16", "channels_last": False, "fused_adam": True, "compile": False}
    assert (ex["precision"], ex["channels_last"], ex["fused_adam"], ex["compile"], ex["grad_scaler"]) == \
        ("fp32", False, False, False, False)  # the CPU: fp32, NCHW, plain Adam
    assert [(h["first_epoch"], h["requested"]["precision"]) for h in ex["history"]] == [(0, "auto"), (1, "bf16")]
    assert done["config"]["train"]["precision"] == "bf16" and done["device"]["amp"] is False
    from semibench.evaluate.score import evaluate_run
    meta = evaluate_run(out)["meta"]
    assert meta["execution"]["train"] == ex
    assert meta["execution"]["eval"] == {"precision": "fp32", "channels_last": False}


# ---------------------------------------------------------------------------- the same results

def _reference_run(cfg, tmp_path):
    """Main's training loop before the execution options, written out plainly: the losses read
    (and checked) every step, backward and steps as ``semibench.train.update.Update.apply`` documents them, the
    per-tensor EMA formula, and validation predicting one sample at a time on the CPU."""
    with determinism(True, torch.device("cpu")):
        tr = Trainer(cfg, tmp_path / "reference")
        t = tr.cfg.train
        steps, val_dice = [], []
        for epoch in range(t.epochs):
            seed_everything(derive_seed(cfg.seed, STREAM_EPOCH, epoch))
            tr.method.train()
            for it in range(tr.iterations_per_epoch):
                iteration = epoch * tr.iterations_per_epoch + it
                tr.update.set_lr(iteration)
                batch = tr.batches.batch(epoch, it)
                info = StepInfo(epoch, t.epochs, iteration, tr.total, epoch >= t.unsup_start_epoch,
                                t.unsup_start_epoch * tr.iterations_per_epoch)
                losses = tr.method.training_step(batch, info)
                per_opt = [(k[len("loss/"):], v) for k, v in losses.items() if k.startswith("loss/")]
                if per_opt:
                    losses = {"loss": sum(v.detach().float() for _, v in per_opt), **losses}
                values = {k: float(torch.as_tensor(v).detach().float()) for k, v in losses.items()}
                assert all(math.isfinite(v) for v in values.values())
                steps.append(values)
                for o in tr.ctx.optimizers:
                    o.zero_grad(set_to_none=True)
                if not per_opt:
                    losses["loss"].backward()
                named = tr.ctx.named_optimizers()
                for i, (name, loss) in enumerate(per_opt):
                    params = [p for g in named[name].param_groups for p in g["params"] if p.requires_grad]
                    if loss.requires_grad and params:
                        loss.backward(inputs=params, retain_graph=i < len(per_opt) - 1)
                for o in tr.ctx.optimizers:
                    if any(p.grad is not None for g in o.param_groups for p in g["params"]):
                        o.step()
                with torch.no_grad():
                    for student, teacher, settings in tr.ctx.emas:
                        a = settings.alpha_at(iteration)
                        for te, st in zip(teacher.parameters(), student.parameters()):
                            te.mul_(a).add_(st.detach() * (1.0 - a))
                        if settings.average_buffers:
                            for te, st in zip(teacher.buffers(), student.buffers()):
                                if te.is_floating_point():
                                    te.mul_(a).add_(st.detach() * (1.0 - a))
                                else:
                                    te.copy_(st)
            val_dice.append(_reference_val_dice(tr))
    return tr, steps, val_dice


@torch.no_grad()
def _reference_val_dice(tr) -> float:
    model, was_training = tr.method.inference_model(), tr.method.training
    model.eval()
    source, ids, counts = SampleCache(tr.data.val_samples), list(tr.data.val.ids), []
    b = tr.cfg.train.eval_batch_size
    for start in range(0, len(ids), b):
        samples = [source.load(i) for i in ids[start:start + b]]
        logits = model(torch.stack([preprocess(s.image, tr.cfg.train.input_size) for s in samples]),
                       project=False).logits
        for s, lg in zip(samples, logits):
            full = F.interpolate(lg[None].float(), size=s.label.shape, mode="bilinear", align_corners=False)[0]
            counts.append(confusion(full.argmax(0) == 1, torch.from_numpy(s.mask)))
    tr.method.train(was_training)
    return per_image_mean(counts)["dice"]


@pytest.mark.parametrize("method", ["meanteacher", "gct", "cutmix", "unimatch"])
def test_defaults_on_the_cpu_compute_what_the_plain_loop_computes(method, toy_root, tmp_path, monkeypatch):  # noqa: F811
    # meanteacher: an eval-mode EMA teacher averaging buffers; gct: three optimisers with
    # per-optimiser losses; cutmix: a train-mode teacher and two unlabeled batches per step;
    # unimatch: eval-mode predictions inside the step, feature dropout, CutMix boxes
    monkeypatch.setattr(progress, "LOG_EVERY", 1)  # a train line per step: each step's losses
    cfg = toy_config(toy_root, method, epochs=2, unsup_start_epoch=0,
                     method_params={"fd_channels": 8} if method == "gct" else None)
    reference, steps, val_dice = _reference_run(cfg, tmp_path)
    out = train(cfg, tmp_path / "engine")
    lines = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert [x["losses"] for x in lines if x["event"] == "train"] == steps
    assert [x["val_dice"] for x in lines if x["event"] == "epoch"] == val_dice
    ck = load_state(out / "checkpoint.pt")
    mine = reference.method.state_dict()
    assert ck["method"].keys() == mine.keys()
    assert all(torch.equal(ck["method"][k], mine[k]) for k in mine)
    for name, opt in reference.ctx.named_optimizers().items():
        saved = ck["optimizers"][name]["state"]
        assert all(torch.equal(saved[i][k], v) for i, s in opt.state_dict()["state"].items()
                   for k, v in s.items())


def test_batched_evaluation_equals_one_sample_at_a_time():
    """EvalSet and predict_samples (resize and argmax on the device, a batch of mixed sizes with
    repeats, so several samples share one resize) against the per-sample computation."""
    from semibench.data.prepared import Sample
    from semibench.evaluate.score import EvalSet, predict_samples
    from semibench.network.model import build_model
    rng = np.random.default_rng(5)
    shapes = [(20, 24), (31, 17), (20, 24), (16, 16), (20, 24), (31, 17), (40, 40)]
    samples = [Sample(f"s{i}", rng.integers(0, 255, (h, w, 3)).astype(np.uint8),
                      (rng.random((h, w)) > 0.6).astype(np.uint16)) for i, (h, w) in enumerate(shapes)]
    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))  # BN statistics off their initial values
    model.eval()
    expected = {}
    with torch.no_grad():
        for start in range(0, len(samples), 4):
            chunk = samples[start:start + 4]
            logits = model(torch.stack([preprocess(s.image, 32) for s in chunk]), project=False).logits
            for s, lg in zip(chunk, logits):
                full = F.interpolate(lg[None].float(), size=s.label.shape, mode="bilinear",
                                     align_corners=False)[0]
                expected[s.id] = (full.argmax(0) == 1, torch.softmax(full, 0)[1])
    rows = EvalSet(samples, 32, 4, torch.device("cpu")).counts(model)
    for r, s in zip(rows, samples):
        c = confusion(expected[s.id][0], torch.from_numpy(s.mask))
        assert (r["id"], r["height"], r["width"]) == (s.id, *s.label.shape)
        assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (c.tp, c.fp, c.tn, c.fn)
    assert sum(r["tp"] + r["fp"] for r in rows) > 0 and sum(r["tn"] + r["fn"] for r in rows) > 0
    # padded to whole batches (for a compiled network): the same rows for the same samples
    padded = EvalSet(samples, 32, 4, torch.device("cpu"), pad=True)
    assert [x.shape[0] for _, x, _ in padded.batches] == [4, 4]
    assert padded.counts(model) == rows
    got = list(predict_samples(model, SampleCache(samples), [s.id for s in samples], 32, 4, torch.device("cpu")))
    assert [s.id for s, _, _ in got] == [s.id for s in samples]
    for s, mask, prob in got:
        assert torch.equal(mask, expected[s.id][0]) and torch.equal(prob, expected[s.id][1])


# ---------------------------------------------------------------------------- deferred losses

def test_loss_queue_reads_in_step_order_and_names_the_first_bad_step():
    q = LossQueue()
    where = lambda step: f"step {step}"  # noqa: E731
    q.push(["loss", "a"], torch.tensor([1.0, 0.5]), 0)
    q.push(["loss"], torch.tensor([2.0]), 1)  # another set of names is fine
    assert len(q) == 2 and q.read(where) == [{"loss": 1.0, "a": 0.5}, {"loss": 2.0}] and len(q) == 0
    assert q.read(where) == []
    q.push(["loss", "a"], torch.tensor([1.0, 0.5]), 2)
    q.push(["loss", "a", "b"], torch.tensor([math.inf, 0.1, math.nan]), 3)
    q.push(["loss", "a"], torch.tensor([math.nan, math.nan]), 4)
    with pytest.raises(TrainingError, match=r"^non-finite loss 'b' = nan at step 3 \(also non-finite: 'loss'\)$"):
        q.read(where)
    assert len(q) == 0  # read: the queue does not report the same steps twice


def test_a_failure_after_a_nan_step_reports_the_nan(toy_root, tmp_path, local_methods, monkeypatch):  # noqa: F811
    # step 4's loss is NaN; step 5 then fails (as a method might on NaN weights): the run names
    # the NaN, and nothing after the last good epoch was written
    draw = BatchSource.batch
    iterations_per_epoch = 3  # 6 unlabeled samples / batches of 2

    def failing(self, epoch, it):
        if epoch * iterations_per_epoch + it == 5:
            raise RuntimeError("a kernel choked on NaN weights")
        return draw(self, epoch, it)

    monkeypatch.setattr(BatchSource, "batch", failing)
    out = tmp_path / "run"
    cfg = toy_config(toy_root, "_test_mt", unsup_start_epoch=0, method_params={"nan_at": 4})
    with pytest.raises(TrainingError, match=r"non-finite loss 'loss_cons' = nan at step 4 \(epoch 1, iteration 1 "
                                            r"of the epoch; 0-based\) \(also non-finite: 'loss'\) in _test_mt run toy"):
        train(cfg, out)
    assert load_state(out / "checkpoint.pt")["epoch"] == 0 and not (out / "train_done.json").exists()


def test_run_step_defers_and_train_step_reads_at_once(toy_root, tmp_path, local_methods):  # noqa: F811
    tr = Trainer(toy_config(toy_root, "_test_mt", unsup_start_epoch=0), tmp_path)
    tr.run_step(0, 0)
    tr.run_step(0, 1)
    assert len(tr.loss_queue) == 2
    values = tr.read_losses()
    assert len(values) == 2 and set(values[0]) == {"loss", "loss_sup", "loss_cons"}
    assert all(math.isfinite(v) for row in values for v in row.values())
    assert set(tr.train_step(0, 2)) == {"loss", "loss_sup", "loss_cons"} and len(tr.loss_queue) == 0


# ---------------------------------------------------------------------------- the mechanisms on the CPU

def test_channels_last_and_bf16_autocast_mechanisms(toy_root, tmp_path, local_methods):  # noqa: F811
    # CUDA-only by configuration; the same mechanisms driven on the CPU: the method's 4-D
    # weights in channels-last memory (the same parameter objects, the same checkpoint keys)
    # and a step under bf16 autocast
    tr = Trainer(toy_config(toy_root, "_test_mt", unsup_start_epoch=0), tmp_path)
    params = [p for o in tr.ctx.optimizers for g in o.param_groups for p in g["params"]]
    keys = set(tr.method.state_dict())
    tr.execution = Execution("cpu", "bf16", channels_last=True, fused_adam=False, compile=False)
    prepare_networks(tr.method, tr.ctx.segmenters, tr.execution)
    convs = [m.weight for m in tr.method.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert [id(p) for p in params] == [id(p) for o in tr.ctx.optimizers for g in o.param_groups for p in g["params"]]
    assert set(tr.method.state_dict()) == keys
    # a checkpoint written in NCHW (another run, the CPU) resumes here with the moments laid out
    # as their parameters (the fused and multi-tensor kernels want them alike)
    nchw = Trainer(toy_config(toy_root, "_test_mt", unsup_start_epoch=0), tmp_path)
    nchw.train_step(0, 0)
    torch.save(nchw.checkpoints.state(0), tmp_path / "nchw.pt")
    tr.checkpoints.load(tmp_path / "nchw.pt")
    opt, saved = tr.ctx.optimizers[0], nchw.ctx.optimizers[0]
    moved = 0
    for p, q in zip(opt.param_groups[0]["params"], saved.param_groups[0]["params"]):
        if q not in saved.state:  # no gradient yet (the projector, unused without project=True)
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].stride() == p.stride() and torch.equal(opt.state[p][key], saved.state[q][key])
            moved += p.dim() == 4
    assert moved > 0
    for it in range(1, 3):
        values = tr.train_step(0, it)
        assert math.isfinite(values["loss"]) and values["loss_cons"] > 0


def test_fused_adam_is_registered_unless_the_method_says_otherwise(toy_root, tmp_path):  # noqa: F811
    from semibench.train.context import EngineContext
    ctx = EngineContext(toy_config(toy_root, "suponly"), torch.device("cpu"), fused_adam=True)
    net = torch.nn.Linear(2, 2)
    assert ctx.add_optimizer(net.parameters(), name="a").defaults["fused"] is True
    other = ctx.add_optimizer(torch.nn.Linear(2, 2).parameters(), name="b", foreach=False)
    assert not other.defaults.get("fused")
    plain = EngineContext(toy_config(toy_root, "suponly"), torch.device("cpu"))
    assert not plain.add_optimizer(net.parameters()).defaults.get("fused")


# ---------------------------------------------------------------------------- compile

def _compiled_vs_eager(toy_root, tmp_path, steps=2):
    cfg = dict(input_size=32, unsup_start_epoch=0)
    eager = Trainer(toy_config(toy_root, "meanteacher", **cfg), tmp_path / "e")
    compiled = Trainer(toy_config(toy_root, "meanteacher", compile=True, **cfg), tmp_path / "c")
    assert compiled.execution.compile and not eager.execution.compile
    nets = compiled.ctx.segmenters + [t for _, t, _ in compiled.ctx.emas]
    assert all(getattr(n, "_compiled_call_impl", None) is not None for n in nets)
    assert set(compiled.method.state_dict()) == set(eager.method.state_dict())  # no _orig_mod. keys
    for it in range(steps):  # the same dropout masks for both (the global RNG, as each epoch)
        seed_everything(it)
        a = eager.train_step(0, it)
        seed_everything(it)
        b = compiled.train_step(0, it)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (it, k)
        if it > 0:
            continue
        # the gradients of the first step, from the same weights (later weights are no test:
        # Adam moves each by ~lr whatever its gradient's size, so rounding noise in a tiny
        # gradient shows as a full step, and the next gradients differ by that much)
        pairs = [(n, pe.grad, pc.grad) for (n, pe), pc in zip(eager.method.named_parameters(),
                                                             compiled.method.parameters()) if pe.grad is not None]
        ge, gc = (torch.cat([g.flatten() for g in grads]) for grads in zip(*[(e, c) for _, e, c in pairs]))
        assert (gc - ge).norm() <= 1e-3 * ge.norm(), it
        for name, e, c in pairs:  # (a conv bias before BN has a zero gradient up to rounding)
            torch.testing.assert_close(c, e, rtol=1e-3, atol=1e-4 * float(ge.norm()) / len(pairs) ** 0.5,
                                       msg=lambda m, it=it, name=name: f"step {it}, {name}: {m}")


def test_compiled_segmenters_train_like_eager_ones(toy_root, tmp_path, monkeypatch):  # noqa: F811
    # the wiring (student and teacher compiled, checkpoints unchanged, the same losses) with
    # dynamo and AOT autograd but without inductor's code generation, which takes minutes on a CPU
    monkeypatch.setattr(execution, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    _compiled_vs_eager(toy_root, tmp_path)


@pytest.mark.slow
def test_compiled_with_inductor_matches_eager(toy_root, tmp_path, monkeypatch):  # noqa: F811
    # the real thing (inductor's C++ code on the CPU): a couple of steps at 32²; dropout drawn
    # from torch's global RNG as in eager mode (inductor's own generator gives other masks)
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    _compiled_vs_eager(toy_root, tmp_path)
