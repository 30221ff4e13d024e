"""The first layer that touches untrusted HDF5 files: open, check, read (DESIGN.md section 4).

Every check here looks at metadata only (links, layout, filters, dtype, shape, stored size) and
runs before a single data byte is read. Anything refused raises
:class:`advgrad.errors.InputFileError` naming the file, the dataset and the reason; so does any
error h5py raises on a corrupt file. HDF5's plugin search path is empty while an input is opened,
inspected or read, so that a file can never make HDF5 load code; and HDF5 reads inputs through
:class:`_Reads`, which checks what HDF5 would trust blindly (SECURITY.md).
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
from numpy.typing import DTypeLike

from advgrad.errors import InputFileError
from advgrad.model import FLOAT_DTYPES

MAX_NDIM = 8
"""Most axes a dataset may have."""
MAX_DIM = 2**40
"""Largest length of one axis."""
MAX_ELEMENTS = 2**40
"""Most elements in one dataset."""
MAX_CHUNK_BYTES = 64 * 2**20
"""Largest chunk, uncompressed, in bytes (bounds what one decompression may allocate)."""
MAX_COMPRESSION_RATIO = 1100
"""Most bytes a dataset may declare per byte it stores.

Deflate cannot exceed about 1032:1 (lzf about 88:1), so every dataset written with the allowed
filters passes; what is refused declares data it does not store (unallocated chunks read as the
fill value): a tiny file that would take unbounded time to read.
"""
MAX_READ_BYTES = 2**32
"""Default bound on the bytes one read returns (``max_read_bytes`` of the loaders)."""
MAX_CHUNK_CACHE_BYTES = 512 * 2**20
"""Largest chunk cache a streamed dataset chunked across its columns gets, in bytes.

