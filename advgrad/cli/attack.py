"""``advgrad attack``: attack every row of a dataset and write the adversarial dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from advgrad.cli.options import (
    AllowNonfiniteOption,
    BatchSizeOption,
    ClipMaxOption,
    ClipMinOption,
    Compression,
    CompressionOption,
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
    OverwriteOption,
    QueriesOption,
    RestartsOption,
    ResumeOption,
    SchedulerOption,
    SearchStepsOption,
    SeedOption,
    StepSizeOption,
    StepsOption,
    TargetClassesOption,
    Version,
    VersionOption,
    clip_range,
    eps_option,
    model_and_data,
    weights_limit,
)
from advgrad.cli.reports import (
    console,
    literal,
    notice,
    number,
    percent,
    progress_bar,
    quartiles,
    reported_errors,
    stop_on_signals,
    summary_table,
)


def target_class(text: str | None) -> int | str | None:
    """``--target`` as :class:`~advgrad.attacks.Attack` takes it: a class index, "random" or
    "least-likely"; None: untargeted."""
    if text is None or text in ("random", "least-likely"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"--target must be a class index, 'random' or 'least-likely', got {text!r}"
        ) from None


def attack(
    model: ModelOption = None,
    data: DataOption = None,
    out: Annotated[
        str | None,
        typer.Option(
            help="Output file. With several --eps, a name containing `{eps}`, e.g. "
            "`adv-{eps}.h5`. Default: `<data name>-<method>-l<norm>-eps<eps>.h5` in the "
            "current directory.",
            show_default=False,
        ),
    ] = None,
    method: Annotated[
        Method,
        typer.Option(
            help="fgsm: one fast-gradient step (FGM in the chosen norm); bim: iterated from "
            "X; pgd: iterated from random starts in the ball; mifgsm: with momentum; "
            "deepfool: nearest linearised class boundary (untargeted, no eps). "
            "Evaluation-grade: apgd-ce, apgd-dlr (Auto-PGD on the cross-entropy or DLR "
            "loss), apgd-t (targeted DLR against --target-classes classes), fab, fab-t "
            "(minimal-norm boundary attack, untargeted and targeted), square (score-based, "
            "--queries), autoattack (the ensemble of --version; writes /broken_by), all in "
            "L-inf, L2 and L1. cw: Carlini & Wagner L2 "
            "(minimal norm, no eps; --confidence, --search-steps, --steps default 1000).",
        ),
    ] = Method.fgsm,
    eps: Annotated[
        list[float] | None,
        eps_option((0.1,), "one output per eps, written in one pass over the data"),
    ] = None,
    norm: NormOption = Norm.inf,
    steps: StepsOption = None,
    step_size: StepSizeOption = None,
    restarts: RestartsOption = None,
    decay: DecayOption = 1.0,
    overshoot: OvershootOption = 0.02,
    max_iter: MaxIterOption = 50,
    target: Annotated[
        str | None,
        typer.Option(
            help="Targeted attack: a class index, 'random' (another class per row) or "
            "'least-likely'. Default: untargeted.",
            show_default=False,
        ),
    ] = None,
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
            help="Attack the dataset's /y labels, or the model's own predictions (the "
            "default, which avoids label leaking).",
        ),
    ] = False,
    min_eps: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Also search each row's smallest successful eps by bisection to this "
            "tolerance; written as /eps_min (inf: not found up to --eps-max).",
            show_default=False,
        ),
    ] = None,
    eps_max: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Upper end of the --min-eps search. Default: `x_max - x_min`.",
            show_default=False,
        ),
    ] = None,
    clip_min: ClipMinOption = None,
    clip_max: ClipMaxOption = None,
    batch_size: BatchSizeOption = 8192,
    compression: CompressionOption = Compression.none,
    overwrite: OverwriteOption = False,
    resume: ResumeOption = None,
    device: DeviceOption = Device.cpu,
    scheduler: SchedulerOption = None,
    allow_nonfinite: AllowNonfiniteOption = False,
    max_weights: MaxWeightsOption = None,
) -> None:
    """Attack every row of a dataset and write the adversarial dataset.

    With no --model/--data it attacks the bundled digits test set with the bundled network
    using FGSM. The output holds /X (perturbed, same shape and dtype), /y, /pred_clean,
    /pred_adv (plus /target and /eps_min when asked) and the attack's settings as
    attributes; it appears only once complete. Rows stream through in blocks, so memory
    does not grow with the dataset. Ctrl-C (or SIGTERM) stops after the block in progress
    and keeps what is done; the same command resumes it.
    """
    clip = clip_range(clip_min, clip_max)
    with reported_errors(), stop_on_signals() as stop:
        from advgrad.attacks import MINIMAL_NORM_METHODS, Attack
        from advgrad.jobs.attack import attack_files, default_output_name

        configs = [
            Attack(
                method.value,
                eps=radius,
                norm=norm.value,
                steps=steps,
                step_size=step_size,
                restarts=restarts,
                decay=decay,
                overshoot=overshoot,
                max_iter=max_iter,
                target=target_class(target),
                seed=seed,
                target_classes=target_classes,
                queries=queries,
                version=version.value,
                confidence=confidence,
                search_steps=search_steps,
                l1_coordinates=l1_coordinates,
            )
            for radius in dict.fromkeys(eps)
        ]
        if method.value in MINIMAL_NORM_METHODS:
            configs = configs[:1]  # DeepFool and C&W have no eps: one output
        model_path, data_path = model_and_data(model, data)
        if out is not None and len(configs) > 1 and "{eps}" not in out:
            raise ValueError("with several --eps, --out must contain {eps}, e.g. adv-{eps}.h5")
        outputs = [
            (
                config,
                Path(out.replace("{eps}", f"{config.eps:g}"))
                if out is not None
                else default_output_name(data_path, config),
            )
            for config in configs
        ]
        with progress_bar("attacking rows") as bar:
            task = bar.add_task("", total=None)
            reports = attack_files(
                model_path,
                data_path,
                outputs,
                batch_size=batch_size,
                use_labels=labels,
                clip=clip,
                min_eps_tolerance=min_eps,
                eps_max=eps_max,
                compression=compression.codec,
                overwrite=overwrite,
                device=device.value,
                allow_nonfinite=allow_nonfinite,
                max_weights=weights_limit(max_weights),
                resume=resume,
                scheduler=scheduler,
                stop=stop,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                notice=notice,
            )
    config = reports[0].attack
    title = f"{config.method} attack, L{config.norm}"
    if len(reports) == 1:
        console().print(summary_table(title, report_rows(reports[0])))
        return
    from rich.table import Table

    table = Table(title=literal(title), title_justify="left")
    columns = [dict(report_rows(report)) for report in reports]
    table.add_column(style="bold", no_wrap=True)
    for column in columns:
        table.add_column(f"eps {column.pop('eps')}", justify="right", overflow="fold")
    for name in columns[0]:
        table.add_row(name, *(literal(column[name]) for column in columns))
    console().print(table)


def report_rows(report) -> list[tuple[str, str]]:
    """The summary of one output of an attack job, as ``(name, value)`` rows."""
    config = report.attack
    rows = [("rows", f"{report.n_rows}")]
    from advgrad.attacks import MINIMAL_NORM_METHODS

    if config.method not in MINIMAL_NORM_METHODS:
        rows.append(("eps", f"{config.eps:g}"))
    rows += [
        ("labels attacked", report.labels),
        ("target", "none" if config.target is None else str(config.target)),
        ("clip range", f"[{report.clip[0]:g}, {report.clip[1]:g}]"),
        ("clean accuracy", percent(report.clean_accuracy)),
        ("adversarial accuracy", percent(report.adversarial_accuracy)),
        ("attack success rate", percent(report.success_rate)),
        ("mean L-inf perturbation", number(report.mean_linf)),
        ("mean L2 perturbation", number(report.mean_l2)),
    ]
    if report.eps_min is not None:
        rows.append(("minimal eps", quartiles(report.eps_min)))
    if report.resumed_rows:
        rows.append(("resumed after row", f"{report.resumed_rows}"))
    rows += [
        ("rows per second", number(report.rows_per_second, ",.0f")),
        ("output", str(report.output)),
    ]
    return rows
