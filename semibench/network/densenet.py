"""torchvision's ``DenseNet(...).features``, rebuilt here so that a run does not import torchvision
(whose package import pulls in ``torch._dynamo``: about 1.1 s of every train and evaluate job).

Same modules in the same order, the same parameter names (ImageNet state dicts load unchanged),
the same initialisation drawing the same random numbers (torchvision's classifier layer is
built and dropped, as ``DenseNet(...).features`` drops it, because building it draws from the
generator), and the same arithmetic in the forward pass: ``tests/test_model.py`` checks weights
and outputs against torchvision's, bit for bit. ImageNet weights still come through torchvision
(``semibench.network.model``), imported only then.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

IMAGENET_CLASSES = 1000  # torchvision's classifier width: built for its draws, then dropped
BN_SIZE = 4  # bottleneck width factor (torchvision's default)


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth_rate: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, BN_SIZE * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(BN_SIZE * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(BN_SIZE * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, previous: list[torch.Tensor]) -> torch.Tensor:
        bottleneck = self.conv1(self.relu1(self.norm1(torch.cat(previous, 1))))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, in_channels: int, growth_rate: int):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(in_channels + i * growth_rate, growth_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


def densenet_features(growth_rate: int, block_config: tuple[int, ...], num_init_features: int) -> nn.Sequential:
    """What ``torchvision.models.densenet.DenseNet(growth_rate, block_config,
    num_init_features).features`` is, weights included for the same generator state."""
    features = nn.Sequential(OrderedDict([
        ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
        ("norm0", nn.BatchNorm2d(num_init_features)),
        ("relu0", nn.ReLU(inplace=True)),
        ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
    ]))
    channels = num_init_features
    for i, num_layers in enumerate(block_config):
        features.add_module(f"denseblock{i + 1}", DenseBlock(num_layers, channels, growth_rate))
        channels += num_layers * growth_rate
        if i != len(block_config) - 1:
            features.add_module(f"transition{i + 1}", Transition(channels, channels // 2))
            channels //= 2
    features.add_module("norm5", nn.BatchNorm2d(channels))
    nn.Linear(channels, IMAGENET_CLASSES)  # torchvision's classifier: its default init draws
    for m in features.modules():  # torchvision's init, in its order
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return features


def torchvision_version() -> str:
    """``torchvision.__version__`` (e.g. ``0.29.1+cu130``, the local tag included, unlike the
    distribution metadata's) read from its ``version.py`` without importing the package."""
    import importlib.metadata
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.find_spec("torchvision")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            found = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""",
                              (Path(folder) / "version.py").read_text(), re.M)
        except OSError:
            continue
        if found:
            return found.group(1)
    return importlib.metadata.version("torchvision")
