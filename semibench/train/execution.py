"""How a run executes on its device: the speed options of the ``train`` config and the deferred
reading of losses. None of them changes *what* a run computes, only how (floating-point rounding
aside), so they are not part of the resume fingerprint, like the device (``config.EXECUTION_KEYS``).

Options (``train.<key>``; what was requested and what was used is recorded in
``train_done.json`` under ``execution``, and in ``metrics.json`` meta):

- ``precision``: ``auto`` (default) | ``bf16`` | ``fp16`` | ``fp32``. CUDA only: ``auto`` is bf16
  autocast on GPUs with native bf16 (compute capability 8.0 and newer: A100, H100, ...), else
  fp16 autocast with a GradScaler; ``bf16`` on a GPU without it is refused. bf16 needs no loss
  scaling, so no GradScaler and none of its per-step host synchronisation. The CPU always
  computes in fp32 (deterministic and bit-reproducible, the CPU's contract).
- ``channels_last`` (default true): CUDA only; the method's 4-D weights (DenseUNets, heads)
  in channels-last memory, which cuDNN's tensor-core convolutions read without transposes.
- ``fused_adam`` (default true): CUDA only; every ``ctx.add_optimizer`` Adam is the fused
  implementation (one kernel for all parameters; with a GradScaler it reads the inf check on
  the device, without a host synchronisation). A method's explicit ``fused``/``foreach`` wins.
- ``compile`` (default false): ``torch.compile`` of every DenseUNet (segmenters and their EMA
  teachers), on any device. The loss code, auxiliary heads and flaw detectors stay eager: they
  are small and method-specific, and compiling them would add compile time for little gain.
  The first steps (and the first validation) pay the compilation.

The old ``train.amp`` (true: fp16 autocast on CUDA; false: fp32) is migrated when an old run
directory is read (``config.amp_to_precision``) and refused, with the replacement named, in a config.

Deferred losses: a step queues its losses on the device (:class:`LossQueue`); the engine reads
them every ``LOG_EVERY`` steps and at the end of each epoch, one host synchronisation for many
steps, and then checks them in step order, so a non-finite loss is still reported with the
first step it occurred at. The epoch's checkpoint and validation follow the last read, so no
state reached by stepping on a non-finite loss is ever written.
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from semibench.errors import ConfigError, TrainingError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DYNAMO_RECOMPILE_LIMIT = 64  # graphs per code object: train/eval, grad/no-grad, batch shapes, ...
# torch.compile's keyword options; SEMIBENCH_COMPILE_BACKEND picks another backend (e.g.
# aot_eager: the same capture without inductor's code generation, for CPU smoke runs and tests)
COMPILE_OPTIONS: dict = ({"backend": os.environ["SEMIBENCH_COMPILE_BACKEND"]}
                         if os.environ.get("SEMIBENCH_COMPILE_BACKEND") else {})
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Execution:
    """What a run uses on its device (see the module docstring)."""

    device_type: str
    precision: str  # used: fp32 | bf16 | fp16
    channels_last: bool
    fused_adam: bool
    compile: bool
    requested: tuple[tuple[str, object], ...] = ()  # the train.<key> values asked for

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.precision)

    @property
    def grad_scaling(self) -> bool:
        return self.precision == "fp16"

    def autocast(self):
        dtype = self.dtype
        return torch.autocast(self.device_type, dtype=dtype) if dtype is not None else nullcontext()

    def record(self) -> dict:
        """For the run's metadata: what was requested and what was used."""
        return {"requested": dict(self.requested), "precision": self.precision,
                "channels_last": self.channels_last, "fused_adam": self.fused_adam,
                "compile": self.compile, "grad_scaler": self.grad_scaling}


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"train.{name} must be true or false, got {value!r}")
    return value


