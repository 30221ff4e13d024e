"""Coverage-guided fuzzing of advgrad's readers of untrusted files, with atheris (libFuzzer).

Every input is written to a file, shown by ``advgrad info`` and loaded as a model and as a
dataset; anything but valid data or :class:`advgrad.errors.InputFileError` is a finding, and so
is an unsafe report (a traceback, more than one error line, a control character reaching the
terminal) or a crash, which libFuzzer reports with the input that caused it. The corpus starts
from the valid files of tests/test_fuzz.py.

    pip install atheris
    python scripts/fuzz_atheris.py corpus/ -max_total_time=600 -timeout=20

Arguments after the script name go to libFuzzer (``-help=1`` lists them); ``corpus/`` is created
and seeded when it does not exist. Python code is instrumented for coverage (HDF5's C code is
not, so coverage guidance sees h5py's and advgrad's branches only).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

with atheris.instrument_imports():
    import test_fuzz

SCRATCH = Path(tempfile.mkdtemp(prefix="advgrad-atheris-"))


def load(data: bytes) -> None:
    """Examine ``data`` as a file; test_fuzz.examine asserts what is shown and loaded."""
    path = SCRATCH / "input.h5"
    path.write_bytes(data)
    test_fuzz.examine(path)


def main() -> None:
    corpus = next((Path(arg) for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if corpus is not None and not corpus.exists():
        test_fuzz.write_seeds(corpus)
    atheris.Setup(sys.argv, load)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
