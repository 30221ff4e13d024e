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


def test_model_settles_its_optional_fields_and_checks_them():
    rng = np.random.default_rng(3)
    network = random_network(rng, 6, 4, 3)
    model = advgrad.Model(
        *network, input_shape=[2, 3], class_names=[0, 1, 2], x_min=0, x_max=1, metadata={"a": 1}
    )
    assert (model.n_inputs, model.n_hidden, model.n_classes) == (6, 4, 3)
    assert model.input_shape == (2, 3)
    assert model.class_names == ("0", "1", "2")
    assert (model.x_min, model.x_max) == (0.0, 1.0)
    assert isinstance(model.x_min, float)
    with pytest.raises(TypeError):
        model.metadata["b"] = 2  # a read-only view
    for options, message in [
        ({"class_names": ["a", "b"]}, "2 class names for 3 classes"),
        ({"x_min": 1.0, "x_max": 0.5}, "must be below x_max"),
        ({"x_max": np.inf}, "x_max must be finite"),
        ({"input_shape": (0, 6)}, "does not have d = 6"),
    ]:
        with pytest.raises(ValueError, match=message):
            advgrad.Model(*network, **options)


@pytest.mark.parametrize("dtype", [np.int64, np.float16])
def test_model_takes_float32_or_float64_weights_only(dtype):
    W1, b1, W2, b2 = random_network(np.random.default_rng(4), 3, 2, 2)
    with pytest.raises(ValueError, match="W1 must be float32 or float64"):
        advgrad.Model(W1.astype(dtype), b1, W2, b2)


def test_astype_converts_every_weight_and_keeps_the_rest():
    network = random_network(np.random.default_rng(5), 5, 4, 3, dtype=np.float32)
    model = advgrad.Model(*network, x_min=-1.0, x_max=1.0, metadata={"seed": 5})
    assert model.astype(np.float32) is model
    wide = model.astype("float64")
    assert wide.dtype == np.float64
    for name, original in zip(("W1", "b1", "W2", "b2"), network, strict=True):
        converted = getattr(wide, name)
        assert converted.dtype == np.float64
        np.testing.assert_array_equal(converted, original.astype(np.float64))
    assert (wide.x_min, wide.x_max, dict(wide.metadata)) == (-1.0, 1.0, {"seed": 5})
    with pytest.raises(ValueError, match="float32 or float64"):
        model.astype(np.int32)
