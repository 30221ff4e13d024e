"""Running advgrad as a user does, in a child process, and checking what it leaves behind.

Shared by the tests that need a real process: separate stdout and stderr that are not a
terminal, signals, ``ulimit`` bounds on memory and file size, and a timeout that fails a hang.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD_TIMEOUT_S = 120
"""Bound on one child: a refusal or a small job takes seconds (mostly starting Python); a
hang is killed and fails the test."""
CHILD_ENV = {
    **os.environ,
    # one Numba cache for every child, so that each compiles a kernel at most once per run
    "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR")
    or str(Path(tempfile.gettempdir()) / "numba-resume-tests"),
    "NUMBA_NUM_THREADS": "2",  # a memory limit must not depend on the machine's cores
    "MALLOC_ARENA_MAX": "2",
    "COLUMNS": "80",  # what rich assumes for a stderr that is not a terminal (logs, CI)
}


def run_advgrad(*args, cwd: Path, timeout: float = CHILD_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m advgrad *args`` in ``cwd``, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "advgrad", *map(str, args)],
        cwd=cwd,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_python(
    code: str, cwd: Path, *, limits: str = "", timeout: float = CHILD_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python in ``cwd``, under the shell ``ulimit`` settings
    ``limits`` (e.g. "ulimit -v 1048576;") when given."""
    script = cwd / "hostile_case.py"
    script.write_text(textwrap.dedent(code))
    try:
        return subprocess.run(
            ["bash", "-c", f"{limits} exec {sys.executable} {script.name}"],
            cwd=cwd,
            env=CHILD_ENV,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    finally:
        script.unlink()


def refusal_line(result: subprocess.CompletedProcess, *words: str) -> str:
    """The one stderr line of a refused command, after checking that it is exactly that:
    exit code 1, no traceback, a single line starting "advgrad: error: " holding ``words``."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("advgrad: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def snapshot(directory: Path) -> dict[str, str]:
    """Every entry of ``directory`` (hidden ones too) with the SHA-256 of its bytes."""
    return {
        entry.name: hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() else "dir"
        for entry in sorted(directory.iterdir())
    }


def assert_passes_on_simulator(test_file: str, *pytest_args: str) -> None:
    """Run ``pytest test_file *pytest_args`` in a child with ``NUMBA_ENABLE_CUDASIM=1`` (it
    must be set before numba is imported) and assert that the tests it selects all pass,
    none skipped."""
    options = ("-q", "-x", "-p", "no:cacheprovider", *pytest_args)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", test_file, *options],
        cwd=Path(test_file).resolve().parents[1],
        env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


class SimulatorRun:
    """``pytest <test file> -q -x`` with ``NUMBA_ENABLE_CUDASIM=1`` in a child process, started
    at once; its output goes to a temporary file, read by :meth:`result`."""

    TIMEOUT_S = 1200

    def __init__(self, test_file: Path) -> None:
        # held open while the child writes; closed by result()
        self._output = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self._process = subprocess.Popen(
            [sys.executable, "-m", "pytest", str(test_file), "-q", "-x", "-p", "no:cacheprovider"],
            cwd=Path(test_file).resolve().parents[1],
            env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"},
            stdout=self._output,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def result(self) -> tuple[int, str]:
        """Wait for the child (killed past ``TIMEOUT_S``); its exit code and output."""
        try:
            code = self._process.wait(timeout=self.TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            code = self._process.wait()
        with self._output:
            self._output.seek(0)
            return code, self._output.read()

    def stop(self) -> None:
        """Kill the child if it still runs."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
