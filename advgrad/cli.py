"""The ``advgrad`` command line: thin Typer commands over the library.

Heavy imports (numba, h5py, the kernels) happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="advgrad",
    help="Exact, fast adversarial examples for two-layer sigmoid networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = Console()
errors = Console(stderr=True)


class Norm(StrEnum):
    inf = "inf"
    l2 = "2"
    l1 = "1"


class Compression(StrEnum):
    none = "none"
    gzip = "gzip"
    lzf = "lzf"


ModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model",
        dir_okay=False,
        help="Model file (.h5, advgrad model format). Default: the bundled digits network.",
        show_default=False,
    ),
]
DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        dir_okay=False,
        help="Dataset file (.h5 with /X and optional /y). Default: the bundled digits test set.",
        show_default=False,
    ),
]


@contextmanager
def _reported_errors():
    """Print expected failures (bad input, bad files, I/O) as one line and exit 1."""
    from advgrad.errors import AdvgradError

    try:
        yield
    except (AdvgradError, ValueError, OSError) as error:
        errors.print(f"[bold red]advgrad: error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        errors.print("[bold red]advgrad: interrupted[/]; no output was written")
        raise typer.Exit(130) from None


def _defaults(model: Path | None, data: Path | None) -> tuple[Path, Path]:
    from advgrad.bundled import MODEL, TEST_DATA, bundled_path

    return model or bundled_path(MODEL), data or bundled_path(TEST_DATA)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


@app.command()
def attack(
    model: ModelOption = None,
    data: DataOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            dir_okay=False,
            help="Output file. Default: <data name>-fgsm-l<norm>-eps<eps>.h5 in the "
            "current directory.",
            show_default=False,
        ),
    ] = None,
    eps: Annotated[
        float,
        typer.Option(min=0.0, help="Perturbation size in the chosen norm, in input units."),
    ] = 0.1,
    norm: Annotated[
        Norm,
        typer.Option(help="inf: eps * sign(G) (FGSM); 2: eps * G/||G||_2; 1: eps * G/||G||_1."),
    ] = Norm.inf,
    labels: Annotated[
        bool,
        typer.Option(
            "--labels/--predictions",
            help="Attack the dataset's /y labels, or the model's own predictions (the "
            "default, which avoids label leaking).",
        ),
    ] = False,
    clip_min: Annotated[
        float | None,
        typer.Option(
            help="Lower clip of the perturbed inputs. Default: the dataset's x_min "
            "attribute, else the model's, else none.",
            show_default=False,
        ),
    ] = None,
    clip_max: Annotated[
        float | None,
        typer.Option(help="Upper clip; default like --clip-min.", show_default=False),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Rows read, attacked and written per block.")
    ] = 8192,
    compression: Annotated[
        Compression, typer.Option(help="Compression of the output datasets.")
    ] = Compression.none,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing output file (never an input).")
    ] = False,
) -> None:
    """Perturb every row of a dataset with the fast gradient method and write the result.

    With no --model/--data it attacks the bundled digits test set with the bundled network.
    The output holds /X (perturbed, same shape and dtype), /y, /pred_clean, /pred_adv and
    the attack's settings as attributes; it appears only once complete.
    """
    if (clip_min is None) != (clip_max is None):
        errors.print(
            "[bold red]advgrad: error:[/] give both --clip-min and --clip-max, or neither",
            soft_wrap=True,
        )
        raise typer.Exit(2)
    with _reported_errors():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        from advgrad.batch import attack_file, default_output_name

        model_path, data_path = _defaults(model, data)
        out_path = out or default_output_name(data_path, eps, norm.value)
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=errors,
            transient=True,
        ) as bar:
            task = bar.add_task("attacking rows", total=None)
            report = attack_file(
                model_path,
                data_path,
                out_path,
                eps=eps,
                norm=norm.value,
                batch_size=batch_size,
                use_labels=labels,
                clip=None if clip_min is None else (clip_min, clip_max),
                compression=None if compression is Compression.none else compression.value,
                overwrite=overwrite,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    table = Table(title=f"FGM attack, L{report.norm}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in (
        ("rows", f"{report.n_rows}"),
        ("eps", f"{report.eps:g}"),
        ("labels attacked", report.labels),
        ("clip range", f"[{report.clip[0]:g}, {report.clip[1]:g}]"),
        ("clean accuracy", _percent(report.clean_accuracy)),
        ("adversarial accuracy", _percent(report.adversarial_accuracy)),
        ("attack success rate", _percent(report.success_rate)),
        ("mean L-inf perturbation", f"{report.mean_linf:.4g}"),
        ("mean L2 perturbation", f"{report.mean_l2:.4g}"),
        ("rows per second", f"{report.rows_per_second:,.0f}"),
        ("output", str(report.output)),
    ):
        table.add_row(name, value)
    console.print(table)


@app.command()
def info(
    path: Annotated[Path, typer.Argument(dir_okay=False, help="A model or dataset file (.h5).")],
) -> None:
    """Show what a model or dataset file holds, and whether advgrad accepts it.

    Every value of a dataset is read (in blocks) to check it; exit code 1 if the file is
    refused, with the reason.
    """
    with _reported_errors():
        from advgrad.io import describe_file

        description = describe_file(path)
    table = Table(title=f"{path} ({description.kind})", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for name, value in description.items:
        table.add_row(name, value)
    table.add_row("valid", "[green]yes[/]")
    console.print(table)


@app.command()
def gradcheck(
    model: ModelOption = None,
    data: DataOption = None,
    rows: Annotated[int, typer.Option(min=1, help="Number of dataset rows to check.")] = 16,
    step: Annotated[float, typer.Option(min=0.0, help="Finite-difference step h.")] = 1e-6,
    tolerance: Annotated[
        float, typer.Option(min=0.0, help="Largest accepted relative error.")
    ] = 1e-6,
) -> None:
    """Check the input gradient against central finite differences in float64.

    Compares dJ/dX from the kernels with (J(x + h e_i) - J(x - h e_i)) / 2h for every
    input coordinate of the first ROWS rows (labels: the model's predictions), and prints
    ||G - F|| / ||F||. Exit code 1 when it exceeds the tolerance.
    """
    with _reported_errors():
        from advgrad.gradient_check import gradcheck as check
        from advgrad.io import load_model, open_dataset

        model_path, data_path = _defaults(model, data)
        network = load_model(model_path)
        with open_dataset(data_path, n_classes=network.n_classes) as reader:
            X, _ = reader.read(0, min(rows, reader.n_rows))
        result = check(network, X, step=step)
    verdict = "[green]passed[/]" if result.passed(tolerance) else "[red]FAILED[/]"
    console.print(
        f"gradcheck {verdict}: relative error {result.relative_error:.3e} "
        f"(tolerance {tolerance:g}), max abs error {result.max_abs_error:.3e}, "
        f"{result.n_rows} rows x {result.n_inputs} inputs, h = {result.step:g}"
    )
    if not result.passed(tolerance):
        raise typer.Exit(1)
