"""advgrad.gradient_check: gradcheck and the finite differences it compares with."""

from __future__ import annotations

import numpy as np
from conftest import one_hot

import advgrad
from advgrad.gradient_check import finite_difference_gradient


def test_gradcheck_passes_on_the_bundled_model(digits_model, digits_test):
    result = advgrad.gradcheck(digits_model, digits_test[0][:8])
    assert result.passed()
    assert result.relative_error < 1e-7
    assert (result.n_rows, result.n_inputs) == (8, 64)


def test_finite_differences_catch_a_wrong_sign(small_model):
    """The check itself can fail: the seed's sign, (Y - P), is far from the differences."""
    rng = np.random.default_rng(27)
    X = rng.uniform(size=(6, 12))
    Y = one_hot(rng.integers(0, 4, 6), 4)
    numeric = finite_difference_gradient(small_model, X, Y)
    analytic = advgrad.input_gradient(small_model, X, Y)
    assert np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric) < 1e-7
    assert np.linalg.norm(-analytic - numeric) / np.linalg.norm(numeric) > 1.9