def native_bf16(device: torch.device) -> bool:
    """Native bf16 arithmetic (compute capability 8.0+); ``torch.cuda.is_bf16_supported`` also
    says yes for emulated bf16, which is slower than fp16."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_execution(train_cfg, device: torch.device, bf16_supported: bool | None = None) -> Execution:
    """The :class:`Execution` of ``train_cfg`` (a TrainConfig) on ``device``; one-line
    :class:`ConfigError` for a bad value. ``bf16_supported``: default :func:`native_bf16`."""
    precision = train_cfg.precision
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    requested = {"precision": precision}
    for key in ("channels_last", "fused_adam", "compile"):
        requested[key] = _check_bool(key, getattr(train_cfg, key))
    cuda = device.type == "cuda"
    if cuda:
        bf16 = native_bf16(device) if bf16_supported is None else bf16_supported
        if precision == "bf16" and not bf16:
            raise ConfigError(f"train.precision bf16: this GPU ({torch.cuda.get_device_name(device)}) "
                              f"has no native bf16; use auto or fp16")
        used = ("bf16" if bf16 else "fp16") if precision == "auto" else precision
    else:
        used = "fp32"
    return Execution(device_type=device.type, precision=used,
                     channels_last=cuda and requested["channels_last"],
                     fused_adam=cuda and requested["fused_adam"], compile=requested["compile"],
                     requested=tuple(requested.items()))


def prepare_networks(method: nn.Module, networks: list[nn.Module], ex: Execution) -> None:
    """Apply the memory format to the whole method (DenseUNets and heads) and compile the
    DenseUNets in ``networks``, in place: parameters stay the same objects (the optimisers
    already hold them) and state-dict keys do not change (checkpoints stay interchangeable)."""
    if ex.channels_last:
        method.to(memory_format=torch.channels_last)
    if ex.compile:
        import torch._dynamo.config as dynamo_config
        # every DenseUNet shares one compiled code object; the default limit (8) is spent by
        # train/eval x grad/no-grad x batch shapes x project, after which torch runs eagerly
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), DYNAMO_RECOMPILE_LIMIT))
                break
        seen = set()
        for net in networks:
            if id(net) not in seen:
                seen.add(id(net))
                net.compile(**COMPILE_OPTIONS)


def match_state_layouts(optimizers) -> None:
    """Give every optimiser state tensor its parameter's memory layout. A checkpoint written
    under another ``channels_last`` (or on another device) loads with the old strides, and the
    fused and multi-tensor Adam kernels want a parameter and its moments laid out alike."""
    for opt in optimizers:
        for p, state in opt.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t.to(device, dtype)`` without a host synchronisation: a blocking copy from pageable
    memory to a GPU waits for the GPU's queue to drain first, so every small tensor made on the
    CPU (random parameters, indices) would stall the host once per step. A pinned copy is
    asynchronous, and torch's pinned-memory cache keeps the buffer until the copy is done."""
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t if dtype is None else t.to(dtype)


def nonfinite_loss_message(names: list[str], values: list[float], where: str, context: str = "") -> str | None:
    """The one-line report of a step's non-finite losses (None when all are finite). The
    culprit term comes first: the total "loss" is only non-finite because of it."""
    bad = sorted(((n, v) for n, v in zip(names, values) if not math.isfinite(v)), key=lambda b: b[0] == "loss")
    if not bad:
        return None
    also = f" (also non-finite: {', '.join(repr(n) for n, _ in bad[1:])})" if bad[1:] else ""
    return f"non-finite loss {bad[0][0]!r} = {bad[0][1]} at {where}{also}{context}"


class LossQueue:
    """Losses of the steps since the last read, kept on the device."""

    def __init__(self):
        self._steps: list[tuple[tuple[str, ...], torch.Tensor, object]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def push(self, names: list[str], values: torch.Tensor, step) -> None:
        """``values``: a 1-D float tensor, one entry per name; ``step``: anything that
        :meth:`read`'s ``where`` turns into the step's description."""
        self._steps.append((tuple(names), values, step))

    def read(self, where: Callable[[object], str], context: str = "") -> list[dict[str, float]]:
        """Every queued step's losses as floats, in step order (one host synchronisation);
        :class:`TrainingError` naming the first step with a non-finite loss (``where(step)``,
        then ``context``)."""
        if not self._steps:
            return []
        steps, self._steps = self._steps, []
        host = torch.cat([v for _, v, _ in steps]).cpu().tolist()
        out, i = [], 0
        for names, _values, step in steps:
            row = host[i:i + len(names)]
            i += len(names)
            message = nonfinite_loss_message(list(names), row, where(step), context)
            if message:
                raise TrainingError(message)
            out.append(dict(zip(names, row)))
        return out

    def clear(self) -> None:
        self._steps = []
