"""SHA-256 of input files, for the provenance attributes of every output.

:func:`sha256_file` hashes a file; a :class:`FileDigest` hashes it on a thread of its own,
so that a job hashes its inputs while it works on them. A digest is remembered in
:class:`DigestCache` (a small JSON file in the user's cache directory) with the file's
identity: device, inode, size, modification and change times. A later job on the same,
unchanged file takes the digest from there instead of reading the file again. Any write,
truncation, rename onto the path, chmod or touch changes the change time (which no
program can set back), so a changed file is hashed again. A file changed in the
``RECENT_CHANGE_S`` before it was hashed is not remembered: a change within the same
tick of the filesystem's clock could leave its times as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from pathlib import Path

from advgrad.errors import InputFileError

HASH_BLOCK_BYTES = 2**20
RECENT_CHANGE_S = 2.0
"""A file whose change time is this close to the start of its hashing is not remembered."""
CACHE_ENTRIES = 1000
"""Digests remembered at most (the oldest are forgotten first)."""
CACHE_DIR_VARIABLE = "ADVGRAD_CACHE_DIR"
"""Environment variable naming the directory of the digest cache (default:
``$XDG_CACHE_HOME/advgrad``, else ``~/.cache/advgrad``)."""


def sha256_file(path: str | os.PathLike, stop: threading.Event | None = None) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks into one buffer.

    Parameters
    ----------
    path : str or os.PathLike
    stop : threading.Event, optional
        Checked before each block: once set, hashing ends with ``HashingStopped``.

    Returns
    -------
    str
        64 lowercase hex digits.

    Raises
    ------
    InputFileError
        The file cannot be read.
    """
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(HASH_BLOCK_BYTES))
    try:
        with Path(path).open("rb", buffering=0) as handle:
            while size := handle.readinto(buffer):
                if stop is not None and stop.is_set():
                    raise HashingStopped(path)
                digest.update(buffer[:size])
    except FileNotFoundError as exc:
        raise InputFileError(path, None, "no such file") from exc
    except OSError as exc:
        raise InputFileError(path, None, f"cannot read: {exc.strerror or exc}") from exc
    return digest.hexdigest()


class HashingStopped(Exception):
    """``sha256_file`` was stopped before the end of the file."""


def cache_directory() -> Path:
    """Where the digest cache lives (``CACHE_DIR_VARIABLE``)."""
    if chosen := os.environ.get(CACHE_DIR_VARIABLE):
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "advgrad"


def _status(path: str | os.PathLike) -> os.stat_result:
    try:
        return Path(path).stat()
    except FileNotFoundError as exc:
        raise InputFileError(path, None, "no such file") from exc
    except OSError as exc:
        raise InputFileError(path, None, f"cannot read: {exc.strerror or exc}") from exc


def _identity(status: os.stat_result) -> list[int]:
    return [status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns]


class DigestCache:
    """Digests of files as they were when hashed, keyed by the files' identity
    (``sha256-cache.json`` in ``cache_directory()``). Reading or writing it never fails
    a job: an unreadable or malformed cache is an empty one, and a cache that cannot be
    written is not written."""

    def __init__(self, directory: Path | None = None) -> None:
        self.path = (directory or cache_directory()) / "sha256-cache.json"

    def _entries(self) -> dict:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def lookup(self, status: os.stat_result) -> str | None:
        """The digest remembered for the file of ``status``, or None."""
        entry = self._entries().get(" ".join(map(str, _identity(status))))
        return entry if isinstance(entry, str) and len(entry) == 64 else None

    def remember(self, status: os.stat_result, digest: str, hashing_started_ns: int) -> None:
        """Remember ``digest`` for the file of ``status`` (taken before it was hashed),
        unless it changed within ``RECENT_CHANGE_S`` of ``hashing_started_ns``."""
        if status.st_ctime_ns > hashing_started_ns - RECENT_CHANGE_S * 1e9:
            return
        entries = self._entries()
        entries[" ".join(map(str, _identity(status)))] = digest
        kept = dict(list(entries.items())[-CACHE_ENTRIES:])
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(kept))
            temporary.replace(self.path)
        temporary.unlink(missing_ok=True)


class FileDigest:
    """The SHA-256 of a file (``sha256_file``), computed on a thread of its own from the
    moment it is made, so that a job hashes its inputs while it works on them; taken from
    the ``DigestCache`` when the file is unchanged since it was last hashed.

    A writer takes it as the value of an attribute and stores :meth:`result` before its
    first checkpoint (``advgrad.io.writer.AdversarialWriter``).
    """

    def __init__(self, path: str | os.PathLike, cache: DigestCache | None = None) -> None:
        self.path = path
        self._cache = cache or DigestCache()
        self._stop = threading.Event()
        self._value: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="advgrad-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            started = time.time_ns()
            status = _status(self.path)
            self._value = self._cache.lookup(status)
            if self._value is None:
                self._value = sha256_file(self.path, self._stop)
                if _identity(_status(self.path)) == _identity(status):  # unchanged meanwhile
                    self._cache.remember(status, self._value, started)
        except BaseException as exc:  # handed to the caller of result()
            self._error = exc

    def result(self) -> str:
        """The 64 hex digits, once hashing is done.

        Raises
        ------
        InputFileError
            The file cannot be read (or hashing was cancelled).
        """
        self._thread.join()
        if isinstance(self._error, HashingStopped):
            raise InputFileError(self.path, None, "hashing was cancelled")
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self) -> None:
        """Stop hashing (within one block) and wait for the thread to end."""
        self._stop.set()
        self._thread.join()
