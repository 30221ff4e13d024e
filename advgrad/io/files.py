"""advgrad's HDF5 files (DESIGN.md section 3): models, datasets and adversarial outputs.

Readers go through :mod:`advgrad.io.safe`, so every refusal is one
:class:`advgrad.errors.InputFileError`. Writers never open an existing file for writing: they
create ``.<name>.partial-<16 hex digits>.h5`` beside the target, fsync it, and rename it onto the
target (``Path.replace``), then fsync the directory. A crash leaves the target as it was, plus at
most one hidden partial file.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import h5py
import numpy as np
from numpy.typing import DTypeLike

from advgrad.errors import InputFileError
from advgrad.io import fastzlib
from advgrad.io.checkpoint import (
    Checkpoint,
    OutputLock,
    block_crc,
    fingerprint,
    partial_path,
    written_paths,
)
from advgrad.io.paths import check_output, fsync_directory, refuse_clobbering, temporary_path
from advgrad.io.safe import (
    MAX_CHUNK_BYTES,
    MAX_READ_BYTES,
    checked_dataset,
    error_reason,
    open_input,
    read_attrs,
    read_rows,
    streamed_dataset,
)
from advgrad.model import FLOAT_DTYPES, MAX_WEIGHTS, Model

MODEL_FORMAT = "two-layer-sigmoid"
MODEL_FORMAT_VERSION = 1
MODEL_ARRAYS = ("W1", "b1", "W2", "b2")
COMMON_ATTRS = ("input_shape", "class_names", "x_min", "x_max")
_MODEL_ATTRS = frozenset({"advgrad_format", "format_version", *COMMON_ATTRS})

SOFT_LABEL_TOL = 1e-3
"""Soft-label rows must sum to 1 within this absolute tolerance (sums taken in float64).

Loose enough for rounding in float32 files with thousands of classes, tight enough that the
gradient factor ``P - Y`` (which assumes each row of Y sums to 1) stays within 0.1 %.
"""
COMPRESSIONS = (None, "gzip", "lzf")
SAVE_CHUNK_BYTES = 2**20
"""Target size of one chunk in files written by :func:`save_dataset`."""
HASH_BLOCK_BYTES = 2**20


# --------------------------------------------------------------------------- attributes


def _common_attrs(attrs: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
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


def _native(array: np.ndarray) -> np.ndarray:
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _beyond_hdf5_int(value: Any) -> bool:
    """Whether ``value`` is a Python int that neither int64 nor uint64 holds."""
    return type(value) is int and not -(2**63) <= value < 2**64


def _storable(name: str, value: Any) -> Any:
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
        return _native(array)
    raise TypeError(
        f"attribute {name!r}: cannot store {type(value).__name__} {value!r:.80}; "
        "use str, numbers, or 1-D arrays of them"
    )


def _write_attrs(obj: h5py.HLObject, values: Mapping[str, Any]) -> None:
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
        stored = _storable(name, value)
        try:
            if isinstance(stored, list):
                obj.attrs.create(name, stored, dtype=h5py.string_dtype())
            else:
                obj.attrs[name] = stored
        except OSError as exc:
            raise ValueError(f"attribute {name!r} cannot be stored: {error_reason(exc)}") from exc


# --------------------------------------------------------------------------- crash-safe writing


class _PartialFile:
    """An HDF5 file ``temp`` beside ``target``, renamed onto it by :meth:`commit`.

    ``temp`` defaults to a new ``.<name>.partial-<16 hex digits>.h5``. The file is created
    exclusively (mode ``"x"``), so it never clobbers anything, unless ``existing``, which opens
    ``temp`` read-write to go on with it. :meth:`discard` deletes it; :meth:`close` keeps it.
    A failure to write (a full disk) raises :class:`InputFileError`; every way out but
    :meth:`close` deletes the file, so a failure never leaves a file behind.
    """

    def __init__(self, target: Path, temp: Path | None = None, *, existing: bool = False) -> None:
        if target.is_dir():
            raise InputFileError(target, None, "is a directory")
        self.target = target
        self.temp = temp or temporary_path(target, ".h5")
        try:
            self.file = h5py.File(self.temp, "r+" if existing else "x", rdcc_nbytes=0)
        except (OSError, RuntimeError) as exc:
            if not existing and not isinstance(exc, FileExistsError):
                with suppress(OSError):  # HDF5 may fail after creating the file
                    self.temp.unlink()
            raise InputFileError(
                target, None, f"cannot create {self.temp.name}: {error_reason(exc)}"
            ) from exc

    def failure(self, exc: BaseException) -> InputFileError:
        """``exc``, raised while writing the file, as an InputFileError naming the target."""
        return InputFileError(
            self.target, None, f"cannot write: {error_reason(exc)} (writing {self.temp.name})"
        )

    @contextmanager
    def writing(self) -> Iterator[h5py.File]:
        """Run the block's writes to the file; when it raises, delete the file (and raise an
        OSError or RuntimeError from HDF5, such as a full disk, as :meth:`failure`)."""
        try:
            yield self.file
        except BaseException as exc:
            self.discard()
            if isinstance(exc, OSError | RuntimeError):
                raise self.failure(exc) from exc
            raise

    def sync(self) -> None:
        """Flush HDF5's buffers and fsync the file: what was written survives a crash."""
        try:
            self.file.flush()
            with self.temp.open("rb") as handle:
                os.fsync(handle.fileno())
        except (OSError, RuntimeError) as exc:
            raise self.failure(exc) from exc

    def commit(self, *, overwrite: bool, inputs: Sequence[str | os.PathLike | None] = ()) -> None:
        """Close, fsync, check the target again (``check_output``), rename onto it, fsync the
        directory. On any failure the file is deleted."""
        try:
            self.file.close()
            with self.temp.open("rb") as handle:
                os.fsync(handle.fileno())
            check_output(self.target, overwrite=overwrite, inputs=inputs)
            self.temp.replace(self.target)
        except BaseException as exc:
            self.discard()
            if isinstance(exc, OSError | RuntimeError):
                raise self.failure(exc) from exc
            raise
        fsync_directory(self.target.parent)

    def close(self) -> None:
        """Close the file and keep it."""
        try:
            self.file.close()
        except (OSError, RuntimeError) as exc:
            raise self.failure(exc) from exc

    def discard(self) -> None:
        """Close and delete the temporary file; the target is untouched."""
        try:
            # The file is deleted: what HDF5 could not write to it no longer matters.
            with suppress(OSError, RuntimeError):
                self.file.close()
        finally:
            self.temp.unlink(missing_ok=True)


