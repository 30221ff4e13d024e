"""The two-layer sigmoid network as a small immutable value, validated once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
MAX_WEIGHTS = 2**27
"""Most elements in one weight matrix, W1 (d * H) or W2 (H * C), that advgrad reads or trains
by default: 512 MiB in float32. A file's shapes are checked against it before anything is
allocated; callers (and the command line's ``--max-weights``) may raise it."""


def _frozen_array(name: str, value, dtype: np.dtype, ndim: int) -> np.ndarray:
    array = np.array(value, dtype=dtype, order="C", copy=True)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values (NaN or inf)")
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class Model:
    """Weights of a two-layer sigmoid network with a softmax output.

    ``Z1 = X @ W1 + b1``, ``A = sigmoid(Z1)``, ``Z2 = A @ W2 + b2``, ``P = softmax(Z2)``.

    Parameters
    ----------
    W1 : (d, H) float32 or float64
    b1 : (H,) same dtype as W1
    W2 : (H, C) same dtype as W1, C >= 2
    b2 : (C,) same dtype as W1
    input_shape : tuple of int, optional
        Shape of one input before flattening (e.g. ``(8, 8)``); its product is d.
    class_names : tuple of str, optional
        One name per class.
    x_min, x_max : float, optional
        Valid input range, the default clip range of attacks.
    metadata : mapping, optional
        Free-form provenance (training data hash, hyper-parameters, ...).

    The arrays are copied, made C-contiguous and read-only; every array takes W1's dtype.
    Raises ValueError when shapes disagree or a value is not finite.
    """

    W1: np.ndarray
    b1: np.ndarray
    W2: np.ndarray
    b2: np.ndarray
    input_shape: tuple[int, ...] | None = None
    class_names: tuple[str, ...] | None = None
    x_min: float | None = None
    x_max: float | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dtype = np.asarray(self.W1).dtype
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"W1 must be float32 or float64, got {dtype}")
        for name, ndim in (("W1", 2), ("b1", 1), ("W2", 2), ("b2", 1)):
            object.__setattr__(self, name, _frozen_array(name, getattr(self, name), dtype, ndim))
        d, H = self.W1.shape
        if d < 1 or H < 1:
            raise ValueError(f"W1 must have at least one row and column, got shape {self.W1.shape}")
        if self.b1.shape != (H,):
            raise ValueError(
                f"b1 must have shape ({H},) to match W1 {self.W1.shape}, got {self.b1.shape}"
            )
        if self.W2.shape[0] != H:
            raise ValueError(
                f"W2 must have {H} rows to match W1 {self.W1.shape}, got {self.W2.shape}"
            )
        C = self.W2.shape[1]
        if C < 2:
            raise ValueError(f"the network needs at least 2 classes, W2 has shape {self.W2.shape}")
        if self.b2.shape != (C,):
            raise ValueError(
                f"b2 must have shape ({C},) to match W2 {self.W2.shape}, got {self.b2.shape}"
            )
        if self.input_shape is not None:
            shape = tuple(int(s) for s in self.input_shape)
            if any(s < 1 for s in shape) or int(np.prod(shape)) != d:
                raise ValueError(f"input_shape {shape} does not have d = {d} elements")
            object.__setattr__(self, "input_shape", shape)
        if self.class_names is not None:
            names = tuple(str(s) for s in self.class_names)
            if len(names) != C:
                raise ValueError(f"{len(names)} class names for {C} classes")
            object.__setattr__(self, "class_names", names)
        for name in ("x_min", "x_max"):
            value = getattr(self, name)
            if value is not None:
                value = float(value)
                if not np.isfinite(value):
                    raise ValueError(f"{name} must be finite, got {value}")
                object.__setattr__(self, name, value)
        if self.x_min is not None and self.x_max is not None and not self.x_min < self.x_max:
            raise ValueError(f"x_min ({self.x_min}) must be below x_max ({self.x_max})")
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    @property
    def dtype(self) -> np.dtype:
        """The compute dtype, float32 or float64."""
        return self.W1.dtype

    @property
    def n_inputs(self) -> int:
        """d, the number of input features."""
        return self.W1.shape[0]

    @property
    def n_hidden(self) -> int:
        """H, the number of hidden units."""
        return self.W1.shape[1]

    @property
    def n_classes(self) -> int:
        """C, the number of classes."""
        return self.W2.shape[1]

    def astype(self, dtype) -> Model:
        """The same network with weights in ``dtype`` (float32 or float64)."""
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return self
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        return Model(
            self.W1.astype(dtype),
            self.b1.astype(dtype),
            self.W2.astype(dtype),
            self.b2.astype(dtype),
            self.input_shape,
            self.class_names,
            self.x_min,
            self.x_max,
            self.metadata,
        )

    @classmethod
    def from_sklearn(cls, classifier) -> Model:
        """The network of a fitted ``MLPClassifier(activation="logistic")`` with one hidden
        layer; see ``advgrad.interop.from_sklearn``."""
        from advgrad.interop import from_sklearn

        return from_sklearn(classifier)

    def to_sklearn(self, classes=None):
        """A fitted ``MLPClassifier`` computing this network; see
        ``advgrad.interop.to_sklearn``."""
        from advgrad.interop import to_sklearn

        return to_sklearn(self, classes)

    @classmethod
    def from_torch(cls, module) -> Model:
        """The network of ``nn.Sequential(nn.Linear, nn.Sigmoid, nn.Linear)`` or of its
        state_dict; see ``advgrad.interop.from_torch``."""
        from advgrad.interop import from_torch

        return from_torch(module)

    def to_torch(self):
        """``nn.Sequential(nn.Linear, nn.Sigmoid, nn.Linear)`` computing this network's
        logits; see ``advgrad.interop.to_torch``."""
        from advgrad.interop import to_torch

        return to_torch(self)
