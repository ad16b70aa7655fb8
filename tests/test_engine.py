"""The training engine on a tiny prepared dataset (random images, hand-written split)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from semibench.config import RunConfig
from semibench.errors import ConfigError, TrainingError
from semibench.registry import METHODS
from semibench.testing import toy_config
from semibench.train.context import weights_note
from semibench.train.device import resolve_device
from semibench.train.engine import Trainer, train
from semibench.train.rundir import config_differences
from semibench.train.schedules import poly_lr
from tests.toy import LocalMeanTeacher

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- one step

def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


STEP_METHODS = sorted(set(METHODS.names()) | {LocalMeanTeacher.name})


@pytest.mark.parametrize("method", STEP_METHODS)
def test_one_step_changes_student_and_teacher_follows_ema(method, toy_root, tmp_path, local_methods):
    cfg = toy_config(toy_root, method, ratio=2, unsup_start_epoch=0, ema_alpha=0.9)
    tr = Trainer(cfg, tmp_path)
    opt_params = [p for o in tr.ctx.optimizers for g in o.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in opt_params]
    teachers_before = [_snapshot(t) for _, t, _ in tr.ctx.emas]
    values = tr.train_step(epoch=0, it=0)
    assert np.isfinite(values["loss"])
    changed = sum(not torch.equal(b, p) for b, p in zip(before, opt_params))
    assert changed > len(opt_params) // 2, f"{method}: only {changed}/{len(opt_params)} tensors moved"
    for (student, teacher, settings), t0 in zip(tr.ctx.emas, teachers_before):
        if method in ("_test_mt", "meanteacher", "cdcl"):  # the defaults: run alpha, eval, buffers
            assert (settings.alpha, settings.mode, settings.average_buffers, settings.warmup) == \
                (0.9, "eval", True, False)
        alpha = settings.alpha_at(0)  # the EMA step after global iteration 0
        s1, t1 = student.state_dict(), teacher.state_dict()
        param_keys = {k for k, _ in teacher.named_parameters()}
        for key, old in t0.items():
            # (a train-mode teacher's own forward passes also move its BN buffers before the
            # EMA step: there only the parameters follow the formula from the snapshot)
            own_stats = settings.mode == "train"
            if key in param_keys or (settings.average_buffers and old.is_floating_point() and not own_stats):
                # parameters (and BN running stats when averaged): the EMA formula, exactly
                expected = alpha * old + (1 - alpha) * s1[key]
                assert torch.equal(t1[key], expected), f"{method}: {key}"
            elif settings.average_buffers and not old.is_floating_point():  # num_batches_tracked is copied
                assert torch.equal(t1[key], s1[key])
        if settings.mode == "eval":
            assert not teacher.training and all(not m.training for m in teacher.modules())
        else:  # follows the method: in train mode while it trains
            assert teacher.training == tr.method.training
        assert all(not p.requires_grad for p in teacher.parameters())


def test_teacher_stays_in_eval_mode_and_dropout_off(toy_root, tmp_path, local_methods):
    tr = Trainer(toy_config(toy_root, "_test_mt"), tmp_path)
    tr.method.train()
    teacher = tr.method.teacher
    assert tr.method.student.training and not teacher.training
    assert not any(m.training for m in teacher.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(teacher(x).logits, teacher(x).logits)  # no active dropout
        a, b = tr.method.student(x).logits, tr.method.student(x).logits
    assert not torch.equal(a, b)  # the student's dropout is on


def test_poly_lr_applied_to_every_optimiser(toy_root, tmp_path, local_methods):
    tr = Trainer(toy_config(toy_root, "_test_mt", lr=2e-3), tmp_path)
    assert tr.iterations_per_epoch == 3 and tr.total == 9  # 6 unlabeled / batch 2, 3 epochs
    for it in (0, 4, 8):
        lr = tr.update.set_lr(it)
        assert lr == poly_lr(2e-3, it, 9, 0.9)
        assert all(g["lr"] == lr for o in tr.ctx.optimizers for g in o.param_groups)


def test_epoch_length_of_labeled_only_methods(toy_root, tmp_path, local_methods):
    # SupOnly: as many steps as the semi-supervised runs at its ratio (6 unlabeled / 2)
    sup = Trainer(toy_config(toy_root, "_test_sup", ratio=4), tmp_path)
    assert len(sup.data.labeled) == 3 and len(sup.data.unlabeled) == 0 and sup.iterations_per_epoch == 5
    assert sup.images_per_step == 2
    # FullSup: ratio fixed to 1, no unlabeled data: one pass over the 12 labeled samples
    full = Trainer(toy_config(toy_root, "_test_full", ratio=4), tmp_path)
    assert full.ratio == 1 and len(full.data.labeled) == 12 and full.iterations_per_epoch == 6
    with pytest.raises(ConfigError, match="leaves no unlabeled samples"):
        Trainer(toy_config(toy_root, "_test_mt", ratio=1), tmp_path)


def test_train_augment_config_reaches_the_labeled_pipeline(toy_root, tmp_path, local_methods):
    # every transform switched off through the run config: a labeled batch is the normalised images
    off = {"hflip_p": 0, "vflip_p": 0, "crop_scale": [1, 1], "rotation_deg": 0, "labeled_photometric": False}
    tr = Trainer(toy_config(toy_root, "_test_sup", ratio=4, augment=off), tmp_path)
    aug = tr.batches.aug
    assert aug.rotation_deg == 0.0 and aug.crop_scale == (1.0, 1.0) and not aug.labeled_photometric
    from semibench.data.augment import augment_labeled, normalise, to_float
    lab = tr.data.labeled
    x, y = augment_labeled(lab.images, lab.masks, torch.Generator().manual_seed(0), tr.batches.aug)
    torch.testing.assert_close(x, normalise(to_float(lab.images)), atol=1e-5, rtol=0)
    assert torch.equal(y, lab.masks.long())
    # the defaults do change the batch, and a bad value fails before any data is read
    x_default, _ = augment_labeled(lab.images, lab.masks, torch.Generator().manual_seed(0),
                                   Trainer(toy_config(toy_root, "_test_sup", ratio=4), tmp_path).batches.aug)
    assert not torch.allclose(x_default, x, atol=1e-3)
    with pytest.raises(ConfigError, match="train.augment.grey_p must be at most 1"):
        Trainer(toy_config(toy_root, "_test_sup", ratio=4, augment={"grey_p": 2}), tmp_path)
    # a checkpoint written under other magnitudes is not resumed
    diff = config_differences(toy_config(toy_root, "_test_sup").fingerprint_items(),
                              toy_config(toy_root, "_test_sup", augment={"rotation_deg": 0}).fingerprint_items())
    assert diff == ["train.augment ({} → {'rotation_deg': 0})"]
    with pytest.raises(ConfigError, match="unknown train.augment option"):
        RunConfig.from_workflow({"train": {"augment": {"rotate": 1}}}, "toy", "_test_sup", 4, 0)


# ---------------------------------------------------------------------------- whole runs

def test_run_writes_all_outputs(toy_root, tmp_path, local_methods):
    out = tmp_path / "run"
    raw = toy_config(toy_root, "_test_mt", epochs=2, weights="imagenet")  # tiny: no ImageNet weights
    with pytest.warns(UserWarning, match="UNAVAILABLE"):
        assert train(raw, out) == out
    cfg = raw.resolved()  # the files hold the method's complete hyperparameters
    assert json.loads((out / "config.json").read_text()) == cfg.to_dict()
    assert cfg.to_dict()["method_params"] == {"_test_mt": {"w_cons": 1.0, "nan_at": -1}}
    lines = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["event"] == "epoch"]
    steps = [x for x in lines if x["event"] == "train"]
    assert [e["epoch"] for e in epochs] == [0, 1] and len(steps) == 2  # 3 iterations < LOG_EVERY
    for x in lines:
        assert {"loss", "loss_sup", "loss_cons"} <= set(x["losses"])
        assert x["img_per_s"] > 0 and x["peak_mem_mb"] > 0
    assert steps[0]["losses"]["loss_cons"] == 0.0  # unsupervised terms off in epoch 0
    assert steps[1]["losses"]["loss_cons"] > 0.0
    assert steps[1]["lr"] == poly_lr(1e-4, 5, 6)  # lr of the last step of epoch 1
    best = torch.load(out / "best.pt", weights_only=True)
    vals = [e["val_dice"] for e in epochs]
    assert best["val_dice"] == max(vals) and best["epoch"] == vals.index(max(vals))
    assert best["config"] == cfg.to_dict()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    student_keys = {k[len("student."):] for k in ckpt["method"] if k.startswith("student.")}
    assert set(best["model"]) == student_keys  # the bare inference DenseUNet
    assert ckpt["epoch"] == 1 and any(k.startswith("teacher.") for k in ckpt["method"])
    assert ckpt["fingerprint"] == cfg.fingerprint() and len(ckpt["optimizers"]) == 1
    done = json.loads((out / "train_done.json").read_text())
    assert done["best_epoch"] == best["epoch"] and done["best_val_dice"] == best["val_dice"]
    assert done["iterations_per_epoch"] == 3 and done["seed"] == 0
    assert set(done["versions"]) >= {"python", "torch", "torchvision", "numpy", "semibench"}
    assert done["device"]["device"] == "cpu"
    assert "RANDOM INITIALISATION" in done["weights_info"]["note"]
    assert done["weights_info"]["segmenters"][0]["used"] == "random-init"
    t = done["timings"]
    assert t["train_s"] > 0 and t["val_s"] > 0 and t["images"] == 2 * 3 * 4 and t["img_per_s"] > 0
    assert not list(out.glob(".*tmp*"))  # no temporary files left
    # a finished run is not trained again
    mtime = (out / "best.pt").stat().st_mtime_ns
    train(cfg, out)
    assert (out / "best.pt").stat().st_mtime_ns == mtime


def test_nan_loss_names_loss_and_step_and_leaves_no_done_file(toy_root, tmp_path, local_methods):
    out = tmp_path / "run"
    cfg = toy_config(toy_root, "_test_mt", unsup_start_epoch=0, method_params={"nan_at": 4})
    with pytest.raises(TrainingError, match=r"non-finite loss 'loss_cons' = nan at step 4 \(epoch 1, "
                                            r"iteration 1 of the epoch; 0-based\) \(also non-finite: 'loss'\)"):
        train(cfg, out)
    assert not (out / "train_done.json").exists() and not (out / "metrics.json").exists()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0  # the last good epoch; the NaN step changed nothing on disk
    for v in ckpt["method"].values():
        assert torch.isfinite(v.float()).all()


def test_resume_under_another_config_is_refused(toy_root, tmp_path, local_methods):
    out = tmp_path / "run"
    cfg = toy_config(toy_root, "_test_mt", epochs=1)
    train(cfg, out)
    other = toy_config(toy_root, "_test_mt", epochs=1, lr=3e-4, method_params={"w_cons": 2.0})
    # hyperparameters are recorded resolved (defaults + overrides): the key and both values
    with pytest.raises(TrainingError, match=r"differing keys: method_params\._test_mt\.w_cons \(1\.0 → 2\.0\), "
                                            r"train\.lr \(0\.0001 → 0\.0003\)"):
        train(other, out)
    (out / "train_done.json").unlink()  # an unfinished run: the checkpoint refuses
    with pytest.raises(TrainingError, match=r"checkpoint\.pt was written under another config.*train\.lr"):
        train(other, out)
    (out / "config.json").unlink()  # even without config.json, the checkpoint's own record refuses
    with pytest.raises(TrainingError, match=r"checkpoint\.pt was written under another config.*train\.lr"):
        train(other, out)
    # the device is not part of the fingerprint
    assert config_differences(cfg.fingerprint_items(), RunConfig.from_dict({**cfg.to_dict(), "device": "cuda"})
                              .fingerprint_items()) == []


def test_unknown_hparams_and_method(toy_root, tmp_path, local_methods):
    with pytest.raises(ConfigError, match="unknown hyperparameter.*bogus"):
        Trainer(toy_config(toy_root, "_test_mt", method_params={"bogus": 1}), tmp_path)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        Trainer(toy_config(toy_root, "nope"), tmp_path)
    with pytest.raises(ConfigError, match="takes no hyperparameters"):
        Trainer(toy_config(toy_root, "_test_sup", method_params={"x": 1}), tmp_path)


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(TrainingError, match=f"device '{spec}' requested but no CUDA GPU is available"):
            resolve_device(spec)
    for spec in ("gpu", "cpu:0", "cuda:x", ""):
        with pytest.raises(ConfigError, match="unknown device"):
            resolve_device(spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("CUDA:1") == torch.device("cuda:1")
    with pytest.raises(TrainingError, match="only 2 CUDA GPU"):
        resolve_device("cuda:2")


def test_weights_note():
    assert "UNAVAILABLE" in weights_note([{"requested": "imagenet", "used": "random-init", "reason": "offline"}])
    assert "offline" in weights_note([{"requested": "imagenet", "used": "random-init", "reason": "offline"}])
    assert weights_note([{"requested": "imagenet", "used": "imagenet:/x.pth"}]) == "weights used: imagenet:/x.pth"
    assert weights_note([{"requested": "none", "used": "random-init"}]) == "weights used: random-init"


@pytest.mark.parametrize("method", ["meanteacher", "fixmatch"])
def test_the_unlabeled_stream_is_exactly_the_train_images_without_labels(method, toy_root, tmp_path):
    """End to end through the engine's own data: every unlabeled image a method is shown in an
    epoch is a train image without a label, each of them is shown, and no labeled, val or test
    image is (the unlabeled pool of a semi-supervised run)."""
    from semibench.data.loading import resize_image_uint8
    from semibench.data.prepared import PreparedDataset
    tr = Trainer(toy_config(toy_root, method, ratio=4, batch_unlabeled=3), tmp_path)
    split = json.loads((toy_root / "splits" / "toy" / "seed0.json").read_text())
    labeled = set(split["labeled"]["4"])
    expected = [i for i in split["train"] if i not in labeled]
    assert tr.data.unlabeled.ids == expected and len(expected) == 12 - 3
    prepared = PreparedDataset(toy_root / "data" / "prepared" / "toy")
    for sid, image in zip(tr.data.unlabeled.ids, tr.data.unlabeled.images):  # the pixels, not just the ids
        assert torch.equal(image, resize_image_uint8(prepared.load(sid).image, 64))
    schedules = [tr.batches.schedule, *tr.batches.more_schedules]
    for schedule in schedules:
        shown = torch.cat([schedule.unlabeled(0, it) for it in range(tr.iterations_per_epoch)])
        assert set(shown.tolist()) == set(range(len(expected)))  # all of them, nothing else
    assert len(schedules) == tr.batches.n_unlabeled_batches
