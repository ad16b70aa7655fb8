"""Choosing the torch device of a run from its config (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
from __future__ import annotations

import re

import torch

from semibench.errors import ConfigError, TrainingError

_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def resolve_device(spec: str) -> torch.device:
    """``auto`` → the first visible GPU if any, else the CPU. Asking for a GPU that is absent is
    an error rather than a silent fall-back to a CPU run that would take days."""
    m = _SPEC.match(str(spec).strip().lower())
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ConfigError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if kind == "auto":
        return torch.device("cuda:0" if available else "cpu")
    if not available:
        raise TrainingError(f"device {spec!r} requested but no CUDA GPU is available "
                            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                            f"use --device cpu or auto")
    i = int(index or 0)
    n = torch.cuda.device_count()
    if i >= n:
        raise TrainingError(f"device {spec!r} requested but only {n} CUDA GPU(s) are visible "
                            f"(cuda:0 .. cuda:{n - 1})")
    return torch.device(f"cuda:{i}")


def device_name(device: torch.device) -> str:
    """A human-readable name for metadata (GPU model, or the CPU's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return "cpu: " + (platform.processor() or platform.machine())
