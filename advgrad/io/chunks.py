"""Row-chunked datasets: creating a dataset chunked by whole rows (at most
``MAX_CHUNK_BYTES`` a chunk, optionally compressed, with the shuffle filter), checking the
compression and the row layout asked for, and writing whole chunks directly, encoded as HDF5's
filters would encode them, bypassing HDF5's chunk cache.
"""

from __future__ import annotations

import math

import h5py
import numpy as np

from advgrad.io import fastzlib
from advgrad.io.safe import MAX_CHUNK_BYTES
from advgrad.model import FLOAT_DTYPES

COMPRESSIONS = (None, "gzip", "lzf")
SAVE_CHUNK_BYTES = 2**20
"""Target size of one chunk in files written by ``advgrad.io.datasets.save_dataset``."""


def check_compression(compression: str | None) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")


def create_rows(
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


def check_rows_layout(name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {dtype}")
    if len(shape) < 2 or math.prod(shape[1:]) < 1:
        raise ValueError(f"{name} must be (N, ...) with at least one feature, got shape {shape}")


def _shuffled_deflate(chunk: np.ndarray) -> bytes:
    """A chunk through HDF5's shuffle filter (byte planes), then gzip."""
    itemsize = chunk.dtype.itemsize
    planes = chunk.reshape(-1).view(np.uint8).reshape(-1, itemsize).T
    return fastzlib.compress(np.ascontiguousarray(planes))


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


def write_chunks(dset: h5py.Dataset, start: int, rows: np.ndarray, encode, pool) -> None:
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
