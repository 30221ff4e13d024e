"""The first layer that touches untrusted HDF5 files: open, check, read (DESIGN.md section 4).

Every check here looks at metadata only (links, layout, filters, dtype, shape) and runs before a
single data byte is read. Anything refused raises :class:`advgrad.errors.InputFileError` naming the
file, the dataset and the reason.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from advgrad.errors import InputFileError

MAX_NDIM = 8
"""Most axes a dataset may have."""
MAX_DIM = 2**40
"""Largest length of one axis."""
MAX_ELEMENTS = 2**40
"""Most elements in one dataset."""
MAX_CHUNK_BYTES = 256 * 2**20
"""Largest chunk, uncompressed, in bytes (bounds what one decompression may allocate)."""
MAX_ATTRS = 1024
"""Most attributes read from one object."""
MAX_ATTR_ELEMENTS = 2**20
"""Most elements in one attribute; larger attributes are ignored."""

ALLOWED_FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32", 32000: "lzf"}
"""HDF5 filter ids that the reader decodes; any other filter is refused."""
_OTHER_FILTERS = {4: "szip", 5: "nbit", 6: "scaleoffset"}

_LINK_NAMES = {h5py.h5l.TYPE_SOFT: "a soft link", h5py.h5l.TYPE_EXTERNAL: "an external link"}


def open_input(path: str | os.PathLike) -> h5py.File:
    """Open an HDF5 file read-only, refusing what is not one.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    h5py.File
        Opened with mode ``"r"``; use it as a context manager (``with open_input(p) as f:``).

    Raises
    ------
    InputFileError
        The path does not exist, is a directory, cannot be read, or is not an HDF5 file.
    """
    file_path = Path(path)
    if not file_path.exists():
        raise InputFileError(path, None, "no such file")
    if file_path.is_dir():
        raise InputFileError(path, None, "is a directory, not an HDF5 file")
    if not os.access(file_path, os.R_OK):
        raise InputFileError(path, None, "permission denied")
    try:
        return h5py.File(file_path, "r")
    except OSError as exc:
        reason = "not an HDF5 file" if not h5py.is_hdf5(file_path) else f"cannot open: {exc}"
        raise InputFileError(path, None, reason) from exc


def checked_dataset(
    f: h5py.File, name: str, *, kind: Literal["float", "label"], required: bool = True
) -> h5py.Dataset | None:
    """Look up a dataset and check it is safe to read, from its metadata only.

    Every part of ``name`` must be reached through a hard link; the object must be a plain
    dataset (not virtual, no external raw storage) using only the filters in
    ``ALLOWED_FILTERS``, with a native-byte-order dtype of the right kind and bounded shape and
    chunks (``MAX_NDIM``, ``MAX_DIM``, ``MAX_ELEMENTS``, ``MAX_CHUNK_BYTES``).

    Parameters
    ----------
    f : h5py.File
        An open file.
    name : str
        Absolute path of the dataset, e.g. ``"/X"``.
    kind : {"float", "label"}
        ``"float"``: float32 or float64. ``"label"``: any integer width, or float32/float64
        (soft labels).
    required : bool
        When False, a missing dataset gives None instead of an error.

    Returns
    -------
    h5py.Dataset or None
        The dataset, nothing read from it yet.

    Raises
    ------
    InputFileError
        With the file, ``name`` and the reason of the refusal.
    """
    path = f.filename
    name = "/" + name.strip("/")
    parts = name.strip("/").split("/")
    obj: Any = f
    for depth, part in enumerate(parts):
        here = "/" + "/".join(parts[: depth + 1])
        if not isinstance(obj, h5py.Group):
            raise InputFileError(path, name, f"no dataset {name} ({obj.name} is not a group)")
        key = part.encode()
        if not obj.id.links.exists(key):
            if required:
                raise InputFileError(path, name, f"no dataset {name}")
            return None
        link_type = obj.id.links.get_info(key).type
        if link_type != h5py.h5l.TYPE_HARD:
            raise InputFileError(path, name, _link_reason(obj, key, here, link_type))
        obj = obj[part]
    if not isinstance(obj, h5py.Dataset):
        raise InputFileError(path, name, f"is a {type(obj).__name__}, not a dataset")
    problem = _layout_problem(obj) or _dtype_problem(obj.dtype, kind) or _type_problem(obj)
    problem = problem or _shape_problem(obj)
    if problem:
        raise InputFileError(path, name, problem)
    return obj


def _link_reason(group: h5py.Group, key: bytes, here: str, link_type: int) -> str:
    what = _LINK_NAMES.get(link_type, f"a user-defined link (type {link_type})")
    if link_type == h5py.h5l.TYPE_SOFT:
        what += f" to {group.id.links.get_val(key).decode(errors='replace')}"
    elif link_type == h5py.h5l.TYPE_EXTERNAL:
        file_name, object_name = group.id.links.get_val(key)
        what += f" to {file_name.decode(errors='replace')}:{object_name.decode(errors='replace')}"
    return f"{here} is {what}; only hard links are accepted"


def _layout_problem(dset: h5py.Dataset) -> str | None:
    if dset.is_virtual:
        return "is a virtual dataset (VDS); only plain datasets are accepted"
    if dset.external:
        return "stores its raw data in external files; only data inside the file is accepted"
    plist = dset.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        filter_id = plist.get_filter(i)[0]
        if filter_id not in ALLOWED_FILTERS:
            label = _OTHER_FILTERS.get(filter_id, "unknown")
            allowed = ", ".join(ALLOWED_FILTERS.values())
            return f"uses filter {filter_id} ({label}); only {allowed} are accepted"
    return None


def _dtype_problem(dtype: np.dtype, kind: str) -> str | None:
    expected = "float32 or float64" if kind == "float" else "integer, float32 or float64"
    special = (
        ("compound", dtype.names is not None),
        ("array-valued", dtype.subdtype is not None),
        ("string", h5py.check_string_dtype(dtype) is not None),
        ("object reference", h5py.check_ref_dtype(dtype) is not None),
        ("variable-length", h5py.check_vlen_dtype(dtype) is not None),
        ("enum", h5py.check_enum_dtype(dtype) is not None),
    )
    for label, found in special:
        if found:
            return f"has a {label} dtype ({dtype}); expected {expected}"
    is_float = dtype.kind == "f" and dtype.itemsize in (4, 8)
    if not (is_float or (kind == "label" and dtype.kind in "iu")):
        return f"has dtype {dtype}; expected {expected}"
    if not dtype.isnative:
        return f"has dtype {dtype.str} in non-native byte order; expected native {expected}"
    return None


def _type_problem(dset: h5py.Dataset) -> str | None:
    # h5py maps non-standard stored numbers (odd exponent bias, padding, precision) to the nearest
    # numpy dtype; accept only files whose stored type is exactly that dtype.
    if not dset.id.get_type().equal(h5py.h5t.py_create(dset.dtype)):
        return f"stores a non-standard number type that h5py converts to {dset.dtype}"
    return None


def _shape_problem(dset: h5py.Dataset) -> str | None:
    shape = dset.shape
    if shape is None:
        return "has no data (null dataspace)"
    if len(shape) == 0:
        return "is a scalar; expected an array with a row axis"
    if len(shape) > MAX_NDIM:
        return f"has {len(shape)} axes; at most {MAX_NDIM} are accepted"
    if max(shape) > MAX_DIM or math.prod(shape) > MAX_ELEMENTS:
        return f"has shape {shape}; at most {MAX_DIM} per axis and {MAX_ELEMENTS} in all"
    if dset.chunks is not None:
        chunk_bytes = math.prod(dset.chunks) * dset.dtype.itemsize
        if chunk_bytes > MAX_CHUNK_BYTES:
            return (
                f"has chunks {dset.chunks} of {chunk_bytes} bytes; "
                f"at most {MAX_CHUNK_BYTES} bytes are accepted"
            )
    return None


def read_rows(
    dset: h5py.Dataset,
    start: int,
    stop: int,
    *,
    path: str | os.PathLike,
    allow_nonfinite: bool = False,
) -> np.ndarray:
    """Read rows ``start:stop`` of a checked dataset, refusing non-finite floats.

    Parameters
    ----------
    dset : h5py.Dataset
        A dataset returned by :func:`checked_dataset`.
    start, stop : int
        Row range, ``0 <= start <= stop <= dset.shape[0]``.
    path : str or os.PathLike
        The file, for error messages.
    allow_nonfinite : bool
        Accept NaN and inf values.

    Returns
    -------
    numpy.ndarray
        ``(stop - start, *dset.shape[1:])``, the dataset's dtype.

    Raises
    ------
    InputFileError
        The rows cannot be read (corrupt data, checksum mismatch), or hold NaN or inf.
    """
    try:
        rows = dset[start:stop]
    except (OSError, ValueError) as exc:
        raise InputFileError(path, dset.name, f"cannot read rows {start}:{stop}: {exc}") from exc
    if rows.dtype.kind == "f" and not allow_nonfinite:
        bad = ~np.isfinite(rows)
        if bad.any():
            first = start + int(np.argmax(bad.reshape(len(rows), -1).any(axis=1)))
            raise InputFileError(
                path,
                dset.name,
                f"{int(bad.sum())} non-finite values (NaN or inf) in rows {start}:{stop}, "
                f"the first in row {first}; allow_nonfinite accepts them",
            )
    return rows


def read_attrs(obj: h5py.HLObject, *, path: str | os.PathLike) -> dict[str, Any]:
    """The attributes of an HDF5 object that advgrad understands.

    Accepted: numeric or boolean scalars (as Python ``int``/``float``/``bool``) and arrays (as
    native-byte-order numpy arrays, at most ``MAX_ATTR_ELEMENTS`` elements), strings (``str``;
    bytes are decoded as UTF-8) and 1-D string arrays (``tuple`` of ``str``). Every other
    attribute (compound, references, enums, empty, undecodable, too large) is left out; callers
    that require an attribute refuse the file when it is missing from the result.

    Parameters
    ----------
    obj : h5py.File, h5py.Group or h5py.Dataset
        Whose attributes to read (advgrad uses the file root).
    path : str or os.PathLike
        The file, for error messages.

    Returns
    -------
    dict
        Attribute name to value.

    Raises
    ------
    InputFileError
        The object has more than ``MAX_ATTRS`` attributes.
    """
    names = list(obj.attrs)
    if len(names) > MAX_ATTRS:
        where = None if obj.name == "/" else obj.name
        raise InputFileError(path, where, f"{len(names)} attributes; at most {MAX_ATTRS} are read")
    values = {}
    for name in names:
        try:
            value = _attr_value(obj.attrs, name)
        except (OSError, KeyError, ValueError, TypeError, UnicodeDecodeError):
            continue
        if value is not None:
            values[name] = value
    return values


def _attr_value(attrs: h5py.AttributeManager, name: str) -> Any:
    attr_id = attrs.get_id(name)
    dtype, shape = attr_id.dtype, attr_id.shape
    if shape is None or len(shape) > MAX_NDIM or math.prod(shape) > MAX_ATTR_ELEMENTS:
        return None
    if h5py.check_string_dtype(dtype) is not None:
        if len(shape) > 1:
            return None
        raw = attrs[name]
        if len(shape) == 0:
            return _as_str(raw)
        return tuple(_as_str(item) for item in raw)
    if dtype.kind not in "biuf" or dtype.itemsize > 8 or h5py.check_enum_dtype(dtype) is not None:
        return None
    value = np.asarray(attrs[name])
    value = value.astype(value.dtype.newbyteorder("="), copy=False)
    return value.item() if value.ndim == 0 else value


def _as_str(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
