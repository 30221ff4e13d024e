"""Converters into (and for models, out of) advgrad's HDF5 formats: a model between its HDF5
file, ``.npz`` (arrays ``W1 b1 W2 b2``, optional ``input_shape class_names x_min x_max``, read
with ``allow_pickle=False``) and ``.safetensors`` (``advgrad.io.safetensors``), the format
following the file extension; a dataset from any source of ``advgrad.io.sources``, read and
written block by block so that memory stays bounded, validated as the loader validates it
(finite X, non-negative integer labels, soft labels summing to 1), the output appearing only
once complete (``advgrad.io.atomic``). Nothing here unpickles: object arrays are refused.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from advgrad.errors import InputFileError
from advgrad.io.atomic import atomic_file, atomic_h5
from advgrad.io.attrs import common_attrs, write_attrs
from advgrad.io.chunks import SAVE_CHUNK_BYTES, check_compression, create_rows
from advgrad.io.datasets import label_value_problem
from advgrad.io.models import MODEL_ARRAYS, load_model, refuse_large_weights, save_model
from advgrad.io.paths import check_output
from advgrad.io.safe import MAX_READ_BYTES, error_reason, refuse_rows, regular_input
from advgrad.io.safetensors import read_safetensors, write_safetensors
from advgrad.io.sources import Source, array_source, csv_source, data_format, npy_header
from advgrad.model import FLOAT_DTYPES, MAX_WEIGHTS, Model

MODEL_FORMATS = {".h5": "hdf5", ".hdf5": "hdf5", ".npz": "npz", ".safetensors": "safetensors"}
"""Model file formats by extension."""
NPZ_OPTIONAL = ("input_shape", "class_names", "x_min", "x_max")
"""Arrays a model .npz may hold besides W1 b1 W2 b2."""
TORCH_KEYS = ("0.weight", "0.bias", "2.weight", "2.bias")
"""Tensor names of an ``nn.Sequential(Linear, Sigmoid, Linear)`` state_dict (advgrad.interop)."""
CONVERT_BLOCK_BYTES = 16 * 2**20
"""Default bytes of float64 values read per block by ``convert_dataset``."""


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
    common = common_attrs(attrs, path)
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


def _read_npz_model(path: Path, max_read_bytes: int, max_weights: int) -> Model:
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
            for name in MODEL_ARRAYS:
                if f"{name}.npy" in archive.namelist():
                    with archive.open(f"{name}.npy") as member:
                        shape = npy_header(member, path, name)[0]
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
    with atomic_file(target, overwrite=overwrite, inputs=inputs) as handle:
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
        refuse_rows(bad, start, path, name, "labels that are not whole numbers")
        y = y.astype(np.int64)
    elif y.dtype.kind == "f":
        if y.ndim != 2:
            raise InputFileError(path, name, f"float labels must be (N,) or (N, C), got {y.shape}")
        refuse_rows(~np.isfinite(y), start, path, name, "non-finite labels (NaN or inf)")
        y = y.astype(y.dtype.newbyteorder("=") if y.dtype in FLOAT_DTYPES else np.float64)
    elif y.dtype.kind not in "iu" or y.ndim != 1:
        raise InputFileError(path, name, f"labels must be integers (N,), got {y.dtype} {y.shape}")
    problem = label_value_problem(y, start, None)
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
    check_compression(compression)
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
    x_source = csv_source(source, label_column) if kind == "csv" else array_source(source, x_key)
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
        y_source = array_source(Path(labels), "y")
    elif kind == "npz":
        with zipfile.ZipFile(source) as archive:
            has_y = f"{y_key or 'y'}.npy" in archive.namelist()
        if y_key is not None or has_y:
            y_source = array_source(source, y_key or "y")
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
    with atomic_h5(target, overwrite=overwrite, inputs=(source, labels)) as f:
        options = (scale, out_dtype, rows, compression)
        written, y_kind = _write_blocks(f, blocks, x_source, label_path, options, progress)
        write_attrs(f, attrs)
    return DatasetConversion(
        target, written, x_source.row_shape, out_dtype, y_kind, attrs["x_min"], attrs["x_max"]
    )


def _write_blocks(f, blocks, source: Source, label_path, options, progress):
    """Validate, scale and append every (X, y) block; returns (rows written, label kind).

    ``options`` is (scale, output dtype, rows per block, compression).
    """
    scale, out_dtype, rows, compression = options
    path = source.path
    chunk_rows = max(1, SAVE_CHUNK_BYTES // (math.prod(source.row_shape) * out_dtype.itemsize))
    capacity = source.n_rows or rows
    X_out = create_rows(f, "X", (capacity, *source.row_shape), out_dtype, chunk_rows, compression)
    y_out = None
    y_kind = "none"
    start = 0
    for X, y in blocks:
        with np.errstate(over="ignore", invalid="ignore"):
            values = (X.astype(np.float64) / scale).astype(out_dtype)
        what = f"values that are NaN, inf or overflow {out_dtype}"
        refuse_rows(~np.isfinite(values), start, path, None, what)
        stop = start + len(values)
        if stop > X_out.shape[0]:
            X_out.resize(max(stop, 2 * X_out.shape[0]), axis=0)
        X_out[start:stop] = values
        if y is not None:
            y = _labels_block(np.asarray(y), start, label_path, None)
            if y_out is None:
                y_kind = "integer" if y.ndim == 1 else "soft"
                y_shape = (X_out.shape[0], *y.shape[1:])
                y_out = create_rows(f, "y", y_shape, y.dtype, chunk_rows, compression)
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
