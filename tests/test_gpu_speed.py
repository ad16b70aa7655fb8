"""The execution options on CUDA (semibench.train.execution): a whole run with the defaults (bf16 or
fp16 autocast, channels-last, fused Adam, losses read every LOG_EVERY steps) and its metadata,
the NaN report of the deferred read, the device evaluation against the CPU's, and torch.compile
against eager on the GPU."""
from __future__ import annotations

import json
import math

import pytest
import torch

from semibench.data.loading import SampleCache
from semibench.errors import TrainingError
from semibench.network.model import build_model
from semibench.testing import toy_config
from semibench.train.engine import Trainer, seed_everything, train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda(cfg):
    cfg.device = "cuda"
    return cfg


def test_a_run_with_the_defaults_on_cuda(toy_root, tmp_path, local_methods):  # noqa: F811
    out = train(_cuda(toy_config(toy_root, "_test_mt", epochs=2, unsup_start_epoch=0)), tmp_path / "run")
    done = json.loads((out / "train_done.json").read_text())
    ex = done["execution"]
    bf16 = torch.cuda.get_device_capability() >= (8, 0)
    assert ex["precision"] == ("bf16" if bf16 else "fp16") and ex["grad_scaler"] == (not bf16)
    assert ex["channels_last"] and ex["fused_adam"] and not ex["compile"]
    assert done["device"]["amp"] is True and done["device"]["device"].startswith("cuda")
    lines = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for x in lines for v in x["losses"].values())
    assert [x["epoch"] for x in lines if x["event"] == "epoch"] == [0, 1]
    assert 0.0 <= done["best_val_dice"] <= 1.0


def test_deferred_nan_report_on_cuda(toy_root, tmp_path, local_methods):  # noqa: F811
    cfg = _cuda(toy_config(toy_root, "_test_mt", unsup_start_epoch=0, method_params={"nan_at": 4}))
    with pytest.raises(TrainingError, match=r"non-finite loss 'loss_cons' = nan at step 4 \(epoch 1, iteration 1 "
                                            r"of the epoch; 0-based\) \(also non-finite: 'loss'\)"):
        train(cfg, tmp_path / "run")
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 0 and all(torch.isfinite(v.float()).all() for v in ck["method"].values())


def test_channels_last_weights_on_cuda(toy_root, tmp_path, local_methods):  # noqa: F811
    tr = Trainer(_cuda(toy_config(toy_root, "_test_mt", unsup_start_epoch=0)), tmp_path)
    convs = [m.weight for m in tr.method.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    for it in range(2):
        tr.run_step(0, it)
    assert len(tr.read_losses()) == 2


def test_device_evaluation_agrees_with_the_cpu(toy_root, tmp_path, local_methods):  # noqa: F811
    from semibench.evaluate.score import EvalSet
    tr = Trainer(_cuda(toy_config(toy_root, "_test_mt", precision="fp32")), tmp_path)
    model = tr.method.inference_model()
    samples = [SampleCache(tr.data.val_samples).load(i) for i in tr.data.val.ids]
    gpu = EvalSet(samples, 64, 4, torch.device("cuda")).counts(model)
    cpu_model = build_model("tiny")
    cpu_model.load_state_dict(model.state_dict())
    cpu = EvalSet(samples, 64, 4, torch.device("cpu")).counts(cpu_model)
    assert [r["id"] for r in gpu] == [r["id"] for r in cpu]
    # rounding differs between the devices (cuDNN's TF32 too): only pixels at a near-tie of an
    # untrained model's two logits may flip; a wrong resize or layout would move far more
    for a, b in zip(gpu, cpu):
        n = a["height"] * a["width"]
        assert sum(a[k] for k in ("tp", "fp", "tn", "fn")) == n
        assert abs(a["tp"] - b["tp"]) + abs(a["fp"] - b["fp"]) <= max(2, n // 50)


def test_compile_on_cuda_matches_eager(toy_root, tmp_path, monkeypatch):  # noqa: F811
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "fallback_random", True)  # dropout from torch's RNG
    kw = dict(input_size=32, unsup_start_epoch=0, precision="fp32")
    eager = Trainer(_cuda(toy_config(toy_root, "meanteacher", **kw)), tmp_path / "e")
    compiled = Trainer(_cuda(toy_config(toy_root, "meanteacher", compile=True, **kw)), tmp_path / "c")
    for it in range(2):
        seed_everything(it)
        a = eager.train_step(0, it)
        seed_everything(it)
        b = compiled.train_step(0, it)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-4), (it, k)
