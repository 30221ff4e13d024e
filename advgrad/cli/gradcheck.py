"""``advgrad gradcheck``: the input gradient against central finite differences."""

from __future__ import annotations

from typing import Annotated

import typer

from advgrad.cli.options import (
    DataOption,
    MaxWeightsOption,
    ModelOption,
    model_and_data,
    weights_limit,
)
from advgrad.cli.reports import console, reported_errors


def gradcheck(
    model: ModelOption = None,
    data: DataOption = None,
    rows: Annotated[int, typer.Option(min=1, help="Number of dataset rows to check.")] = 16,
    step: Annotated[float, typer.Option(min=0.0, help="Finite-difference step h.")] = 1e-6,
    tolerance: Annotated[
        float, typer.Option(min=0.0, help="Largest accepted relative error.")
    ] = 1e-6,
    max_weights: MaxWeightsOption = None,
) -> None:
    """Check the input gradient against central finite differences in float64.

    Compares dJ/dX from the kernels with `(J(x + h e_i) - J(x - h e_i)) / 2h` for every
    input coordinate of the first ROWS rows (labels: the model's predictions), and prints
    `||G - F|| / ||F||`. Exit code 1 when it exceeds the tolerance.
    """
    with reported_errors():
        from advgrad.gradient_check import gradcheck as check
        from advgrad.io import load_model, open_dataset

        model_path, data_path = model_and_data(model, data)
        network = load_model(model_path, max_weights=weights_limit(max_weights))
        with open_dataset(data_path, n_classes=network.n_classes) as reader:
            X, _ = reader.read(0, min(rows, reader.n_rows))
        result = check(network, X, step=step)
    verdict = "[green]passed[/]" if result.passed(tolerance) else "[red]FAILED[/]"
    console().print(
        f"gradcheck {verdict}: relative error {result.relative_error:.3e} "
        f"(tolerance {tolerance:g}), max abs error {result.max_abs_error:.3e}, "
        f"{result.n_rows} rows x {result.n_inputs} inputs, h = {result.step:g}"
    )
    if not result.passed(tolerance):
        raise typer.Exit(1)
