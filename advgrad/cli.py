"""The ``advgrad`` command line: thin Typer commands over the library.

Heavy imports (numba, h5py, the kernels) happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from advgrad.errors import printable

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


CompressionOption = Annotated[
    Compression,
    typer.Option(
        help="Compression of the output datasets: gzip (standard deflate, which any HDF5 "
        "reads; compressed on every core) or lzf (faster to write, but only readable where "
        "h5py's lzf filter is installed).",
    ),
]
ModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="Model file (.h5, advgrad model format). Default: the bundled digits network.",
        show_default=False,
    ),
]
DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Dataset file (.h5 with /X and optional /y). Default: the bundled digits test set.",
        show_default=False,
    ),
]


def _literal(value: object) -> Text:
    """``value`` as rich text shown as it is: control characters escaped, so that it stays on
    one line and cannot drive the terminal, and brackets not read as markup. Every string
    that came from a file or a path goes through here (or :func:`_markup_literal`)."""
    return Text(printable(value))


def _markup_literal(value: object) -> str:
    """``value`` escaped like :func:`_literal`, for splicing into a markup string."""
    return escape(printable(value))


@contextmanager
def _reported_errors():
    """Print expected failures (bad input, bad files, I/O) as one line and exit 1."""
    from advgrad.errors import AdvgradError

    try:
        yield
    except (AdvgradError, ValueError, OSError) as error:
        errors.print(
            f"[bold red]advgrad: error:[/] {_markup_literal(error)}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        errors.print(
            "[bold red]advgrad: interrupted[/]; no complete output was written "
            "(an interrupted attack keeps its last checkpoint: run it again to resume)",
            soft_wrap=True,
        )
        raise typer.Exit(130) from None


@contextmanager
def _stop_on_signals():
    """Yield an event that SIGINT (Ctrl-C) and SIGTERM set: a file-level job then stops after
    the block in progress, keeping its partial output, and the command exits 128 + the
    signal's number. A second signal stops at once (the last checkpoint is kept)."""
    import signal
    import threading

    from advgrad.batch import Interrupted

    stop = threading.Event()
    received: list[int] = []

    def handle(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()
        errors.print(
            "advgrad: stopping after the block in progress (Ctrl-C again stops at once)",
            highlight=False,
            soft_wrap=True,
        )

    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, handle) for signum in watched}
    try:
        yield stop
    except Interrupted as interruption:
        errors.print(
            f"[bold red]advgrad: interrupted:[/] {_markup_literal(interruption)}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(128 + received[0]) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _defaults(model: Path | None, data: Path | None) -> tuple[Path, Path]:
    from advgrad.bundled import MODEL, TEST_DATA, bundled_path

    return model or bundled_path(MODEL), data or bundled_path(TEST_DATA)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _number(value: float | None, spec: str = ".4g") -> str:
    """``value`` formatted by ``spec``, or "-" where it is undefined (no rows)."""
    return "-" if value is None else format(value, spec)


class Method(StrEnum):
    fgsm = "fgsm"
    bim = "bim"
    pgd = "pgd"
    mifgsm = "mifgsm"
    deepfool = "deepfool"


NormOption = Annotated[
    Norm,
    typer.Option(
        help="Norm of the perturbation: inf (FGSM: eps * sign(G)), 2 (eps * G/||G||_2) or 1 "
        "(eps * G/||G||_1); projections use the same norm. DeepFool: inf or 2.",
    ),
]
StepsOption = Annotated[int, typer.Option(min=1, help="Iterations of bim, pgd and mifgsm.")]
StepSizeOption = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        help="Step length of the iterative methods. Default: 2.5 eps/steps for pgd, "
        "eps/steps for bim and mifgsm.",
        show_default=False,
    ),
]
RestartsOption = Annotated[
    int, typer.Option(min=1, help="pgd: random starts; each row keeps its worst case.")
]
DecayOption = Annotated[float, typer.Option(min=0.0, help="mifgsm: momentum decay mu.")]
OvershootOption = Annotated[float, typer.Option(min=0.0, help="deepfool: overshoot.")]
MaxIterOption = Annotated[int, typer.Option(min=1, help="deepfool: iteration limit.")]
SeedOption = Annotated[
    int, typer.Option(help="Seeds every random choice (pgd starts, random targets).")
]
ClipMinOption = Annotated[
    float | None,
    typer.Option(
        help="Lower clip of the perturbed inputs. Default: the dataset's x_min attribute, "
        "else the model's, else none.",
        show_default=False,
    ),
]
ClipMaxOption = Annotated[
    float | None, typer.Option(help="Upper clip; default like --clip-min.", show_default=False)
]
BatchSizeOption = Annotated[
    int,
    typer.Option(
        min=1,
        help="Rows read, attacked and written per block (rounded up to a multiple of 256, "
        "so that every batch size gives bitwise the same output).",
    ),
]


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


