"""What every file job does before it streams: open the model and the dataset it reads,
settle the clip range and the block size, name the inputs in the outputs' attributes, and
check what a block computed before it is written."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import advgrad
from advgrad.attacks import declared_range
from advgrad.errors import InputFileError
from advgrad.io import FileDigest, column_blocks, load_model, open_dataset
from advgrad.io.safe import MAX_READ_BYTES
from advgrad.kernels import cpu
from advgrad.kernels.cpu import ROWS_PER_BLOCK
from advgrad.model import MAX_WEIGHTS, Model

DEFAULT_BATCH_SIZE = 8192
BLOCK_WORKING_BYTES = 2**30
"""Bound on one set of a block's working arrays, rows x (d + H + C) values of the compute
dtype (the pipeline holds a few such sets: input and output buffers, hidden activations).
Wide networks get fewer rows per block (``rows_per_block``), never fewer than
``ROWS_PER_BLOCK``: a network whose d + H + C values per row exceed this bound over 256 rows
uses 256-row blocks."""


class NonFiniteResult(ValueError):
    """An attack turned a finite input row into one holding inf or NaN (an eps or step size
    that takes it past the largest value of the data's dtype). Such a row is never written:
    the job's outputs are discarded."""


def clip_range(clip, reader, model) -> tuple[float, float]:
    """The explicit clip, else the dataset's x_min/x_max, else the model's, else none
    (``declared_range``), as a (x_min, x_max) pair with infinite ends for none."""
    if clip is None:
        clip = declared_range(reader, model)
    return (-math.inf, math.inf) if clip is None else (float(clip[0]), float(clip[1]))


def rows_per_block(batch_size: int, model: Model) -> int:
    """Rows in one block of a file job on ``model`` (in its compute dtype).

    ``aligned_batch_size(batch_size)``, capped for a wide network so that one set of a
    block's working arrays, rows x (d + H + C) values, takes at most ``BLOCK_WORKING_BYTES``,
    but never below ``ROWS_PER_BLOCK``: every block size stays a multiple of it, so every
    batch size still gives bitwise the same output.

    Raises
    ------
    ValueError
        The batch size is below 1, or the block's rows take more than the ``MAX_READ_BYTES``
        read at once.
    """
    aligned = aligned_batch_size(batch_size)
    itemsize = model.dtype.itemsize
    values_per_row = model.n_inputs + model.n_hidden + model.n_classes
    widest = BLOCK_WORKING_BYTES // (values_per_row * itemsize) // ROWS_PER_BLOCK
    rows = min(aligned, max(widest, 1) * ROWS_PER_BLOCK)
    row_bytes = model.n_inputs * itemsize
    if rows * row_bytes > MAX_READ_BYTES:
        largest = MAX_READ_BYTES // row_bytes // ROWS_PER_BLOCK * ROWS_PER_BLOCK
        remedy = f"use a batch size of at most {largest}" if largest else "the rows are too wide"
        raise ValueError(
            f"a block of {rows} rows takes {rows * row_bytes} bytes, more than the "
            f"{MAX_READ_BYTES} read at once; {remedy}"
        )
    return rows


def perturbation_norms(X_adv: np.ndarray, rows: np.ndarray, first_row: int, output):
    """L-inf and L2 norms (m,) float64 of each row of X_adv - rows, both (m, d).

    Raises
    ------
    NonFiniteResult
        Naming the first row (absolute index, from ``first_row``) whose adversarial values
        are not finite while its input row is, and ``output``.
    """
    linf, l2 = np.empty(len(rows)), np.empty(len(rows))
    cpu.perturbation_norms_into(X_adv, rows, linf, l2)
    suspects = np.flatnonzero(~np.isfinite(linf))
    if suspects.size:
        made = ~np.isfinite(X_adv[suspects]).all(axis=1) & np.isfinite(rows[suspects]).all(axis=1)
        if made.any():
            raise NonFiniteResult(
                f"{output}: the attack made row {first_row + int(suspects[made][0])} "
                f"non-finite (inf or NaN): its eps or step size goes past the largest "
                f"{X_adv.dtype} value; use a smaller eps or a clip range"
            )
    return linf, l2


def aligned_batch_size(batch_size: int) -> int:
    """``batch_size`` rounded up to a multiple of ``ROWS_PER_BLOCK``.

    Kernel blocks and random draws are aligned to absolute row indices in groups of this
    size, so every aligned batch size gives bitwise the same output.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return -(-batch_size // ROWS_PER_BLOCK) * ROWS_PER_BLOCK


@contextmanager
def open_for_model(
    model_path, data_path, *, allow_nonfinite: bool = False, max_weights: int = MAX_WEIGHTS
):
    """Load a model and open a dataset it can read; yields (model, reader).

    Refuses a model with more than ``max_weights`` elements in W1 or W2 (before reading it),
    and data whose rows do not flatten to the model's d; the model comes back in the
    dataset's dtype, the compute dtype of every file-level job (a float64 weight beyond
    float32's range is refused rather than turned into inf).
    """
    model = load_model(model_path, max_weights=max_weights)
    with open_dataset(
        data_path, n_classes=model.n_classes, allow_nonfinite=allow_nonfinite
    ) as reader:
        width = math.prod(reader.row_shape)
        if width != model.n_inputs:
            raise InputFileError(
                data_path,
                "/X",
                f"rows have shape {reader.row_shape} ({width} features); "
                f"the model expects {model.n_inputs}",
            )
        if model.dtype != reader.dtype:
            model = load_model(model_path, as_dtype=reader.dtype, max_weights=max_weights)
        yield model, reader


@contextmanager
def provenance(model_path, data_path) -> Iterator[dict]:
    """Output attributes naming the inputs (file names and SHA-256), version and time.

    The SHA-256 values are ``FileDigest`` objects: the inputs are hashed on threads of their
    own while the job starts working, and the writers store the digests before their first
    checkpoint (at once when they resume, since the digests identify the job). Leaving the
    context stops hashing that no writer waited for.
    """
    digests = {"model_sha256": FileDigest(model_path), "data_sha256": FileDigest(data_path)}
    try:
        yield {
            **digests,
            "model_file": Path(model_path).name,
            "data_file": Path(data_path).name,
            "advgrad_version": advgrad.__version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    finally:
        for digest in digests.values():
            digest.cancel()


def column_values(path, name: str) -> Callable[[], Iterator[np.ndarray]]:
    """The per-row column ``/name`` of an output, as a function that reads it block by block
    at each call (for ``advgrad.quantiles``)."""
    return lambda: (block for (block,) in column_blocks(path, [name]))
