"""semibench.testing's comparison of checkpoints: the path it names is where two states differ."""
import torch

from semibench.testing import first_difference


def test_identical_states_have_no_difference():
    state = {"student": {"w": torch.ones(2, 3), "n": torch.tensor(4)}, "opt": [1, (2.0, "x")]}
    copy = {"student": {"w": torch.ones(2, 3), "n": torch.tensor(4)}, "opt": [1, (2.0, "x")]}
    assert first_difference(state, copy) is None


def test_names_the_first_differing_leaf():
    a = {"student": {"a": torch.zeros(2), "b": torch.zeros(2)}}
    b = {"student": {"a": torch.zeros(2), "b": torch.tensor([0.0, 1e-30])}}
    assert first_difference(a, b) == ".student.b"
    assert first_difference(a, b, "ck") == "ck.student.b"


def test_shape_dtype_missing_keys_lengths_and_values_count():
    assert first_difference(torch.zeros(2), torch.zeros(1, 2)) == "<root>"
    assert first_difference(torch.zeros(2), torch.zeros(2, dtype=torch.float64)) == "<root>"
    assert first_difference(torch.zeros(2), [0.0, 0.0]) == "<root>"
    assert first_difference({"a": 1}, {"a": 1, "b": 2}) == ".b"
    assert first_difference({"l": [1, 2]}, {"l": [1, 2, 3]}) == ".l (length 2 vs 3)"
    assert first_difference({"l": [1, 2]}, {"l": [1, 5]}) == ".l[1]"
    assert first_difference({"e": 3}, {"e": 4}) == ".e"