DeviceOption = Annotated[
    Device,
    typer.Option(
        help="cpu; cuda (an NVIDIA GPU, needs the cuda extra: fails with one line without "
        "one); auto (cuda when usable, else cpu).",
    ),
]
AllowNonfiniteOption = Annotated[
    bool,
    typer.Option(
        "--allow-nonfinite",
        help="Accept NaN and inf in the dataset's /X (never in weights or labels).",
    ),
]


MaxWeightsOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Most elements in one weight matrix of a model (d*H for W1, H*C for W2); a larger "
        "model is refused before anything is allocated. Default: 2**27 (512 MiB of float32).",
        show_default=False,
    ),
]
OverwriteOption = Annotated[
    bool, typer.Option(help="Replace an existing output file (never an input).")
]


def _weights_limit(max_weights: int | None) -> int:
    from advgrad.model import MAX_WEIGHTS

    return MAX_WEIGHTS if max_weights is None else max_weights


def _clip(clip_min: float | None, clip_max: float | None) -> tuple[float, float] | None:
    if (clip_min is None) != (clip_max is None):
        errors.print(
            "[bold red]advgrad: error:[/] give both --clip-min and --clip-max, or neither",
            soft_wrap=True,
        )
        raise typer.Exit(2)
    return None if clip_min is None else (clip_min, clip_max)


def _parse_target(target: str | None) -> int | str | None:
    if target is None or target in ("random", "least-likely"):
        return target
    try:
        return int(target)
    except ValueError:
        raise ValueError(
            f"--target must be a class index, 'random' or 'least-likely', got {target!r}"
        ) from None


def _progress_bar(description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        f"[progress.description]{description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=errors,
        transient=True,
        disable=not errors.is_terminal,
    )


