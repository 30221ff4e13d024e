"""``advgrad info``: what a model or dataset file holds, and whether advgrad accepts it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from advgrad.cli.options import AllowNonfiniteOption, MaxWeightsOption, weights_limit
from advgrad.cli.reports import console, literal, reported_errors


def info(
    path: Annotated[Path, typer.Argument(help="A model or dataset file (.h5).")],
    allow_nonfinite: AllowNonfiniteOption = False,
    max_weights: MaxWeightsOption = None,
) -> None:
    """Show what a model or dataset file holds, and whether advgrad accepts it.

    Every value of a dataset is read (in blocks) to check it; exit code 1 if the file is
    refused, with the reason.
    """
    with reported_errors():
        from advgrad.io import describe_file

        description = describe_file(
            path, allow_nonfinite=allow_nonfinite, max_weights=weights_limit(max_weights)
        )
    from rich.table import Table

    table = Table(
        title=literal(f"{path} ({description.kind})"), show_header=False, title_justify="left"
    )
    table.add_column(style="bold")
    table.add_column()
    for name, value in description.items:
        table.add_row(literal(name), literal(value))
    table.add_row("valid", "[green]yes[/]")
    console().print(table)
