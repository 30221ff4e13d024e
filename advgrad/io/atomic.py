"""Crash-safe creation of files: a new file is written beside its target, fsynced, renamed
onto the target (``Path.replace``) and the directory fsynced, so a crash leaves the target as it
was, plus at most one hidden ``.<name>.partial-<16 hex digits>`` file. HDF5 files go through
:class:`PartialFile` (which can also be kept and resumed) or :func:`atomic_h5`; other files
through :func:`atomic_file`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

import h5py

from advgrad.errors import InputFileError
from advgrad.io.paths import atomic_output, check_output, fsync_directory, temporary_path
from advgrad.io.safe import error_reason


class PartialFile:
    """An HDF5 file ``temp`` beside ``target``, renamed onto it by :meth:`commit`.

    ``temp`` defaults to a new ``.<name>.partial-<16 hex digits>.h5``. The file is created
    exclusively (mode ``"x"``), so it never clobbers anything, unless ``existing``, which opens
    ``temp`` read-write to go on with it. :meth:`discard` deletes it; :meth:`close` keeps it.
    A failure to write (a full disk) raises :class:`InputFileError`; every way out but
    :meth:`close` deletes the file, so a failure never leaves a file behind.
    """

    def __init__(self, target: Path, temp: Path | None = None, *, existing: bool = False) -> None:
        if target.is_dir():
            raise InputFileError(target, None, "is a directory")
        self.target = target
        self.temp = temp or temporary_path(target, ".h5")
        try:
            self.file = h5py.File(self.temp, "r+" if existing else "x", rdcc_nbytes=0)
        except (OSError, RuntimeError) as exc:
            if not existing and not isinstance(exc, FileExistsError):
                with suppress(OSError):  # HDF5 may fail after creating the file
                    self.temp.unlink()
            raise InputFileError(
                target, None, f"cannot create {self.temp.name}: {error_reason(exc)}"
            ) from exc

    def failure(self, exc: BaseException) -> InputFileError:
        """``exc``, raised while writing the file, as an InputFileError naming the target."""
        return InputFileError(
            self.target, None, f"cannot write: {error_reason(exc)} (writing {self.temp.name})"
        )

    @contextmanager
    def writing(self) -> Iterator[h5py.File]:
        """Run the block's writes to the file; when it raises, delete the file (and raise an
        OSError or RuntimeError from HDF5, such as a full disk, as :meth:`failure`)."""
        try:
            yield self.file
        except BaseException as exc:
            self.discard()
            if isinstance(exc, OSError | RuntimeError):
                raise self.failure(exc) from exc
            raise

    def sync(self) -> None:
        """Flush HDF5's buffers and fsync the file: what was written survives a crash."""
        try:
            self.file.flush()
            with self.temp.open("rb") as handle:
                os.fsync(handle.fileno())
        except (OSError, RuntimeError) as exc:
            raise self.failure(exc) from exc

    def commit(self, *, overwrite: bool, inputs: Sequence[str | os.PathLike | None] = ()) -> None:
        """Close, fsync, check the target again (``check_output``), rename onto it, fsync the
        directory. On any failure the file is deleted."""
        try:
            self.file.close()
            with self.temp.open("rb") as handle:
                os.fsync(handle.fileno())
            check_output(self.target, overwrite=overwrite, inputs=inputs)
            self.temp.replace(self.target)
        except BaseException as exc:
            self.discard()
            if isinstance(exc, OSError | RuntimeError):
                raise self.failure(exc) from exc
            raise
        fsync_directory(self.target.parent)

    def close(self) -> None:
        """Close the file and keep it."""
        try:
            self.file.close()
        except (OSError, RuntimeError) as exc:
            raise self.failure(exc) from exc

    def discard(self) -> None:
        """Close and delete the temporary file; the target is untouched."""
        try:
            # The file is deleted: what HDF5 could not write to it no longer matters.
            with suppress(OSError, RuntimeError):
                self.file.close()
        finally:
            self.temp.unlink(missing_ok=True)


@contextmanager
def atomic_h5(
    target: str | os.PathLike,
    *,
    overwrite: bool = True,
    inputs: Sequence[str | os.PathLike | None] = (),
) -> Iterator[h5py.File]:
    """A new HDF5 file beside ``target``, renamed onto it when the block ends normally,
    deleted when anything fails.

    ``target`` is refused up front (and again before the rename) when it is a directory, one
    of ``inputs`` (by identity), or exists without ``overwrite``.
    """
    target = Path(target)
    check_output(target, overwrite=overwrite, inputs=inputs)
    partial = PartialFile(target)
    with partial.writing() as f:
        yield f
    partial.commit(overwrite=overwrite, inputs=inputs)


@contextmanager
def atomic_file(
    target: Path, *, overwrite: bool, inputs: tuple[str | os.PathLike | None, ...] = ()
) -> Iterator[IO[bytes]]:
    """A new file beside ``target`` (``advgrad.io.paths.atomic_output``), open for writing,
    renamed onto ``target`` when the block ends normally, deleted when anything fails."""
    with (
        atomic_output(target, overwrite=overwrite, inputs=inputs) as temp,
        temp.open("xb") as handle,
    ):
        yield handle
