"""The engine's own method context for unit tests of methods: :class:`FakeContext` is an
:class:`~semibench.engine.EngineContext` (same EMA teachers, optimiser registration and checks)
whose segmenters come from a test's factory instead of the run's model config."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from semibench.config import RunConfig, TrainConfig
from semibench.engine import EngineContext


class FakeContext(EngineContext):
    def __init__(self, make_net: Callable[[], nn.Module], lr: float = 1e-3, ema_alpha: float = 0.999):
        cfg = RunConfig(dataset="toy", method="suponly", ratio=2, seed=0, device="cpu",
                        train=TrainConfig(backbone="tiny", weights="none", lr=lr, ema_alpha=ema_alpha))
        super().__init__(cfg, torch.device("cpu"))
        self.make_net, self.lr = make_net, lr

    def build_segmenter(self) -> nn.Module:
        net = self.make_net()
        self.segmenters.append(net)
        return net
