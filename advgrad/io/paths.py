"""Output paths that never clobber an input (DESIGN.md section 4).

Every command checks every path it will write, rename or delete (its output, the partial
output, checkpoint and lock beside it, temporary files, side outputs such as ``--json``) against
every input file by identity, not by name: a hard link, a symlink, ``./x`` against ``x`` or an
input that happens to be named like a partial output all count as the same file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from advgrad.errors import InputFileError

StrPath = str | os.PathLike


def same_file(a: StrPath, b: StrPath) -> bool:
    """Whether ``a`` and ``b`` name the same file.

    When both exist, they are the same file exactly when their ``(st_dev, st_ino)`` are equal
    (symlinks followed, so hard links and symlinks count); otherwise when their resolved paths
    are equal.
    """
    try:
        stat_a, stat_b = Path(a).stat(), Path(b).stat()
    except (OSError, ValueError):
        return _resolved(a) == _resolved(b)
    return (stat_a.st_dev, stat_a.st_ino) == (stat_b.st_dev, stat_b.st_ino)


def _resolved(path: StrPath) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return str(Path(path).absolute())


def refuse_clobbering(
    target: StrPath, written: Iterable[StrPath], inputs: Iterable[StrPath | None]
) -> None:
    """Refuse an output whose writing would touch an input file.

    Parameters
    ----------
    target : str or os.PathLike
        The output, named in the error.
    written : iterable of path
        Every path the command will write, rename or delete for this output: the output
        itself, its partial file, checkpoint, lock and temporary files.
    inputs : iterable of path or None
        The command's input files; None entries are skipped.

    Raises
    ------
    InputFileError
        A path in ``written`` is the same file (:func:`same_file`) as an input.
    """
    inputs = [source for source in inputs if source is not None]
    for path in written:
        for source in inputs:
            if not same_file(path, source):
                continue
            if Path(path) == Path(target):
                reason = f"is the input file {source}; choose another output path"
            else:
                reason = (
                    f"writing it also writes {Path(path).name}, which is the input file "
                    f"{source}; choose another output path"
                )
            raise InputFileError(target, None, reason)


def fsync_directory(directory: StrPath) -> None:
    """fsync a directory, so a rename or unlink inside it survives a power loss."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def temporary_path(target: Path, suffix: str) -> Path:
    """A new hidden name ``.<name>.partial-<16 hex digits><suffix>`` beside ``target``."""
    return target.with_name(f".{target.name}.partial-{secrets.token_hex(8)}{suffix}")


def check_output(target: Path, *, overwrite: bool, inputs: Iterable[StrPath | None]) -> None:
    """Refuse ``target`` as an output: an input, existing without ``overwrite``, or a
    directory.

    Raises
    ------
    InputFileError
        With the reason.
    """
    refuse_clobbering(target, [target], inputs)
    if not overwrite and (target.exists() or target.is_symlink()):
        raise InputFileError(target, None, "exists; pass --overwrite")
    if target.is_dir():
        raise InputFileError(target, None, "is a directory")


@contextmanager
def atomic_output(
    target: StrPath, *, overwrite: bool, inputs: Iterable[StrPath | None] = ()
) -> Iterator[Path]:
    """A temporary path to write a side output (``--json``, ``--plot``) to, renamed onto
    ``target`` when the block ends normally.

    Up front, ``target`` is refused when it is a directory, an input (by identity), or exists
    without ``overwrite``. The block gets a new path ``.<name>.partial-<16 hex><suffix>``
    beside ``target`` (the same suffix, so a writer can infer the format from it); when the
    block ends normally the file is fsynced, the checks are made again, and it is renamed onto
    ``target`` and the directory fsynced. When the block raises, or anything after it fails, the
    temporary file is deleted: nothing is left behind either way.

    Parameters
    ----------
    target : str or os.PathLike
    overwrite : bool
        Replace an existing ``target``.
    inputs : iterable of path or None
        The command's input files; ``target`` may not be any of them, even with ``overwrite``.

    Yields
    ------
    pathlib.Path
        The temporary path; the block must create the file there.

    Raises
    ------
    InputFileError
        A refusal above, or the file cannot be written (an ``OSError`` inside the block too).
    """
    target = Path(target)
    inputs = list(inputs)
    check_output(target, overwrite=overwrite, inputs=inputs)
    temp = temporary_path(target, target.suffix)
    try:
        try:
            yield temp
            with temp.open("rb") as handle:
                os.fsync(handle.fileno())
            check_output(target, overwrite=overwrite, inputs=inputs)
            temp.replace(target)
            fsync_directory(target.parent)
        except OSError as exc:
            raise InputFileError(target, None, f"cannot write it: {_os_reason(exc)}") from exc
    finally:
        temp.unlink(missing_ok=True)


def _os_reason(exc: OSError) -> str:
    """An OSError's reason on one line, without the file name (the caller names the file)."""
    return " ".join(str(exc.strerror or exc).split())
