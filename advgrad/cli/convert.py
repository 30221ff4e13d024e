"""``advgrad convert-model`` and ``advgrad convert-data``: other formats in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from advgrad.cli.options import (
    Compression,
    CompressionOption,
    MaxWeightsOption,
    OverwriteOption,
    Precision,
    value_range,
    weights_limit,
)
from advgrad.cli.reports import console, progress_bar, reported_errors, summary_table


def convert_model(
    source: Annotated[
        Path,
        typer.Argument(help="Model file: .h5, .npz or .safetensors."),
    ],
    target: Annotated[
        Path,
        typer.Argument(help="Output: .h5, .npz or .safetensors."),
    ],
    overwrite: OverwriteOption = False,
    max_weights: MaxWeightsOption = None,
) -> None:
    """Convert a model between advgrad's HDF5 format, .npz and .safetensors.

    The direction follows the extensions. .npz holds arrays W1 (d, H), b1, W2 (H, C), b2
    (read without unpickling); .safetensors holds the same tensors (or a torch
    nn.Sequential(Linear, Sigmoid, Linear) state_dict) and the attributes as metadata.
    """
    with reported_errors():
        from advgrad.io import convert_model as convert

        model = convert(source, target, overwrite=overwrite, max_weights=weights_limit(max_weights))
    rows = [
        ("network", f"d = {model.n_inputs}, H = {model.n_hidden}, C = {model.n_classes}"),
        ("dtype", str(model.dtype)),
        ("output", str(target)),
    ]
    console().print(summary_table(f"Converted {source.name}", rows))


def convert_data(
    source: Annotated[
        Path,
        typer.Argument(
            help=".npy, .npz, an IDX file (MNIST's train-images-idx3-ubyte[.gz]) or CSV "
            "(.csv, .tsv, .txt, optionally .gz).",
        ),
    ],
    target: Annotated[Path, typer.Argument(help="Output dataset file (.h5).")],
    labels: Annotated[
        Path | None,
        typer.Option(
            help="Labels of a .npy or IDX source: .npy or IDX (train-labels-idx1-ubyte).",
            show_default=False,
        ),
    ] = None,
    label_column: Annotated[
        str | None,
        typer.Option(
            help="CSV: the label column, by index (negative from the end) or header name.",
            show_default=False,
        ),
    ] = None,
    x_key: Annotated[str, typer.Option(help=".npz: the array of rows.")] = "X",
    y_key: Annotated[
        str | None,
        typer.Option(
            help=".npz: the array of labels. Default: y, when present.", show_default=False
        ),
    ] = None,
    scale: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Divide X by this. Default: 255 for uint8 data (pixels to [0, 1]), else 1.",
            show_default=False,
        ),
    ] = None,
    x_min: Annotated[
        float | None,
        typer.Option(
            help="x_min attribute (the valid data range). Default: 0 for uint8 data, else none.",
            show_default=False,
        ),
    ] = None,
    x_max: Annotated[
        float | None,
        typer.Option(
            help="x_max attribute. Default: `255/scale` for uint8 data, else none.",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[Precision, typer.Option(help="dtype of /X.")] = Precision.float32,
    compression: CompressionOption = Compression.none,
    overwrite: OverwriteOption = False,
) -> None:
    """Convert .npy/.npz arrays, IDX (MNIST) or CSV files into a dataset file.

    The source is read and written in blocks of rows, so files larger than memory convert
    in bounded memory; values are checked as the loader checks them (finite X, labels that
    are non-negative whole numbers) and the output appears only once complete.
    """
    x_range = value_range(x_min, x_max, ("--x-min", "--x-max"))
    column = label_column
    if column is not None and column.lstrip("-").isdigit():
        column = int(column)
    with reported_errors():
        from advgrad.io import convert_dataset

        with progress_bar("converting rows") as bar:
            task = bar.add_task("", total=None)
            result = convert_dataset(
                source,
                target,
                labels=labels,
                label_column=column,
                x_key=x_key,
                y_key=y_key,
                scale=scale,
                x_range=x_range,
                dtype=dtype.value,
                compression=compression.codec,
                overwrite=overwrite,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    x_range_text = "not set" if result.x_min is None else f"[{result.x_min:g}, {result.x_max:g}]"
    rows = [
        ("rows", str(result.n_rows)),
        ("row shape", str(result.row_shape)),
        ("dtype", str(result.dtype)),
        ("labels", result.labels),
        ("x range", x_range_text),
        ("output", str(result.output)),
    ]
    console().print(summary_table(f"Converted {source.name}", rows))
