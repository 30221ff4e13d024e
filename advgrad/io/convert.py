"""Converters into (and for models, out of) advgrad's HDF5 formats.

Models: ``.npz`` (arrays ``W1 b1 W2 b2``, optional ``input_shape class_names x_min x_max``,
read with ``allow_pickle=False``) and ``.safetensors`` (read and written here with numpy and
json: an 8-byte little-endian header length, a JSON header, raw little-endian buffers), to and
from the model file format; the direction follows the file extensions.

Datasets: ``.npy`` (memory-mapped), ``.npz`` (members streamed out of the zip), IDX files (the
raw MNIST / Fashion-MNIST format, optionally gzipped) and CSV (optionally gzipped) are read in
blocks of rows and written block by block into a dataset file, so memory stays bounded whatever
the file size. Values are validated as the loader validates them (finite X, non-negative
integer labels, soft labels summing to 1), and the output appears only once complete
(``advgrad.io.files``' crash-safe writer).

Nothing here unpickles: object arrays are refused.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import DTypeLike

from advgrad.errors import InputFileError
from advgrad.io.files import (
    MODEL_ARRAYS,
    SAVE_CHUNK_BYTES,
    _atomic_h5,
    _check_compression,
    _common_attrs,
    _create_rows,
    _label_value_problem,
    _write_attrs,
    load_model,
    refuse_large_weights,
    save_model,
)
from advgrad.io.paths import atomic_output, check_output
from advgrad.io.safe import (
    MAX_CHUNK_BYTES,
    MAX_ELEMENTS,
    MAX_NDIM,
    MAX_READ_BYTES,
    _refuse_rows,
    error_reason,
    regular_input,
)
from advgrad.model import FLOAT_DTYPES, MAX_WEIGHTS, Model

MODEL_FORMATS = {".h5": "hdf5", ".hdf5": "hdf5", ".npz": "npz", ".safetensors": "safetensors"}
"""Model file formats by extension."""
NPZ_OPTIONAL = ("input_shape", "class_names", "x_min", "x_max")
"""Arrays a model .npz may hold besides W1 b1 W2 b2."""
SAFETENSORS_MAX_HEADER = 100 * 2**20
"""Largest safetensors JSON header read, in bytes (the format's own limit)."""
SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
TORCH_KEYS = ("0.weight", "0.bias", "2.weight", "2.bias")
"""Tensor names of an ``nn.Sequential(Linear, Sigmoid, Linear)`` state_dict (advgrad.interop)."""

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
"""IDX type codes (third byte of the magic number) and their big-endian dtypes."""
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": ","}
CONVERT_BLOCK_BYTES = 16 * 2**20
"""Default bytes of float64 values read per block by ``convert_dataset``."""
MAX_CSV_LINE_CHARS = 16 * 2**20
"""Longest CSV line read, in characters; a longer line is refused with its line number, read
no further than this (a line of 200 MB inflates from 200 KB of gzip)."""


# --------------------------------------------------------------------------- crash-safe files


@contextmanager
def _atomic_file(
    target: Path, *, overwrite: bool, inputs: tuple[str | os.PathLike | None, ...] = ()
) -> Iterator[IO[bytes]]:
    """A new file beside ``target`` (``advgrad.io.paths.atomic_output``), open for writing,
    renamed onto ``target`` when the block ends normally, deleted when anything fails."""
    with (
        atomic_output(target, overwrite=overwrite, inputs=inputs) as temp,
        temp.open("xb") as handle,
    ):
        yield handle


# --------------------------------------------------------------------------- safetensors


def read_safetensors(
    path: str | os.PathLike,
    *,
    max_read_bytes: int = MAX_READ_BYTES,
    max_weights: int = MAX_WEIGHTS,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a ``.safetensors`` file of float32/float64 tensors.

    Parameters
    ----------
    path : str or os.PathLike
    max_read_bytes : int
        Refuse a file whose tensors take more bytes than this.
    max_weights : int
        Refuse a tensor of more elements than this (``advgrad.model.MAX_WEIGHTS``), from the
        header, before reading any tensor.

    Returns
    -------
    tensors : dict of name to array
        Native byte order, float32 or float64, the stored shapes.
    metadata : dict of str to str
        The header's ``__metadata__`` (empty when absent).

    Raises
    ------
    InputFileError
        Not a safetensors file, a malformed header (bad JSON, duplicate names, offsets outside
        the buffer, overlapping or leaving holes, sizes that disagree with the shapes), another
        tensor dtype, a tensor over ``max_weights``, a truncated file, not a regular file.
    """
    file_path = regular_input(path, "a safetensors file")
    try:
        size = file_path.stat().st_size
        with file_path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise InputFileError(path, None, "not a safetensors file: shorter than 8 bytes")
            (header_size,) = struct.unpack("<Q", head)
            if header_size > min(SAFETENSORS_MAX_HEADER, size - 8):
                raise InputFileError(
                    path,
                    None,
                    f"not a safetensors file: header length {header_size} exceeds the file "
                    f"({size} bytes) or the {SAFETENSORS_MAX_HEADER}-byte limit",
                )
            header = _safetensors_header(handle.read(header_size), path)
            metadata = header.pop("__metadata__", {})
            layout = _safetensors_layout(header, size - 8 - header_size, path)
            for name, (_, shape, _) in layout.items():
                refuse_large_weights(path, name, shape, max_weights)
            if sum(end - begin for _, _, (begin, end) in layout.values()) > max_read_bytes:
                raise InputFileError(path, None, f"tensors take more than {max_read_bytes} bytes")
            tensors = {}
            for name, (dtype, shape, (begin, end)) in layout.items():
                handle.seek(8 + header_size + begin)
                buffer = handle.read(end - begin)
                tensors[name] = (
                    np.frombuffer(buffer, dtype=dtype)
                    .reshape(shape)
                    .astype(dtype.newbyteorder("="))
                )
    except FileNotFoundError as exc:
        raise InputFileError(path, None, "no such file") from exc
    except OSError as exc:
        raise InputFileError(path, None, f"cannot read: {error_reason(exc)}") from exc
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputFileError(path, None, "__metadata__ must map strings to strings")
    return tensors, metadata


def _safetensors_header(raw: bytes, path) -> dict:
    def unique(pairs):
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise InputFileError(path, None, "safetensors header names a tensor twice")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(
            path, None, f"not a safetensors file: bad JSON header ({exc})"
        ) from exc
    except RecursionError as exc:
        raise InputFileError(
            path, None, "not a safetensors file: the JSON header nests too deeply"
        ) from exc
    if not isinstance(header, dict):
        raise InputFileError(path, None, "not a safetensors file: the header is not an object")
    return header


def _safetensors_layout(header: dict, buffer_size: int, path) -> dict:
    """name -> (dtype, shape, (begin, end)), checked to tile the data buffer exactly."""
    layout = {}
    for name, entry in header.items():
        where = f"tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise InputFileError(path, None, f"{where}: needs exactly dtype, shape, data_offsets")
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise InputFileError(
                path, None, f"{where} has dtype {entry['dtype']!r}; advgrad reads F32 and F64"
            )
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_NDIM
            and all(type(s) is int and s >= 0 for s in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
        ):
            raise InputFileError(path, None, f"{where}: malformed shape or data_offsets")
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = offsets
        if not 0 <= begin <= end <= buffer_size:
            raise InputFileError(
                path, None, f"{where}: data_offsets {offsets} outside the {buffer_size}-byte buffer"
            )
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise InputFileError(
                path, None, f"{where}: {end - begin} bytes for shape {shape} of {entry['dtype']}"
            )
        layout[name] = (dtype, tuple(shape), (begin, end))
    position = 0
    for _, _, (begin, end) in sorted(layout.values(), key=lambda item: item[2]):
        if begin != position:
            raise InputFileError(path, None, "tensor data overlap or leave a hole in the buffer")
        position = end
    if position != buffer_size:
        raise InputFileError(path, None, f"{buffer_size - position} bytes after the last tensor")
    return layout


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = True,
    inputs: tuple[str | os.PathLike | None, ...] = (),
) -> None:
    """Write float32/float64 tensors as a ``.safetensors`` file, crash-safely.

    Parameters
    ----------
    path : str or os.PathLike
    tensors : mapping of name to float32 or float64 array, stored in this order
    metadata : mapping of str to str, optional, the header's ``__metadata__``
    overwrite : bool
        Replace an existing file.
    inputs : tuple of path or None
        Input files; ``path`` may not be any of them (by identity).
    """
    names = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64"}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    buffers = []
    offset = 0
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        dtype = array.dtype.newbyteorder("<")
        if dtype not in names:
            raise ValueError(f"tensor {name!r} must be float32 or float64, got {array.dtype}")
        buffers.append(array.astype(dtype, copy=False).tobytes())
        header[name] = {
            "dtype": names[dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(buffers[-1])],
        }
        offset += len(buffers[-1])
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # pad so that the buffer starts 8-byte aligned
    with _atomic_file(Path(path), overwrite=overwrite, inputs=inputs) as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for buffer in buffers:
            handle.write(buffer)


# --------------------------------------------------------------------------- models


def model_format(path: str | os.PathLike) -> str:
    """ "hdf5", "npz" or "safetensors", from the file extension; ValueError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in MODEL_FORMATS:
        raise ValueError(
            f"{path}: cannot tell the model format from the extension {suffix or '(none)'!r}; "
            f"expected one of {', '.join(MODEL_FORMATS)}"
        )
    return MODEL_FORMATS[suffix]


def _model_from(arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any], metadata, path):
    """A Model from W1..b2 and raw common attributes, every refusal as InputFileError."""
    common = _common_attrs(attrs, path)
    dtypes = {np.asarray(arrays[name]).dtype for name in MODEL_ARRAYS}
    if len(dtypes) > 1 or not dtypes <= set(FLOAT_DTYPES):
        found = ", ".join(f"{name} {np.asarray(arrays[name]).dtype}" for name in MODEL_ARRAYS)
        raise InputFileError(
            path, None, f"weights must share one dtype, float32 or float64: {found}"
        )
    try:
        return Model(**{name: arrays[name] for name in MODEL_ARRAYS}, **common, metadata=metadata)
    except ValueError as exc:
        raise InputFileError(path, None, str(exc)) from exc


def _npy_header(member: IO[bytes], path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) from the header of a ``.npy`` stream, nothing else read."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise InputFileError(path, key, f"unsupported .npy version {version}")


def _read_npz_model(path: Path, max_read_bytes: int, max_weights: int) -> Model:
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
            for name in MODEL_ARRAYS:
                if f"{name}.npy" in archive.namelist():
                    with archive.open(f"{name}.npy") as member:
                        shape = _npy_header(member, path, name)[0]
                    refuse_large_weights(path, name, shape, max_weights)
        if declared > max_read_bytes:
            raise InputFileError(path, None, f"arrays take {declared} bytes, over {max_read_bytes}")
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = [name for name in MODEL_ARRAYS if name not in keys]
            unknown = sorted(keys - set(MODEL_ARRAYS) - set(NPZ_OPTIONAL))
            if missing or unknown:
                raise InputFileError(
                    path,
                    None,
                    f"a model .npz holds W1 b1 W2 b2 (and optionally {' '.join(NPZ_OPTIONAL)}); "
                    f"missing: {' '.join(missing) or 'none'}, "
                    f"unknown: {' '.join(unknown) or 'none'}",
                )
            arrays = {name: npz[name] for name in keys}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise InputFileError(path, None, f"cannot read as .npz: {error_reason(exc)}") from exc
    attrs: dict[str, Any] = {}
    for name in ("x_min", "x_max"):
        if name in arrays:
            value = arrays[name]
            if value.shape != () or value.dtype.kind not in "iuf":
                raise InputFileError(path, None, f"{name} must be a number")
            attrs[name] = value.item()
    if "input_shape" in arrays:
        attrs["input_shape"] = arrays["input_shape"]
    if "class_names" in arrays:
        names = arrays["class_names"]
        if names.ndim != 1 or names.dtype.kind != "U":
            raise InputFileError(path, None, "class_names must be a 1-D array of strings")
        attrs["class_names"] = tuple(str(s) for s in names)
    return _model_from(arrays, attrs, {}, path)


def _attr_from_json(text: str):
    """A metadata string decoded as JSON when it holds a number, bool, string or flat list."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text
    scalar = (str, int, float, bool)
    if isinstance(value, scalar):
        return value
    if isinstance(value, list) and value and all(isinstance(v, scalar) for v in value):
        return np.array(value)
    return text


def _read_safetensors_model(path: Path, max_read_bytes: int, max_weights: int) -> Model:
    tensors, raw = read_safetensors(path, max_read_bytes=max_read_bytes, max_weights=max_weights)
    if set(tensors) == set(TORCH_KEYS):
        from advgrad.interop import from_torch

        try:
            torch_layout = from_torch(tensors)
        except ValueError as exc:
            raise InputFileError(path, None, str(exc)) from exc
        tensors = {name: getattr(torch_layout, name) for name in MODEL_ARRAYS}
    elif set(tensors) != set(MODEL_ARRAYS):
        raise InputFileError(
            path,
            None,
            f"expected tensors W1 b1 W2 b2 (or a torch state_dict {' '.join(TORCH_KEYS)}), "
            f"got {' '.join(sorted(tensors)) or 'none'}",
        )
    values = {key: _attr_from_json(text) for key, text in raw.items()}
    if "class_names" in values:
        names = values["class_names"]
        values["class_names"] = tuple(str(s) for s in np.atleast_1d(names))
    metadata = {
        key: value
        for key, value in values.items()
        if key not in ("advgrad_format", "format_version", *NPZ_OPTIONAL)
    }
    return _model_from(tensors, values, metadata, path)


def read_model_file(
    path: str | os.PathLike,
    *,
    max_read_bytes: int = MAX_READ_BYTES,
    max_weights: int = MAX_WEIGHTS,
) -> Model:
    """Read a model from an advgrad HDF5 file, a ``.npz`` or a ``.safetensors`` file.

    The format follows the extension (``model_format``). A ``.safetensors`` file holds
    tensors ``W1 (d, H) b1 W2 (H, C) b2``, or the state_dict of
    ``nn.Sequential(Linear, Sigmoid, Linear)`` (``0.weight (H, d)`` ...); its ``__metadata__``
    strings (JSON values) fill ``input_shape``, ``class_names``, ``x_min``, ``x_max`` and the
    model's metadata. An array of more than ``max_weights`` elements is refused from its
    stored shape, before anything is read (``load_model``).

    Raises
    ------
    InputFileError
        The file is refused (see ``load_model`` and ``read_safetensors``), is not a regular
        file, or its arrays do not form a model.
    ValueError
        Unknown extension.
    """
    kind = model_format(path)
    if kind == "hdf5":
        return load_model(path, max_read_bytes=max_read_bytes, max_weights=max_weights)
    file_path = regular_input(path, f"a .{kind} file")
    if kind == "npz":
        return _read_npz_model(file_path, max_read_bytes, max_weights)
    return _read_safetensors_model(file_path, max_read_bytes, max_weights)


def write_model_file(
    model: Model,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: tuple[str | os.PathLike | None, ...] = (),
) -> None:
    """Write a model as advgrad HDF5, ``.npz`` or ``.safetensors``, by extension, crash-safely.

    ``.npz`` stores W1 b1 W2 b2 and the set ones of input_shape, class_names, x_min, x_max
    (no metadata); ``.safetensors`` stores W1 b1 W2 b2 and every attribute in
    ``__metadata__``: strings as they are, other values as JSON (read back as such, so a
    string that reads as a JSON number, bool or list comes back as that value).

    ``path`` may not be any of ``inputs`` (by identity), even with ``overwrite``.

    Raises
    ------
    InputFileError
        ``path`` exists and ``overwrite`` is False, is a directory or an input, or cannot be
        written.
    ValueError
        Unknown extension; HDF5 cannot store a metadata value (larger than 64 KiB).
    """
    kind = model_format(path)
    target = Path(path)
    check_output(target, overwrite=overwrite, inputs=inputs)
    if kind == "hdf5":
        save_model(model, target, inputs=inputs)
        return
    arrays = {name: getattr(model, name) for name in MODEL_ARRAYS}
    common = {name: getattr(model, name) for name in NPZ_OPTIONAL}
    if kind == "safetensors":
        attrs = {"advgrad_format": "two-layer-sigmoid", "format_version": 1, **common}
        attrs |= dict(model.metadata)
        metadata = {
            key: value if isinstance(value, str) else json.dumps(np.asarray(value).tolist())
            for key, value in attrs.items()
            if value is not None
        }
        write_safetensors(target, arrays, metadata, overwrite=overwrite, inputs=inputs)
        return
    extra = {key: np.asarray(value) for key, value in common.items() if value is not None}
    with _atomic_file(target, overwrite=overwrite, inputs=inputs) as handle:
        np.savez(handle, **arrays, **extra)


def convert_model(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_weights: int = MAX_WEIGHTS,
) -> Model:
    """Convert a model file between HDF5, ``.npz`` and ``.safetensors`` (by extensions).

    ``max_weights`` is passed on to ``read_model_file``.

    Returns
    -------
    Model
        The model read from ``source`` (and written to ``target``).

    Raises
    ------
    InputFileError, ValueError
        As ``read_model_file`` and ``write_model_file`` (a metadata value HDF5 cannot store
        is an InputFileError naming ``source``); ValueError also when both files have the
        same format.
    """
    if model_format(source) == model_format(target):
        raise ValueError(
            f"{source} and {target} are both {model_format(source)}; nothing to convert"
        )
    check_output(Path(target), overwrite=overwrite, inputs=(source,))
    model = read_model_file(source, max_weights=max_weights)
    try:
        write_model_file(model, target, overwrite=overwrite, inputs=(source,))
    except ValueError as exc:
        raise InputFileError(source, None, f"cannot be written as {target}: {exc}") from exc
    return model


# --------------------------------------------------------------------------- dataset sources


@dataclass(frozen=True)
class _Source:
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


def _npy_source(path: Path) -> _Source:
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

    return _Source(path, len(array), array.shape[1:], array.dtype, blocks)


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


def _npz_source(path: Path, key: str) -> _Source:
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
            if f"{key}.npy" not in members:
                found = ", ".join(m.removesuffix(".npy") for m in members) or "nothing"
                raise InputFileError(path, key, f"no such array; the archive holds {found}")
            with archive.open(f"{key}.npy") as member:
                shape, fortran, dtype = _npy_header(member, path, key)
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
    return _Source(path, shape[0], tuple(shape[1:]), dtype, blocks)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")


def _idx_source(path: Path) -> _Source:
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
    return _Source(path, shape[0], tuple(shape[1:]), dtype, blocks)


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


def _csv_source(path: Path, label_column: int | str | None) -> _Source:
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

    return _Source(path, None, (n_columns - (label is not None),), np.dtype(np.float64), blocks)


def _source(path: Path, key: str) -> _Source:
    kind = data_format(path)
    if kind == "npy":
        return _npy_source(path)
    if kind == "npz":
        return _npz_source(path, key)
    if kind == "idx":
        return _idx_source(path)
    raise ValueError(f"{path}: a CSV file is read with its labels, not as a label file")


# --------------------------------------------------------------------------- dataset conversion


@dataclass(frozen=True)
class DatasetConversion:
    """What ``convert_dataset`` wrote: rows, row shape, dtype, labels ("integer", "soft" or
    "none") and the x_min / x_max attributes (None when not set)."""

    output: Path
    n_rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    labels: str
    x_min: float | None
    x_max: float | None


def _labels_block(y: np.ndarray, start: int, path, name) -> np.ndarray:
    """Validated labels: int64 classes (N,) or float soft labels (N, C)."""
    if y.dtype.kind == "f" and y.ndim == 1:
        bad = ~np.isfinite(y) | (y != np.round(y))
        _refuse_rows(bad, start, path, name, "labels that are not whole numbers")
        y = y.astype(np.int64)
    elif y.dtype.kind == "f":
        if y.ndim != 2:
            raise InputFileError(path, name, f"float labels must be (N,) or (N, C), got {y.shape}")
        _refuse_rows(~np.isfinite(y), start, path, name, "non-finite labels (NaN or inf)")
        y = y.astype(y.dtype.newbyteorder("=") if y.dtype in FLOAT_DTYPES else np.float64)
    elif y.dtype.kind not in "iu" or y.ndim != 1:
        raise InputFileError(path, name, f"labels must be integers (N,), got {y.dtype} {y.shape}")
    problem = _label_value_problem(y, start, None)
    if problem:
        raise InputFileError(path, name, problem)
    return y.astype(np.int64, copy=False) if y.dtype.kind in "iu" else y


def convert_dataset(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    label_column: int | str | None = None,
    x_key: str = "X",
    y_key: str | None = None,
    scale: float | None = None,
    x_range: tuple[float, float] | None = None,
    dtype: DTypeLike = np.float32,
    compression: str | None = None,
    overwrite: bool = False,
    block_rows: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> DatasetConversion:
    """Convert arrays, IDX or CSV files into a dataset file, in blocks of rows.

    Parameters
    ----------
    source : str or os.PathLike
        ``.npy`` (X), ``.npz`` (arrays ``x_key`` and ``y_key``), an IDX file (X) or a CSV file
        (one row per line, a header line when its first line is not all numbers). ``.gz``
        compression is accepted for IDX and CSV.
    target : str or os.PathLike
        The dataset file to write (``.h5``).
    labels : str or os.PathLike, optional
        A ``.npy`` or IDX file of labels for the rows of a ``.npy`` or IDX source: integers
        (N,), whole-number floats (N,), or soft labels (N, C).
    label_column : int or str, optional
        CSV: the column (index, negative from the end, or header name) holding the labels.
    x_key, y_key : str
        ``.npz`` member names of the rows and the labels; ``y_key`` None: ``"y"`` when the
        archive has it.
    scale : float, optional
        X is divided by it; default: 255 for uint8 sources (MNIST pixels), else 1.
    x_range : (x_min, x_max), optional
        The ``x_min`` / ``x_max`` attributes; default: (0, 255 / scale) for uint8 sources,
        else none.
    dtype : float32 or float64
        dtype of ``/X``.
    compression : {None, "gzip", "lzf"}
    overwrite : bool
        Replace an existing ``target``.
    block_rows : int, optional
        Rows read and written at a time; default: about ``CONVERT_BLOCK_BYTES`` of float64.
    progress : callable, optional
        Called as ``progress(rows_done, n_rows)`` (``n_rows`` None for CSV) after each block.

    Returns
    -------
    DatasetConversion

    Raises
    ------
    InputFileError
        A source is refused or malformed (wrong IDX magic number, truncated data, object
        arrays, a line that is not numbers), X holds NaN or inf (or overflows ``dtype``),
        labels are negative, fractional or non-finite, X and the labels have different
        numbers of rows, or ``target`` exists (without ``overwrite``) or is a source.
    ValueError
        Unknown file format, bad options.
    """
    _check_compression(compression)
    out_dtype = np.dtype(dtype)
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {out_dtype}")
    source, target = Path(source), Path(target)
    kind = data_format(source)
    if labels is not None and kind in ("csv", "npz"):
        raise ValueError(f"{kind} sources hold their own labels: use label_column or y_key")
    if label_column is not None and kind != "csv":
        raise ValueError("label_column applies to CSV sources")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be > 0, got {scale}")
    check_output(target, overwrite=overwrite, inputs=(source, labels))
    for path in (source, labels):
        if path is not None:
            regular_input(path, f"a .{data_format(path)} file")
    x_source = _csv_source(source, label_column) if kind == "csv" else _source(source, x_key)
    if x_source.dtype.kind not in "biuf":
        raise InputFileError(source, None, f"has dtype {x_source.dtype}; expected numbers")
    if not x_source.row_shape:
        raise InputFileError(
            source,
            None if kind != "npz" else x_key,
            f"holds a 1-D array of {x_source.n_rows} values; expected rows (N, d) with a "
            "feature axis (reshape it to (N, 1) for one feature per row)",
        )
    y_source = None
    if labels is not None:
        y_source = _source(Path(labels), "y")
    elif kind == "npz":
        with zipfile.ZipFile(source) as archive:
            has_y = f"{y_key or 'y'}.npy" in archive.namelist()
        if y_key is not None or has_y:
            y_source = _source(source, y_key or "y")
    if y_source is not None and y_source.n_rows != x_source.n_rows:
        raise InputFileError(
            y_source.path,
            None,
            f"has {y_source.n_rows} labels, but {x_source.path} has {x_source.n_rows} rows",
        )
    integer_pixels = x_source.dtype == np.uint8
    scale = scale if scale is not None else (255.0 if integer_pixels else 1.0)
    if x_range is None and integer_pixels:
        x_range = (0.0, 255.0 / scale)
    if x_range is not None and not float(x_range[0]) < float(x_range[1]):
        raise ValueError(f"x_min must be below x_max, got {x_range}")
    rows = block_rows or max(1, CONVERT_BLOCK_BYTES // (math.prod(x_source.row_shape) * 8))
    if kind == "csv":
        blocks = x_source.blocks(rows)
    elif y_source is None:
        blocks = ((X, None) for X in x_source.blocks(rows))
    else:
        blocks = zip(x_source.blocks(rows), y_source.blocks(rows), strict=True)
    attrs = {
        "x_min": None if x_range is None else float(x_range[0]),
        "x_max": None if x_range is None else float(x_range[1]),
        "input_shape": np.array(x_source.row_shape) if len(x_source.row_shape) > 1 else None,
        "converted_from": ", ".join(Path(p).name for p in (source, labels) if p is not None),
        "scale": scale,
    }
    label_path = source if y_source is None else y_source.path
    with _atomic_h5(target, overwrite=overwrite, inputs=(source, labels)) as f:
        options = (scale, out_dtype, rows, compression)
        written, y_kind = _write_blocks(f, blocks, x_source, label_path, options, progress)
        _write_attrs(f, attrs)
    return DatasetConversion(
        target, written, x_source.row_shape, out_dtype, y_kind, attrs["x_min"], attrs["x_max"]
    )


def _write_blocks(f, blocks, source: _Source, label_path, options, progress):
    """Validate, scale and append every (X, y) block; returns (rows written, label kind).

    ``options`` is (scale, output dtype, rows per block, compression).
    """
    scale, out_dtype, rows, compression = options
    path = source.path
    chunk_rows = max(1, SAVE_CHUNK_BYTES // (math.prod(source.row_shape) * out_dtype.itemsize))
    capacity = source.n_rows or rows
    X_out = _create_rows(f, "X", (capacity, *source.row_shape), out_dtype, chunk_rows, compression)
    y_out = None
    y_kind = "none"
    start = 0
    for X, y in blocks:
        with np.errstate(over="ignore", invalid="ignore"):
            values = (X.astype(np.float64) / scale).astype(out_dtype)
        what = f"values that are NaN, inf or overflow {out_dtype}"
        _refuse_rows(~np.isfinite(values), start, path, None, what)
        stop = start + len(values)
        if stop > X_out.shape[0]:
            X_out.resize(max(stop, 2 * X_out.shape[0]), axis=0)
        X_out[start:stop] = values
        if y is not None:
            y = _labels_block(np.asarray(y), start, label_path, None)
            if y_out is None:
                y_kind = "integer" if y.ndim == 1 else "soft"
                y_shape = (X_out.shape[0], *y.shape[1:])
                y_out = _create_rows(f, "y", y_shape, y.dtype, chunk_rows, compression)
            if y.shape[1:] != y_out.shape[1:]:
                raise InputFileError(label_path, None, f"labels change shape at row {start}")
            if stop > y_out.shape[0]:
                y_out.resize(X_out.shape[0], axis=0)
            y_out[start:stop] = y
        start = stop
        if progress is not None:
            progress(start, source.n_rows)
    if start == 0:
        raise InputFileError(path, None, "holds no rows")
    X_out.resize(start, axis=0)
    if y_out is not None:
        y_out.resize(start, axis=0)
    return start, y_kind
