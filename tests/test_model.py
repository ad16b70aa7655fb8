import subprocess
import sys
import urllib.error
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import densenet as tv_densenet

import semibench.network.model as model_mod
from semibench.errors import ConfigError
from semibench.network.densenet import densenet_features, torchvision_version
from semibench.network.model import BACKBONES, DenseUNet, SegOutput, build_model


@pytest.fixture(autouse=True)
def _isolated_hub(tmp_path, monkeypatch):
    """No test sees a real torch hub cache or the network; warnings start afresh."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(model_mod, "_WARNED", set())

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


@pytest.mark.parametrize("backbone", ["tiny", "densenet121", "densenet161"])
def test_output_shapes_per_backbone(backbone):
    torch.manual_seed(0)
    m = build_model(backbone).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = m(x)
    assert isinstance(out, SegOutput)
    assert out.features.shape == (2, 256, 16, 24)  # extractor: 256 channels at 1/4
    assert out.logits.shape == (2, 2, 64, 96)  # logits at the input size
    assert out.proj.shape == (2, 128, 8, 12)  # projector: 128 channels at 1/8 with pooling
    # the encoder's declared channels are the real ones
    with torch.no_grad():
        skips, bottom = m.encoder(x)
    assert [s.shape[1] for s in skips] + [bottom.shape[1]] == list(m.encoder.channels)
    assert [s.shape[-1] for s in skips] + [bottom.shape[-1]] == [48, 24, 12, 6, 3]


def test_paper_channel_counts_densenet161():
    m = DenseUNet("densenet161")
    assert m.encoder.channels == (96, 384, 768, 2112, 2208)
    # decoder 2208 -> 768 -> 384 -> 256 as the official release
    assert [b.conv.out_channels for b in m.decoder] == [768, 384, 256]


def test_projector_without_pool_and_custom_dim():
    m = build_model("tiny", proj_dim=16, proj_pool=False).eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 32, 32))
    assert out.proj.shape == (1, 16, 8, 8)
    assert m(torch.randn(1, 3, 32, 32), project=False).proj is None


def test_projector_is_pool_then_two_convs():
    m = build_model("tiny").eval()
    f = torch.randn(1, 256, 8, 8)
    p = m.projector
    pooled = f.reshape(1, 256, 4, 2, 4, 2).mean(dim=(3, 5))
    expected = p.conv2(torch.relu(p.conv1(pooled)))
    torch.testing.assert_close(p(f), expected)


def test_odd_input_size_keeps_logits_at_input_size():
    m = build_model("tiny").eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 70, 45))
    assert out.logits.shape == (1, 2, 70, 45)
    assert out.features.shape[1] == 256


def test_one_forward_runs_the_extractor_once():
    m = build_model("tiny").eval()
    calls = []
    m.decoder[2].register_forward_hook(lambda *a: calls.append(1))
    out = m(torch.randn(1, 3, 32, 32))
    assert len(calls) == 1
    # logits and proj are computed from the very features returned
    torch.testing.assert_close(out.logits, m.head_logits(out.features, (32, 32)))
    torch.testing.assert_close(out.proj, m.projector(out.features))


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    m = build_model("tiny")
    drops = [mod for mod in m.modules() if isinstance(mod, nn.modules.dropout._DropoutNd)]
    assert len(drops) == 1 and drops[0].p == 0.3
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        a, b = m(x).logits, m(x).logits
    torch.testing.assert_close(a, b)
    # in train mode dropout makes two forwards differ (BN in train mode alone would not)
    m.train()
    with torch.no_grad():
        c, d = m(x).logits, m(x).logits
    assert not torch.allclose(c, d)


def test_unknown_backbone_lists_known():
    with pytest.raises(ConfigError) as e:
        build_model("resnet50")
    for name in BACKBONES:
        assert name in str(e.value)


def test_weights_none_is_recorded():
    m = build_model("tiny", "none")
    assert m.weights_info["requested"] == "none"
    assert m.weights_info["used"] == "random-init"


@pytest.mark.parametrize("backbone", ["tiny", "densenet121"])
def test_features_are_torchvisions_bit_for_bit(backbone):
    # semibench.network.densenet rebuilds DenseNet(...).features without importing torchvision: the same
    # names, the same initial weights from the same generator state, and the same outputs
    growth, blocks, init, _ = BACKBONES[backbone]
    torch.manual_seed(7)
    ref = tv_densenet.DenseNet(growth, blocks, init).features
    after_ref = torch.rand(3)
    torch.manual_seed(7)
    ours = densenet_features(growth, blocks, init)
    assert torch.equal(torch.rand(3), after_ref)  # the same draws, so the decoder's init follows
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for mode in (True, False):
        ref.train(mode), ours.train(mode)
        assert torch.equal(ref(x), ours(x))
    assert torchvision.__version__ == torchvision_version()


def _fresh_python(*lines: str) -> str:
    """What a new interpreter running ``lines`` prints (imports start from nothing there)."""
    out = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_a_run_imports_neither_torchvision_nor_inductor():
    # about 1 s each of every train and evaluate job: torchvision's package import pulls in
    # torch._dynamo, torch.use_deterministic_algorithms imports torch._inductor
    assert _fresh_python(
        "import sys, torch, semibench.train.engine as e, semibench.evaluate.score, semibench.network.model as m",
        "m.build_model('tiny', 'none')",
        "with e.determinism(True, torch.device('cpu')):",
        "    inside = torch.are_deterministic_algorithms_enabled()",
        "print(inside, torch.are_deterministic_algorithms_enabled(), "
        "[k for k in ('torchvision', 'torch._inductor', 'torch._dynamo') if k in sys.modules])") == "True False []"
    # a compiling run sets inductor's copy of the flag too, and restores both
    assert _fresh_python(
        "import torch, semibench.train.engine as e",
        "with e.determinism(True, torch.device('cpu'), compile=True):",
        "    import torch._inductor.config as c",
        "    inside = (torch.are_deterministic_algorithms_enabled(), c.deterministic)",
        "print(inside, torch.are_deterministic_algorithms_enabled(), c.deterministic)") == "(True, True) False False"


def test_tiny_has_no_imagenet_weights_and_no_download(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("tiny must not try to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = build_model("tiny", "imagenet")
    assert m.weights_info["used"] == "random-init"
    assert "tiny" in m.weights_info["reason"]


def test_imagenet_offline_warns_once_and_falls_back():
    with pytest.warns(UserWarning, match="RANDOM INITIALISATION") as rec:
        m1 = build_model("densenet121", "imagenet")
        m2 = build_model("densenet121", "imagenet")
    assert len([w for w in rec if "RANDOM" in str(w.message)]) == 1
    for m in (m1, m2):
        assert m.weights_info["requested"] == "imagenet"
        assert m.weights_info["used"] == "random-init"
        assert "download failed" in m.weights_info["reason"]


def test_imagenet_from_cache_old_style_keys(tmp_path):
    torch.manual_seed(1)
    ref = tv_densenet.densenet121()
    state = {}
    for k, v in ref.state_dict().items():  # published checkpoints use 'norm.1'-style keys
        state[k.replace("denselayer1.norm1", "denselayer1.norm.1")] = v
    assert any("norm.1" in k for k in state)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    name = "densenet121-a639ec97.pth"
    torch.save(state, cache / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = build_model("densenet121", "imagenet")
    assert m.weights_info["used"] == f"imagenet:{cache / name}"
    torch.testing.assert_close(m.encoder.features.conv0.weight, ref.features.conv0.weight)
    torch.testing.assert_close(m.encoder.features.denseblock1.denselayer1.norm1.running_var,
                               ref.features.denseblock1.denselayer1.norm1.running_var)


def test_weights_from_file(tmp_path):
    torch.manual_seed(2)
    src = build_model("tiny")
    path = tmp_path / "w.pt"
    torch.save({"model": src.state_dict()}, path)
    m = build_model("tiny", str(path))
    for (k, a), b in zip(src.state_dict().items(), m.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert m.weights_info["used"] == f"file:{path}"


def test_weights_file_missing_or_mismatched(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_model("tiny", str(tmp_path / "nope.pt"))
    path = tmp_path / "w.pt"
    torch.save(build_model("tiny").state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit"):
        build_model("densenet121", str(path))
