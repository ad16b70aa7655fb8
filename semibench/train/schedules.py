"""Learning-rate and loss-weight schedules shared by the engine and the methods."""
from __future__ import annotations

import math


def poly_lr(base_lr: float, iteration: int, total: int, power: float = 0.9) -> float:
    """Polynomial decay ``base_lr * (1 - iteration / total) ** power`` (paper Sec. 4.1: power 0.9
    over all iterations). ``iteration`` is 0-based and clipped to [0, total]."""
    if total <= 0:
        return float(base_lr)
    frac = min(max(iteration / total, 0.0), 1.0)
    return float(base_lr) * (1.0 - frac) ** power


def gaussian_rampup(current: float, length: float) -> float:
    """Laine & Aila / Tarvainen & Valpola ramp-up ``exp(-5 (1 - t/T)^2)``, with t clipped to
    [0, T]; 1 when ``length`` is 0 (no ramp-up)."""
    if length <= 0:
        return 1.0
    t = min(max(float(current), 0.0), float(length)) / float(length)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))
