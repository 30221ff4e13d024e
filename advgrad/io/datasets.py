"""Dataset files (DESIGN.md section 3): the streaming, validating reader (layout checked on
opening, values and labels checked in every block read), whole-file loading and crash-safe
saving, one column of an output, and the SHA-256 of a file. Reads go through
``advgrad.io.safe``, so every refusal is one ``InputFileError``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from advgrad.errors import InputFileError
from advgrad.io.atomic import atomic_h5
from advgrad.io.attrs import common_attrs, native_byte_order, write_attrs
from advgrad.io.chunks import SAVE_CHUNK_BYTES, check_compression, check_rows_layout, create_rows
from advgrad.io.safe import (
    MAX_READ_BYTES,
    checked_dataset,
    open_input,
    read_attrs,
    read_rows,
    streamed_dataset,
)
from advgrad.model import FLOAT_DTYPES

SOFT_LABEL_TOL = 1e-3
"""Soft-label rows must sum to 1 within this absolute tolerance (sums taken in float64).

Loose enough for rounding in float32 files with thousands of classes, tight enough that the
gradient factor ``P - Y`` (which assumes each row of Y sums to 1) stays within 0.1 %.
"""
COLUMN_BLOCK_ROWS = 2**16
"""Rows of the blocks in which ``column_blocks`` reads per-row columns."""


def label_layout_problem(
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


def label_value_problem(y: np.ndarray, start: int, n_classes: int | None) -> str | None:
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
                problem = label_layout_problem(self._y.shape, self._y.dtype, self.n_rows, n_classes)
                if problem:
                    raise InputFileError(path, "/y", problem)
            attrs = read_attrs(self._file, path=path)
            common = common_attrs(attrs, path)
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
        problem = label_value_problem(y, start, self._n_classes)
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
    check_compression(compression)
    X = native_byte_order(np.asarray(X))
    check_rows_layout("X", X.shape, X.dtype)
    if y is not None:
        y = native_byte_order(np.asarray(y))
        problem = label_layout_problem(y.shape, y.dtype, len(X), None)
        problem = problem or label_value_problem(y, 0, None)
        if problem:
            raise ValueError(f"y {problem}")
    row_bytes = math.prod(X.shape[1:]) * X.dtype.itemsize
    rows = max(1, SAVE_CHUNK_BYTES // row_bytes)
    with atomic_h5(path, inputs=inputs) as f:
        create_rows(f, "X", X.shape, X.dtype, rows, compression)[...] = X
        if y is not None:
            create_rows(f, "y", y.shape, y.dtype, rows, compression)[...] = y
        write_attrs(f, attrs or {})


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


def column_blocks(
    path: str | os.PathLike, names: Sequence[str], block_rows: int = COLUMN_BLOCK_ROWS
) -> Iterator[tuple[np.ndarray, ...]]:
    """Per-row datasets of an advgrad output (``/radius``, ``/pred_clean``, ``/y``...), read
    safely and together, ``block_rows`` rows at a time: memory bounded by the block.

    Yields
    ------
    tuple of arrays
        One block of each dataset, in the order of ``names``.

    Raises
    ------
    InputFileError
        The file or a dataset is missing or refused, or the datasets differ in rows.
    """
    with open_input(path) as f:
        datasets = [checked_dataset(f, f"/{name}", kind="label") for name in names]
        n_rows = datasets[0].shape[0]
        for name, dset in zip(names, datasets, strict=True):
            if dset.shape[0] != n_rows:
                raise InputFileError(
                    path, f"/{name}", f"has {dset.shape[0]} rows; /{names[0]} has {n_rows}"
                )
        for start in range(0, n_rows, block_rows):
            stop = min(start + block_rows, n_rows)
            yield tuple(
                read_rows(dset, start, stop, path=path, allow_nonfinite=True) for dset in datasets
            )
