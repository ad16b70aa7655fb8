"""The method contract, checked once, when the engine builds a method (before any data is drawn),
so that a method that breaks it fails with one line naming what to change, never after training:

- the class (:func:`method_class`): registered under its name (``name`` is set by the registry,
  said once), ``Hparams`` a dataclass or absent, ``training_step`` implemented, ``unlabeled_views``
  a known view kind whose builder takes every ``view_options`` key, ``unlabeled_batches`` >= 1;
- the built method (:func:`build_method`): at least one optimiser, all registered through
  ``ctx.add_optimizer``; ``inference_model()`` is a DenseUNet of the run's backbone with two
  classes, built by ``ctx.build_segmenter()`` (or its EMA teacher), so the evaluation, which
  rebuilds a stock DenseUNet from ``best.pt``, can load it.

The unlabeled views a method receives are exactly its view kind's keys (``semibench.data.augment``),
so a method does not check them itself.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from torch import nn

from semibench.data.augment import VIEW_KINDS, view_options_of
from semibench.errors import ConfigError
from semibench.method import Method, check_method_class, make_hparams
from semibench.network.model import DenseUNet
from semibench.registry import METHODS
from semibench.train.context import EngineContext


def method_class(name: str) -> type:
    """The registered class of method ``name``, its declarations checked."""
    cls = METHODS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method {name!r} is {cls!r}, not a subclass of semibench.method.Method")
    if cls.training_step is Method.training_step:
        raise ConfigError(f"method {name!r} does not implement training_step(batch, step)")
    hp = cls.Hparams
    if hp is not type(None) and not dataclasses.is_dataclass(hp):
        raise ConfigError(f"method {name!r}: Hparams must be a dataclass (or left out), got {hp!r}")
    check_method_class(cls, VIEW_KINDS)
    if cls.unlabeled_views is not None and cls.view_options:
        accepted = view_options_of(cls.unlabeled_views)
        unknown = sorted(set(cls.view_options) - accepted)
        if unknown:
            raise ConfigError(f"method {name!r} declares view_options {', '.join(unknown)} that view kind "
                              f"{cls.unlabeled_views!r} does not take; it takes: "
                              f"{', '.join(sorted(accepted)) or 'none'}")
    return cls


def build_method(cls: type, ctx: EngineContext, overrides: Mapping[str, Any] | None,
                 backbone: str) -> Method:
    """``cls(ctx, hp)`` with ``hp`` its Hparams from the defaults plus ``overrides``, checked
    against the contract (module docstring)."""
    hp = make_hparams(cls.Hparams, overrides) if dataclasses.is_dataclass(cls.Hparams) else None
    method = cls(ctx, hp)
    name = cls.name
    if not ctx.optimizers:
        raise ConfigError(f"method {name!r} registered no optimiser (ctx.add_optimizer)")
    ctx.check_optimizers(method, name)
    check_inference_model(method, ctx, backbone)
    return method


def check_inference_model(method: Method, ctx: EngineContext, backbone: str) -> None:
    name = type(method).name
    try:
        net = method.inference_model()
    except AttributeError as e:
        raise ConfigError(f"method {name!r}: inference_model() failed ({e}); the default returns "
                          f"self.student, so name the evaluated network student or override "
                          f"inference_model()") from None
    built = list(ctx.segmenters) + [teacher for _, teacher, _ in ctx.emas]
    if not isinstance(net, nn.Module) or not any(net is b for b in built):
        raise ConfigError(f"method {name!r}: inference_model() must return a network built by "
                          f"ctx.build_segmenter() (or its ctx.ema_of teacher), got {type(net).__name__}; "
                          f"the evaluation loads its weights into a stock DenseUNet")
    stock = isinstance(net, DenseUNet) and net.backbone == backbone and net.num_classes == 2
    if not stock:
        raise ConfigError(f"method {name!r}: inference_model() must be a 2-class DenseUNet of backbone "
                          f"{backbone!r} (the evaluation rebuilds that network from best.pt); got "
                          f"{type(net).__name__} with num_classes={getattr(net, 'num_classes', '?')}")
