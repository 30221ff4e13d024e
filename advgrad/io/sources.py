"""Dataset sources: rows of ``.npy`` (memory-mapped), ``.npz`` (members streamed out of the
zip), IDX files (the raw MNIST / Fashion-MNIST format, optionally gzipped) and CSV (optionally
gzipped), read in blocks of rows so that memory stays bounded whatever the file size, every
header and shape checked against advgrad's limits first. Nothing here unpickles: object arrays
are refused.
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from advgrad.errors import InputFileError
from advgrad.io.safe import MAX_CHUNK_BYTES, MAX_ELEMENTS, MAX_NDIM, error_reason

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
"""IDX type codes (third byte of the magic number) and their big-endian dtypes."""
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": ","}
MAX_CSV_LINE_CHARS = 16 * 2**20
"""Longest CSV line read, in characters; a longer line is refused with its line number, read
no further than this (a line of 200 MB inflates from 200 KB of gzip)."""


@dataclass(frozen=True)
class Source:
    """Rows of one input file: ``n_rows`` (None until read, for CSV), one row's shape and
    dtype, and ``blocks(rows)``, a generator of arrays of at most ``rows`` rows (CSV: pairs
    of X and label blocks)."""

    path: Path
    n_rows: int | None
    row_shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Callable[[int], Iterator]


def data_format(path: str | os.PathLike) -> str:
    """ "npy", "npz", "idx" or "csv", from the file name (``.gz`` allowed for idx and csv).

    IDX files are recognised by ``idx`` in the name or an ``ubyte`` ending, as in MNIST's
    ``train-images-idx3-ubyte.gz``; CSV by ``.csv``, ``.tsv`` or ``.txt``.
    """
    name = Path(path).name.lower()
    base = name.removesuffix(".gz")
    suffix = Path(base).suffix
    if suffix in (".npy", ".npz") and base == name:
        return suffix[1:]
    if suffix in CSV_SUFFIXES:
        return "csv"
    if "idx" in base or base.endswith("ubyte"):
        return "idx"
    raise ValueError(
        f"{path}: cannot tell the data format from the name; expected .npy, .npz, .csv, "
        ".tsv, .txt or an IDX file (e.g. train-images-idx3-ubyte), the last three optionally .gz"
    )


def npy_header(member: IO[bytes], path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) from the header of a ``.npy`` stream, nothing else read."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise InputFileError(path, key, f"unsupported .npy version {version}")


@contextmanager
def _reading(path) -> Iterator[None]:
    """Errors of reading a (possibly gzipped) source become InputFileError."""
    try:
        yield
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise InputFileError(path, None, f"cannot read: {error_reason(exc)}") from exc


def _checked_row_shape(path, name, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if len(shape) > MAX_NDIM or math.prod(shape) > MAX_ELEMENTS:
        raise InputFileError(path, name, f"shape {shape} is beyond advgrad's limits")
    if math.prod(shape[1:]) == 0:
        raise InputFileError(path, name, f"has shape {shape}: its rows hold no values")
    if math.prod(shape[1:]) * max(dtype.itemsize, 8) > MAX_CHUNK_BYTES:
        raise InputFileError(
            path, name, f"one row of shape {shape[1:]} is larger than {MAX_CHUNK_BYTES} bytes"
        )


def _npy_source(path: Path) -> Source:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputFileError(path, None, f"cannot read as .npy: {error_reason(exc)}") from exc
    if array.ndim < 1:
        raise InputFileError(path, None, "holds a scalar; expected (N, ...) rows")
    _checked_row_shape(path, None, array.shape, array.dtype)

    def blocks(rows: int) -> Iterator[np.ndarray]:
        for start in range(0, len(array), rows):
            yield np.array(array[start : start + rows])

    return Source(path, len(array), array.shape[1:], array.dtype, blocks)


def _read_exactly(handle, n_bytes: int, path, name, what: str) -> bytes:
    data = handle.read(n_bytes)
    if len(data) != n_bytes:
        raise InputFileError(path, name, f"truncated: ends inside {what}")
    return data


def _stream_blocks(open_stream, skip: int, n_rows, row_shape, dtype, path, name):
    """``blocks(rows)`` for rows stored one after another from byte ``skip`` of a stream."""
    row_bytes = math.prod(row_shape) * dtype.itemsize

    def blocks(rows: int) -> Iterator[np.ndarray]:
        with _reading(path), open_stream() as handle:
            handle.read(skip)
            for start in range(0, n_rows, rows):
                stop = min(start + rows, n_rows)
                data = _read_exactly(
                    handle, (stop - start) * row_bytes, path, name, f"rows {start}:{stop}"
                )
                yield np.frombuffer(data, dtype=dtype).reshape(stop - start, *row_shape)
            if handle.read(1):
                raise InputFileError(path, name, f"has data after the {n_rows} rows it declares")

    return blocks


def _npz_source(path: Path, key: str) -> Source:
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
            if f"{key}.npy" not in members:
                found = ", ".join(m.removesuffix(".npy") for m in members) or "nothing"
                raise InputFileError(path, key, f"no such array; the archive holds {found}")
            with archive.open(f"{key}.npy") as member:
                shape, fortran, dtype = npy_header(member, path, key)
                skip = member.tell()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InputFileError(path, key, f"cannot read as .npz: {error_reason(exc)}") from exc
    if dtype.hasobject or dtype.kind not in "biuf":
        raise InputFileError(path, key, f"has dtype {dtype}; expected numbers (never objects)")
    if not shape:
        raise InputFileError(path, key, "holds a scalar; expected (N, ...) rows")
    if fortran and len(shape) > 1:
        raise InputFileError(
            path,
            key,
            "is stored in Fortran order, which cannot be streamed by rows; save it in C order",
        )
    _checked_row_shape(path, key, shape, dtype)

    @contextmanager
    def open_stream():
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
            yield member

    blocks = _stream_blocks(open_stream, skip, shape[0], shape[1:], dtype, path, key)
    return Source(path, shape[0], tuple(shape[1:]), dtype, blocks)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")


def _idx_source(path: Path) -> Source:
    with _reading(path), _open_binary(path) as handle:
        magic = handle.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in IDX_DTYPES or magic[3] < 1:
            raise InputFileError(
                path,
                None,
                f"not an IDX file: magic number 0x{magic.hex() or 'empty'}; expected 0x0000, "
                f"a type code ({', '.join(f'0x{code:02x}' for code in IDX_DTYPES)}) and the "
                "number of dimensions",
            )
        ndim = magic[3]
        if ndim > MAX_NDIM:
            raise InputFileError(path, None, f"IDX header declares {ndim} dimensions")
        shape = struct.unpack(f">{ndim}I", _read_exactly(handle, 4 * ndim, path, None, "header"))
    dtype = np.dtype(IDX_DTYPES[magic[2]])
    _checked_row_shape(path, None, shape, dtype)
    skip = 4 + 4 * ndim
    if not path.name.lower().endswith(".gz"):
        expected = skip + math.prod(shape) * dtype.itemsize
        actual = path.stat().st_size
        if actual != expected:
            raise InputFileError(
                path,
                None,
                f"holds {actual} bytes, but its IDX header (shape {shape}, {dtype.name}) "
                f"declares {expected}",
            )
    blocks = _stream_blocks(
        lambda: _open_binary(path), skip, shape[0], shape[1:], dtype, path, None
    )
    return Source(path, shape[0], tuple(shape[1:]), dtype, blocks)


def _parse_csv_block(lines: list[tuple[int, str]], delimiter: str, n_columns: int, path):
    """Lines (number, text) as a (rows, n_columns) float64 array; errors name the line."""
    try:
        return np.loadtxt(
            [text for _, text in lines], delimiter=delimiter, dtype=np.float64, ndmin=2
        ).reshape(len(lines), n_columns)
    except ValueError:
        pass
    for number, text in lines:  # find the offending line for the message
        fields = text.rstrip("\r\n").split(delimiter)
        if len(fields) != n_columns:
            raise InputFileError(
                path, None, f"line {number} has {len(fields)} values; expected {n_columns}"
            )
        for column, field in enumerate(fields):
            try:
                float(field)
            except ValueError:
                raise InputFileError(
                    path,
                    None,
                    f"line {number}, column {column + 1}: {field.strip()!r} is not a number",
                ) from None
    raise InputFileError(path, None, "cannot parse the values")  # pragma: no cover


def _csv_line(handle: IO[str], number: int, path) -> str:
    """Line ``number`` of a text stream ("" at the end), at most ``MAX_CSV_LINE_CHARS`` long."""
    line = handle.readline(MAX_CSV_LINE_CHARS + 1)
    if len(line) > MAX_CSV_LINE_CHARS:
        raise InputFileError(
            path,
            None,
            f"line {number} is longer than {MAX_CSV_LINE_CHARS} characters (MAX_CSV_LINE_CHARS)",
        )
    return line


def csv_source(path: Path, label_column: int | str | None) -> Source:
    """CSV rows; the first line is a header when any of its fields is not a number."""
    delimiter = CSV_SUFFIXES[Path(path.name.lower().removesuffix(".gz")).suffix]

    def open_text():
        if path.name.lower().endswith(".gz"):
            return gzip.open(path, "rt", newline="")
        return path.open(newline="")

    with _reading(path), open_text() as handle:
        first = _csv_line(handle, 1, path)
    fields = [field.strip() for field in first.rstrip("\r\n").split(delimiter)]
    try:
        [float(field) for field in fields]
        names, skip = None, 0
    except ValueError:
        names, skip = fields, 1
    if not first.strip():
        raise InputFileError(path, None, "is empty, or its first line is blank")
    n_columns = len(fields)
    label = None
    if label_column is not None:
        if isinstance(label_column, str) and not label_column.lstrip("-").isdigit():
            if names is None or label_column not in names:
                raise InputFileError(path, None, f"no header column named {label_column!r}")
            label = names.index(label_column)
        else:
            label = int(label_column)
            if not -n_columns <= label < n_columns:
                raise InputFileError(path, None, f"label column {label} of {n_columns} columns")
            label %= n_columns
    if n_columns - (label is not None) < 1:
        raise InputFileError(path, None, "has no feature columns")

    def blocks(rows: int):
        with _reading(path), open_text() as handle:
            lines = (_csv_line(handle, number, path) for number in itertools.count(1))
            numbered = (
                (number, text)
                for number, text in enumerate(
                    itertools.islice(itertools.takewhile(bool, lines), skip, None), skip + 1
                )
                if text.strip()
            )
            while lines := list(itertools.islice(numbered, rows)):
                values = _parse_csv_block(lines, delimiter, n_columns, path)
                if label is None:
                    yield values, None
                else:
                    yield np.delete(values, label, axis=1), values[:, label]

    return Source(path, None, (n_columns - (label is not None),), np.dtype(np.float64), blocks)


def array_source(path: Path, key: str) -> Source:
    kind = data_format(path)
    if kind == "npy":
        return _npy_source(path)
    if kind == "npz":
        return _npz_source(path, key)
    if kind == "idx":
        return _idx_source(path)
    raise ValueError(f"{path}: a CSV file is read with its labels, not as a label file")
