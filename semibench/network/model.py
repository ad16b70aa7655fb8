"""The shared segmentation network: DenseUNet with a DenseNet encoder (torchvision), a U-Net
decoder ending in the 256-channel *extractor* at 1/4 of the input, a *classifier* and a
*projector* (CDCL paper, Sec. 4.1; layer widths of the official release's ``model/segnet.py``).

One forward returns all three outputs (:class:`SegOutput`), so methods never recompute the
encoder. Layout for an H×W input::

    encoder  relu0 (1/2) ─ denseblock1 (1/4) ─ denseblock2 (1/8) ─ denseblock3 (1/16) ─ relu(norm5) (1/32)
    decoder  1/32 → 1/16 (+db3) → 1/8 (+db2) → 1/4 (+db1, +relu0 pooled)  = features (B, 256, H/4, W/4)
    classifier  features → logits at 1/4 → bilinear to H×W              = logits (B, 2, H, W)
    projector   [avg-pool 2] → 1×1 conv → ReLU → 1×1 conv                = proj (B, 128, H/8, W/8)

Feature perturbation (UniMatch's second stream): ``forward(x, feature_dropout=p)`` runs the
encoder once and the decoder on ``cat(e, Dropout2d_p(e))`` for every encoder output e (the four
skips and the bottom map) in one batch of 2B; ``fp_logits`` holds the decoder's logits on the
dropped features, everything else is the clean half.
"""
from __future__ import annotations

import os
import re
import socket
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from semibench.errors import ConfigError, first_line
from semibench.network.densenet import densenet_features

FEATURE_CHANNELS = 256  # the paper's extractor width, the same for every backbone

# name -> (growth_rate, block_config, num_init_features, torchvision weights enum or None)
BACKBONES: dict[str, tuple[int, tuple[int, int, int, int], int, Optional[str]]] = {
    "densenet161": (48, (6, 12, 36, 24), 96, "DenseNet161_Weights"),
    "densenet121": (32, (6, 12, 24, 16), 64, "DenseNet121_Weights"),
    # Our choice for CPU smoke runs and the quick workflow (no paper counterpart, no ImageNet
    # weights): same topology, 2 layers per block and a small growth rate.
    "tiny": (12, (2, 2, 2, 2), 32, None),
}

_WARNED: set[str] = set()  # one warning per process for the same missing weights
_DOWNLOAD_TIMEOUT_S = 30  # torch.hub's urlopen has no timeout; a hanging DNS must not hang a run


class SegOutput(NamedTuple):
    features: torch.Tensor  # (B, 256, H/4, W/4) extractor output
    logits: torch.Tensor  # (B, num_classes, H, W)
    proj: Optional[torch.Tensor]  # (B, proj_dim, H/8, W/8) with pooling; None if not asked for
    fp_logits: Optional[torch.Tensor] = None  # (B, num_classes, H, W) on channel-dropped encoder features


def _xavier(conv: nn.Conv2d) -> nn.Conv2d:
    # the official release's initialisation of the decoder and classifier
    nn.init.xavier_normal_(conv.weight)
    return conv


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    nn.init.constant_(bn.weight, 1)
    nn.init.constant_(bn.bias, 0)
    return bn


def _up(x: torch.Tensor, size) -> torch.Tensor:
    # Upsampling to the skip's exact size (not scale_factor=2) keeps odd sizes working.
    # align_corners=False: pixel-centre geometry, so the 1/4 and 1/8 grids stay aligned with the
    # input pixels that CDCL's patches are cut from (the official code uses True; our choice).
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DenseNetEncoder(nn.Module):
    """torchvision's ``DenseNet.features`` (:mod:`semibench.network.densenet`), returning the four skips
    and the bottom map."""

    def __init__(self, growth_rate: int, block_config: tuple[int, ...], num_init_features: int):
        super().__init__()
        self.features = densenet_features(growth_rate, block_config, num_init_features)
        c = num_init_features
        widths = []
        for i, n in enumerate(block_config):
            c += n * growth_rate
            widths.append(c)
            if i != len(block_config) - 1:
                c //= 2
        # channels of relu0, denseblock1, denseblock2, denseblock3, bottom
        self.channels = (num_init_features, widths[0], widths[1], widths[2], widths[3])

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips = []
        for name, layer in self.features.named_children():
            x = layer(x)
            if name in ("relu0", "denseblock1", "denseblock2", "denseblock3"):
                skips.append(x)
        return skips, F.relu(x)  # features ends at norm5; torchvision applies the ReLU outside


