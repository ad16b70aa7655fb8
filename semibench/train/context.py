"""What a method gets while it is built (:class:`EngineContext`, the engine's
:class:`~semibench.method.MethodContext`): segmenters from the run's model config, EMA teachers
and named optimisers, which the engine then schedules, steps, updates and checkpoints. Also the
one sentence every run's metadata carries on its weights (ImageNet or random init)."""
from __future__ import annotations

import torch
from torch import nn

from semibench.config import RunConfig
from semibench.errors import ConfigError
from semibench.method import MethodContext
from semibench.train.ema import TeacherSettings, ema_update, make_teacher


def make_segmenter(cfg: RunConfig, **model_options) -> nn.Module:
    """A fresh DenseUNet from the run's model config; ``model_options`` are
    :func:`semibench.network.model.build_model`'s keyword options (num_classes, proj_dim, proj_pool)."""
    from semibench.network.model import build_model
    known = {"num_classes", "proj_dim", "proj_pool"}
    unknown = sorted(set(model_options) - known)
    if unknown:
        raise ConfigError(f"unknown model option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return build_model(cfg.train.backbone, cfg.train.weights, **model_options)


class EngineContext(MethodContext):
    """What a method gets while it is built: segmenters, EMA teachers and optimisers that the
    engine then schedules, steps and checkpoints."""

    def __init__(self, cfg: RunConfig, device: torch.device, fused_adam: bool = False):
        self.cfg, self.device = cfg, device
        self.fused_adam = fused_adam  # train.fused_adam where it applies (CUDA)
        self.segmenters: list[nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []  # registration order
        self.optimizer_names: list[str] = []  # the same order; checkpoints key optimisers by name
        self.emas: list[tuple[nn.Module, nn.Module, TeacherSettings]] = []  # (student, teacher, settings)

    def build_segmenter(self, **model_options) -> nn.Module:
        net = make_segmenter(self.cfg, **model_options).to(self.device)
        self.segmenters.append(net)
        return net

    def ema_of(self, module: nn.Module, alpha: float | None = None, *, average_buffers: bool = True,
               warmup: bool = False, mode: str = "eval") -> nn.Module:
        """A frozen copy of ``module``, updated after every optimiser step (semibench.train.ema):
        ``alpha`` (default: the run's ``train.ema_alpha``), ``average_buffers`` (BN statistics
        averaged too, or parameters only), ``warmup`` (α_t = min(1 − 1/(t+1), α)) and ``mode``
        (``"eval"``: always eval; ``"train"``: follows the method's mode)."""
        settings = TeacherSettings(alpha=self.cfg.train.ema_alpha if alpha is None else float(alpha),
                                   average_buffers=bool(average_buffers), warmup=bool(warmup), mode=mode)
        teacher = make_teacher(module, mode)
        self.emas.append((module, teacher, settings))
        return teacher

    def add_optimizer(self, params, name: str = "main", **adam_options) -> torch.optim.Optimizer:
        """An Adam optimiser named ``name`` over ``params``, poly-scheduled from its own initial
        lr (``lr`` in ``adam_options``, default the run's ``train.lr``), stepped and checkpointed
        by the engine. ``adam_options`` are ``torch.optim.Adam``'s (lr, betas, eps,
        weight_decay, ...). Names are unique, and no parameter belongs to two optimisers (it
        would be stepped twice, or by a loss that is not its own)."""
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"optimiser name must be a non-empty string without '/', got {name!r}")
        if name in self.optimizer_names:
            raise ConfigError(f"optimiser {name!r} is registered twice (give each ctx.add_optimizer "
                              f"call its own name)")
        params = [p for p in params]
        if not params:
            raise ConfigError(f"optimiser {name!r} got no parameters")
        taken = {id(p): n for n, o in zip(self.optimizer_names, self.optimizers)
                 for g in o.param_groups for p in g["params"]}
        shared = sorted({taken[id(p)] for p in params if id(p) in taken})
        if shared:
            raise ConfigError(f"optimiser {name!r} shares parameters with optimiser(s) "
                              f"{', '.join(map(repr, shared))}")
        adam_options.setdefault("lr", self.cfg.train.lr)
        if self.fused_adam and "foreach" not in adam_options:
            adam_options.setdefault("fused", True)
        try:
            opt = torch.optim.Adam(params, **adam_options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"optimiser {name!r}: bad Adam options {adam_options}: {e}") from None
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]  # the poly schedule's base, saved with the state
        self.optimizers.append(opt)
        self.optimizer_names.append(name)
        return opt

    def named_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return dict(zip(self.optimizer_names, self.optimizers))

    def check_optimizers(self, method: nn.Module, method_name: str) -> None:
        """Refuse an optimiser that the method built itself: the engine would neither schedule,
        step nor checkpoint it."""
        mine = {id(o) for o in self.optimizers}
        for mod_name, mod in method.named_modules():
            for attr, value in vars(mod).items():
                items = value.values() if isinstance(value, dict) else (
                    value if isinstance(value, (list, tuple)) else (value,))
                for v in items:
                    if isinstance(v, torch.optim.Optimizer) and id(v) not in mine:
                        where = f"{mod_name}.{attr}" if mod_name else attr
                        raise ConfigError(f"method {method_name!r} built an optimiser itself "
                                          f"({where}: {type(v).__name__}); register it with "
                                          f"ctx.add_optimizer(params, name=...) so the engine "
                                          f"schedules, steps and checkpoints it")

    def update_teachers(self, iteration: int) -> None:
        """The EMA step after the optimiser step of global iteration ``iteration`` (0-based; the
        warm-up's t, a function of the step, so a resumed run continues it exactly)."""
        for student, teacher, settings in self.emas:
            ema_update(teacher, student, settings.alpha_at(iteration), settings.average_buffers)

    def weights_info(self) -> list[dict]:
        return [dict(getattr(net, "weights_info", {"used": "unknown"})) for net in self.segmenters]


def weights_fell_back(infos: list[dict]) -> list[dict]:
    """The networks that asked for ImageNet weights and started from random init instead."""
    return [i for i in infos if i.get("requested") == "imagenet" and i.get("used") == "random-init"]


def weights_note(infos: list[dict]) -> str:
    """One sentence for the metadata: were the requested ImageNet weights used?"""
    fallback = weights_fell_back(infos)
    if fallback:
        return ("ImageNet weights were requested but UNAVAILABLE: the network(s) were trained from "
                f"RANDOM INITIALISATION ({fallback[0].get('reason', '')})")
    used = sorted({str(i.get("used")) for i in infos})
    return "weights used: " + ", ".join(used)
