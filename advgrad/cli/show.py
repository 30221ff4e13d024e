"""``advgrad show``: a picture of what an attack did to some rows of its output."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from advgrad.cli.options import MaxWeightsOption, OverwriteOption, weights_limit
from advgrad.cli.reports import console, markup_literal, reported_errors


class Selection(StrEnum):
    first = "first"
    successful = "successful"
    confidence_drop = "confidence-drop"


def show(
    output: Annotated[
        Path, typer.Argument(help="An output of `advgrad attack` (.h5).", show_default=False)
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            help="The PNG to write. Default: `<output name>.png` in the current directory.",
            show_default=False,
        ),
    ] = None,
    rows: Annotated[int, typer.Option(help="Rows of the grid, one example each: 1 to 100.")] = 8,
    select: Annotated[
        Selection,
        typer.Option(
            help="Which rows: first (the first ones); successful (the first ones the attack "
            "succeeded on, as its success rate counts them); confidence-drop (those whose "
            "true class lost the most probability, largest drop first).",
        ),
    ] = Selection.first,
    model: Annotated[
        Path | None,
        typer.Option(
            help="The model the attack used, when it is no longer where the output says "
            "(beside the output, or bundled); it must be the same file (same SHA-256).",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="The dataset the attack read, when it is no longer where the output says; "
            "it must be the same file (same SHA-256).",
            show_default=False,
        ),
    ] = None,
    overwrite: OverwriteOption = False,
    max_weights: MaxWeightsOption = None,
) -> None:
    """Draw some rows of an attack's output: clean image, adversarial image, perturbation.

    Each row of the grid shows the clean image, the adversarial image and the perturbation
    (a diverging colour scale, symmetric around 0 and shared by every row), titled with the
    true class and the model's predictions and confidences, computed with the model the
    output names. For image-shaped data only: `input_shape` (h, w), (h, w, c) or (c, h, w)
    with c 1 or 3. Needs the plot extra (`pip install 'advgrad[plot]'`). The PNG appears
    only once complete, and never replaces an input. Example: `advgrad show
    digits_test-fgsm-linf-eps0.1.h5 --out grid.png --rows 4 --select successful`
    """
    with reported_errors():
        from advgrad.jobs.show import show_file

        target = out if out is not None else Path(f"{output.stem}.png")
        shown = show_file(
            output,
            target,
            rows=rows,
            select=select.value,
            model_path=model,
            data_path=data,
            overwrite=overwrite,
            max_weights=weights_limit(max_weights),
        )
    listed = ", ".join(str(index) for index in shown.index)
    console().print(f"wrote {markup_literal(target)}: rows {listed}", soft_wrap=True)