@contextmanager
def _atomic_h5(
    target: str | os.PathLike,
    *,
    overwrite: bool = True,
    inputs: Sequence[str | os.PathLike | None] = (),
) -> Iterator[h5py.File]:
    """A new HDF5 file beside ``target``, renamed onto it when the block ends normally,
    deleted when anything fails.

    ``target`` is refused up front (and again before the rename) when it is a directory, one
    of ``inputs`` (by identity), or exists without ``overwrite``.
    """
    target = Path(target)
    check_output(target, overwrite=overwrite, inputs=inputs)
    partial = _PartialFile(target)
    with partial.writing() as f:
        yield f
    partial.commit(overwrite=overwrite, inputs=inputs)


def _check_compression(compression: str | None) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")


def _create_rows(
    f: h5py.File,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    rows_per_chunk: int,
    compression: str | None,
    *,
    final_rows: int | None = None,
) -> h5py.Dataset:
    """A dataset chunked by whole rows, at most ``MAX_CHUNK_BYTES`` a chunk.

    ``final_rows`` is the row count the dataset will grow to (default ``shape[0]``): chunks
    hold no more rows than that.
    """
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    final_rows = shape[0] if final_rows is None else final_rows
    rows = max(1, min(rows_per_chunk, MAX_CHUNK_BYTES // row_bytes, final_rows))
    return f.create_dataset(
        name,
        shape=shape,
        dtype=dtype,
        chunks=(rows, *shape[1:]),
        maxshape=(None, *shape[1:]),
        compression=compression,
        compression_opts=fastzlib.ZLIB_LEVEL if compression == "gzip" else None,
        shuffle=compression is not None,
    )


def _check_rows_layout(name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {dtype}")
    if len(shape) < 2 or math.prod(shape[1:]) < 1:
        raise ValueError(f"{name} must be (N, ...) with at least one feature, got shape {shape}")


# --------------------------------------------------------------------------- models


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
        return Model(**arrays, **_common_attrs(attrs, path), metadata=metadata)
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
    with _atomic_h5(path, inputs=inputs) as f:
        for name in MODEL_ARRAYS:
            f.create_dataset(name, data=getattr(model, name))
        _write_attrs(f, attrs)


# --------------------------------------------------------------------------- datasets


def _label_layout_problem(
    shape: tuple[int, ...], dtype: np.dtype, n_rows: int, n_classes: int | None
) -> str | None:
    """Why labels of this shape and dtype do not fit ``n_rows`` rows, or None."""
    if dtype.kind not in "iu" and dtype not in FLOAT_DTYPES:
        return f"has dtype {dtype}; expected integer or float32/float64 labels"
    if len(shape) == 0 or shape[0] != n_rows:
        return f"has shape {shape}, but /X has {n_rows} rows"
    if dtype.kind in "iu":
        if len(shape) != 1:
            return f"integer labels must have shape (N,), got {shape}"
    elif len(shape) != 2:
        return f"float labels must be soft labels of shape (N, C), got {shape}"
    elif n_classes is not None and shape[1] != n_classes:
        return f"soft labels have {shape[1]} classes, expected {n_classes}"
    return None


def _label_value_problem(y: np.ndarray, start: int, n_classes: int | None) -> str | None:
    """Why label rows ``start:start+len(y)`` are invalid, or None."""
    if y.dtype.kind in "iu":
        upper = 2**63 if n_classes is None else n_classes
        bad = (y < 0) | (y >= upper)
        if bad.any():
            row = int(np.argmax(bad))
            limit = "2**63" if n_classes is None else n_classes
            return (
                f"{int(bad.sum())} labels outside [0, {limit}), "
                f"the first ({y[row]}) in row {start + row}"
            )
        return None
    sums = y.sum(axis=1, dtype=np.float64)
    bad = ~(y >= 0).all(axis=1) | ~(np.abs(sums - 1.0) <= SOFT_LABEL_TOL)
    if bad.any():
        row = int(np.argmax(bad))
        return (
            f"{int(bad.sum())} soft-label rows are not non-negative or do not sum to 1 "
            f"(within {SOFT_LABEL_TOL}), the first is row {start + row} (sum {sums[row]:.6g})"
        )
    return None


@dataclass(frozen=True)
class DatasetAttrs:
    """The root attributes of a dataset file.

    Attributes
    ----------
    x_min, x_max : float or None
        Valid data range.
    input_shape : tuple of int or None
        Shape of one sample; its product equals the number of features of a row of ``/X``.
    class_names : tuple of str or None
    attrs : mapping
        Every readable root attribute, these four included.
    """

    x_min: float | None
    x_max: float | None
    input_shape: tuple[int, ...] | None
    class_names: tuple[str, ...] | None
    attrs: Mapping[str, Any]


class DatasetReader:
    """Streaming, validating reader of a dataset file; open it with :func:`open_dataset`.

    Layout (links, dtypes, shapes, filters, attributes) is checked when it opens; values (NaN,
    inf, label range, soft-label sums) are checked in every block read. Memory use is bounded by
    the block size, never by the number of rows.

    Parameters
    ----------
    path : str or os.PathLike
    n_classes : int or None
    allow_nonfinite : bool
    max_read_bytes : int
        As for :func:`open_dataset`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_classes: int | None,
        allow_nonfinite: bool,
        max_read_bytes: int = MAX_READ_BYTES,
    ) -> None:
        self.path = path
        self._n_classes = n_classes
        self._allow_nonfinite = allow_nonfinite
        self._max_read_bytes = max_read_bytes
        self._file = open_input(path)
        try:
            self._X = streamed_dataset(self._file, "/X", kind="float")
            if self._X.ndim < 2:
                raise InputFileError(
                    path, "/X", f"has shape {self._X.shape}; expected (N, ...) with a feature axis"
                )
            self._y = streamed_dataset(self._file, "/y", kind="label", required=False)
            if self._y is not None:
                problem = _label_layout_problem(
                    self._y.shape, self._y.dtype, self.n_rows, n_classes
                )
                if problem:
                    raise InputFileError(path, "/y", problem)
            attrs = read_attrs(self._file, path=path)
            common = _common_attrs(attrs, path)
            shape = common["input_shape"]
            if shape is not None and math.prod(shape) != math.prod(self.row_shape):
                raise InputFileError(
                    path,
                    None,
                    f"attribute input_shape {shape} does not match /X rows {self.row_shape}",
                )
            self._info = DatasetAttrs(**common, attrs=MappingProxyType(attrs))
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> DatasetReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    @property
    def n_rows(self) -> int:
        """N, the number of rows."""
        return self._X.shape[0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one row of ``/X``."""
        return self._X.shape[1:]

    @property
    def dtype(self) -> np.dtype:
        """dtype of ``/X``, float32 or float64."""
        return self._X.dtype

    @property
    def has_labels(self) -> bool:
        """Whether the file has ``/y``."""
        return self._y is not None

    @property
    def y_template(self) -> tuple[tuple[int, ...], np.dtype] | None:
        """``(shape[1:], dtype)`` of the labels as :meth:`read` returns them, or None."""
        if self._y is None:
            return None
        if self._y.dtype.kind in "iu":
            return (), np.dtype(np.int64)
        return self._y.shape[1:], self._y.dtype

    @property
    def info(self) -> DatasetAttrs:
        """The parsed root attributes."""
        return self._info

    @property
    def attrs(self) -> Mapping[str, Any]:
        """Every readable root attribute."""
        return self._info.attrs

    @property
    def x_min(self) -> float | None:
        """The ``x_min`` attribute, or None."""
        return self._info.x_min

    @property
    def x_max(self) -> float | None:
        """The ``x_max`` attribute, or None."""
        return self._info.x_max

    def read(
        self,
        start: int,
        stop: int,
        *,
        as_dtype: DTypeLike | None = None,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows ``start:stop``, validated.

        Parameters
        ----------
        start, stop : int
            Row range, ``0 <= start <= stop <= n_rows``.
        as_dtype : float32 or float64, optional
            The compute dtype: X is converted to it, and a float64 value beyond float32's range
            is refused instead of becoming inf. None keeps :attr:`dtype`. Labels keep theirs.
        out : numpy.ndarray, optional
            C-contiguous ``(stop - start, *row_shape)`` array of :attr:`dtype` that X is read
            into (a buffer reused from block to block); not with a converting ``as_dtype``.

        Returns
        -------
        X : (stop - start, *row_shape) float32 or float64
        y : (stop - start,) int64, (stop - start, C) float soft labels, or None

        Raises
        ------
        InputFileError
            NaN or inf in X (unless ``allow_nonfinite``) or in y, X overflowing ``as_dtype``,
            labels out of range, soft labels that are negative or do not sum to 1, rows larger
            than ``max_read_bytes``, corrupt data.
        """
        if not 0 <= start <= stop <= self.n_rows:
            raise ValueError(f"rows {start}:{stop} are not within 0:{self.n_rows}")
        X = read_rows(
            self._X,
            start,
            stop,
            path=self.path,
            allow_nonfinite=self._allow_nonfinite,
            as_dtype=as_dtype,
            max_bytes=self._max_read_bytes,
            out=out,
        )
        if self._y is None:
            return X, None
        y = read_rows(self._y, start, stop, path=self.path, max_bytes=self._max_read_bytes)
        problem = _label_value_problem(y, start, self._n_classes)
        if problem:
            raise InputFileError(self.path, "/y", problem)
        return X, y.astype(np.int64, copy=False) if y.dtype.kind in "iu" else y

    def chunks(
        self, rows_per_chunk: int, start: int = 0, *, as_dtype: DTypeLike | None = None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """Validated blocks of rows from ``start`` to the end, each read by :meth:`read`.

        ``as_dtype`` is passed on to :meth:`read`.

        Yields
        ------
        start : int
            Index of the block's first row.
        X : (m, *row_shape) float32 or float64
            ``m <= rows_per_chunk`` rows.
        y : (m,) int64, (m, C) float, or None
        """
        if rows_per_chunk < 1:
            raise ValueError(f"rows_per_chunk must be at least 1, got {rows_per_chunk}")
        if not 0 <= start <= self.n_rows:
            raise ValueError(f"start {start} is not within 0:{self.n_rows}")
        return self._blocks(rows_per_chunk, start, as_dtype)

    def _blocks(
        self, rows_per_chunk: int, start: int, as_dtype: DTypeLike | None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        for first in range(start, self.n_rows, rows_per_chunk):
            stop = min(first + rows_per_chunk, self.n_rows)
            yield first, *self.read(first, stop, as_dtype=as_dtype)


def open_dataset(
    path: str | os.PathLike,
    *,
    n_classes: int | None = None,
    allow_nonfinite: bool = False,
    max_read_bytes: int = MAX_READ_BYTES,
) -> DatasetReader:
    """Open a dataset file for streaming reads; use as a context manager.

    Parameters
    ----------
    path : str or os.PathLike
        HDF5 file with ``/X (N, ...)`` float32/float64 and optional ``/y``: ``(N,)`` integer
        labels or ``(N, C)`` float soft labels.
    n_classes : int, optional
        When given, integer labels must lie in ``[0, n_classes)`` and soft labels have
        ``n_classes`` columns.
    allow_nonfinite : bool
        Accept NaN and inf in ``/X`` (never in ``/y``).
    max_read_bytes : int
        Refuse a read of more bytes than this (``MAX_READ_BYTES``, 4 GiB): read fewer rows at
        once, or raise it.

    Returns
    -------
    DatasetReader

    Raises
    ------
    InputFileError
        The file or its layout is refused.
    """
    return DatasetReader(
        path, n_classes=n_classes, allow_nonfinite=allow_nonfinite, max_read_bytes=max_read_bytes
    )


def load_dataset(
    path: str | os.PathLike,
    *,
    n_classes: int | None = None,
    allow_nonfinite: bool = False,
    as_dtype: DTypeLike | None = None,
    max_read_bytes: int = MAX_READ_BYTES,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a whole dataset file, validated as by :func:`open_dataset` and
    :meth:`DatasetReader.read` (``as_dtype``).

    Returns
    -------
    X : (N, ...) float32 or float64
        Trailing shape as stored.
    y : (N,) int64, (N, C) float32/float64 soft labels, or None when the file has no ``/y``

    Raises
    ------
    InputFileError
        See :func:`open_dataset` and :meth:`DatasetReader.read`.
    """
    with open_dataset(
        path, n_classes=n_classes, allow_nonfinite=allow_nonfinite, max_read_bytes=max_read_bytes
    ) as reader:
        return reader.read(0, reader.n_rows, as_dtype=as_dtype)


def dataset_attrs(path: str | os.PathLike) -> DatasetAttrs:
    """The root attributes of a dataset file (whose layout is checked, its values are not read).

    Returns
    -------
    DatasetAttrs
    """
    with open_dataset(path) as reader:
        return reader.info


def save_dataset(
    path: str | os.PathLike,
    X: np.ndarray,
    y: np.ndarray | None = None,
    *,
    attrs: Mapping[str, Any] | None = None,
    compression: str | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> None:
    """Write a dataset file crash-safely (temporary file, fsync, rename onto ``path``).

    Parameters
    ----------
    path : str or os.PathLike
        Target file, replaced if it exists.
    X : (N, ...) float32 or float64
        Stored as ``/X``, chunked by rows (about ``SAVE_CHUNK_BYTES`` a chunk).
    y : (N,) integer or (N, C) float32/float64 soft labels, optional
        Stored as ``/y`` with its dtype; checked like the reader checks it.
    attrs : mapping, optional
        Root attributes: str, numbers, bools or 1-D arrays of them; None values are skipped.
    compression : {None, "gzip", "lzf"}
        With compression, the shuffle filter is added.
    inputs : sequence of path
        The files the data came from; ``path`` may not be any of them (by identity).

    Raises
    ------
    ValueError
        Bad dtypes or shapes, invalid labels, unknown compression.
    InputFileError
        ``path`` is an input, or the file cannot be written.
    """
    _check_compression(compression)
    X = _native(np.asarray(X))
    _check_rows_layout("X", X.shape, X.dtype)
    if y is not None:
        y = _native(np.asarray(y))
        problem = _label_layout_problem(y.shape, y.dtype, len(X), None)
        problem = problem or _label_value_problem(y, 0, None)
        if problem:
            raise ValueError(f"y {problem}")
    row_bytes = math.prod(X.shape[1:]) * X.dtype.itemsize
    rows = max(1, SAVE_CHUNK_BYTES // row_bytes)
    with _atomic_h5(path, inputs=inputs) as f:
        _create_rows(f, "X", X.shape, X.dtype, rows, compression)[...] = X
        if y is not None:
            _create_rows(f, "y", y.shape, y.dtype, rows, compression)[...] = y
        _write_attrs(f, attrs or {})


# --------------------------------------------------------------------------- adversarial output


def _shuffled_deflate(chunk: np.ndarray) -> bytes:
    """A chunk through HDF5's shuffle filter (byte planes), then gzip."""
    itemsize = chunk.dtype.itemsize
    return fastzlib.compress(chunk.reshape(-1).view(np.uint8).reshape(-1, itemsize).T.tobytes())


def chunk_encoder(dset: h5py.Dataset):
    """How to store whole chunks of ``dset`` with ``write_direct_chunk``, bypassing HDF5's
    chunk machinery (which allocates chunk-sized buffers that it keeps): a function from a
    C-contiguous chunk array to the bytes HDF5's filters would store, or None where advgrad
    leaves the filters to HDF5."""
    if dset.fletcher32 or dset.scaleoffset is not None:
        return None
    if dset.compression is None and not dset.shuffle:
        return lambda chunk: chunk
    if dset.compression == "gzip" and dset.shuffle:
        return _shuffled_deflate
    return None


def _write_chunks(dset: h5py.Dataset, start: int, rows: np.ndarray, encode, pool) -> None:
    """Write ``rows`` at row ``start`` of ``dset`` as whole chunks, each encoded by
    ``encode`` (see ``chunk_encoder``), on ``pool``'s threads when given (every core).

    ``start`` is a multiple of the chunk rows; so is ``len(rows)``, unless the rows end the
    dataset (the last chunk is padded with zeros, HDF5's fill value, as HDF5 pads it).
    """
    chunk_rows = dset.chunks[0]

    def encoded(first: int):
        part = rows[first : first + chunk_rows]
        if len(part) < chunk_rows:
            padded = np.zeros((chunk_rows, *rows.shape[1:]), rows.dtype)
            padded[: len(part)] = part
            part = padded
        return encode(np.ascontiguousarray(part))

    firsts = range(0, len(rows), chunk_rows)
    offset = (0,) * (rows.ndim - 1)
    chunks = map(encoded, firsts) if pool is None else pool.map(encoded, firsts)
    for first, data in zip(firsts, chunks, strict=True):
        dset.id.write_direct_chunk((start + first, *offset), data)


class AdversarialWriter:
    """Crash-safe, resumable writer of an adversarial dataset (DESIGN.md sections 3 and 4).

    Rows go into ``.<name>.partial.h5`` beside ``target`` holding ``/X``, ``/y`` (when
    labelled), ``/pred_clean``, ``/pred_adv`` and the extra ``columns``, chunked by rows and
    grown as rows arrive, with the root attributes and ``complete = False``. While it is open
    the writer holds ``.<name>.lock``, so two jobs never write the same output.

    :meth:`checkpoint` makes the rows so far durable (flush, fsync, then an atomic
    ``.<name>.partial.json`` naming the job, the rows and a CRC-32 of each block).
    :meth:`close` (or leaving a ``with`` block normally) checks every row was written, sets
    ``complete = True``, fsyncs, renames the file onto ``target`` and fsyncs the directory.

    An interrupted writer keeps its partial output when it has a checkpoint (leaving the
    ``with`` block by any exception, or calling :meth:`suspend`); finished work is never
    deleted but by :meth:`discard` or a later writer with ``resume=False``. A later writer
    of the same job (same ``attrs`` except ``created``, same layout) resumes it: it
    re-checks each checkpointed block's CRC, drops anything written after the checkpoint,
    and starts at :attr:`rows_written` with the saved :attr:`resumed_state`. Rows written
    the same way give the same final datasets and attributes as an uninterrupted run.

    Parameters
    ----------
    target : str or os.PathLike
        Output file.
    n_rows : int
        N.
    row_shape : tuple of int
        Shape of one row of ``/X`` (the source's trailing shape).
    dtype : float32 or float64
        dtype of ``/X`` (the source's).
    y_template : (tuple of int, dtype) or None
        ``shape[1:]`` and dtype of ``/y`` (e.g. ``DatasetReader.y_template``); None: no labels.
    attrs : mapping
        Root attributes (attack, norm, eps, ..., sha256 of inputs); None values are skipped.
    rows_per_chunk : int
        Rows in one HDF5 chunk (capped so a chunk stays within ``MAX_CHUNK_BYTES``).
    compression : {None, "gzip", "lzf"}
    overwrite : bool
        Replace an existing ``target``.
    inputs : sequence of path or None
        Input files (None entries skipped): no path the writer writes or deletes
        (``target``, its partial output, checkpoint and lock) may be any of them, by identity
        (``advgrad.io.paths.refuse_clobbering``), even with ``overwrite``; this is checked
        before anything is locked, created or deleted.
    columns : mapping of name to dtype, optional
        Extra per-row datasets (N,), e.g. ``{"eps_min": "float64", "target": "int64"}``.
    resume : bool or None
        None: resume a partial output of this job when there is one, else start afresh.
        True: resume, and refuse when there is nothing to resume. False: delete any partial
        output and start afresh.

    Attributes
    ----------
    rows_written : int
        Rows in the output so far (the resumed rows included).
    resumed_rows : int
        Rows taken over from an interrupted run (0 when starting afresh).
    resumed_state : dict
        The ``state`` of the checkpoint resumed from ({} when starting afresh).
    notice : str or None
        Why a partial output found beside ``target`` was deleted instead of resumed.

    Raises
    ------
    InputFileError
        ``target`` exists (without ``overwrite``), is an input, is a directory, or cannot be
        created; another job holds the lock; a partial output of a different job is in the way
        (unless ``resume=False``); ``resume=True`` with nothing to resume.
    ValueError
        Bad shapes, dtypes or compression.
    """

    def __init__(
        self,
        target: str | os.PathLike,
        *,
        n_rows: int,
        row_shape: Sequence[int],
        dtype: DTypeLike,
        y_template: tuple[Sequence[int], DTypeLike] | None,
        attrs: Mapping[str, Any],
        rows_per_chunk: int,
        compression: str | None = None,
        overwrite: bool = False,
        inputs: Sequence[str | os.PathLike | None] = (),
        columns: Mapping[str, DTypeLike] | None = None,
        resume: bool | None = None,
    ) -> None:
        _check_compression(compression)
        self.target = Path(target)
        self.n_rows = int(n_rows)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype = np.dtype(dtype)
        _check_rows_layout("X", (self.n_rows, *self.row_shape), self.dtype)
        if rows_per_chunk < 1:
            raise ValueError(f"rows_per_chunk must be at least 1, got {rows_per_chunk}")
        layout = {"X": (self.row_shape, self.dtype)}
        if y_template is not None:
            y_tail, y_dtype = tuple(int(s) for s in y_template[0]), np.dtype(y_template[1])
            problem = _label_layout_problem((self.n_rows, *y_tail), y_dtype, self.n_rows, None)
            if problem:
                raise ValueError(f"y_template {problem}")
            layout["y"] = (y_tail, y_dtype)
        layout["pred_clean"] = layout["pred_adv"] = ((), np.dtype(np.int64))
        self._column_names = tuple(columns or {})
        for name, column_dtype in (columns or {}).items():
            layout[name] = ((), np.dtype(column_dtype))
        self._layout = layout
        self._inputs = tuple(inputs)
        refuse_clobbering(self.target, written_paths(self.target), self._inputs)
        check_output(self.target, overwrite=overwrite, inputs=self._inputs)
        self._overwrite = overwrite
        try:
            self._lock = OutputLock(self.target)
        except InputFileError as exc:
            if not self.target.parent.is_dir():
                raise InputFileError(target, None, f"cannot create it: {exc.reason}") from exc
            raise
        try:
            job = {
                "attrs": {
                    name: _storable(name, value)
                    for name, value in attrs.items()
                    if name != "created" and value is not None
                },
                "n_rows": self.n_rows,
                "layout": {name: [list(tail), str(dt)] for name, (tail, dt) in layout.items()},
                "compression": compression,
            }
            self._checkpoint = Checkpoint(fingerprint(job))
            self.resumed_state: dict[str, Any] = {}
            self.notice: str | None = None
            self._partial = self._resumed(resume) or self._created(
                attrs, rows_per_chunk, compression
            )
        except BaseException:
            self._lock.release()
            raise
        self._datasets = {name: self._partial.file[name] for name in layout}
        X = self._datasets["X"]
        self._encode_X = chunk_encoder(X)
        compressed = self._encode_X is not None and X.compression is not None
        self._deflate_pool = ThreadPoolExecutor(os.cpu_count()) if compressed else None
        self.rows_written = self._checkpoint.rows
        self.resumed_rows = self.rows_written
        self._open = True

    def _created(
        self, attrs: Mapping[str, Any], rows_per_chunk: int, compression: str | None
    ) -> _PartialFile:
        partial = _PartialFile(self.target, partial_path(self.target))
        with partial.writing() as f:
            _write_attrs(f, {**attrs, "complete": False})
            for name, (tail, dtype) in self._layout.items():
                _create_rows(
                    *(f, name, (0, *tail), dtype, rows_per_chunk, compression),
                    final_rows=self.n_rows,
                )
        return partial

    def _resumed(self, resume: bool | None) -> _PartialFile | None:
        """The partial output of an interrupted run of this job, opened to go on; else None."""
        temp = partial_path(self.target)
        if not temp.exists():
            Checkpoint.remove(self.target)
            if resume:
                raise InputFileError(self.target, None, "has no interrupted run to resume")
            return None
        previous = Checkpoint.load(self.target)
        if resume is False or previous is None or previous.rows == 0:
            if resume and previous is None:
                self.notice = f"{temp.name} has no checkpoint; starting afresh"
            self._remove_partial()
            return None
        if previous.job != self._checkpoint.job:
            raise InputFileError(
                self.target,
                None,
                f"{temp.name} holds an interrupted run with other settings "
                f"({previous.rows} of its rows done); run the same command again to resume it, "
                "or pass --restart to discard it",
            )
        problem = self._verify(temp, previous)
        if problem:
            self.notice = f"{temp.name} cannot be resumed ({problem}); starting afresh"
            self._remove_partial()
            return None
        partial = _PartialFile(self.target, temp, existing=True)
        for name, (tail, _) in self._layout.items():
            partial.file[name].resize((previous.rows, *tail))
        self._checkpoint = previous
        self.resumed_state = dict(previous.state)
        return partial

    def _verify(self, temp: Path, checkpoint: Checkpoint) -> str | None:
        """Why the partial file does not hold the checkpoint's rows, or None when it does."""
        try:
            with open_input(temp) as f:
                datasets = []
                for name, (tail, dtype) in self._layout.items():
                    kind = "float" if name == "X" else "label"
                    dset = checked_dataset(f, f"/{name}", kind=kind)
                    if dset.dtype != dtype or dset.shape[1:] != tail:
                        return f"/{name} has the wrong layout"
                    if dset.shape[0] < checkpoint.rows:
                        return f"/{name} has {dset.shape[0]} rows, {checkpoint.rows} expected"
                    datasets.append(dset)
                for start, stop, crc in checkpoint.blocks:
                    arrays = [
                        read_rows(dset, start, stop, path=temp, allow_nonfinite=True)
                        for dset in datasets
                    ]
                    if block_crc(arrays) != crc:
                        return f"rows {start}:{stop} do not match their checksum"
        except InputFileError as exc:
            return exc.reason
        return None

    def _remove_partial(self) -> None:
        partial_path(self.target).unlink(missing_ok=True)
        Checkpoint.remove(self.target)

    def __enter__(self) -> AdversarialWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.suspend()

    def write(
        self,
        start: int,
        X_adv: np.ndarray,
        y: np.ndarray | None,
        pred_clean: np.ndarray,
        pred_adv: np.ndarray,
        **columns: np.ndarray,
    ) -> None:
        """Write rows ``start:start+m``; blocks must come in order, without gaps.

        Parameters
        ----------
        start : int
            Must equal :attr:`rows_written`.
        X_adv : (m, *row_shape), the writer's dtype
        y : (m, *y_template[0]) or None (exactly when the writer has no labels)
        pred_clean, pred_adv : (m,) integer
        **columns : (m,) arrays, one for each name in the writer's ``columns``
        """
        if start != self.rows_written:
            raise ValueError(f"rows must be written in order: expected start {self.rows_written}")
        X_adv = np.asarray(X_adv)
        m = len(X_adv)
        if X_adv.shape != (m, *self.row_shape) or X_adv.dtype != self.dtype:
            raise ValueError(
                f"X_adv must be (m, *{self.row_shape}) {self.dtype}, "
                f"got {X_adv.shape} {X_adv.dtype}"
            )
        if start + m > self.n_rows:
            raise ValueError(f"rows {start}:{start + m} go past n_rows {self.n_rows}")
        if (y is None) != ("y" not in self._layout):
            raise ValueError("y must be given exactly when the writer has labels")
        values = {"X": X_adv}
        if y is not None:
            y_tail = self._layout["y"][0]
            if np.shape(y) != (m, *y_tail):
                raise ValueError(f"y must have shape {(m, *y_tail)}, got {np.shape(y)}")
            values["y"] = y
        for name, pred in (("pred_clean", pred_clean), ("pred_adv", pred_adv)):
            pred = np.asarray(pred)
            if pred.shape != (m,) or pred.dtype.kind not in "iu":
                raise ValueError(f"{name} must be (m,) integers, got {pred.shape} {pred.dtype}")
            values[name] = pred
        if set(columns) != set(self._column_names):
            raise ValueError(
                f"columns {sorted(self._column_names)} expected, got {sorted(columns)}"
            )
        for name in self._column_names:
            if np.shape(columns[name]) != (m,):
                raise ValueError(f"{name} must have shape ({m},), got {np.shape(columns[name])}")
            values[name] = columns[name]
        stored = [np.asarray(values[name], dtype=self._layout[name][1]) for name in self._layout]
        try:
            for dset, array in zip(self._datasets.values(), stored, strict=True):
                self._write_rows(dset, start, array)
        except (OSError, RuntimeError) as exc:
            raise self._partial.failure(exc) from exc
        if m:
            self._checkpoint.blocks.append([start, start + m, block_crc(stored)])
        self.rows_written += m

    def _write_rows(self, dset: h5py.Dataset, start: int, rows: np.ndarray) -> None:
        dset.resize(start + len(rows), axis=0)
        whole_chunks = start % dset.chunks[0] == 0 and (
            len(rows) % dset.chunks[0] == 0 or start + len(rows) == self.n_rows
        )
        if dset.name == "/X" and self._encode_X is not None and whole_chunks:
            _write_chunks(dset, start, rows, self._encode_X, self._deflate_pool)
        else:
            dset[start : start + len(rows)] = rows

    def checkpoint(self, state: Mapping[str, Any] | None = None) -> None:
        """Make every row written so far durable, with the job's running totals ``state``.

        ``state`` must be JSON-serialisable; a resumed writer hands it back as
        :attr:`resumed_state`.
        """
        if state is not None:
            self._checkpoint.state = dict(state)
        self._partial.sync()
        self._checkpoint.save(self.target)

    def _stop(self) -> None:
        self._open = False
        if self._deflate_pool is not None:
            self._deflate_pool.shutdown()

    def close(self) -> None:
        """Finish: mark complete, fsync, rename onto the target. No-op once finished.

        Raises
        ------
        RuntimeError
            Not every row was written (the partial file is deleted).
        InputFileError
            The file cannot be written (a full disk: the partial output is kept when it has a
            checkpoint, as by :meth:`suspend`), the target appeared meanwhile (without
            ``overwrite``) or became an input, or the rename failed.
        """
        if not self._open:
            return
        self._stop()
        try:
            if self.rows_written != self.n_rows:
                self._partial.discard()
                Checkpoint.remove(self.target)
                raise RuntimeError(
                    f"only {self.rows_written} of {self.n_rows} rows were written; "
                    f"{self.target} was not created"
                )
            try:
                self._partial.file.attrs["complete"] = True
                self._partial.close()
            except (OSError, RuntimeError) as exc:
                self._set_aside()
                raise self._partial.failure(exc) from exc
            except InputFileError:
                self._set_aside()
                raise
            try:
                self._partial.commit(overwrite=self._overwrite, inputs=self._inputs)
            finally:
                Checkpoint.remove(self.target)
        finally:
            self._lock.release()

    def _set_aside(self) -> None:
        """Keep the partial output when it has a checkpoint, else delete it.

        Raises
        ------
        InputFileError
            The kept file cannot be closed (a full disk); it stays on disk.
        """
        if Checkpoint.load(self.target) is None:
            self._partial.discard()
        else:
            self._partial.close()

    def suspend(self) -> None:
        """Stop, keeping the partial output for a later writer to resume when it has a
        checkpoint (else deleting it). The target is untouched. No-op once finished.

        Raises
        ------
        InputFileError
            The kept partial output cannot be closed (a full disk); it stays on disk, and a
            later writer resumes it from its checkpoint.
        """
        if not self._open:
            return
        self._stop()
        try:
            self._set_aside()
        finally:
            self._lock.release()

    def discard(self) -> None:
        """Abandon the output: delete the partial file and its checkpoint; the target is
        untouched. No-op once finished."""
        if not self._open:
            return
        self._stop()
        try:
            self._partial.discard()
            Checkpoint.remove(self.target)
        finally:
            self._lock.release()


def read_column(path: str | os.PathLike, name: str) -> np.ndarray:
    """A per-row column (N,) of an advgrad output, e.g. ``/eps_min``, read safely.

    Raises
    ------
    InputFileError
        The file or the column is missing, refused, or not one-dimensional.
    """
    with open_input(path) as f:
        dset = checked_dataset(f, f"/{name}", kind="label")
        if dset.ndim != 1:
            raise InputFileError(path, f"/{name}", f"has shape {dset.shape}; expected (N,)")
        return read_rows(dset, 0, dset.shape[0], path=path, allow_nonfinite=True)


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks.

    Returns
    -------
    str
        64 lowercase hex digits.

    Raises
    ------
    InputFileError
        The file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as handle:
            while block := handle.read(HASH_BLOCK_BYTES):
                digest.update(block)
    except FileNotFoundError as exc:
        raise InputFileError(path, None, "no such file") from exc
    except OSError as exc:
        raise InputFileError(path, None, f"cannot read: {exc.strerror or exc}") from exc
    return digest.hexdigest()
