"""Paths of the bundled default: the digits dataset and a network trained on it."""

from __future__ import annotations

from pathlib import Path

MODEL = "digits_model.h5"
TEST_DATA = "digits_test.h5"
TRAIN_DATA = "digits_train.h5"


def bundled_path(name: str) -> Path:
    """Path of a bundled file (``MODEL``, ``TEST_DATA`` or ``TRAIN_DATA``).

    An installed wheel carries the files in ``advgrad/data``; a source checkout (or an
    editable install) keeps them in the repository's ``data/`` folder.
    """
    package = Path(__file__).resolve().parent
    for folder in (package / "data", package.parent / "data"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"bundled file {name} is missing from {package / 'data'}")
