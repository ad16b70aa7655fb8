"""numpy's global generator seeded for one block: seaborn's strip-plot jitter and rliable's
stratified bootstrap both draw from it, and the report must be reproducible from
``report.seed`` without changing the caller's random state."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np


@contextmanager
def seeded(seed: int):
    """Seed numpy's global generator for the block, then give the caller's state back."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)