Read in blocks of rows, such a dataset touches every chunk of a band (the chunks that hold
the same rows) in every block; without a cache each block would inflate every chunk of the
band again (114 s instead of 5 s for 2**24 x 1 gzip chunks). :func:`streamed_dataset` gives it
a cache of two bands, so each chunk is inflated once, and refuses a layout whose two bands
exceed this bound, with a message saying how to re-chunk it by rows.
"""
MAX_ATTRS = 1024
"""Most attributes read from one object."""
MAX_ATTR_BYTES = 16 * 2**20
"""Largest attribute read, in bytes of its stored elements; larger attributes are ignored."""

ALLOWED_FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32", 32000: "lzf"}
"""HDF5 filter ids that the reader decodes; any other filter is refused."""
_OTHER_FILTERS = {4: "szip", 5: "nbit", 6: "scaleoffset"}

_LINK_NAMES = {h5py.h5l.TYPE_SOFT: "a soft link", h5py.h5l.TYPE_EXTERNAL: "an external link"}

_H5PY_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)
"""What h5py raises on a corrupt or unreadable file (HDF5 errors, and numpy's on odd types)."""

_plugin_path_lock = threading.RLock()


@contextmanager
def _without_plugin_paths() -> Iterator[None]:
    """Empty HDF5's plugin search path while the block runs, then restore it.

    HDF5 searches that path (``HDF5_PLUGIN_PATH``, else its default directories) and loads
    every library it finds there when a file names a filter it does not know (on reading
    data) or a file driver other than the default one (in the superblock, on opening). An empty
    path loads nothing; built-in filters, lzf and filters already registered in the process
    keep working. The lock keeps threads from restoring each other's saved path.
    """
    with _plugin_path_lock:
        saved = [h5py.h5pl.get(index) for index in range(h5py.h5pl.size())]
        for _ in saved:
            h5py.h5pl.remove(0)
        try:
            yield
        finally:
            for entry in saved:
                h5py.h5pl.append(entry)


_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")


def error_reason(exc: BaseException) -> str:
    """The message of an error from h5py or the OS on one line, without HDF5's details.

    An error with an errno (``OSError.errno``, or ``errno = N`` inside HDF5's text) gives the
    operating system's words for it ("No space left on device"); any other message has its
    whitespace (HDF5 embeds a ``ctime()`` newline) collapsed to single spaces.
    """
    code = getattr(exc, "errno", None)
    if code is None:
        found = _ERRNO_IN_MESSAGE.search(str(exc))
        code = int(found.group(1)) if found else None
    if code:
        return os.strerror(code)
    return " ".join(str(exc).split())


@contextmanager
def _untrusted(path: str | os.PathLike, dataset: str | None, action: str) -> Iterator[None]:
    """Run h5py calls on an input: no plugin can load, and h5py errors become InputFileError."""
    with _without_plugin_paths():
        try:
            yield
        except _H5PY_ERRORS as exc:
            raise InputFileError(path, dataset, f"{action}: {error_reason(exc)}") from exc


def regular_input(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path, once it is known to be a readable regular file.

    Checked without opening it, so a FIFO or a device never blocks or streams endlessly.

    Parameters
    ----------
    path : str or os.PathLike
    what : str
        What the file should be, for the message on a directory ("an HDF5 file").

    Raises
    ------
    InputFileError
        The path does not exist, is a directory, is not a regular file (a device, a pipe, a
        socket), or cannot be read.
    """
    file_path = Path(path)
    if not file_path.exists():
        raise InputFileError(path, None, "no such file")
    if file_path.is_dir():
        raise InputFileError(path, None, f"is a directory, not {what}")
    if not file_path.is_file():
        raise InputFileError(path, None, "is not a regular file")
    if not os.access(file_path, os.R_OK):
        raise InputFileError(path, None, "permission denied")
    return file_path


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
        The path does not exist, is not a regular file (a directory, a device, a pipe), cannot
        be read, is not an HDF5 file, or HDF5 cannot open it (truncated, corrupt, or written for
        another file driver).
    """
    file_path = regular_input(path, "an HDF5 file")
    with _untrusted(path, None, "cannot open"):
        try:
            return _InputFile(file_path)
        except OSError as exc:
            if not h5py.is_hdf5(file_path):
                raise InputFileError(path, None, "not an HDF5 file") from exc
            raise


class _InputFile(h5py.File):
    """An input file, read-only, whose every byte HDF5 reads passes through :class:`_Reads`.

    Without a raw-data chunk cache: inputs are read once, in order, in blocks of many chunks,
    and a cache of small chunks only held on to memory (about 10 MB more over 2 million
    labels, never returned).
    """

    def __init__(self, path: Path) -> None:
        self._reads = _Reads(path)
        try:
            super().__init__(self._reads, "r", rdcc_nbytes=0)
        except BaseException:
            self._reads.close()
            raise
        self._reads.length_size = self.id.get_create_plist().get_sizes()[1]

    @property
    def filename(self) -> str:
        """The path of the file."""
        return str(self._reads.path)

    def close(self) -> None:
        """Close the HDF5 file, then the file handle under it."""
        super().close()
        self._reads.close()


class _Reads(io.RawIOBase):
    """A file opened ``"rb"``, as HDF5 reads it through h5py's ``fileobj`` driver.

    HDF5 parses a global heap collection (the variable-length strings of attributes) as soon as
    it has read it, trusting its object sizes: a zero size makes HDF5 2.0 loop forever. Each
    read that starts a collection is checked first (:func:`_heap_collection_problem`).
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.length_size = 8  # bytes of a length field; the file's own, once it is open
        self._file = path.open("rb")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer: Any) -> int:
        address = self._file.tell()
        count = self._file.readinto(buffer)
        if bytes(memoryview(buffer)[: len(_HEAP_SIGNATURE)]) == _HEAP_SIGNATURE:
            problem = _heap_collection_problem(self._file.fileno(), address, self.length_size)
            if problem:
                raise InputFileError(self.path, None, problem)
        return count

    def close(self) -> None:
        self._file.close()
        super().close()


_HEAP_SIGNATURE = b"GCOL"


def _heap_collection_problem(fd: int, address: int, length_size: int) -> str | None:
    """Why the global heap collection at ``address`` must not reach HDF5, or None.

    A collection is a header (signature, version, reserved bytes, its size) and objects, each
    an index, a reference count, reserved bytes, a size, and the data padded to 8 bytes; the
    free space (index 0) counts its own header in its size. A valid collection is tiled
    exactly by its objects; HDF5 (``H5HG__cache_heap_deserialize``) walks them without
    checking that each step moves forward and stays inside.
    """
    header_size = 8 + length_size
    header = os.pread(fd, header_size, address)
    size = int.from_bytes(header[8:], "little")
    if len(header) < header_size or header[4] != 1 or address + size > os.fstat(fd).st_size:
        return None  # HDF5 refuses these itself, before walking the objects
    collection = os.pread(fd, size, address)
    object_header = 8 + length_size
    offset = header_size
    while offset + object_header <= size:
        index = int.from_bytes(collection[offset : offset + 2], "little")
        length = int.from_bytes(collection[offset + 8 : offset + object_header], "little")
        step = object_header + -(-length // 8) * 8 if index else length
        if step == 0 or offset + step > size:
            return (
                f"corrupt global heap collection at byte {address}: object {index} at offset "
                f"{offset} has size {length}"
            )
        offset += step
    return None


def checked_dataset(
    f: h5py.File, name: str, *, kind: Literal["float", "label"], required: bool = True
) -> h5py.Dataset | None:
    """Look up a dataset and check it is safe to read, from its metadata only.

    Every part of ``name`` must be reached through a hard link (links are inspected, never
    followed); the object must be a plain dataset (not virtual, no external raw storage) using
    only the filters in ``ALLOWED_FILTERS``, with a native-byte-order dtype of the right kind,
    bounded shape and chunks (``MAX_NDIM``, ``MAX_DIM``, ``MAX_ELEMENTS``, ``MAX_CHUNK_BYTES``),
    and as many bytes stored as its shape needs (``MAX_COMPRESSION_RATIO``).

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
    with _untrusted(path, name, "cannot read the metadata"):
        dset = _hard_linked(f, name, required)
        if dset is None:
            return None
        problem = _layout_problem(dset) or _dtype_problem(dset.dtype, kind)
        problem = problem or _type_problem(dset) or _shape_problem(dset) or _size_problem(dset)
    if problem:
        raise InputFileError(path, name, problem)
    return dset


def _hard_linked(f: h5py.File, name: str, required: bool) -> h5py.Dataset | None:
    parts = name.strip("/").split("/")
    obj: Any = f
    for depth, part in enumerate(parts):
        here = "/" + "/".join(parts[: depth + 1])
        if not isinstance(obj, h5py.Group):
            raise InputFileError(f.filename, name, f"no dataset {name} ({obj.name} is not a group)")
        key = part.encode()
        if not obj.id.links.exists(key):
            if required:
                raise InputFileError(f.filename, name, f"no dataset {name}")
            return None
        link_type = obj.id.links.get_info(key).type
        if link_type != h5py.h5l.TYPE_HARD:
            raise InputFileError(f.filename, name, _link_reason(obj, key, here, link_type))
        obj = obj[part]
    if not isinstance(obj, h5py.Dataset):
        raise InputFileError(f.filename, name, f"is a {type(obj).__name__}, not a dataset")
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
    # First of the checks: the shape of a virtual dataset may come from its source files.
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
        ("reference", h5py.check_ref_dtype(dtype) is not None),
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


def _size_problem(dset: h5py.Dataset) -> str | None:
    declared = math.prod(dset.shape) * dset.dtype.itemsize
    stored = dset.id.get_storage_size()
    if declared > MAX_COMPRESSION_RATIO * stored:
        return (
            f"declares {declared} bytes but stores {stored}; more than "
            f"{MAX_COMPRESSION_RATIO} bytes per stored byte is refused (a decompression bomb "
            "or unwritten data)"
        )
    return None


def streamed_dataset(
    f: h5py.File, name: str, *, kind: Literal["float", "label"], required: bool = True
) -> h5py.Dataset | None:
    """:func:`checked_dataset`, opened to be read in blocks of rows at the cost of one read.

    A dataset whose chunks span whole rows (or an unchunked one) is opened as it is: a block
    of rows inflates each chunk once, or twice where a chunk straddles two blocks. One chunked
    across its other axes is opened with a chunk cache of two bands of chunks (a band: the
    chunks that hold the same rows), so consecutive blocks find the chunks they share already
    inflated; at most ``MAX_CHUNK_CACHE_BYTES``.

    Raises
    ------
    InputFileError
        As :func:`checked_dataset`; or two bands of chunks exceed ``MAX_CHUNK_CACHE_BYTES``
        (the message says how to re-chunk the file by rows).
    """
    dset = checked_dataset(f, name, kind=kind, required=required)
    if dset is None or dset.chunks is None:
        return dset
    shape, chunks = dset.shape, dset.chunks
    band_chunks = math.prod(
        -(-size // chunk) for size, chunk in zip(shape[1:], chunks[1:], strict=True)
    )
    if band_chunks <= 1:
        return dset
    cache_bytes = 2 * band_chunks * math.prod(chunks) * dset.dtype.itemsize
    name = dset.name
    if cache_bytes > MAX_CHUNK_CACHE_BYTES:
        rows = max(1, MAX_CHUNK_BYTES // 64 // (math.prod(shape[1:]) * dset.dtype.itemsize))
        layout = "x".join(str(n) for n in (rows, *shape[1:]))
        raise InputFileError(
            f.filename,
            name,
            f"has chunks {chunks} across its columns: reading it by rows would inflate every "
            f"chunk again for each block, or cache {cache_bytes} bytes of chunks (at most "
            f"{MAX_CHUNK_CACHE_BYTES}); re-chunk it by rows, e.g. h5repack -l "
            f"{name.lstrip('/')}:CHUNK={layout} IN.h5 OUT.h5",
        )
    del dset  # HDF5 shares an open dataset between handles: a cache applies to a fresh open
    with _untrusted(f.filename, name, "cannot read the metadata"):
        access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        access.set_chunk_cache(4 * band_chunks + 1, cache_bytes, 1.0)
        return h5py.Dataset(h5py.h5d.open(f.id, name.encode(), dapl=access))


def read_rows(
    dset: h5py.Dataset,
    start: int,
    stop: int,
    *,
    path: str | os.PathLike,
    allow_nonfinite: bool = False,
    as_dtype: DTypeLike | None = None,
    max_bytes: int = MAX_READ_BYTES,
    out: np.ndarray | None = None,
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
    as_dtype : float32 or float64, optional
        Convert float rows to this dtype, refusing values that overflow it (a float64 value
        beyond float32's range, which would become inf). None keeps the stored dtype.
    max_bytes : int
        Refuse to read more bytes than this at once.
    out : numpy.ndarray, optional
        C-contiguous ``(stop - start, *dset.shape[1:])`` array of the dataset's dtype to read
        into (not with a converting ``as_dtype``): a reused buffer instead of a new array.

    Returns
    -------
    numpy.ndarray
        ``(stop - start, *dset.shape[1:])``, ``as_dtype`` or the dataset's dtype; ``out``
        when given.

    Raises
    ------
    InputFileError
        The rows would take more than ``max_bytes``, cannot be read (corrupt data, checksum
        mismatch), hold NaN or inf, or overflow ``as_dtype``.
    """
    if as_dtype is not None and np.dtype(as_dtype) not in FLOAT_DTYPES:
        raise ValueError(f"as_dtype must be float32 or float64, got {np.dtype(as_dtype)}")
    n_bytes = (stop - start) * math.prod(dset.shape[1:]) * dset.dtype.itemsize
    if n_bytes > max_bytes:
        raise InputFileError(
            path,
            dset.name,
            f"rows {start}:{stop} take {n_bytes} bytes; at most {max_bytes} are read at once "
            "(read fewer rows at once, or raise max_read_bytes)",
        )
    if out is not None:
        shape = (stop - start, *dset.shape[1:])
        converting = as_dtype is not None and np.dtype(as_dtype) != dset.dtype
        if out.shape != shape or out.dtype != dset.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {shape} {dset.dtype} array")
        if converting:
            raise ValueError("out cannot be combined with a converting as_dtype")
    with _untrusted(path, dset.name, f"cannot read rows {start}:{stop}"):
        if out is None:
            rows = dset[start:stop]
        else:
            rows = out
            if stop > start:
                dset.read_direct(out, np.s_[start:stop])
    if rows.dtype.kind != "f":
        return rows
    if not allow_nonfinite and not _all_finite(rows):
        refuse_rows(
            ~np.isfinite(rows),
            start,
            path,
            dset.name,
            "non-finite values (NaN or inf)",
            "; allow_nonfinite accepts them",
        )
    if as_dtype is None or np.dtype(as_dtype) == rows.dtype:
        return rows
    with np.errstate(over="ignore"):
        converted = rows.astype(as_dtype)
    overflow = np.isinf(converted) & np.isfinite(rows)
    refuse_rows(overflow, start, path, dset.name, f"values that overflow {converted.dtype}")
    return converted


def _all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite, found without a temporary array of the values' size:
    min and max propagate NaN and reach an infinity."""
    return values.size == 0 or bool(np.isfinite(values.min()) and np.isfinite(values.max()))


def refuse_rows(
    bad: np.ndarray, start: int, path: str | os.PathLike, dataset: str, what: str, hint: str = ""
) -> None:
    """Raise InputFileError when ``bad`` (one flag per value of the rows) flags anything."""
    if bad.any():
        first = start + int(np.argmax(bad.reshape(len(bad), -1).any(axis=1)))
        raise InputFileError(
            path,
            dataset,
            f"{int(bad.sum())} {what} in rows {start}:{start + len(bad)}, "
            f"the first in row {first}{hint}",
        )


def read_attrs(obj: h5py.HLObject, *, path: str | os.PathLike) -> dict[str, Any]:
    """The attributes of an HDF5 object that advgrad understands.

    Accepted: numeric or boolean scalars (as Python ``int``/``float``/``bool``) and arrays (as
    native-byte-order numpy arrays), strings (``str``; bytes are decoded as UTF-8) and 1-D
    string arrays (``tuple`` of ``str``), each at most ``MAX_ATTR_BYTES`` stored; a name that
    is not UTF-8 is decoded with its bad bytes as ``\\xNN`` escapes. Every other
    attribute (compound, references, enums, variable-length sequences, empty, undecodable,
    unreadable, too large) is left out without reading its value; callers that require an
    attribute refuse the file when it is missing from the result.

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
        The object has more than ``MAX_ATTRS`` attributes, or its attributes cannot be listed.
    """
    where = None if obj.name == "/" else obj.name
    values = {}
    with _untrusted(path, where, "cannot read the attributes"):
        count = len(obj.attrs)
        if count > MAX_ATTRS:
            raise InputFileError(path, where, f"{count} attributes; at most {MAX_ATTRS} are read")
        for name in obj.attrs:
            try:
                value = _attr_value(obj.attrs, name)
            except _H5PY_ERRORS:
                continue
            if value is not None:
                values[_as_str(name, errors="backslashreplace")] = value
    return values


def _attr_value(attrs: h5py.AttributeManager, name: str) -> Any:
    attr_id = attrs.get_id(name)
    dtype, shape = attr_id.dtype, attr_id.shape
    if shape is None or len(shape) > MAX_NDIM or math.prod(shape) * dtype.itemsize > MAX_ATTR_BYTES:
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


def _as_str(value: str | bytes, errors: str = "strict") -> str:
    return value.decode("utf-8", errors) if isinstance(value, bytes) else str(value)