class DecoderBlock(nn.Module):
    """Bilinear ×2, add the 1×1-projected skip(s), 3×3 conv, BN, ReLU."""

    def __init__(self, in_ch: int, skip_chs: tuple[int, ...], out_ch: int):
        super().__init__()
        self.skip_proj = nn.ModuleList(_xavier(nn.Conv2d(c, in_ch, 1)) for c in skip_chs)
        self.conv = _xavier(nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.bn = _bn(out_ch)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = _up(x, skips[0].shape[-2:])
        for proj, s in zip(self.skip_proj, skips):
            x = x + proj(s)
        return F.relu(self.bn(self.conv(x)))


class Classifier(nn.Module):
    """3×3 conv 256→64, dropout 0.3, BN, ReLU, 1×1 conv → classes (paper Sec. 4.1).
    Channel-wise dropout (Dropout2d) as in the official release's ``F.dropout2d``; as a module
    it follows ``train()``/``eval()``, so the teacher and the test predictions run without it
    (the official release kept it on everywhere)."""

    def __init__(self, in_ch: int = FEATURE_CHANNELS, mid_ch: int = 64, num_classes: int = 2,
                 dropout: float = 0.3):
        super().__init__()
        self.conv1 = _xavier(nn.Conv2d(in_ch, mid_ch, 3, padding=1))
        self.dropout = nn.Dropout2d(dropout)
        self.bn = _bn(mid_ch)
        self.conv2 = _xavier(nn.Conv2d(mid_ch, num_classes, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn(self.dropout(self.conv1(features)))))


class Projector(nn.Module):
    """[avg-pool 2] → 1×1 conv (256→256) → ReLU → 1×1 conv → ``out_ch`` (CDCL's projection head)."""

    def __init__(self, in_ch: int = FEATURE_CHANNELS, out_ch: int = 128, pool: bool = True):
        super().__init__()
        self.pool = pool
        self.conv1 = nn.Conv2d(in_ch, in_ch, 1)
        self.conv2 = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool:
            features = F.avg_pool2d(features, kernel_size=2, stride=2)
        return self.conv2(F.relu(self.conv1(features)))


class DenseUNet(nn.Module):
    def __init__(self, backbone: str = "densenet161", num_classes: int = 2, proj_dim: int = 128,
                 proj_pool: bool = True):
        super().__init__()
        if backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {backbone!r}; known: {', '.join(sorted(BACKBONES))}")
        growth, blocks, init, _ = BACKBONES[backbone]
        self.backbone, self.num_classes = backbone, num_classes
        self.encoder = DenseNetEncoder(growth, blocks, init)
        c_relu0, c_db1, c_db2, c_db3, c_bottom = self.encoder.channels
        # Decoder widths: denseblock2's and denseblock1's channel counts, then 256; for
        # densenet161 this is the official release's 2208 → 768 → 384 → 256.
        self.decoder = nn.ModuleList([
            DecoderBlock(c_bottom, (c_db3,), c_db2),
            DecoderBlock(c_db2, (c_db2,), c_db1),
            # relu0 sits at 1/2 but the extractor ends at 1/4 (the resolution CDCL's 1/8 patch
            # grid is defined on), so relu0 is average-pooled to 1/4 and enters the last block
            # beside denseblock1: the stem's low-level detail still reaches the decoder without
            # adding a 1/2-resolution stage (the official release hooks relu0 but never uses it).
            DecoderBlock(c_db1, (c_db1, c_relu0), FEATURE_CHANNELS),
        ])
        self.classifier = Classifier(FEATURE_CHANNELS, 64, num_classes)
        self.projector = Projector(FEATURE_CHANNELS, proj_dim, proj_pool)
        self.weights_info: dict = {"requested": "none", "used": "random-init", "reason": "not loaded"}

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """The extractor output (B, 256, H/4, W/4)."""
        skips, bottom = self.encoder(x)
        return self.decode(skips, bottom)

    def decode(self, skips: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The decoder: encoder skips (relu0, denseblock1-3) and bottom map → extractor output."""
        s_relu0, s_db1, s_db2, s_db3 = skips
        x = self.decoder[0](x, [s_db3])
        x = self.decoder[1](x, [s_db2])
        s_relu0 = F.adaptive_avg_pool2d(s_relu0, s_db1.shape[-2:])  # = avg-pool 2 for even sizes
        return self.decoder[2](x, [s_db1, s_relu0])

    def head_logits(self, features: torch.Tensor, size) -> torch.Tensor:
        """Classifier on (possibly perturbed) features, logits upsampled to ``size``."""
        return _up(self.classifier(features), size)

    def forward(self, x: torch.Tensor, project: bool = True, feature_dropout: float = 0.0) -> SegOutput:
        """``feature_dropout`` p > 0 adds ``fp_logits``: the decoder and classifier on the encoder
        outputs with channel dropout p (``F.dropout2d``, on whatever the module's mode: the
        caller asks for the perturbation), decoded in the same batch as the clean features, so
        decoder BatchNorm in train mode sees both halves (as UniMatch's ``need_fp`` forward)."""
        if feature_dropout <= 0:
            features = self.extract(x)
            logits = self.head_logits(features, x.shape[-2:])
            proj = self.projector(features) if project else None
            return SegOutput(features, logits, proj)
        skips, bottom = self.encoder(x)
        both = [torch.cat([e, F.dropout2d(e, feature_dropout, training=True)]) for e in (*skips, bottom)]
        decoded = self.decode(both[:-1], both[-1])  # (2B, 256, H/4, W/4): clean, then dropped
        logits, fp_logits = self.head_logits(decoded, x.shape[-2:]).chunk(2)
        features = decoded[:len(x)]
        proj = self.projector(features) if project else None
        return SegOutput(features, logits, proj, fp_logits)


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                      r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _features_state(state: dict) -> dict:
    """A torchvision DenseNet state dict (old 'norm.1' keys too) -> ``features`` sub-dict."""
    out = {}
    for k, v in state.items():
        m = _OLD_KEY.match(k)
        k = m.group(1) + m.group(2) if m else k
        if k.startswith("features."):
            out[k[len("features."):]] = v
    return out


def _load_imagenet(model: DenseUNet) -> dict:
    enum_name = BACKBONES[model.backbone][3]
    if enum_name is None:
        return dict(requested="imagenet", used="random-init",
                    reason=f"no ImageNet weights exist for the {model.backbone!r} backbone")
    from torchvision.models import densenet as tv_densenet  # only here: its import costs ~1 s
    weights = getattr(tv_densenet, enum_name).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.exists():
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # offline, proxy, HTTP error: train from scratch, say so loudly
            reason = f"ImageNet weights not in {cached.parent} and download failed ({type(e).__name__}: {e})"
            _warn_once(f"{model.backbone}: {reason}; training from RANDOM INITIALISATION. Put "
                       f"{os.path.basename(weights.url)} there (or set TORCH_HOME) to use them.")
            return dict(requested="imagenet", used="random-init", reason=reason)
        finally:
            socket.setdefaulttimeout(old)
    else:
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as e:
            raise ConfigError(f"cached ImageNet weights {cached} cannot be read ({e}); delete the file "
                              f"so it is downloaded again") from None
    model.encoder.features.load_state_dict(_features_state(state))
    return dict(requested="imagenet", used=f"imagenet:{cached}", reason="torchvision IMAGENET1K_V1")


def _load_file(model: DenseUNet, path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"weights file {path} not found (weights must be 'imagenet', 'none' or a path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"weights file {path} cannot be read: {e}") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {path} holds no state dict")
    try:
        if any(k.startswith("encoder.") for k in state):  # a whole DenseUNet
            model.load_state_dict(state)
        else:  # a torchvision DenseNet classifier's weights
            model.encoder.features.load_state_dict(_features_state(state))
    except RuntimeError as e:
        raise ConfigError(f"weights file {path} does not fit backbone {model.backbone!r}: {first_line(e)}") from None
    return dict(requested=str(path), used=f"file:{path}", reason="loaded from file")


def build_model(backbone: str, weights: str = "none", *, num_classes: int = 2, proj_dim: int = 128,
                proj_pool: bool = True) -> DenseUNet:
    """A DenseUNet; ``weights`` is "imagenet" (torchvision cache, else download, else random
    init with one warning), "none" (random init) or a path to a state dict. What happened is
    in ``model.weights_info`` (requested, used, reason)."""
    model = DenseUNet(backbone, num_classes=num_classes, proj_dim=proj_dim, proj_pool=proj_pool)
    weights = str(weights)
    if weights == "none":
        info = dict(requested="none", used="random-init", reason="weights: none")
    elif weights == "imagenet":
        info = _load_imagenet(model)
    else:
        info = _load_file(model, Path(weights))
    model.weights_info = info
    return model
