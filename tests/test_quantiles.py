"""Exact quantiles of values read in blocks (advgrad.quantiles) against numpy's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from advgrad.quantiles import PASSES, Spread, lower_quantiles, spread_of

PROBABILITIES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def in_blocks(values: np.ndarray, cuts) -> tuple:
    """``values`` split at ``cuts``, and a function giving those blocks, counting its calls."""
    calls = []

    def blocks():
        calls.append(1)
        return np.split(values, sorted(cuts))

    return blocks, calls


@settings(max_examples=200, deadline=None)
@given(
    values=arrays(
        np.float64,
        st.integers(1, 300),
        elements=st.floats(allow_nan=False) | st.sampled_from([0.0, -0.0, np.inf, 5e-324]),
    ),
    cuts=st.lists(st.integers(0, 300), max_size=4),
)
def test_lower_quantiles_are_numpys_whatever_the_blocks(values, cuts):
    blocks, calls = in_blocks(values, [c for c in cuts if c <= len(values)])
    got = lower_quantiles(blocks, PROBABILITIES)
    assert np.array_equal(got, np.quantile(values, PROBABILITIES, method="lower"))
    assert len(calls) == PASSES


@pytest.mark.parametrize("n", [1, 2, 3, 1000, 65537])
def test_lower_quantiles_of_many_ties_and_large_values(n):
    rng = np.random.default_rng(n)
    values = np.concatenate([rng.integers(0, 3, n).astype(float), np.exp(rng.normal(size=n) * 100)])
    blocks, _ = in_blocks(values, [n // 3, n])
    assert np.array_equal(
        lower_quantiles(blocks, PROBABILITIES), np.quantile(values, PROBABILITIES, method="lower")
    )


def test_no_values_and_nan():
    assert lower_quantiles(lambda: [np.empty(0), np.empty(0)], (0.5,)) is None
    assert spread_of(lambda: []) is None
    assert np.isnan(lower_quantiles(lambda: [np.array([1.0, np.nan, 2.0])], (0.25, 0.5))).all()


def test_spread_counts_the_finite_values():
    values = np.array([0.3, np.inf, 0.1, 0.2, np.inf])
    spread = spread_of(lambda: [values[:2], values[2:]])
    q25, median, q75 = np.quantile(values, (0.25, 0.5, 0.75), method="lower")
    assert spread == Spread(q25, median, q75, found=0.6)
