"""The optimisation step after a method's ``training_step``: :class:`Update` sets every optimiser's
poly learning rate, routes the returned losses to their optimisers, runs the AMP-scaled backward
pass(es) and steps (see *Update steps* in :mod:`semibench.method`), then moves the EMA teachers.
"""
from __future__ import annotations

import torch

from semibench.errors import TrainingError
from semibench.train.context import EngineContext
from semibench.train.schedules import poly_lr

LOSS_PREFIX = "loss/"  # "loss/<optimiser name>": a loss stepped by that optimiser only


class Update:
    def __init__(self, ctx: EngineContext, scaler: torch.amp.GradScaler, total_iterations: int,
                 poly_power: float, method_name: str):
        self.ctx, self.scaler = ctx, scaler
        self.total, self.poly_power, self.method_name = total_iterations, poly_power, method_name

    def set_lr(self, iteration: int) -> float:
        """Poly decay of every optimiser from its own initial lr; returns the first one's lr."""
        for opt in self.ctx.optimizers:
            for group in opt.param_groups:
                group["lr"] = poly_lr(group["initial_lr"], iteration, self.total, self.poly_power)
        return self.ctx.optimizers[0].param_groups[0]["lr"]

    def route(self, losses: dict) -> list[tuple[str, torch.Tensor]]:
        """``[(optimiser name, loss)]`` in the method's order for ``"loss/<name>"`` keys, or []
        for a method that returns one ``"loss"``."""
        prefixed = [(k[len(LOSS_PREFIX):], torch.as_tensor(v, device=self.ctx.device))  # a tensor: itself
                    for k, v in losses.items() if k.startswith(LOSS_PREFIX)]
        method = self.method_name
        if not prefixed:
            if "loss" not in losses:
                raise TrainingError(f"method {method!r} returned no 'loss' and no "
                                    f"'{LOSS_PREFIX}<optimiser>' losses (got {', '.join(losses)})")
            return []
        if "loss" in losses:
            raise TrainingError(f"method {method!r} returned both 'loss' and per-optimiser losses "
                                f"({', '.join(LOSS_PREFIX + n for n, _ in prefixed)}); return one or the other")
        unknown = [n for n, _ in prefixed if n not in self.ctx.optimizer_names]
        if unknown:
            raise TrainingError(f"method {method!r} returned losses for unknown optimiser(s) "
                                f"{', '.join(map(repr, unknown))}; registered: "
                                f"{', '.join(map(repr, self.ctx.optimizer_names))}")
        return prefixed

    def stack(self, losses: dict) -> tuple[list[str], torch.Tensor]:
        """The names and a 1-D float32 tensor on the device of a step's scalar losses."""
        names, vals = [], []
        for name, v in losses.items():
            v = torch.as_tensor(v).detach()
            if v.numel() != 1:
                raise TrainingError(f"loss {name!r} of method {self.method_name!r} is not a scalar "
                                    f"(shape {tuple(v.shape)})")
            names.append(name)
            vals.append(v.float().reshape(()).to(self.ctx.device))
        return names, torch.stack(vals)

    def apply(self, total: torch.Tensor, per_optimizer: list[tuple[str, torch.Tensor]]) -> None:
        """Zero every optimiser; back-propagate (AMP-scaled) either ``total`` once, or each
        per-optimiser loss in the method's order into its own optimiser's parameters only
        (``backward(inputs=...)``); then step, in registration order, every optimiser that got a
        gradient; then one ``scaler.update()``. All backward passes run before any step: every
        forward of the step ran before them, so this equals stepping each optimiser right after
        its own backward, and a loss whose graph runs through another optimiser's parameters
        (GCT's L_fc through the flaw detector) still finds them unmodified."""
        for opt in self.ctx.optimizers:
            opt.zero_grad(set_to_none=True)
        if not per_optimizer:
            self.scaler.scale(total).backward()
        named = self.ctx.named_optimizers()
        for i, (name, loss) in enumerate(per_optimizer):
            params = [p for g in named[name].param_groups for p in g["params"] if p.requires_grad]
            if loss.requires_grad and params:  # e.g. a term that is off before unsup_start_epoch
                self.scaler.scale(loss).backward(inputs=params, retain_graph=i < len(per_optimizer) - 1)
        stepped = False
        for opt in self.ctx.optimizers:
            # an optimiser without gradient is not stepped: under CUDA AMP GradScaler.step
            # raises "No inf checks were recorded" for it, and Adam would do nothing anyway
            if any(p.grad is not None for g in opt.param_groups for p in g["params"]):
                self.scaler.step(opt)
                stepped = True
        if stepped:
            self.scaler.update()

    def teachers(self, iteration: int) -> None:
        """The EMA step of every teacher after the optimiser step of ``iteration``."""
        self.ctx.update_teachers(iteration)
