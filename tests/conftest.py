"""Fixtures shared across test modules (their helpers live in tests/toy.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semibench.registry import METHODS
from semibench.testing import write_toy_dataset
from tests.toy import LOCAL_METHODS, TWO_OPTIMISER_METHODS


@pytest.fixture
def one_thread():
    """Engine tests opt in (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny tensors
    gain nothing from threads, and on a loaded machine OpenMP threads spinning against other
    processes make each step ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    """tests/toy.py's dataset and splits for seeds 0 and 1, written once per module."""
    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(root, seeds=(0, 1))
    return root


@pytest.fixture
def local_methods():
    """The test-local methods _test_mt, _test_sup and _test_full, registered for one test."""
    with METHODS.temporarily({cls.name: cls for cls in LOCAL_METHODS}):
        yield


@pytest.fixture
def two_methods():
    """_test_two (two named optimisers) and _test_rogue (an optimiser the engine never sees)."""
    with METHODS.temporarily({cls.name: cls for cls in TWO_OPTIMISER_METHODS}):
        yield
