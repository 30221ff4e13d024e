"""What a model or dataset file holds, for ``advgrad info``; validates as the loaders do."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from advgrad.io.datasets import open_dataset
from advgrad.io.digests import sha256_file
from advgrad.io.models import load_model
from advgrad.io.safe import open_input, read_attrs
from advgrad.model import MAX_WEIGHTS

DESCRIBE_ROWS_PER_BLOCK = 65536
"""Most rows of a dataset read at once."""
DESCRIBE_BLOCK_BYTES = 64 * 2**20
"""Most bytes of a dataset read at once (fewer rows when rows are large)."""


@dataclass(frozen=True)
class FileDescription:
    """``kind`` ("model" or "dataset") and ``items``: (name, value) pairs to show."""

    kind: str
    items: tuple[tuple[str, str], ...]


def _text(value) -> str:
    if isinstance(value, np.ndarray):
        return np.array2string(value, threshold=12, separator=", ")
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def describe_file(
    path: str | os.PathLike, *, allow_nonfinite: bool = False, max_weights: int = MAX_WEIGHTS
) -> FileDescription:
    """Describe a model file (root attribute ``advgrad_format``) or a dataset file (``/X``).

    A model is read by ``load_model`` (``max_weights`` bounds its arrays). A dataset is read
    block by block (at most ``DESCRIBE_ROWS_PER_BLOCK`` rows and ``DESCRIBE_BLOCK_BYTES``),
    so every value is validated in bounded memory; the value range leaves NaN out.

    Raises
    ------
    InputFileError
        The file is refused; the message says why.
    """
    with open_input(path) as f:
        attrs = read_attrs(f, path=path)
    if "advgrad_format" in attrs:
        model = load_model(path, max_weights=max_weights)
        items = [
            ("format", f"{attrs['advgrad_format']} v{attrs.get('format_version')}"),
            ("dtype", str(model.dtype)),
            ("inputs d", str(model.n_inputs)),
            ("hidden units H", str(model.n_hidden)),
            ("classes C", str(model.n_classes)),
            ("input shape", _text(model.input_shape)),
            ("class names", ", ".join(model.class_names or ()) or "None"),
            ("x range", f"[{_text(model.x_min)}, {_text(model.x_max)}]"),
        ]
        items += [(key, _text(value)) for key, value in sorted(model.metadata.items())]
    else:
        with open_dataset(path, allow_nonfinite=allow_nonfinite) as reader:
            low, high = np.inf, -np.inf
            counts: dict[int, int] = {}
            row_bytes = math.prod(reader.row_shape) * reader.dtype.itemsize
            rows = max(1, min(DESCRIBE_ROWS_PER_BLOCK, DESCRIBE_BLOCK_BYTES // row_bytes))
            for _, X, y in reader.chunks(rows):
                # fmin and fmax skip NaN without warning when every value is NaN
                low = float(np.fmin.reduce(X, axis=None, initial=low))
                high = float(np.fmax.reduce(X, axis=None, initial=high))
                if y is not None:
                    classes = y if y.ndim == 1 else np.argmax(y, axis=1)
                    for label, count in zip(*np.unique(classes, return_counts=True), strict=True):
                        counts[int(label)] = counts.get(int(label), 0) + int(count)
            items = [
                ("rows", str(reader.n_rows)),
                ("row shape", str(reader.row_shape)),
                ("dtype", str(reader.dtype)),
                ("values", f"min {_text(low)}, max {_text(high)}"),
            ]
            if reader.y_template is None:
                items.append(("labels", "none"))
            else:
                kind = "integer" if reader.y_template[0] == () else "soft"
                spread = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items()))
                items.append(("labels", f"{kind}; per class {spread}"))
            items += [(key, _text(value)) for key, value in sorted(reader.attrs.items())]
    items.append(("sha256", sha256_file(path)))
    return FileDescription("model" if "advgrad_format" in attrs else "dataset", tuple(items))