def _summary_table(title: str, rows) -> Table:
    table = Table(title=_literal(title), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in rows:
        table.add_row(_literal(name), _literal(value))
    return table


def _quartiles(values) -> str:
    import numpy as np

    from advgrad.attacks import quartiles

    if (spread := quartiles(values)) is None:
        return "-"
    q25, median, q75 = spread
    found = np.isfinite(values).mean()
    return f"median {median:.4g} (quartiles {q25:.4g}, {q75:.4g}); found for {100 * found:.1f} %"


@app.command()
def attack(
    model: ModelOption = None,
    data: DataOption = None,
    out: Annotated[
        str | None,
        typer.Option(
            help="Output file. With several --eps, a name containing {eps}, e.g. "
            "adv-{eps}.h5. Default: <data name>-<method>-l<norm>-eps<eps>.h5 in the current "
            "directory.",
            show_default=False,
        ),
    ] = None,
    method: Annotated[
        Method,
        typer.Option(
            help="fgsm: one fast-gradient step (FGM in the chosen norm); bim: iterated from "
            "X; pgd: iterated from random starts in the ball; mifgsm: with momentum; "
            "deepfool: nearest linearised class boundary (untargeted, no eps).",
        ),
    ] = Method.fgsm,
    eps: Annotated[
        list[float] | None,
        typer.Option(
            min=0.0,
            help="Radius of the perturbation, in input units. Repeat it (--eps 0.05 --eps 0.1) "
            "to write one output per eps in one pass over the data. Default: 0.1.",
            show_default=False,
        ),
    ] = None,
    norm: NormOption = Norm.inf,
    steps: StepsOption = 10,
    step_size: StepSizeOption = None,
    restarts: RestartsOption = 1,
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
            help="Upper end of the --min-eps search. Default: x_max - x_min.",
            show_default=False,
        ),
    ] = None,
    clip_min: ClipMinOption = None,
    clip_max: ClipMaxOption = None,
    batch_size: BatchSizeOption = 8192,
    compression: CompressionOption = Compression.none,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing output file (never an input).")
    ] = False,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--restart",
            help="An interrupted run leaves a partial output (.<out>.partial.h5); running the "
            "same command again resumes it. --resume insists on resuming; --restart "
            "discards it and starts afresh.",
            show_default=False,
        ),
    ] = None,
    device: DeviceOption = Device.cpu,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Address of a Dask scheduler (tcp://host:8786): attack the blocks on its "
            "workers; this process reads and writes. Needs the dask extra.",
            show_default=False,
        ),
    ] = None,
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
    clip = _clip(clip_min, clip_max)
    radii = eps or [0.1]
    with _reported_errors(), _stop_on_signals() as stop:
        from advgrad.attacks import Attack
        from advgrad.batch import attack_files, default_output_name

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
                target=_parse_target(target),
                seed=seed,
            )
            for radius in dict.fromkeys(radii)
        ]
        if method is Method.deepfool:
            configs = configs[:1]
        model_path, data_path = _defaults(model, data)
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
        with _progress_bar("attacking rows") as bar:
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
                compression=None if compression is Compression.none else compression.value,
                overwrite=overwrite,
                device=device.value,
                allow_nonfinite=allow_nonfinite,
                max_weights=_weights_limit(max_weights),
                resume=resume,
                scheduler=scheduler,
                stop=stop,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                notice=lambda message: errors.print(
                    f"advgrad: {_markup_literal(message)}", highlight=False, soft_wrap=True
                ),
            )
    config = reports[0].attack
    title = f"{config.method} attack, L{config.norm}"
    if len(reports) == 1:
        console.print(_summary_table(title, _attack_report_rows(reports[0])))
        return
    table = Table(title=_literal(title), title_justify="left")
    columns = [dict(_attack_report_rows(report)) for report in reports]
    table.add_column(style="bold", no_wrap=True)
    for column in columns:
        table.add_column(f"eps {column.pop('eps')}", justify="right", overflow="fold")
    for name in columns[0]:
        table.add_row(name, *(_literal(column[name]) for column in columns))
    console.print(table)


def _attack_report_rows(report) -> list[tuple[str, str]]:
    config = report.attack
    rows = [("rows", f"{report.n_rows}")]
    if config.method != "deepfool":
        rows.append(("eps", f"{config.eps:g}"))
    rows += [
        ("labels attacked", report.labels),
        ("target", "none" if config.target is None else str(config.target)),
        ("clip range", f"[{report.clip[0]:g}, {report.clip[1]:g}]"),
        ("clean accuracy", _percent(report.clean_accuracy)),
        ("adversarial accuracy", _percent(report.adversarial_accuracy)),
        ("attack success rate", _percent(report.success_rate)),
        ("mean L-inf perturbation", _number(report.mean_linf)),
        ("mean L2 perturbation", _number(report.mean_l2)),
    ]
    if report.eps_min is not None:
        rows.append(("minimal eps", _quartiles(report.eps_min)))
    if report.resumed_rows:
        rows.append(("resumed after row", f"{report.resumed_rows}"))
    rows += [
        ("rows per second", _number(report.rows_per_second, ",.0f")),
        ("output", str(report.output)),
    ]
    return rows


