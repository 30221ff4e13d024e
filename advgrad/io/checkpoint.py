"""Locks and checkpoints of resumable outputs (DESIGN.md section 4).

A long job writing ``<dir>/<name>`` keeps, beside it:

- ``.<name>.lock``: held with ``flock`` for as long as the job runs, so a second job writing the
  same output is refused instead of mixing rows into it; removed when the job ends.
- ``.<name>.partial.h5``: the output so far (see ``advgrad.io.writer.AdversarialWriter``).
- ``.<name>.partial.json``: the last checkpoint: which job it is (a fingerprint of every
  setting that shapes the output), how many rows are safely on disk with a CRC-32 of each written
  block, and the job's running totals. Replaced atomically (temporary file, fsync, rename), and
  written only after the partial file was flushed and fsynced, so it never claims rows that
  could be lost.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from advgrad.errors import InputFileError
from advgrad.io import fastzlib
from advgrad.io.paths import fsync_directory
from advgrad.io.safe import error_reason

CHECKPOINT_FORMAT = "advgrad-checkpoint"
CHECKPOINT_VERSION = 1


def lock_path(target: Path) -> Path:
    """``.<name>.lock`` beside ``target``."""
    return target.with_name(f".{target.name}.lock")


def partial_path(target: Path) -> Path:
    """``.<name>.partial.h5`` beside ``target``: the resumable output so far."""
    return target.with_name(f".{target.name}.partial.h5")


def checkpoint_path(target: Path) -> Path:
    """``.<name>.partial.json`` beside ``target``: the last checkpoint of the partial output."""
    return target.with_name(f".{target.name}.partial.json")


def checkpoint_temp_path(target: Path) -> Path:
    """``.<name>.partial.json.tmp`` beside ``target``: a checkpoint being written."""
    return target.with_name(f".{target.name}.partial.json.tmp")


def written_paths(target: Path) -> tuple[Path, ...]:
    """Every path a resumable job writing ``target`` creates, renames or deletes: ``target``,
    its partial output, checkpoint (and the checkpoint's temporary file) and lock."""
    return (
        target,
        partial_path(target),
        checkpoint_path(target),
        checkpoint_temp_path(target),
        lock_path(target),
    )


class OutputLock:
    """An exclusive ``flock`` on ``.<name>.lock`` beside an output; one job per output.

    The lock file is removed on :meth:`release`. A job that dies loses the lock with its
    process (the kernel drops ``flock`` locks), so a stale lock file never blocks anyone.

    Raises
    ------
    InputFileError
        Another process holds the lock, or the lock file cannot be created.
    """

    def __init__(self, target: Path) -> None:
        self.path = lock_path(target)
        self._target = target
        while True:
            try:
                handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise InputFileError(
                    target, None, f"cannot create the lock file {self.path}: {error_reason(exc)}"
                ) from exc
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(handle)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise InputFileError(
                        target,
                        None,
                        f"another advgrad run is writing it (it holds {self.path.name}); "
                        "wait for it to finish",
                    ) from exc
                raise InputFileError(
                    target, None, f"cannot lock {self.path}: {error_reason(exc)}"
                ) from exc
            # The holder before us may have removed the file between our open and our lock:
            # then we locked an orphan and must lock the file now at the path instead.
            try:
                if os.fstat(handle).st_ino == self.path.stat().st_ino:
                    self._handle: int | None = handle
                    return
            except FileNotFoundError:
                pass
            os.close(handle)

    def release(self) -> None:
        """Remove the lock file and drop the lock. No-op once released."""
        if self._handle is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._handle)
        self._handle = None


def fingerprint(settings: Mapping[str, Any]) -> str:
    """SHA-256 of the settings as canonical JSON (arrays as lists, None kept)."""

    def plain(value: Any) -> Any:
        if isinstance(value, np.ndarray | np.generic):
            return value.tolist()
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, float) and not np.isfinite(value):
            return repr(value)
        return str(value) if isinstance(value, Path | np.dtype) else value

    def walk(value: Any) -> Any:
        value = plain(value)
        if isinstance(value, Mapping):
            return {str(k): walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    text = json.dumps(walk(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def block_crc(arrays: Iterable[np.ndarray | None]) -> int:
    """CRC-32 of the bytes of the given arrays, in order (None skipped)."""
    crc = 0
    for array in arrays:
        if array is not None:
            crc = fastzlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1), crc)
    return crc


@dataclass
class Checkpoint:
    """What a partial output holds: the job, the rows on disk, per-block CRCs, running totals.

    Attributes
    ----------
    job : str
        ``fingerprint`` of the job's settings; a partial is resumed only by the same job.
    blocks : list of [start, stop, crc32]
        The written row blocks, contiguous from row 0; ``rows`` is the last stop.
    state : dict
        JSON-serialisable running totals of the job (for its final report).
    """

    job: str
    blocks: list[list[int]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows safely on disk."""
        return self.blocks[-1][1] if self.blocks else 0

    def save(self, target: Path) -> None:
        """Write atomically to ``.<name>.partial.json`` (temporary file, fsync, rename).

        Raises
        ------
        InputFileError
            It cannot be written (a full disk); the previous checkpoint stays.
        """
        path = checkpoint_path(target)
        temp = checkpoint_temp_path(target)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "job": self.job,
            "blocks": self.blocks,
            "state": self.state,
        }
        try:
            with temp.open("w") as handle:
                json.dump(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
            temp.replace(path)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise InputFileError(
                target, None, f"cannot write the checkpoint {path.name}: {error_reason(exc)}"
            ) from exc
        fsync_directory(path.parent)

    @classmethod
    def load(cls, target: Path) -> Checkpoint | None:
        """The checkpoint beside ``target``; None when it is missing or not well-formed."""
        try:
            payload = json.loads(checkpoint_path(target).read_text())
            blocks = payload["blocks"]
            well_formed = (
                payload["format"] == CHECKPOINT_FORMAT
                and payload["version"] == CHECKPOINT_VERSION
                and isinstance(payload["job"], str)
                and isinstance(payload["state"], dict)
                and all(
                    isinstance(b, list) and len(b) == 3 and all(type(v) is int for v in b)
                    for b in blocks
                )
                and all(b[0] < b[1] for b in blocks)
                and [b[0] for b in blocks] == [0] + [b[1] for b in blocks[:-1]]
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return cls(payload["job"], blocks, payload["state"]) if well_formed else None

    @staticmethod
    def remove(target: Path) -> None:
        """Delete the checkpoint file beside ``target`` (and a leftover temporary one)."""
        checkpoint_path(target).unlink(missing_ok=True)
        checkpoint_temp_path(target).unlink(missing_ok=True)
