"""The options that several commands share: their types, choices and parsers, declared once.

Help texts are markdown (the app renders them so): literal text that markdown would read as
markup, such as ``<placeholders>`` or ``d*H``, goes in a code span.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from advgrad.cli.reports import errors

Value = TypeVar("Value")


class Norm(StrEnum):
    inf = "inf"
    l2 = "2"
    l1 = "1"


class Method(StrEnum):
    fgsm = "fgsm"
    bim = "bim"
    pgd = "pgd"
    mifgsm = "mifgsm"
    deepfool = "deepfool"
    apgd_ce = "apgd-ce"
    apgd_dlr = "apgd-dlr"
    apgd_t = "apgd-t"
    fab = "fab"
    fab_t = "fab-t"
    square = "square"
    autoattack = "autoattack"
    cw = "cw"


class Version(StrEnum):
    standard = "standard"
    plus = "plus"
    rand = "rand"


class Compression(StrEnum):
    none = "none"
    gzip = "gzip"
    lzf = "lzf"

    @property
    def codec(self) -> str | None:
        """The h5py compression filter, None for none."""
        return None if self is Compression.none else self.value


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class Precision(StrEnum):
    float32 = "float32"
    float64 = "float64"


def comma_separated(
    convert: Callable[[str], Value], default: tuple[Value, ...]
) -> Callable[[list[str] | None], list[Value]]:
    """The callback of a repeatable option whose values may also be comma-separated
    (``--eps 0.05 --eps 0.1`` or ``--eps 0.05,0.1``): each value through ``convert``, which
    raises :class:`typer.BadParameter`; ``default`` when the option is not given."""

    def parse(texts: list[str] | None) -> list[Value]:
        if texts is None:
            return list(default)
        items = [item.strip() for text in texts for item in text.split(",")]
        if not any(items):
            raise typer.BadParameter("no value given")
        return [convert(item) for item in items if item]

    return parse


def radius(text: str) -> float:
    """A radius typed by the user: a number >= 0 (finiteness is the library's to check)."""
    try:
        value = float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number") from None
    if value < 0:
        raise typer.BadParameter(f"{text} is negative; a radius is >= 0")
    return value


def choice(choices: type[StrEnum]) -> Callable[[str], StrEnum]:
    """The converter of one of ``choices``' values, refusing others by name."""

    def convert(text: str) -> StrEnum:
        try:
            return choices(text)
        except ValueError:
            names = ", ".join(repr(member.value) for member in choices)
            raise typer.BadParameter(f"{text!r} is not one of {names}.") from None

    return convert


def list_option(convert: Callable[[str], Value], default: tuple[Value, ...], **settings):
    """A repeatable option whose values may also be comma-separated; the command receives the
    list of ``convert``'s values (see :func:`comma_separated`). ``settings``: metavar, help."""
    return typer.Option(
        parser=str,  # each value reaches the callback as typed
        callback=comma_separated(convert, default),
        show_default=False,
        **settings,
    )


def eps_option(default: tuple[float, ...], several: str):
    """The ``--eps`` option of every command: one parser and one wording; ``several`` says
    what the command does with several radii."""
    return list_option(
        radius,
        default,
        metavar="EPS[,EPS...]",
        help="Radius of the perturbation, in input units. Several radii: repeat the option "
        "(`--eps 0.05 --eps 0.1`) or separate them with commas (`--eps 0.05,0.1`); "
        f"{several}. Default: {','.join(f'{value:g}' for value in default)}.",
    )


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
NormOption = Annotated[
    Norm,
    typer.Option(
        help="Norm of the perturbation: inf (FGSM: `eps * sign(G)`), 2 (`eps * G/||G||_2`) or "
        "1 (`eps * G/||G||_1`); projections use the same norm. DeepFool: inf or 2.",
    ),
]
StepsOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Iterations of bim, pgd and mifgsm (default 10), of apgd-*, fab, fab-t and "
        "autoattack's (default 100).",
        show_default=False,
    ),
]
StepSizeOption = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        help="Step length of the iterative methods. Default: `2.5 eps/steps` for pgd, "
        "`eps/steps` for bim and mifgsm.",
        show_default=False,
    ),
]
RestartsOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="pgd, apgd-*, fab, fab-t: runs from random starts; each row keeps its worst case. "
        "Default: 1; autoattack: its version's for its apgd-ce, apgd-dlr and fab (plus: 5).",
        show_default=False,
    ),
]
TargetClassesOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="apgd-t, fab-t (and autoattack's): the highest non-true classes attacked in "
        "turn (at most C - 1). Default: 9; autoattack in L1: 5 for its apgd-t.",
        show_default=False,
    ),
]
QueriesOption = Annotated[
    int, typer.Option(min=1, help="square (and autoattack's): queries of the model per row.")
]
ConfidenceOption = Annotated[
    float, typer.Option(min=0.0, help="cw: the margin kappa its examples must reach.")
]
SearchStepsOption = Annotated[
    int, typer.Option(min=1, help="cw: binary search steps over its constant c.")
]
L1CoordinatesOption = Annotated[
    int | None,
    typer.Option(
        "--l1-coordinates",
        min=1,
        help="--norm 1 with fgsm, bim, pgd, mifgsm: each step moves eps/q along sign(G) on "
        "the q coordinates of largest |G| (SLIDE). Default: for fgsm the fewest that take all "
        "of eps within the clip range, ceil(eps/(x_max-x_min)) (the steepest L1 step; 1 "
        "without a range), the top 1 % (ceil(d/100)) for the iterative methods.",
        show_default=False,
    ),
]
VersionOption = Annotated[
    Version,
    typer.Option(
        help="autoattack: standard (apgd-ce, apgd-t, fab-t, square; in L1 apgd-ce with 5 "
        "restarts and apgd-t against 5 classes, both from 3 eps down to eps), plus (apgd-ce, "
        "apgd-dlr, fab with 5 restarts each, square, apgd-t, fab-t; L-inf and L2) or rand "
        "(apgd-ce, apgd-dlr)."
    ),
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
CompressionOption = Annotated[
    Compression,
    typer.Option(
        help="Compression of the output datasets: gzip (standard deflate, which any HDF5 "
        "reads; compressed on every core) or lzf (faster to write, but only readable where "
        "h5py's lzf filter is installed).",
    ),
]
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
        help="Most elements in one weight matrix of a model (`d*H` for W1, `H*C` for W2); a "
        "larger model is refused before anything is allocated. Default: `2**27` (512 MiB of "
        "float32).",
        show_default=False,
    ),
]
OverwriteOption = Annotated[
    bool, typer.Option(help="Replace an existing output file (never an input).")
]