@app.command()
def evaluate(
    model: ModelOption = None,
    data: DataOption = None,
    eps: Annotated[
        str, typer.Option(help="Comma-separated eps values.")
    ] = "0,0.05,0.1,0.15,0.2,0.25",
    method: Annotated[
        str, typer.Option(help="Comma-separated methods: fgsm, bim, pgd, mifgsm, deepfool.")
    ] = "fgsm,pgd",
    norm: NormOption = Norm.inf,
    steps: StepsOption = 10,
    step_size: StepSizeOption = None,
    restarts: RestartsOption = 1,
    decay: DecayOption = 1.0,
    overshoot: OvershootOption = 0.02,
    max_iter: MaxIterOption = 50,
    seed: SeedOption = 0,
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
    max_weights: MaxWeightsOption = None,
) -> None:
    """Accuracy under attack per method and eps, and each method's minimal-eps summary.

    With no --model/--data it evaluates the bundled digits network on its test set. The
    dataset needs labels (/y). "wrong conf." is the mean probability the model gives its
    wrong predictions. --json and --plot appear only once complete, and never replace an
    input.
    """
    clip = _clip(clip_min, clip_max)
    with _reported_errors(), ExitStack() as side_outputs:
        from advgrad.attacks import Attack
        from advgrad.evaluate import evaluate_file, plot_curves, require_matplotlib
        from advgrad.io import atomic_output, same_file

        if plot is not None:
            require_matplotlib()
        try:
            eps_values = [float(value) for value in eps.split(",") if value.strip()]
        except ValueError:
            raise ValueError(f"--eps must be comma-separated numbers, got {eps!r}") from None
        if not eps_values or min(eps_values) < 0:
            raise ValueError("--eps needs at least one value, all >= 0")
        methods = [name.strip() for name in method.split(",") if name.strip()]
        config = Attack(
            methods[0] if methods else "",
            norm=norm.value,
            steps=steps,
            step_size=step_size,
            restarts=restarts,
            decay=decay,
            overshoot=overshoot,
            max_iter=max_iter,
            seed=seed,
        )
        for name in methods[1:]:
            Attack(name, norm=norm.value)
        model_path, data_path = _defaults(model, data)
        if json_path is not None and plot is not None and same_file(json_path, plot):
            raise ValueError("--json and --plot name the same file; give two paths")
        temporary = {
            path: side_outputs.enter_context(
                atomic_output(path, overwrite=overwrite, inputs=(model_path, data_path))
            )
            for path in (json_path, plot)
            if path is not None
        }
        with _progress_bar("evaluating rows") as bar:
            task = bar.add_task("", total=None)
            result = evaluate_file(
                model_path,
                data_path,
                methods=methods,
                eps_values=eps_values,
                attack=config,
                use_labels=labels,
                min_eps_tolerance=min_eps or None,
                clip=clip,
                batch_size=batch_size,
                device=device.value,
                max_weights=_weights_limit(max_weights),
                progress=lambda done: bar.update(task, completed=done),
            )
        if json_path is not None:
            temporary[json_path].write_text(result.to_json())
        if plot is not None:
            plot_curves(result, temporary[plot])
    table = Table(
        title=f"Accuracy under attack, L{result.norm}, {result.n_rows} rows "
        f"(clean {_percent(result.clean_accuracy)})",
        title_justify="left",
    )
    table.add_column("method", style="bold")
    for value in sorted(set(eps_values)):
        table.add_column(f"eps {value:g}", justify="right")
    for name in methods:
        cells = []
        for point in (p for p in result.points if p.method == name):
            confidence = (
                ""
                if point.wrong_confidence is None
                else (f" ({100 * point.wrong_confidence:.0f} %)")
            )
            cells.append(f"{_percent(point.accuracy)}{confidence}")
        table.add_row(_literal(name), *map(_literal, cells))
    table.caption = "accuracy (mean confidence of the wrong predictions)"
    console.print(table)
    if result.minimal_eps:
        summary = Table(title="Minimal eps per row", title_justify="left")
        for column in ("method", "q25", "median", "q75", "found"):
            summary.add_column(column, justify="right")
        for item in result.minimal_eps:
            summary.add_row(
                _literal(item.method),
                _number(item.q25),
                _number(item.median),
                _number(item.q75),
                f"{_percent(item.found)} (eps <= {item.eps_max:g})",
            )
        console.print(summary)
    for path in (json_path, plot):
        if path is not None:
            console.print(f"wrote {_markup_literal(path)}")


