"""The crash-safe, resumable writer of a job's output (DESIGN.md sections 3 and 4):
:class:`AdversarialWriter` grows a locked partial file row block by row block, checkpoints it,
resumes an interrupted run of the same job, and renames the finished file onto its target.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import DTypeLike

from advgrad.errors import InputFileError
from advgrad.io.atomic import PartialFile
from advgrad.io.attrs import storable, write_attrs
from advgrad.io.checkpoint import (
    Checkpoint,
    OutputLock,
    block_crc,
    fingerprint,
    partial_path,
    written_paths,
)
from advgrad.io.chunks import (
    check_compression,
    check_rows_layout,
    chunk_encoder,
    create_rows,
    write_chunks,
)
from advgrad.io.datasets import COLUMN_BLOCK_ROWS, label_layout_problem
from advgrad.io.paths import check_output, refuse_clobbering
from advgrad.io.safe import checked_dataset, open_input, read_rows


class AdversarialWriter:
    """Crash-safe, resumable writer of an adversarial dataset (DESIGN.md sections 3 and 4).

    Rows go into ``.<name>.partial.h5`` beside ``target`` holding ``/X``, ``/y`` (when
    labelled), ``/pred_clean``, ``/pred_adv`` and the extra ``columns``, chunked by rows and
    grown as rows arrive, with the root attributes and ``complete = False``. While it is open
    the writer holds ``.<name>.lock``, so two jobs never write the same output.

    :meth:`checkpoint` makes the rows so far durable (flush, fsync, then an atomic
    ``.<name>.partial.json`` naming the job, the rows and a CRC-32 of each block).
    :meth:`close` (or leaving a ``with`` block normally) checks every row was written, sets
    ``complete = True``, fsyncs, renames the file onto ``target`` and fsyncs the directory.

    An interrupted writer keeps its partial output when it has a checkpoint (leaving the
    ``with`` block by any exception, or calling :meth:`suspend`); finished work is never
    deleted but by :meth:`discard` or a later writer with ``resume=False``. A later writer
    of the same job (same ``attrs`` except ``created``, same layout) resumes it: it
    re-checks each checkpointed block's CRC, drops anything written after the checkpoint,
    and starts at :attr:`rows_written` with the saved :attr:`resumed_state`. Rows written
    the same way give the same final datasets and attributes as an uninterrupted run.

    Parameters
    ----------
    target : str or os.PathLike
        Output file.
    n_rows : int
        N.
    row_shape : tuple of int or None
        Shape of one row of ``/X`` (the source's trailing shape). None: a table of the
        ``columns`` only (no ``/X``, labels or predictions), written by
        :meth:`write_columns`; a job keeps its per-row results there.
    dtype : float32 or float64
        dtype of ``/X`` (the source's).
    y_template : (tuple of int, dtype) or None
        ``shape[1:]`` and dtype of ``/y`` (e.g. ``DatasetReader.y_template``); None: no labels.
    attrs : mapping
        Root attributes (attack, norm, eps, ..., sha256 of inputs); None values are skipped.
        A value may be deferred (an ``advgrad.io.FileDigest``: it has ``result()`` and
        ``cancel()``): it is stored, and becomes part of the job's identity, at the first
        :meth:`checkpoint` or at :meth:`close`; a writer that may resume waits for it at
        once. A writer that stops early cancels it.
    rows_per_chunk : int
        Rows in one HDF5 chunk (capped so a chunk stays within ``MAX_CHUNK_BYTES``).
    compression : {None, "gzip", "lzf"}
    overwrite : bool
        Replace an existing ``target``.
    inputs : sequence of path or None
        Input files (None entries skipped): no path the writer writes or deletes
        (``target``, its partial output, checkpoint and lock) may be any of them, by identity
        (``advgrad.io.paths.refuse_clobbering``), even with ``overwrite``; this is checked
        before anything is locked, created or deleted.
    columns : mapping of name to dtype, optional
        Extra per-row datasets (N,), e.g. ``{"eps_min": "float64", "target": "int64"}``.
    resume : bool or None
        None: resume a partial output of this job when there is one, else start afresh.
        True: resume, and refuse when there is nothing to resume. False: delete any partial
        output and start afresh.

    Attributes
    ----------
    rows_written : int
        Rows in the output so far (the resumed rows included).
    resumed_rows : int
        Rows taken over from an interrupted run (0 when starting afresh).
    resumed_state : dict
        The ``state`` of the checkpoint resumed from ({} when starting afresh).
    notice : str or None
        Why a partial output found beside ``target`` was deleted instead of resumed.

    Raises
    ------
    InputFileError
        ``target`` exists (without ``overwrite``), is an input, is a directory, or cannot be
        created; another job holds the lock; a partial output of a different job is in the way
        (unless ``resume=False``); ``resume=True`` with nothing to resume.
    ValueError
        Bad shapes, dtypes or compression.
    """

    def __init__(
        self,
        target: str | os.PathLike,
        *,
        n_rows: int,
        row_shape: Sequence[int] | None,
        dtype: DTypeLike,
        y_template: tuple[Sequence[int], DTypeLike] | None,
        attrs: Mapping[str, Any],
        rows_per_chunk: int,
        compression: str | None = None,
        overwrite: bool = False,
        inputs: Sequence[str | os.PathLike | None] = (),
        columns: Mapping[str, DTypeLike] | None = None,
        resume: bool | None = None,
    ) -> None:
        check_compression(compression)
        self.target = Path(target)
        self.n_rows = int(n_rows)
        if rows_per_chunk < 1:
            raise ValueError(f"rows_per_chunk must be at least 1, got {rows_per_chunk}")
        layout = {}
        if row_shape is not None:
            self.row_shape = tuple(int(s) for s in row_shape)
            self.dtype = np.dtype(dtype)
            check_rows_layout("X", (self.n_rows, *self.row_shape), self.dtype)
            layout["X"] = (self.row_shape, self.dtype)
        elif y_template is not None:
            raise ValueError("a writer of columns only (row_shape None) takes no labels")
        if y_template is not None:
            y_tail, y_dtype = tuple(int(s) for s in y_template[0]), np.dtype(y_template[1])
            problem = label_layout_problem((self.n_rows, *y_tail), y_dtype, self.n_rows, None)
            if problem:
                raise ValueError(f"y_template {problem}")
            layout["y"] = (y_tail, y_dtype)
        if row_shape is not None:
            layout["pred_clean"] = layout["pred_adv"] = ((), np.dtype(np.int64))
        self._column_names = tuple(columns or {})
        for name, column_dtype in (columns or {}).items():
            layout[name] = ((), np.dtype(column_dtype))
        self._layout = layout
        self._inputs = tuple(inputs)
        refuse_clobbering(self.target, written_paths(self.target), self._inputs)
        check_output(self.target, overwrite=overwrite, inputs=self._inputs)
        self._overwrite = overwrite
        try:
            self._lock = OutputLock(self.target)
        except InputFileError as exc:
            if not self.target.parent.is_dir():
                raise InputFileError(target, None, f"cannot create it: {exc.reason}") from exc
            raise
        self._compression = compression
        self._deferred = {name: value for name, value in attrs.items() if _deferred(value)}
        try:
            if self._deferred and resume is not False and partial_path(self.target).exists():
                attrs = {**attrs, **self._resolved()}  # the digests identify the job
            self._attrs = attrs
            self._checkpoint = Checkpoint(self._fingerprint() if not self._deferred else "")
            self.resumed_state: dict[str, Any] = {}
            self.notice: str | None = None
            self._partial = self._resumed(resume) or self._created(
                attrs, rows_per_chunk, compression
            )
        except BaseException:
            self._cancel_deferred()
            self._lock.release()
            raise
        self._datasets = {name: self._partial.file[name] for name in layout}
        X = self._datasets.get("X")
        self._encode_X = None if X is None else chunk_encoder(X)
        compressed = self._encode_X is not None and X.compression is not None
        self._deflate_pool = ThreadPoolExecutor(os.cpu_count()) if compressed else None
        self.rows_written = self._checkpoint.rows
        self.resumed_rows = self.rows_written
        self._open = True

    def _fingerprint(self) -> str:
        """``fingerprint`` of this job: attributes (but ``created``), rows, layout, compression."""
        job = {
            "attrs": {
                name: storable(name, value)
                for name, value in self._attrs.items()
                if name != "created" and value is not None
            },
            "n_rows": self.n_rows,
            "layout": {name: [list(tail), str(dt)] for name, (tail, dt) in self._layout.items()},
            "compression": self._compression,
        }
        return fingerprint(job)

    def _resolved(self) -> dict[str, Any]:
        """The results of the deferred attributes (waiting for them), none left deferred."""
        values = {name: value.result() for name, value in self._deferred.items()}
        self._deferred = {}
        return values

    def _settle(self) -> None:
        """Store the deferred attributes and name the job in the checkpoint, once."""
        if not self._deferred:
            return
        values = self._resolved()
        self._attrs = {**self._attrs, **values}
        try:
            write_attrs(self._partial.file, values)
        except (OSError, RuntimeError) as exc:
            raise self._partial.failure(exc) from exc
        self._checkpoint.job = self._fingerprint()

    def _cancel_deferred(self) -> None:
        for value in self._deferred.values():
            value.cancel()

    def _release(self) -> None:
        """Stop computing deferred attributes no longer needed, and release the lock."""
        self._cancel_deferred()
        self._lock.release()

    def _created(
        self, attrs: Mapping[str, Any], rows_per_chunk: int, compression: str | None
    ) -> PartialFile:
        partial = PartialFile(self.target, partial_path(self.target))
        with partial.writing() as f:
            ready = {name: value for name, value in attrs.items() if not _deferred(value)}
            write_attrs(f, {**ready, "complete": False})
            for name, (tail, dtype) in self._layout.items():
                create_rows(
                    *(f, name, (0, *tail), dtype, rows_per_chunk, compression),
                    final_rows=self.n_rows,
                )
        return partial

    def _resumed(self, resume: bool | None) -> PartialFile | None:
        """The partial output of an interrupted run of this job, opened to go on; else None."""
        temp = partial_path(self.target)
        if not temp.exists():
            Checkpoint.remove(self.target)
            if resume:
                raise InputFileError(self.target, None, "has no interrupted run to resume")
            return None
        previous = Checkpoint.load(self.target)
        if resume is False or previous is None or previous.rows == 0:
            if resume and previous is None:
                self.notice = f"{temp.name} has no checkpoint; starting afresh"
            self._remove_partial()
            return None
        if previous.job != self._checkpoint.job:
            raise InputFileError(
                self.target,
                None,
                f"{temp.name} holds an interrupted run with other settings "
                f"({previous.rows} of its rows done); run the same command again to resume it, "
                "or pass --restart to discard it",
            )
        problem = self._verify(temp, previous)
        if problem:
            self.notice = f"{temp.name} cannot be resumed ({problem}); starting afresh"
            self._remove_partial()
            return None
        partial = PartialFile(self.target, temp, existing=True)
        for name, (tail, _) in self._layout.items():
            partial.file[name].resize((previous.rows, *tail))
        self._checkpoint = previous
        self.resumed_state = dict(previous.state)
        return partial

    def _verify(self, temp: Path, checkpoint: Checkpoint) -> str | None:
        """Why the partial file does not hold the checkpoint's rows, or None when it does."""
        try:
            with open_input(temp) as f:
                datasets = []
                for name, (tail, dtype) in self._layout.items():
                    kind = "float" if name == "X" else "label"
                    dset = checked_dataset(f, f"/{name}", kind=kind)
                    if dset.dtype != dtype or dset.shape[1:] != tail:
                        return f"/{name} has the wrong layout"
                    if dset.shape[0] < checkpoint.rows:
                        return f"/{name} has {dset.shape[0]} rows, {checkpoint.rows} expected"
                    datasets.append(dset)
                for start, stop, crc in checkpoint.blocks:
                    arrays = [
                        read_rows(dset, start, stop, path=temp, allow_nonfinite=True)
                        for dset in datasets
                    ]
                    if block_crc(arrays) != crc:
                        return f"rows {start}:{stop} do not match their checksum"
        except InputFileError as exc:
            return exc.reason
        return None

    def _remove_partial(self) -> None:
        partial_path(self.target).unlink(missing_ok=True)
        Checkpoint.remove(self.target)

    def __enter__(self) -> AdversarialWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.suspend()

    def write(
        self,
        start: int,
        X_adv: np.ndarray,
        y: np.ndarray | None,
        pred_clean: np.ndarray,
        pred_adv: np.ndarray,
        **columns: np.ndarray,
    ) -> None:
        """Write rows ``start:start+m``; blocks must come in order, without gaps.

        Parameters
        ----------
        start : int
            Must equal :attr:`rows_written`.
        X_adv : (m, *row_shape), the writer's dtype
        y : (m, *y_template[0]) or None (exactly when the writer has no labels)
        pred_clean, pred_adv : (m,) integer
        **columns : (m,) arrays, one for each name in the writer's ``columns``
        """
        if "X" not in self._layout:
            raise ValueError("this writer writes columns only: use write_columns")
        if start != self.rows_written:
            raise ValueError(f"rows must be written in order: expected start {self.rows_written}")
        X_adv = np.asarray(X_adv)
        m = len(X_adv)
        if X_adv.shape != (m, *self.row_shape) or X_adv.dtype != self.dtype:
            raise ValueError(
                f"X_adv must be (m, *{self.row_shape}) {self.dtype}, "
                f"got {X_adv.shape} {X_adv.dtype}"
            )
        if start + m > self.n_rows:
            raise ValueError(f"rows {start}:{start + m} go past n_rows {self.n_rows}")
        if (y is None) != ("y" not in self._layout):
            raise ValueError("y must be given exactly when the writer has labels")
        values = {"X": X_adv}
        if y is not None:
            y_tail = self._layout["y"][0]
            if np.shape(y) != (m, *y_tail):
                raise ValueError(f"y must have shape {(m, *y_tail)}, got {np.shape(y)}")
            values["y"] = y
        for name, pred in (("pred_clean", pred_clean), ("pred_adv", pred_adv)):
            pred = np.asarray(pred)
            if pred.shape != (m,) or pred.dtype.kind not in "iu":
                raise ValueError(f"{name} must be (m,) integers, got {pred.shape} {pred.dtype}")
            values[name] = pred
        self._append(start, m, values, columns)

    def write_columns(self, start: int, **columns: np.ndarray) -> None:
        """Write rows ``start:start+m`` of a writer of columns only (``row_shape`` None);
        blocks must come in order, without gaps.

        Parameters
        ----------
        start : int
            Must equal :attr:`rows_written`.
        **columns : (m,) arrays, one for each name in the writer's ``columns``
        """
        if "X" in self._layout:
            raise ValueError("this writer writes rows of /X: use write")
        if start != self.rows_written:
            raise ValueError(f"rows must be written in order: expected start {self.rows_written}")
        m = len(next(iter(columns.values()))) if columns else 0
        if start + m > self.n_rows:
            raise ValueError(f"rows {start}:{start + m} go past n_rows {self.n_rows}")
        self._append(start, m, {}, columns)

    def column_blocks(self, name: str, block_rows: int = COLUMN_BLOCK_ROWS) -> Iterator[np.ndarray]:
        """The rows written so far of the column ``name`` (resumed rows included), in blocks
        of ``block_rows``: memory bounded by the block, whatever the rows."""
        if name not in self._column_names:
            raise ValueError(f"no column {name!r}; columns {sorted(self._column_names)}")
        dset = self._datasets[name]
        for start in range(0, self.rows_written, block_rows):
            yield dset[start : min(start + block_rows, self.rows_written)]

    def _append(self, start: int, m: int, values: dict, columns: dict) -> None:
        """Store ``values`` and ``columns`` (each m rows) at ``start``, checking the columns,
        and record the block for the checkpoint."""
        if set(columns) != set(self._column_names):
            raise ValueError(
                f"columns {sorted(self._column_names)} expected, got {sorted(columns)}"
            )
        for name in self._column_names:
            if np.shape(columns[name]) != (m,):
                raise ValueError(f"{name} must have shape ({m},), got {np.shape(columns[name])}")
            values[name] = columns[name]
        stored = [np.asarray(values[name], dtype=self._layout[name][1]) for name in self._layout]
        try:
            for dset, array in zip(self._datasets.values(), stored, strict=True):
                self._write_rows(dset, start, array)
        except (OSError, RuntimeError) as exc:
            raise self._partial.failure(exc) from exc
        if m:
            self._checkpoint.blocks.append([start, start + m, block_crc(stored)])
        self.rows_written += m

    def _write_rows(self, dset: h5py.Dataset, start: int, rows: np.ndarray) -> None:
        dset.resize(start + len(rows), axis=0)
        whole_chunks = start % dset.chunks[0] == 0 and (
            len(rows) % dset.chunks[0] == 0 or start + len(rows) == self.n_rows
        )
        if dset.name == "/X" and self._encode_X is not None and whole_chunks:
            write_chunks(dset, start, rows, self._encode_X, self._deflate_pool)
        else:
            dset[start : start + len(rows)] = rows

    def checkpoint(self, state: Mapping[str, Any] | None = None) -> None:
        """Make every row written so far durable, with the job's running totals ``state``.

        ``state`` must be JSON-serialisable; a resumed writer hands it back as
        :attr:`resumed_state`.
        """
        if state is not None:
            self._checkpoint.state = dict(state)
        self._settle()
        self._partial.sync()
        self._checkpoint.save(self.target)

    def _stop(self) -> None:
        self._open = False
        if self._deflate_pool is not None:
            self._deflate_pool.shutdown()

    def close(self) -> None:
        """Finish: mark complete, fsync, rename onto the target. No-op once finished.

        Raises
        ------
        RuntimeError
            Not every row was written (the partial file is deleted).
        InputFileError
            The file cannot be written (a full disk: the partial output is kept when it has a
            checkpoint, as by :meth:`suspend`), the target appeared meanwhile (without
            ``overwrite``) or became an input, or the rename failed.
        """
        if not self._open:
            return
        self._stop()
        try:
            if self.rows_written != self.n_rows:
                self._partial.discard()
                Checkpoint.remove(self.target)
                raise RuntimeError(
                    f"only {self.rows_written} of {self.n_rows} rows were written; "
                    f"{self.target} was not created"
                )
            try:
                self._settle()
                self._partial.file.attrs["complete"] = True
                self._partial.close()
            except (OSError, RuntimeError) as exc:
                self._set_aside()
                raise self._partial.failure(exc) from exc
            except InputFileError:
                self._set_aside()
                raise
            try:
                self._partial.commit(overwrite=self._overwrite, inputs=self._inputs)
            finally:
                Checkpoint.remove(self.target)
        finally:
            self._release()

    def _set_aside(self) -> None:
        """Keep the partial output when it has a checkpoint, else delete it.

        Raises
        ------
        InputFileError
            The kept file cannot be closed (a full disk); it stays on disk.
        """
        if Checkpoint.load(self.target) is None:
            self._partial.discard()
        else:
            self._partial.close()

    def suspend(self) -> None:
        """Stop, keeping the partial output for a later writer to resume when it has a
        checkpoint (else deleting it). The target is untouched. No-op once finished.

        Raises
        ------
        InputFileError
            The kept partial output cannot be closed (a full disk); it stays on disk, and a
            later writer resumes it from its checkpoint.
        """
        if not self._open:
            return
        self._stop()
        try:
            self._set_aside()
        finally:
            self._release()

    def discard(self) -> None:
        """Abandon the output: delete the partial file and its checkpoint; the target is
        untouched. No-op once finished."""
        if not self._open:
            return
        self._stop()
        try:
            self._partial.discard()
            Checkpoint.remove(self.target)
        finally:
            self._release()


def _deferred(value: Any) -> bool:
    """Whether an attribute value is computed elsewhere (a ``FileDigest``): it has
    ``result()`` and ``cancel()``."""
    return callable(getattr(value, "result", None)) and callable(getattr(value, "cancel", None))