ResumeOption = Annotated[
    bool | None,
    typer.Option(
        "--resume/--restart",
        help="An interrupted run leaves a partial output (`.<out>.partial.h5`); running "
        "the same command again resumes it. --resume insists on resuming; --restart "
        "discards it and starts afresh.",
        show_default=False,
    ),
]
SchedulerOption = Annotated[
    str | None,
    typer.Option(
        help="Address of a Dask scheduler (`tcp://host:8786`): compute the blocks on its "
        "workers; this process reads and writes. Needs the dask extra.",
        show_default=False,
    ),
]


def value_range(
    low: float | None, high: float | None, options: tuple[str, str]
) -> tuple[float, float] | None:
    """``(low, high)``, or None when neither is given; refused (one line, exit 2) when only
    one is, naming the two ``options`` as the user typed them."""
    if (low is None) != (high is None):
        errors().print(
            f"[bold red]advgrad: error:[/] give both {options[0]} and {options[1]}, or neither",
            soft_wrap=True,
        )
        raise typer.Exit(2)
    return None if low is None else (low, high)


def clip_range(clip_min: float | None, clip_max: float | None) -> tuple[float, float] | None:
    """The clip range of ``--clip-min``/``--clip-max``; None: the files' default."""
    return value_range(clip_min, clip_max, ("--clip-min", "--clip-max"))


def model_and_data(model: Path | None, data: Path | None) -> tuple[Path, Path]:
    """``--model`` and ``--data``, the bundled digits network and test set where not given."""
    from advgrad.bundled import MODEL, TEST_DATA, bundled_path

    return model or bundled_path(MODEL), data or bundled_path(TEST_DATA)


def weights_limit(max_weights: int | None) -> int:
    """``--max-weights``, or the library's default bound."""
    from advgrad.model import MAX_WEIGHTS

    return MAX_WEIGHTS if max_weights is None else max_weights