@app.command()
def certify(
    model: ModelOption = None,
    data: DataOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output file. Default: <data name>-certify-l<norm>.h5 in the current directory.",
            show_default=False,
        ),
    ] = None,
    eps: Annotated[str, typer.Option(help="Comma-separated eps values.")] = "0.01,0.02,0.05,0.1",
    norm: NormOption = Norm.inf,
    method: Annotated[
        str,
        typer.Option(
            help="crown: linear relaxation of the sigmoids (never looser than ibp); ibp: "
            "interval bounds."
        ),
    ] = "crown",
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
            help="Top of the radius search. Default: the whole clip box (x_max - x_min, "
            "times sqrt(d) for L2).",
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
    max_weights: MaxWeightsOption = None,
) -> None:
    """Certified accuracy per eps next to PGD's empirical robust accuracy, and per-row radii.

    A row is certified at eps when bounds prove that every input within eps (in the clip
    box) keeps its label. Each row's certified radius is bracketed from above by the
    smallest eps at which PGD (with restarts) finds an adversarial example. The output
    holds /radius and /attack_eps per row, and /X: the PGD examples at the largest eps.
    """
    clip = _clip(clip_min, clip_max)
    with _reported_errors():
        from advgrad.attacks import Attack
        from advgrad.certify import certify_file, default_output_name

        try:
            eps_values = [float(value) for value in eps.split(",") if value.strip()]
        except ValueError:
            raise ValueError(f"--eps must be comma-separated numbers, got {eps!r}") from None
        if not eps_values or min(eps_values) < 0:
            raise ValueError("--eps needs at least one value, all >= 0")
        model_path, data_path = _defaults(model, data)
        out_path = out or default_output_name(data_path, norm.value)
        with _progress_bar("certifying rows") as bar:
            task = bar.add_task("", total=None)
            result = certify_file(
                model_path,
                data_path,
                out_path,
                norm=norm.value,
                eps_values=eps_values,
                method=method,
                tolerance=tolerance,
                clip=clip,
                eps_max=eps_max,
                attack=Attack("pgd", steps=steps, restarts=restarts, seed=seed),
                use_labels=labels,
                batch_size=batch_size,
                overwrite=overwrite,
                max_weights=_weights_limit(max_weights),
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    table = Table(
        title=f"Certified vs empirical robust accuracy, L{result.norm}, {result.n_rows} rows "
        f"(clean {_percent(result.clean_accuracy)})",
        title_justify="left",
    )
    table.add_column("eps", justify="right")
    table.add_column(f"certified ({result.method})", justify="right")
    table.add_column(f"pgd, {restarts} restarts", justify="right")
    for value, certified, robust in zip(
        result.eps_values, result.certified_accuracy, result.robust_accuracy, strict=True
    ):
        table.add_row(f"{value:g}", _percent(certified), _percent(robust))
    console.print(table)
    bracket = result.bracket()
    milliseconds = None if result.seconds_per_row is None else 1e3 * result.seconds_per_row
    rows = []
    if bracket is not None:
        rows += [
            ("median certified radius", f"{bracket.median_lower:.4g}"),
            ("median adversarial eps", f"{bracket.median_upper:.4g}"),
            ("median gap", f"{bracket.median_gap:.4g}"),
            ("adversarial eps found", f"{_percent(bracket.found)} (eps <= {result.eps_max:g})"),
        ]
    rows += [
        ("labels certified", result.label_source),
        ("clip range", f"[{result.clip[0]:g}, {result.clip[1]:g}]"),
        ("certification time", f"{_number(milliseconds, '.3g')} ms per row"),
        ("output", str(result.output)),
    ]
    console.print(_summary_table("Per-row bracket [certified radius, adversarial eps]", rows))
    if result.contradictions:
        errors.print(
            f"[bold red]advgrad: warning:[/] {result.contradictions} rows were certified at an "
            "eps where the attack succeeded; please report this",
            soft_wrap=True,
        )


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="A model or dataset file (.h5).")],
    allow_nonfinite: AllowNonfiniteOption = False,
    max_weights: MaxWeightsOption = None,
) -> None:
    """Show what a model or dataset file holds, and whether advgrad accepts it.

    Every value of a dataset is read (in blocks) to check it; exit code 1 if the file is
    refused, with the reason.
    """
    with _reported_errors():
        from advgrad.io import describe_file

        description = describe_file(
            path, allow_nonfinite=allow_nonfinite, max_weights=_weights_limit(max_weights)
        )
    table = Table(
        title=_literal(f"{path} ({description.kind})"), show_header=False, title_justify="left"
    )
    table.add_column(style="bold")
    table.add_column()
    for name, value in description.items:
        table.add_row(_literal(name), _literal(value))
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
    max_weights: MaxWeightsOption = None,
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
        network = load_model(model_path, max_weights=_weights_limit(max_weights))
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


