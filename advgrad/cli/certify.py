"""``advgrad certify``: certified radius per row next to PGD's smallest adversarial eps."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from advgrad.cli.options import (
    BatchSizeOption,
    ClipMaxOption,
    ClipMinOption,
    DataOption,
    Device,
    DeviceOption,
    MaxWeightsOption,
    ModelOption,
    OverwriteOption,
    RestartsOption,
    ResumeOption,
    SchedulerOption,
    SeedOption,
    StepsOption,
    clip_range,
    eps_option,
    model_and_data,
    weights_limit,
)
from advgrad.cli.reports import (
    console,
    notice,
    number,
    percent,
    progress_bar,
    reported_errors,
    stop_on_signals,
    summary_table,
    warn,
)


class BallNorm(StrEnum):
    """The norms whose balls the bounds certify."""

    inf = "inf"
    l2 = "2"


class Bounds(StrEnum):
    crown = "crown"
    ibp = "ibp"


def certify(
    model: ModelOption = None,
    data: DataOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output file. Default: `<data name>-certify-l<norm>.h5` in the current directory.",
            show_default=False,
        ),
    ] = None,
    eps: Annotated[
        list[float] | None,
        eps_option((0.01, 0.02, 0.05, 0.1), "the table has a row per eps"),
    ] = None,
    norm: Annotated[
        BallNorm,
        typer.Option(help="Norm of the eps-ball certified (and attacked by PGD): inf or 2."),
    ] = BallNorm.inf,
    method: Annotated[
        Bounds,
        typer.Option(
            help="crown: linear relaxation of the sigmoids (never looser than ibp); ibp: "
            "interval bounds."
        ),
    ] = Bounds.crown,
    tolerance: Annotated[
        float,
        typer.Option(
            min=0.0, help="Bisection tolerance of the certified radius and the attack's eps."
        ),
    ] = 1e-3,
    eps_max: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Top of the radius search. Default: the whole clip box (`x_max - x_min`, "
            "times `sqrt(d)` for L2).",
            show_default=False,
        ),
    ] = None,
    steps: StepsOption = 50,
    restarts: RestartsOption = 5,
    seed: SeedOption = 0,
    labels: Annotated[
        bool,
        typer.Option(
            "--labels/--predictions",
            help="Certify the dataset's labels (the default here) or the clean predictions.",
        ),
    ] = True,
    clip_min: ClipMinOption = None,
    clip_max: ClipMaxOption = None,
    batch_size: BatchSizeOption = 8192,
    overwrite: OverwriteOption = False,
    device: DeviceOption = Device.cpu,
    resume: ResumeOption = None,
    scheduler: SchedulerOption = None,
    max_weights: MaxWeightsOption = None,
) -> None:
    """Certified accuracy per eps next to PGD's empirical robust accuracy, and per-row radii.

    A row is certified at eps when bounds prove that every input within eps (in the clip
    box) keeps its label. Each row's certified radius is bracketed from above by the
    smallest eps at which PGD (with restarts) finds an adversarial example. The output
    holds /radius and /attack_eps per row, and /X: the PGD examples at the largest eps;
    it appears only once complete. Rows stream through in blocks, so memory does not grow
    with the dataset. Ctrl-C (or SIGTERM) stops after the block in progress and keeps what
    is done; the same command resumes it.
    """
    clip = clip_range(clip_min, clip_max)
    with reported_errors(), stop_on_signals() as stop:
        from advgrad.attacks import Attack
        from advgrad.jobs.certify import certify_file, default_output_name

        model_path, data_path = model_and_data(model, data)
        out_path = out or default_output_name(data_path, norm.value)
        with progress_bar("certifying rows") as bar:
            task = bar.add_task("", total=None)
            result = certify_file(
                model_path,
                data_path,
                out_path,
                norm=norm.value,
                eps_values=eps,
                method=method.value,
                tolerance=tolerance,
                clip=clip,
                eps_max=eps_max,
                attack=Attack("pgd", steps=steps, restarts=restarts, seed=seed),
                use_labels=labels,
                batch_size=batch_size,
                overwrite=overwrite,
                max_weights=weights_limit(max_weights),
                device=device.value,
                resume=resume,
                scheduler=scheduler,
                stop=stop,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                notice=notice,
            )
    from rich.table import Table

    table = Table(
        title=f"Certified vs empirical robust accuracy, L{result.norm}, {result.n_rows} rows "
        f"(clean {percent(result.clean_accuracy)})",
        title_justify="left",
    )
    table.add_column("eps", justify="right")
    table.add_column(f"certified ({result.method})", justify="right")
    table.add_column(f"pgd, {restarts} restarts", justify="right")
    for value, certified, robust in zip(
        result.eps_values, result.certified_accuracy, result.robust_accuracy, strict=True
    ):
        table.add_row(f"{value:g}", percent(certified), percent(robust))
    console().print(table)
    bracket = result.bracket()
    milliseconds = None if result.seconds_per_row is None else 1e3 * result.seconds_per_row
    rows = []
    if bracket is not None:
        rows += [
            ("median certified radius", f"{bracket.median_lower:.4g}"),
            ("median adversarial eps", f"{bracket.median_upper:.4g}"),
            ("median gap", f"{bracket.median_gap:.4g}"),
            ("adversarial eps found", f"{percent(bracket.found)} (eps <= {result.eps_max:g})"),
        ]
    rows += [
        ("labels certified", result.label_source),
        ("clip range", f"[{result.clip[0]:g}, {result.clip[1]:g}]"),
        ("certification time", f"{number(milliseconds, '.3g')} ms per row"),
        *([("resumed after row", f"{result.resumed_rows}")] if result.resumed_rows else []),
        ("output", str(result.output)),
    ]
    console().print(summary_table("Per-row bracket [certified radius, adversarial eps]", rows))
    if result.contradictions:
        warn(
            f"{result.contradictions} rows were certified at an eps where the attack "
            "succeeded; please report this"
        )
