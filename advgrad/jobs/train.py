"""The train job: the data side of training, on the pipeline of every file job.

The training set is read block by block into memory (training visits its rows in a new
random order every epoch, so it holds them all); the test set streams through the pipeline
and is scored block by block; the model file is written atomically (``save_model``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from advgrad.attacks import predict
from advgrad.errors import InputFileError
from advgrad.io import open_dataset, refuse_clobbering, save_model, sha256_file
from advgrad.jobs.inputs import DEFAULT_BATCH_SIZE, rows_per_block
from advgrad.jobs.pipeline import Job, LocalTasks, stream
from advgrad.model import MAX_WEIGHTS
from advgrad.train import EpochStats, TrainConfig, TrainResult, network_shape, train

DEFAULT_CONFIG = TrainConfig()


@dataclass(frozen=True)
class TrainReport:
    """What ``train_file`` did: the result, the output file, and the test accuracy (None
    without a test set)."""

    result: TrainResult
    output: Path
    n_rows: int
    test_rows: int | None
    test_accuracy: float | None


def correct_predictions(model, rows, y, first_row, outputs, out) -> list[int]:
    """The test scoring's compute step (``advgrad.jobs.pipeline.Job``): how many rows of
    the block the model classifies as their labels."""
    classes = y if y.ndim == 1 else np.argmax(y, axis=1)
    return [int((predict(model, rows) == classes).sum())]


class _Score:
    """The one output of the test scoring: a count in memory."""

    rows_written = 0

    def __init__(self) -> None:
        self.correct = 0


def _score(model, test_path) -> tuple[int, float | None]:
    """Rows of the labelled test set at ``test_path`` and the model's accuracy on them
    (None for 0 rows), streamed through the pipeline."""
    with open_dataset(test_path, n_classes=model.n_classes) as reader:
        if not reader.has_labels:
            raise InputFileError(test_path, "/y", "is missing; the test set needs labels")
        if math.prod(reader.row_shape) != model.n_inputs:
            raise InputFileError(
                test_path,
                "/X",
                f"rows do not have the {model.n_inputs} features of the training set",
            )
        score = _Score()

        def account(i, start, offset, rows, y, correct: int) -> None:
            score.correct += correct

        job = Job(correct_predictions, (), [score], account)
        stream(reader, model, job, LocalTasks(), rows_per_block(DEFAULT_BATCH_SIZE, model))
        n_rows = reader.n_rows
    return n_rows, score.correct / n_rows if n_rows else None


def train_file(
    data_path: str | os.PathLike,
    out_path: str | os.PathLike,
    config: TrainConfig = DEFAULT_CONFIG,
    *,
    test_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Callable[[EpochStats], None] | None = None,
    max_weights: int = MAX_WEIGHTS,
    device: str = "cpu",
) -> TrainReport:
    """Train on a labelled dataset file and write the model file.

    The model takes the dataset's ``input_shape`` (else the trailing shape of ``/X``),
    ``class_names``, ``x_min`` and ``x_max`` (also the clip range of adversarial rows).
    Its attributes add to ``train``'s metadata the file names and SHA-256 hashes of the
    training (and test) files, and ``test_accuracy`` on ``test_path`` (None when the test
    set has no rows). ``max_weights`` bounds the network and ``device`` runs the gradients,
    as in ``train``.

    Raises
    ------
    InputFileError
        ``out_path`` exists (without ``overwrite``) or is an input (by identity: a hard link
        or symlink counts); a dataset is refused, has no labels or no rows; a label makes
        too many classes; the test set's rows do not fit the model.
    """
    out = Path(out_path)
    inputs = [p for p in (data_path, test_path) if p is not None]
    refuse_clobbering(out, [out], inputs)
    if out.exists() and not overwrite:
        raise InputFileError(out, None, "exists; pass --overwrite")
    with open_dataset(data_path) as reader:
        if not reader.has_labels:
            raise InputFileError(data_path, "/y", "is missing; training needs labels")
        if reader.n_rows == 0:
            raise InputFileError(data_path, "/X", "has no rows; training needs at least one")
        info = reader.info
        n_classes = len(info.class_names) if info.class_names is not None else None
        d = math.prod(reader.row_shape)
        X, y = reader.read(0, reader.n_rows)
    network_shape(d, y, config, n_classes, max_weights=max_weights, labels_file=data_path)
    clip = None if info.x_min is None or info.x_max is None else (info.x_min, info.x_max)
    result = train(
        *(X, y, config),
        n_classes=n_classes,
        clip=clip,
        progress=progress,
        max_weights=max_weights,
        device=device,
    )
    metadata = {
        **result.model.metadata,
        "training_data": Path(data_path).name,
        "training_file_sha256": sha256_file(data_path),
    }
    test_rows = test_accuracy = None
    if test_path is not None:
        test_rows, test_accuracy = _score(result.model, test_path)
        metadata |= {
            "test_data": Path(test_path).name,
            "test_file_sha256": sha256_file(test_path),
            "test_accuracy": test_accuracy,
        }
    model = replace(
        result.model,
        input_shape=info.input_shape or X.shape[1:],
        class_names=info.class_names,
        x_min=info.x_min,
        x_max=info.x_max,
        metadata=metadata,
    )
    save_model(model, out, inputs=inputs)
    return TrainReport(replace(result, model=model), out, len(X), test_rows, test_accuracy)
