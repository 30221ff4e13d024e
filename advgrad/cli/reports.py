"""What the commands print: the consoles, escaping, errors, signals, progress and summaries.

Every string that came from a file or a path is shown through :func:`literal` (or
:func:`markup_literal`), so that it stays on one line and cannot drive the terminal.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from threading import Event, Lock, Thread
from typing import NoReturn

import typer

from advgrad.errors import printable


@cache
def console():
    """The rich console of the results (stdout); rich loads on first use, not with the CLI."""
    from rich.console import Console

    return Console()


@cache
def errors():
    """The rich console of errors, notices and progress (stderr)."""
    from rich.console import Console

    return Console(stderr=True)


def literal(value: object):
    """``value`` as rich text shown as it is: control characters escaped, so that it stays on
    one line and cannot drive the terminal, and brackets not read as markup."""
    from rich.text import Text

    return Text(printable(value))


def markup_literal(value: object) -> str:
    """``value`` escaped like :func:`literal`, for splicing into a markup string."""
    from rich.markup import escape

    return escape(printable(value))


def warn(message: str) -> None:
    """Print ``message`` (markup) as one ``advgrad: warning:`` line on stderr."""
    errors().print(f"[bold red]advgrad: warning:[/] {message}", soft_wrap=True)


INTERRUPT_GRACE_S = 1.0
"""How long the KeyboardInterrupt of a second Ctrl-C has to unwind (closing the outputs)
before the command exits regardless: a native library can swallow an exception raised in
one of its callbacks (llvmlite's, while Numba compiles a kernel), or turn it into another."""

_second_signal = Event()
_exiting = Lock()


def exit_interrupted() -> NoReturn:
    """Print that the command was interrupted and exit 130 at once, skipping interpreter
    shutdown (it can crash in native thread pools, numba's or BLAS's, after an interrupt
    between two kernel slices). Whichever thread comes first prints; the other waits."""
    _exiting.acquire()
    errors().print(
        "[bold red]advgrad: interrupted[/]; no complete output was written "
        "(an interrupted attack keeps its last checkpoint: run it again to resume)",
        soft_wrap=True,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Print expected failures (bad input, bad files, I/O) as one line and exit 1; after a
    second Ctrl-C, whatever is raised, exit 130 (``exit_interrupted``)."""
    from advgrad.errors import AdvgradError

    try:
        yield
    except KeyboardInterrupt:
        exit_interrupted()  # every output was closed, its checkpoint kept, while it unwound
    except BaseException as error:
        if _second_signal.is_set():
            exit_interrupted()
        if not isinstance(error, (AdvgradError, ValueError, OSError)):
            raise
        errors().print(
            f"[bold red]advgrad: error:[/] {markup_literal(error)}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


@cache
def _exit_after_second_signal() -> None:
    """Start the thread that exits ``INTERRUPT_GRACE_S`` after a second signal, should its
    KeyboardInterrupt not have ended the command by then."""

    def wait_then_exit() -> None:
        _second_signal.wait()
        time.sleep(INTERRUPT_GRACE_S)
        exit_interrupted()

    Thread(target=wait_then_exit, name="advgrad-second-signal", daemon=True).start()


@contextmanager
def stop_on_signals() -> Iterator[Event]:
    """Yield an event that SIGINT (Ctrl-C) and SIGTERM set: a file-level job then stops after
    the block in progress, keeping its partial output, and the command exits 128 + the
    signal's number. A second signal stops at once (the last checkpoint is kept): its
    KeyboardInterrupt unwinds, and should that not end the command within
    ``INTERRUPT_GRACE_S``, it exits regardless."""
    import signal

    from advgrad.jobs import Interrupted

    stop = Event()
    received: list[int] = []
    errors()  # rich loads now: a signal that lands during an import must not import it
    _exit_after_second_signal()

    def handle(signum, frame) -> None:
        if stop.is_set():
            _second_signal.set()
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()
        errors().print(
            "advgrad: stopping after the block in progress (Ctrl-C again stops at once)",
            highlight=False,
            soft_wrap=True,
        )

    def report_unraisable(unraisable) -> None:
        if not (_second_signal.is_set() and unraisable.exc_type is KeyboardInterrupt):
            previous_hook(unraisable)  # else it was lost in a callback: the command ends anyway

    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, handle) for signum in watched}
    previous_hook, sys.unraisablehook = sys.unraisablehook, report_unraisable
    try:
        yield stop
    except Interrupted as interruption:
        errors().print(
            f"[bold red]advgrad: interrupted:[/] {markup_literal(interruption)}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(128 + received[0]) from None
    finally:
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def notice(message: str) -> None:
    """Print a job's ``message`` (plain text, escaped) as one ``advgrad:`` line on stderr."""
    errors().print(f"advgrad: {markup_literal(message)}", highlight=False, soft_wrap=True)


def progress_bar(description: str):
    """A rich progress bar on stderr, shown only when stderr is a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        f"[progress.description]{description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=errors(),
        transient=True,
        disable=not errors().is_terminal,
    )


def summary_table(title: str, rows: Iterable[tuple[str, str]]):
    """A two-column table of ``(name, value)`` rows under ``title``, every cell escaped."""
    from rich.table import Table

    table = Table(title=literal(title), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in rows:
        table.add_row(literal(name), literal(value))
    return table


def percent(value: float | None) -> str:
    """``value`` (a fraction) as a percentage, or "-" where it is undefined (no rows)."""
    return "-" if value is None else f"{100 * value:.1f} %"


def number(value: float | None, spec: str = ".4g") -> str:
    """``value`` formatted by ``spec``, or "-" where it is undefined (no rows)."""
    return "-" if value is None else format(value, spec)


def quartiles(spread) -> str:
    """Median and quartiles of a per-row result (an ``advgrad.quantiles.Spread``), and the
    share of the rows where it is finite; "-" for None."""
    if spread is None:
        return "-"
    return (
        f"median {spread.median:.4g} (quartiles {spread.q25:.4g}, {spread.q75:.4g}); "
        f"found for {100 * spread.found:.1f} %"
    )
