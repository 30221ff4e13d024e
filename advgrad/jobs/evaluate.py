"""The evaluate job: accuracy under attack over a dataset file, streamed on the pipeline.

Blocks of rows are read ahead and evaluated (``advgrad.evaluate.evaluate_rows``) in this
process or, with a Dask scheduler, on the cluster's workers; the per-block counts come back
in order, so the figures are those of an in-memory evaluation of the whole file, in memory
bounded by the block size (and 8 bytes per row and searched method for the minimal eps).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from contextlib import ExitStack

import numpy as np

from advgrad.backend import get_backend
from advgrad.errors import InputFileError
from advgrad.evaluate import (
    Evaluation,
    EvaluationSettings,
    EvaluationTotals,
    evaluate_rows,
    evaluation_settings,
)
from advgrad.jobs.inputs import DEFAULT_BATCH_SIZE, clip_range, open_for_model, rows_per_block
from advgrad.jobs.pipeline import Interrupted, Job, stream, tasks_for
from advgrad.model import MAX_WEIGHTS


class _Counted:
    """The pipeline's one output of an evaluation: counts in memory, nothing written."""

    rows_written = 0


def evaluate_block(model, rows, y, first_row, outputs, out, settings: EvaluationSettings, device):
    """The evaluate job's compute step (``advgrad.jobs.pipeline.Job``): ``evaluate_rows``
    on a block, on the backend of ``device``."""
    rows = np.ascontiguousarray(rows)
    return [evaluate_rows(model, rows, y, settings, first_row, get_backend(device))]


def evaluate_file(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    clip: tuple[float, float] | None = None,
    device: str = "cpu",
    max_weights: int = MAX_WEIGHTS,
    scheduler: str | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    **options,
) -> Evaluation:
    """Evaluate a model on a labelled dataset file, streaming it in blocks of
    ``rows_per_block(batch_size, model)`` rows on the pipeline of every file job.

    ``clip`` defaults to the dataset's (else the model's) x_min/x_max, else none;
    ``max_weights`` bounds the model (``open_for_model``); ``options`` as in
    ``advgrad.evaluate.evaluation_settings``. Computation runs in the dataset's dtype.
    ``scheduler`` (a Dask scheduler's address) evaluates the blocks on its workers;
    ``progress(rows_done, n_rows)`` is called after each block. Setting ``stop`` ends the
    job after the blocks in progress with ``advgrad.jobs.Interrupted`` (an evaluation
    keeps no partial result).
    """
    get_backend(device)
    with (
        open_for_model(model_path, data_path, max_weights=max_weights) as (model, reader),
        ExitStack() as stack,
    ):
        if not reader.has_labels:
            raise InputFileError(data_path, "/y", "is missing; evaluation needs labels")
        block = rows_per_block(batch_size, model)
        settings = evaluation_settings(model, clip=clip_range(clip, reader, model), **options)
        totals = EvaluationTotals(settings)

        def account(i, start, offset, rows, y, counted):
            totals.add(counted)

        tasks = tasks_for(scheduler, model)
        stack.callback(tasks.close)
        job = Job(evaluate_block, (settings, device), [_Counted()], account)
        empty = get_backend(device).empty if tasks.in_process else np.empty
        try:
            stream(reader, model, job, tasks, block, empty=empty, stop=stop, progress=progress)
        except Interrupted as interruption:
            raise Interrupted(totals.n_rows, interruption.n_rows, kept=False) from None
    return totals.evaluation()
