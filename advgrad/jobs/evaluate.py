"""The evaluate job: accuracy under attack over a dataset file, streamed on the pipeline.

Blocks of rows are read ahead and evaluated (``advgrad.evaluate.evaluate_rows``) in this
process or, with a Dask scheduler, on the cluster's workers; the per-block counts come back
in order, so the figures are those of an in-memory evaluation of the whole file, in memory
bounded by the block size (and 8 bytes per row and searched method for the minimal eps).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

from advgrad.backend import get_backend
from advgrad.errors import InputFileError
from advgrad.evaluate import (
    EvaluatedRows,
    Evaluation,
    EvaluationSettings,
    EvaluationTotals,
    evaluate_rows,
    evaluation_settings,
)
from advgrad.io import AdversarialWriter
from advgrad.jobs.inputs import (
    DEFAULT_BATCH_SIZE,
    clip_range,
    open_for_model,
    provenance,
    rows_per_block,
)
from advgrad.jobs.pipeline import Interrupted, Job, announce, stream, tasks_for
from advgrad.model import MAX_WEIGHTS


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
    checkpoint: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: bool | None = None,
    scheduler: str | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    notice: Callable[[str], None] | None = None,
    **options,
) -> Evaluation:
    """Evaluate a model on a labelled dataset file, streaming it in blocks of
    ``rows_per_block(batch_size, model)`` rows on the pipeline of every file job.

    ``clip`` defaults to the dataset's (else the model's) x_min/x_max, else none;
    ``max_weights`` bounds the model (``open_for_model``); ``options`` as in
    ``advgrad.evaluate.evaluation_settings``. Computation runs in the dataset's dtype.
    ``scheduler`` (a Dask scheduler's address) evaluates the blocks on its workers;
    ``progress(rows_done, n_rows)`` is called after each block.

    With ``checkpoint``, the path where the caller will write the evaluation (e.g. its JSON
    file), the job keeps its counts and per-row minimal eps beside it in a crash-safe,
    locked partial file (``.<name>.partial.h5``, as ``advgrad.io.AdversarialWriter``
    writes) and deletes it once the evaluation is returned: a stopped or killed job run
    again resumes there (``resume`` and ``notice`` as in ``advgrad.jobs.attack_files``;
    ``overwrite`` lets ``checkpoint`` be an existing file), and memory stays bounded by
    the block size. Without it the per-row results go to a temporary directory, deleted
    at the end, so memory stays bounded too. Setting ``stop`` ends the job after the
    blocks in progress with ``advgrad.jobs.Interrupted``.
    """
    get_backend(device)
    with (
        open_for_model(model_path, data_path, max_weights=max_weights) as (model, reader),
        ExitStack() as stack,
    ):
        if not reader.has_labels:
            raise InputFileError(data_path, "/y", "is missing; evaluation needs labels")
        block = rows_per_block(batch_size, model)
        settings = evaluation_settings(
            model,
            clip=clip_range(clip, reader, model),
            image_shape=reader.info.input_shape or model.input_shape,
            **options,
        )
        columns = {method: np.float64 for method in settings.searched}
        if checkpoint is None:  # the per-row results still go to a file, a temporary one
            scratch = stack.enter_context(TemporaryDirectory(prefix="advgrad-evaluate-"))
            target, resume = Path(scratch) / "minimal-eps.h5", False
        else:
            target = checkpoint
        results = AdversarialWriter(
            target,
            n_rows=reader.n_rows,
            row_shape=None,
            dtype=None,
            y_template=None,
            attrs={
                **_describe(settings),
                **stack.enter_context(provenance(model_path, data_path)),
            },
            rows_per_chunk=min(block, max(reader.n_rows, 1)),
            overwrite=overwrite,
            inputs=(model_path, data_path),
            columns=columns,
            resume=resume,
        )
        stack.enter_context(results)
        if checkpoint is not None:
            announce(results, checkpoint, reader.n_rows, notice)
        totals = EvaluationTotals(settings, results.resumed_state or None)

        def account(i, start, offset, rows, y, counted: EvaluatedRows):
            totals.add(counted)
            state = totals.state

            def write() -> None:
                results.write_columns(start, **counted.minimal)
                results.checkpoint(state)

            return write

        tasks = tasks_for(scheduler, model)
        stack.callback(tasks.close)
        job = Job(evaluate_block, (settings, device), [results], account)
        empty = get_backend(device).empty if tasks.in_process else np.empty
        try:
            stream(reader, model, job, tasks, block, empty=empty, stop=stop, progress=progress)
        except Interrupted as interruption:
            if checkpoint is None:
                raise Interrupted(totals.n_rows, interruption.n_rows, kept=False) from None
            raise
        evaluation = totals.evaluation(
            {name: partial(results.column_blocks, name) for name in columns}
        )
        results.discard()  # the evaluation is complete: its partial state goes
    return evaluation


def _describe(settings: EvaluationSettings) -> dict:
    """The settings as attributes of the partial file (what makes a run the same job)."""
    return {
        "methods": list(settings.methods),
        "eps": np.asarray(settings.eps_values),
        **{
            f"attack_{name}": value
            for name, value in dataclasses.asdict(settings.attack).items()
            if name not in ("method", "eps")
        },
        "x_min": settings.clip[0] if np.isfinite(settings.clip[0]) else None,
        "x_max": settings.clip[1] if np.isfinite(settings.clip[1]) else None,
        "labels": "dataset" if settings.use_labels else "predictions",
        "eps_max": settings.eps_max,
        "tolerance": settings.tolerance,
    }
