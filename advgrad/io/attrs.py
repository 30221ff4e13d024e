"""Root attributes of advgrad's HDF5 files: the common ones parsed and checked on reading
(``x_min``, ``x_max``, ``input_shape``, ``class_names``), and any value turned into what HDF5
stores on writing (str, numbers, bools, 1-D arrays of them; an integer beyond 64 bits as its
decimal string).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

from advgrad.errors import InputFileError
from advgrad.io.safe import error_reason

COMMON_ATTRS = ("input_shape", "class_names", "x_min", "x_max")


def common_attrs(attrs: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """x_min, x_max, input_shape and class_names from root attributes, None when absent."""
    common: dict[str, Any] = dict.fromkeys(COMMON_ATTRS)
    for name in ("x_min", "x_max"):
        if name in attrs:
            value = attrs[name]
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise InputFileError(path, None, f"attribute {name} must be a number")
            if not math.isfinite(value):
                raise InputFileError(path, None, f"attribute {name} must be finite, got {value}")
            common[name] = float(value)
    x_min, x_max = common["x_min"], common["x_max"]
    if x_min is not None and x_max is not None and not x_min < x_max:
        raise InputFileError(path, None, f"attribute x_min ({x_min}) must be below x_max ({x_max})")
    if "input_shape" in attrs:
        shape = np.atleast_1d(attrs["input_shape"])
        if shape.ndim != 1 or shape.dtype.kind not in "iu" or not (shape >= 1).all():
            raise InputFileError(
                path, None, "attribute input_shape must be a list of positive integers"
            )
        common["input_shape"] = tuple(int(s) for s in shape)
    if "class_names" in attrs:
        if not isinstance(attrs["class_names"], tuple):
            raise InputFileError(path, None, "attribute class_names must be an array of strings")
        common["class_names"] = attrs["class_names"]
    return common


def native_byte_order(array: np.ndarray) -> np.ndarray:
    """``array`` in native byte order (a view when it already is)."""
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _beyond_hdf5_int(value: Any) -> bool:
    """Whether ``value`` is a Python int that neither int64 nor uint64 holds."""
    return type(value) is int and not -(2**63) <= value < 2**64


def storable(name: str, value: Any) -> Any:
    """``value`` as it is stored as an attribute: str, numbers, bools, or 1-D arrays of them.

    An integer that neither int64 nor uint64 holds (a seed of 2**64, a number from a
    safetensors header) is stored as its decimal string; a list holding one, as a list of
    decimal strings.
    """
    if _beyond_hdf5_int(value):
        return str(value)
    if isinstance(value, str | bool | int | float | np.bool_ | np.integer | np.floating):
        return value
    array = np.asarray(value)
    items = array.tolist()
    if array.dtype.kind == "O" and array.ndim == 1 and all(type(item) is int for item in items):
        return [str(item) for item in items]
    if array.dtype.kind == "U" and array.ndim == 1:
        return array.tolist()
    if array.dtype.kind in "biuf":
        return native_byte_order(array)
    raise TypeError(
        f"attribute {name!r}: cannot store {type(value).__name__} {value!r:.80}; "
        "use str, numbers, or 1-D arrays of them"
    )


def write_attrs(obj: h5py.HLObject, values: Mapping[str, Any]) -> None:
    """Store str, numbers, bools and arrays of them as attributes; None values are skipped.

    Raises
    ------
    TypeError
        A value of another type.
    ValueError
        HDF5 cannot store a value (an attribute larger than 64 KiB).
    """
    for name, value in values.items():
        if value is None:
            continue
        stored = storable(name, value)
        try:
            if isinstance(stored, list):
                obj.attrs.create(name, stored, dtype=h5py.string_dtype())
            else:
                obj.attrs[name] = stored
        except OSError as exc:
            raise ValueError(f"attribute {name!r} cannot be stored: {error_reason(exc)}") from exc
