"""What a model or dataset file holds, for ``advgrad info``; validates as the loaders do."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from advgrad.io.files import load_model, open_dataset, sha256_file
from advgrad.io.safe import open_input, read_attrs

DESCRIBE_ROWS_PER_BLOCK = 65536


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


def describe_file(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> FileDescription:
    """Describe a model file (root attribute ``advgrad_format``) or a dataset file (``/X``).

    A dataset is read block by block (``DESCRIBE_ROWS_PER_BLOCK`` rows), so every value is
    validated in bounded memory.

    Raises
    ------
    InputFileError
        The file is refused; the message says why.
    """
    with open_input(path) as f:
        attrs = read_attrs(f, path=path)
    if "advgrad_format" in attrs:
        model = load_model(path)
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
            for _, X, y in reader.chunks(DESCRIBE_ROWS_PER_BLOCK):
                if X.size:
                    low, high = min(low, float(np.nanmin(X))), max(high, float(np.nanmax(X)))
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
