"""``.safetensors`` files, read and written with numpy and json alone: an 8-byte little-endian
header length, a JSON header, raw little-endian buffers. Only float32 and float64 tensors; the
header is checked to tile the buffer exactly before any tensor is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from advgrad.errors import InputFileError
from advgrad.io.atomic import atomic_file
from advgrad.io.models import refuse_large_weights
from advgrad.io.safe import MAX_NDIM, MAX_READ_BYTES, error_reason, regular_input
from advgrad.model import MAX_WEIGHTS

SAFETENSORS_MAX_HEADER = 100 * 2**20
"""Largest safetensors JSON header read, in bytes (the format's own limit)."""
SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8")}


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
    with atomic_file(Path(path), overwrite=overwrite, inputs=inputs) as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for buffer in buffers:
            handle.write(buffer)
