"""A minimal MethodContext for unit tests of methods, independent of the engine."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from semibench.method import MethodContext


class FakeContext(MethodContext):
    def __init__(self, make_net: Callable[[], nn.Module], lr: float = 1e-3):
        self.device = torch.device("cpu")
        self.make_net, self.lr = make_net, lr
        self.optimizers: list[torch.optim.Optimizer] = []
        self.emas: list[tuple[nn.Module, nn.Module]] = []

    def build_segmenter(self) -> nn.Module:
        return self.make_net()

    def ema_of(self, module: nn.Module) -> nn.Module:
        teacher = copy.deepcopy(module).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.emas.append((module, teacher))
        return teacher

    def add_optimizer(self, params) -> torch.optim.Optimizer:
        opt = torch.optim.Adam(params, lr=self.lr)
        self.optimizers.append(opt)
        return opt
