"""advgrad.model: the Model value, validated once and read-only."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_network

import advgrad


def test_model_validates_shapes_and_values():
    rng = np.random.default_rng(28)
    W1, b1, W2, b2 = random_network(rng, 4, 3, 2)
    with pytest.raises(ValueError, match="b1 must have shape"):
        advgrad.Model(W1, b2, W2, b2)
    with pytest.raises(ValueError, match="W2 must have 3 rows"):
        advgrad.Model(W1, b1, W2.T, b2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        advgrad.Model(W1, b1, W2[:, :1], b2[:1])
    with pytest.raises(ValueError, match="non-finite"):
        advgrad.Model(W1, b1 * np.nan, W2, b2)
    with pytest.raises(ValueError, match="input_shape"):
        advgrad.Model(W1, b1, W2, b2, input_shape=(3, 3))
    model = advgrad.Model(W1, b1, W2, b2)
    with pytest.raises(ValueError, match="read-only"):
        model.W1[0, 0] = 1.0
