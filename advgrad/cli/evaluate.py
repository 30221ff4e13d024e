"""``advgrad evaluate``: accuracy under attack per method and eps."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from advgrad.cli.options import (
    BatchSizeOption,
    ClipMaxOption,
    ClipMinOption,
    ConfidenceOption,
    DataOption,
    DecayOption,
    Device,
    DeviceOption,
    L1CoordinatesOption,
    MaxIterOption,
    MaxWeightsOption,
    Method,
    ModelOption,
    Norm,
    NormOption,
    OvershootOption,
    QueriesOption,
    RestartsOption,
    SchedulerOption,
    SearchStepsOption,
    SeedOption,
    StepSizeOption,
    StepsOption,
    TargetClassesOption,
    Version,
    VersionOption,
    choice,
    clip_range,
    eps_option,
    list_option,
    model_and_data,
    weights_limit,
)
from advgrad.cli.reports import (
    console,
    literal,
    markup_literal,
    notice,
    number,
    percent,
    progress_bar,
    reported_errors,
    stop_on_signals,
)


def evaluate(
    model: ModelOption = None,
    data: DataOption = None,
    eps: Annotated[
        list[float] | None,
        eps_option((0.0, 0.05, 0.1, 0.15, 0.2, 0.25), "the table has a column per eps"),
    ] = None,
    method: Annotated[
        list[Method] | None,
        list_option(
            choice(Method),
            (Method.fgsm, Method.pgd),
            metavar="METHOD[,METHOD...]",
            help="Attacks to evaluate: fgsm, bim, pgd, mifgsm, deepfool; apgd-ce, apgd-dlr, "
            "apgd-t, fab, fab-t, square, autoattack (a row after each of its attacks, then the "
            "ensemble's), cw (of minimal L2 norm, like deepfool). Several: repeat the "
            "option (`--method fgsm --method pgd`) or separate them with commas "
            "(`--method fgsm,pgd`); the table has a row per method. Default: fgsm,pgd.",
        ),
    ] = None,
    norm: NormOption = Norm.inf,
    steps: StepsOption = None,
    step_size: StepSizeOption = None,
    restarts: RestartsOption = None,
    decay: DecayOption = 1.0,
    overshoot: OvershootOption = 0.02,
    max_iter: MaxIterOption = 50,
    seed: SeedOption = 0,
    target_classes: TargetClassesOption = None,
    queries: QueriesOption = 5000,
    version: VersionOption = Version.standard,
    confidence: ConfidenceOption = 0.0,
    search_steps: SearchStepsOption = 9,
    l1_coordinates: L1CoordinatesOption = None,
    labels: Annotated[
        bool,
        typer.Option(
            "--labels/--predictions",
            help="Attack the dataset's labels (the default here) or the clean predictions.",
        ),
    ] = True,
    min_eps: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Tolerance of the per-row minimal-eps bisection (up to the largest eps); 0 "
            "skips it.",
        ),
    ] = 1e-3,
    clip_min: ClipMinOption = None,
    clip_max: ClipMaxOption = None,
    batch_size: BatchSizeOption = 8192,
    device: DeviceOption = Device.cpu,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Write the results as JSON here."),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Save accuracy vs eps, one line per method (needs the plot extra).",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace existing --json and --plot files (never an input)."),
    ] = False,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--restart",
            help="With --json, an interrupted run leaves its partial state beside it "
            "(`.<json>.partial.h5`); running the same command again resumes it. --resume "
            "insists on resuming; --restart discards it and starts afresh.",
            show_default=False,
        ),
    ] = None,
    scheduler: SchedulerOption = None,
    max_weights: MaxWeightsOption = None,
) -> None:
    """Accuracy under attack per method and eps, and each method's minimal-eps summary.

    With no --model/--data it evaluates the bundled digits network on its test set. The
    dataset needs labels (/y). "wrong conf." is the mean probability the model gives its
    wrong predictions. --json and --plot appear only once complete, and never replace an
    input. Rows stream through in blocks, so memory does not grow with the dataset. Ctrl-C
    (or SIGTERM) stops after the block in progress; with --json the work done is kept and
    the same command resumes it.
    """
    clip = clip_range(clip_min, clip_max)
    methods = [name.value for name in method]
    with reported_errors(), stop_on_signals() as stop, ExitStack() as side_outputs:
        from advgrad.attacks import Attack
        from advgrad.figures import plot_curves, require_matplotlib
        from advgrad.io import atomic_output, same_file
        from advgrad.jobs.evaluate import evaluate_file

        if plot is not None:
            require_matplotlib("advgrad evaluate --plot")
        config = Attack(
            methods[0],
            norm=norm.value,
            steps=steps,
            step_size=step_size,
            restarts=restarts,
            decay=decay,
            overshoot=overshoot,
            max_iter=max_iter,
            seed=seed,
            target_classes=target_classes,
            queries=queries,
            version=version.value,
            confidence=confidence,
            search_steps=search_steps,
            l1_coordinates=l1_coordinates,
        )
        for name in methods[1:]:
            Attack(name, norm=norm.value)
        model_path, data_path = model_and_data(model, data)
        if json_path is not None and plot is not None and same_file(json_path, plot):
            raise ValueError("--json and --plot name the same file; give two paths")
        temporary = {
            path: side_outputs.enter_context(
                atomic_output(path, overwrite=overwrite, inputs=(model_path, data_path))
            )
            for path in (json_path, plot)
            if path is not None
        }
        with progress_bar("evaluating rows") as bar:
            task = bar.add_task("", total=None)
            result = evaluate_file(
                model_path,
                data_path,
                methods=methods,
                eps_values=eps,
                attack=config,
                use_labels=labels,
                min_eps_tolerance=min_eps or None,
                clip=clip,
                batch_size=batch_size,
                device=device.value,
                max_weights=weights_limit(max_weights),
                checkpoint=json_path,
                overwrite=overwrite,
                resume=resume,
                scheduler=scheduler,
                stop=stop,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                notice=notice,
            )
        if json_path is not None:
            temporary[json_path].write_text(result.to_json())
        if plot is not None:
            plot_curves(result, temporary[plot])
    from rich.table import Table

    table = Table(
        title=f"Accuracy under attack, L{result.norm}, {result.n_rows} rows "
        f"(clean {percent(result.clean_accuracy)})",
        title_justify="left",
    )
    table.add_column("method", style="bold")
    for value in sorted(set(eps)):
        table.add_column(f"eps {value:g}", justify="right")
    for name in dict.fromkeys(point.method for point in result.points):
        cells = []
        for point in (p for p in result.points if p.method == name):
            confidence = (
                "" if point.wrong_confidence is None else f" ({100 * point.wrong_confidence:.0f} %)"
            )
            cells.append(f"{percent(point.accuracy)}{confidence}")
        table.add_row(literal(name), *map(literal, cells))
    table.caption = "accuracy (mean confidence of the wrong predictions)"
    if "autoattack" in methods:
        table.caption += "; above autoattack, the accuracy after each of its attacks in turn"
    console().print(table)
    if result.minimal_eps:
        summary = Table(title="Minimal eps per row", title_justify="left")
        for column in ("method", "q25", "median", "q75", "found"):
            summary.add_column(column, justify="right")
        for item in result.minimal_eps:
            summary.add_row(
                literal(item.method),
                number(item.q25),
                number(item.median),
                number(item.q75),
                f"{percent(item.found)} (eps <= {item.eps_max:g})",
            )
        console().print(summary)
    for path in (json_path, plot):
        if path is not None:
            console().print(f"wrote {markup_literal(path)}")
