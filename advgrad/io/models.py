"""Model files (DESIGN.md section 3): reading a two-layer sigmoid network from its HDF5 file,
refusing anything unsafe or malformed (through ``advgrad.io.safe``, so every refusal is one
``InputFileError``), and writing one crash-safely.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from numpy.typing import DTypeLike

from advgrad.errors import InputFileError
from advgrad.io.atomic import atomic_h5
from advgrad.io.attrs import COMMON_ATTRS, common_attrs, write_attrs
from advgrad.io.safe import MAX_READ_BYTES, checked_dataset, open_input, read_attrs, read_rows
from advgrad.model import MAX_WEIGHTS, Model

MODEL_FORMAT = "two-layer-sigmoid"
MODEL_FORMAT_VERSION = 1
MODEL_ARRAYS = ("W1", "b1", "W2", "b2")
_MODEL_ATTRS = frozenset({"advgrad_format", "format_version", *COMMON_ATTRS})


def load_model(
    path: str | os.PathLike,
    *,
    as_dtype: DTypeLike | None = None,
    max_read_bytes: int = MAX_READ_BYTES,
    max_weights: int = MAX_WEIGHTS,
) -> Model:
    """Read a model file (DESIGN.md section 3), refusing anything unsafe or malformed.

    Parameters
    ----------
    path : str or os.PathLike
        HDF5 file with ``/W1 (d, H)``, ``/b1 (H,)``, ``/W2 (H, C)``, ``/b2 (C,)``, all float32 or
        all float64, and root attributes ``advgrad_format = "two-layer-sigmoid"``,
        ``format_version = 1``.
    as_dtype : float32 or float64, optional
        The compute dtype: weights are converted to it, and a float64 weight beyond float32's
        range is refused instead of becoming inf. None keeps the stored dtype.
    max_read_bytes : int
        Refuse a weight array larger than this many bytes (``MAX_READ_BYTES``, 4 GiB).
    max_weights : int
        Refuse an array of more elements than this (``d * H`` for W1, ``H * C`` for W2;
        ``advgrad.model.MAX_WEIGHTS``), from its stored shape, before reading or allocating
        anything.

    Returns
    -------
    Model
        Optional attributes ``input_shape``, ``class_names``, ``x_min``, ``x_max`` fill the
        fields of the same name; every other readable root attribute goes into ``metadata``.

    Raises
    ------
    InputFileError
        Wrong or missing format attributes, unsafe or missing datasets, mixed dtypes, shapes
        that disagree, non-finite weights (never accepted: see :class:`Model`), weights that
        overflow ``as_dtype`` or exceed ``max_read_bytes`` or ``max_weights``, a corrupt file.
    """
    with open_input(path) as f:
        attrs = read_attrs(f, path=path)
        fmt = attrs.get("advgrad_format")
        if not isinstance(fmt, str):
            raise InputFileError(
                path, None, "no string attribute advgrad_format; not an advgrad model file"
            )
        if fmt != MODEL_FORMAT:
            raise InputFileError(
                path, None, f"attribute advgrad_format is {fmt!r}, expected {MODEL_FORMAT!r}"
            )
        version = attrs.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int | float):
            raise InputFileError(path, None, "no numeric attribute format_version")
        if version != MODEL_FORMAT_VERSION:
            raise InputFileError(
                path,
                None,
                f"attribute format_version is {version}; "
                f"this advgrad reads version {MODEL_FORMAT_VERSION}",
            )
        datasets = {name: checked_dataset(f, f"/{name}", kind="float") for name in MODEL_ARRAYS}
        if len({dset.dtype for dset in datasets.values()}) > 1:
            found = ", ".join(f"{name} {dset.dtype}" for name, dset in datasets.items())
            raise InputFileError(path, None, f"weights must share one dtype, got {found}")
        for name, dset in datasets.items():
            refuse_large_weights(path, f"/{name}", dset.shape, max_weights)
        arrays = {
            name: read_rows(
                dset, 0, dset.shape[0], path=path, as_dtype=as_dtype, max_bytes=max_read_bytes
            )
            for name, dset in datasets.items()
        }
    metadata = {key: value for key, value in attrs.items() if key not in _MODEL_ATTRS}
    try:
        return Model(**arrays, **common_attrs(attrs, path), metadata=metadata)
    except ValueError as exc:
        subject = str(exc).split(" ", 1)[0]
        raise InputFileError(
            path, f"/{subject}" if subject in MODEL_ARRAYS else None, str(exc)
        ) from exc


def refuse_large_weights(
    path: str | os.PathLike, name: str, shape: Sequence[int], max_weights: int
) -> None:
    """Refuse a model array of more than ``max_weights`` elements, from its stored shape.

    Raises
    ------
    InputFileError
        Naming the file, the array ``name``, its shape and the limit.
    """
    n_weights = math.prod(shape)
    if n_weights > max_weights:
        raise InputFileError(
            path,
            name,
            f"has shape {tuple(shape)}, {n_weights} weights, over the limit of {max_weights} "
            "(--max-weights raises it)",
        )


def save_model(
    model: Model, path: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = ()
) -> None:
    """Write a model file crash-safely (temporary file, fsync, rename onto ``path``).

    Parameters
    ----------
    model : Model
        Its arrays become ``/W1 /b1 /W2 /b2`` in the model's dtype; ``input_shape``,
        ``class_names``, ``x_min``, ``x_max`` and each ``metadata`` entry become root attributes
        (skipped when None).
    path : str or os.PathLike
        Target file, replaced if it exists.
    inputs : sequence of path
        The files the model was made from; ``path`` may not be any of them (by identity:
        ``advgrad.io.paths.same_file``).

    Raises
    ------
    ValueError
        A metadata key clashes with a format attribute, or HDF5 cannot store a metadata value
        (larger than 64 KiB).
    TypeError
        A metadata value is not a str, number, bool or 1-D array of them.
    InputFileError
        ``path`` is an input, or the file cannot be written.
    """
    clash = _MODEL_ATTRS.intersection(model.metadata)
    if clash:
        raise ValueError(f"metadata keys {sorted(clash)} clash with model file attributes")
    attrs = {
        "advgrad_format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        **{name: getattr(model, name) for name in COMMON_ATTRS},
        **model.metadata,
    }
    with atomic_h5(path, inputs=inputs) as f:
        for name in MODEL_ARRAYS:
            f.create_dataset(name, data=getattr(model, name))
        write_attrs(f, attrs)