class Optimizer(StrEnum):
    adam = "adam"
    sgd = "sgd"


class AdversarialMethod(StrEnum):
    fgsm = "fgsm"
    pgd = "pgd"


class Precision(StrEnum):
    float32 = "float32"
    float64 = "float64"


@app.command()
def train(
    data: Annotated[
        Path | None,
        typer.Option(
            help="Labelled training set (.h5 with /X and /y). Default: the bundled digits "
            "training set.",
            show_default=False,
        ),
    ] = None,
    test: Annotated[
        Path | None,
        typer.Option(
            help="Labelled test set, scored after training. Default: the bundled digits test "
            "set when --data is not given, else none.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output model file.")] = Path("model.h5"),
    hidden: Annotated[int, typer.Option(min=1, help="Hidden units H.")] = 64,
    epochs: Annotated[int, typer.Option(min=1, help="Most passes over the data.")] = 300,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per mini-batch.")] = 32,
    lr: Annotated[
        float | None,
        typer.Option(
            min=0.0, help="Learning rate. Default: 0.01 for adam, 0.1 for sgd.", show_default=False
        ),
    ] = None,
    optimizer: Annotated[Optimizer, typer.Option(help="adam, or sgd with momentum.")] = (
        Optimizer.adam
    ),
    momentum: Annotated[float, typer.Option(min=0.0, max=0.999, help="sgd: momentum.")] = 0.9,
    weight_decay: Annotated[
        float, typer.Option(min=0.0, help="L2 penalty on W1 and W2: weight_decay/2 ||W||^2.")
    ] = 1e-4,
    seed: Annotated[
        int, typer.Option(help="Seeds the weights, the validation split, the batch order.")
    ] = 0,
    validation: Annotated[
        float,
        typer.Option(
            min=0.0, max=0.99, help="Share of rows held out for early stopping (0: none)."
        ),
    ] = 0.1,
    patience: Annotated[
        int,
        typer.Option(min=1, help="Stop after this many epochs without a lower validation loss."),
    ] = 30,
    adv_eps: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Adversarial training: L-inf radius of the adversarial rows (0: plain training).",
        ),
    ] = 0.0,
    adv_alpha: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Weight alpha of the clean loss: alpha J(x, y) + (1 - alpha) J(x_adv, y).",
        ),
    ] = 0.5,
    adv_method: Annotated[
        AdversarialMethod,
        typer.Option(help="fgsm (Goodfellow et al.) or pgd (Madry et al.) adversarial rows."),
    ] = AdversarialMethod.fgsm,
    adv_steps: Annotated[int, typer.Option(min=1, help="pgd: steps per batch.")] = 10,
    dtype: Annotated[Precision, typer.Option(help="Compute dtype.")] = Precision.float32,
    overwrite: OverwriteOption = False,
    max_weights: MaxWeightsOption = None,
) -> None:
    """Train a two-layer sigmoid network and write the model file.

    Mini-batches with Adam (or SGD with momentum), early stopping on a validation split,
    optional adversarial training (--adv-eps). With no --data it trains on the bundled digits
    training set and scores the bundled test set. The model file records the data's hash, the
    hyper-parameters and the final metrics.
    """
    with _reported_errors():
        from advgrad.bundled import TRAIN_DATA, bundled_path
        from advgrad.train import TrainConfig, train_file

        config = TrainConfig(
            hidden=hidden,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer.value,
            momentum=momentum,
            weight_decay=weight_decay,
            seed=seed,
            validation_fraction=validation,
            patience=patience,
            adv_eps=adv_eps,
            adv_alpha=adv_alpha,
            adv_method=adv_method.value,
            adv_steps=adv_steps,
            dtype=dtype.value,
        )
        test_path = test if data is not None else _defaults(None, test)[1]
        columns = "loss {task.fields[loss]}, accuracy {task.fields[accuracy]}"
        with _progress_bar(f"training epochs: {columns}") as bar:
            task = bar.add_task("", total=epochs, loss="-", accuracy="-")

            def progress(stats) -> None:
                loss, accuracy = stats.train_loss, stats.train_accuracy
                if stats.validation_loss is not None:
                    loss, accuracy = stats.validation_loss, stats.validation_accuracy
                bar.update(
                    task, completed=stats.epoch, loss=f"{loss:.4f}", accuracy=_percent(accuracy)
                )

            report = train_file(
                data or bundled_path(TRAIN_DATA),
                out,
                config,
                test_path=test_path,
                overwrite=overwrite,
                max_weights=_weights_limit(max_weights),
                progress=progress,
            )
    result = report.result
    final = result.history[result.best_epoch - 1]
    split = result.model.metadata
    rows = [
        (
            "rows",
            f"{report.n_rows} ({split['training_rows']} training, "
            f"{split['validation_rows']} validation)",
        ),
        ("epochs", f"{len(result.history)} (best {result.best_epoch})"),
        ("training loss, accuracy", f"{final.train_loss:.4f}, {_percent(final.train_accuracy)}"),
    ]
    if final.validation_loss is not None:
        rows.append(
            (
                "validation loss, accuracy",
                f"{final.validation_loss:.4f}, {_percent(final.validation_accuracy)}",
            )
        )
    if report.test_accuracy is not None:
        rows.append((f"test accuracy ({report.test_rows} rows)", _percent(report.test_accuracy)))
    if config.adversarial:
        rows.append(
            ("adversarial training", f"{adv_method.value}, eps {adv_eps:g}, alpha {adv_alpha:g}")
        )
    rows += [("seconds", f"{result.seconds:.1f}"), ("output", str(report.output))]
    console.print(_summary_table(f"Training, {config.optimizer}, H = {hidden}", rows))


@app.command("convert-model")
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
    with _reported_errors():
        from advgrad.io import convert_model as convert

        model = convert(
            source, target, overwrite=overwrite, max_weights=_weights_limit(max_weights)
        )
    rows = [
        ("network", f"d = {model.n_inputs}, H = {model.n_hidden}, C = {model.n_classes}"),
        ("dtype", str(model.dtype)),
        ("output", str(target)),
    ]
    console.print(_summary_table(f"Converted {source.name}", rows))


@app.command("convert-data")
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
            help="x_max attribute. Default: 255/scale for uint8 data, else none.",
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
    x_range = _clip(x_min, x_max)
    with _reported_errors():
        from advgrad.io import convert_dataset

        column = label_column
        if column is not None and column.lstrip("-").isdigit():
            column = int(column)
        with _progress_bar("converting rows") as bar:
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
                compression=None if compression is Compression.none else compression.value,
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
    console.print(_summary_table(f"Converted {source.name}", rows))
