"""The certify job: certify every row of a dataset file, next to an attack, on the pipeline.

Rows stream through ``advgrad.certify.certify_rows`` block by block into a crash-safe
adversarial dataset (``advgrad.io.AdversarialWriter``) holding the attack's examples at the
largest eps and the per-row ``/radius`` and ``/attack_eps``; the job's counts are saved in
its checkpoints, so a stopped or killed job resumes to the same file and the same figures,
and with a Dask scheduler the blocks are certified on the cluster's workers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from advgrad.attacks import Attack
from advgrad.backend import get_backend
from advgrad.certify import (
    DEFAULT_ATTACK,
    DEFAULT_EPS,
    DEFAULT_TOLERANCE,
    Bracket,
    CertifiedRows,
    CertifySettings,
    bracket_of,
    certify_rows,
    certify_settings,
    check_norm,
)
from advgrad.io import AdversarialWriter, column_blocks
from advgrad.jobs.inputs import (
    DEFAULT_BATCH_SIZE,
    NonFiniteResult,
    clip_range,
    open_for_model,
    perturbation_norms,
    provenance,
    rows_per_block,
)
from advgrad.jobs.pipeline import Job, announce, stream, tasks_for
from advgrad.model import MAX_WEIGHTS


@dataclass(frozen=True)
class CertifyReport:
    """What ``certify_file`` did: the settings, the figures over every row of the file
    (those of a resumed run included), and where the per-row results are.

    The fractions are None for 0 rows (one None per eps). ``robust_accuracy`` is, per eps,
    the fraction of rows classified correctly where the attack found no adversarial
    example within eps; ``contradictions`` counts rows certified at an eps where the
    attack succeeded (0 unless a bound is wrong). The seconds add up every run of the job;
    ``resumed_rows`` were done by an interrupted run before this one.
    """

    output: Path
    n_rows: int
    norm: str
    method: str
    eps_values: tuple[float, ...]
    eps_max: float
    tolerance: float
    clip: tuple[float, float]
    attack: Attack
    label_source: str
    clean_accuracy: float | None
    certified_accuracy: tuple[float | None, ...]
    robust_accuracy: tuple[float | None, ...]
    contradictions: int
    medians: Bracket | None
    certify_seconds: float
    attack_seconds: float
    resumed_rows: int = 0

    def bracket(self) -> Bracket | None:
        """Medians of the per-row brackets [radius, attack_eps] of the correctly classified
        rows (None when there are none)."""
        return self.medians

    @property
    def seconds_per_row(self) -> float | None:
        """Certification time per row (attacks excluded)."""
        return self.certify_seconds / self.n_rows if self.n_rows else None


@dataclass
class _Counts:
    """Running counts of a certify job (certified and robust: per eps); saved in its
    checkpoints."""

    certified: list[int]
    robust: list[int]
    clean_correct: int = 0
    contradictions: int = 0
    certify_seconds: float = 0.0
    attack_seconds: float = 0.0

    def add(self, part: CertifiedRows) -> None:
        """Count a block's rows."""
        self.clean_correct += int((part.predicted == part.classes).sum())
        self.certified = np.add(self.certified, part.certified.sum(axis=0)).tolist()
        self.robust = np.add(self.robust, part.robust.sum(axis=0)).tolist()
        self.contradictions += int((part.certified & ~part.robust).any(axis=1).sum())
        self.certify_seconds += part.certify_seconds
        self.attack_seconds += part.attack_seconds


def certify_block(model, rows, y, first_row, outputs, out, settings, labelled) -> list:
    """The certify job's compute step (``advgrad.jobs.pipeline.Job``): ``certify_rows`` on
    a block, its labels from y when ``labelled``, the attack's examples into ``out[0]``."""
    rows = np.ascontiguousarray(rows)
    target = None if out is None else out[0]
    return [certify_rows(model, rows, y if labelled else None, settings, first_row, out=target)]


def default_output_name(data_path: str | os.PathLike, norm: str) -> Path:
    """``<data stem>-certify-l<norm>.h5`` in the current folder."""
    return Path(f"{Path(data_path).stem}-certify-l{check_norm(norm)}.h5")


def certify_file(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    norm="inf",
    eps_values: Sequence[float] = DEFAULT_EPS,
    method: str = "crown",
    tolerance: float = DEFAULT_TOLERANCE,
    clip: tuple[float, float] | None = None,
    eps_max: float | None = None,
    attack: Attack = DEFAULT_ATTACK,
    use_labels: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    max_weights: int = MAX_WEIGHTS,
    device: str = "cpu",
    resume: bool | None = None,
    scheduler: str | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    notice: Callable[[str], None] | None = None,
) -> CertifyReport:
    """Certify every row of a dataset file and write the per-row results.

    Rows stream in blocks of ``rows_per_block(batch_size, model)`` on the pipeline of every
    file job. ``clip`` defaults to the dataset's (else the model's) x_min/x_max, else none;
    labels are the dataset's ``/y`` (``use_labels``, when it has one) or the clean
    predictions. The output is an adversarial dataset (DESIGN.md section 3): ``/X`` holds
    the attack's examples at the largest eps with ``/pred_clean``, ``/pred_adv`` and
    ``/y``, and the columns ``/radius`` (N,) (certified radius) and ``/attack_eps`` (N,)
    (smallest adversarial eps found, inf: none up to eps_max), so that a row is certified
    at eps > 0 exactly when its radius is >= eps; the settings are root attributes.
    ``max_weights`` bounds the model (``open_for_model``); ``device`` runs the bounds and
    the attack on a backend (``advgrad.backend.get_backend``).

    Crash safety, ``resume``, ``stop``, ``scheduler``, ``progress`` and ``notice`` are as
    in ``advgrad.jobs.attack_files``.
    """
    if attack is None:
        raise ValueError("certify_file needs the attack whose examples it writes as /X")
    with (
        open_for_model(model_path, data_path, max_weights=max_weights) as (model, reader),
        ExitStack() as stack,
    ):
        block = rows_per_block(batch_size, model)
        labelled = use_labels and reader.has_labels
        clip = clip_range(clip, reader, model)
        settings = certify_settings(
            model, norm, eps_values, method, tolerance, clip, eps_max, attack, device
        )
        attrs = {
            "certify_method": settings.method,
            "norm": settings.norm,
            "eps": np.asarray(settings.eps_values),
            "eps_max": settings.eps_max,
            "tolerance": settings.tolerance,
            "x_min": clip[0] if math.isfinite(clip[0]) else None,
            "x_max": clip[1] if math.isfinite(clip[1]) else None,
            "labels": "labels" if labelled else "predictions",
            "attack": attack.method,
            "attack_eps": max(settings.eps_values),  # the eps of /X
            "steps": attack.n_steps,
            "restarts": attack.n_restarts,
            "step_size_ratio": attack.alpha / attack.eps if attack.eps > 0 else None,
            "seed": attack.seed,
            "targeted": False,
            **stack.enter_context(provenance(model_path, data_path)),
        }
        writer = AdversarialWriter(
            out_path,
            n_rows=reader.n_rows,
            row_shape=reader.row_shape,
            dtype=reader.dtype,
            y_template=reader.y_template,
            attrs=attrs,
            rows_per_chunk=min(block, max(reader.n_rows, 1)),
            overwrite=overwrite,
            inputs=(model_path, data_path),
            columns={"radius": np.float64, "attack_eps": np.float64},
            resume=resume,
        )
        stack.enter_context(writer)
        announce(writer, out_path, reader.n_rows, notice)
        zeros = [0] * len(settings.eps_values)
        counts = _Counts(**(writer.resumed_state or {"certified": zeros, "robust": zeros}))

        def account(i, start, offset, rows, y, part: CertifiedRows):
            # one output: every block starts where it resumes, so offset is 0
            perturbation_norms(part.X_adv, rows, start, out_path)
            counts.add(part)
            state = dataclasses.asdict(counts)
            X_adv = part.X_adv.reshape(len(part.X_adv), *reader.row_shape)

            def write() -> None:
                writer.write(
                    start,
                    X_adv,
                    y,
                    part.predicted,
                    part.predicted_adv,
                    radius=part.radius,
                    attack_eps=part.attack_eps,
                )
                writer.checkpoint(state)

            return write

        tasks = tasks_for(scheduler, model)
        stack.callback(tasks.close)
        width = math.prod(reader.row_shape)
        job = Job(certify_block, (settings, labelled), [writer], account, width)
        empty = get_backend(device).empty if tasks.in_process else np.empty
        try:
            stream(reader, model, job, tasks, block, empty=empty, stop=stop, progress=progress)
        except NonFiniteResult:
            writer.discard()
            raise
    return _report(writer, reader.n_rows, settings, attrs["labels"], counts)


def _report(writer, n_rows, settings: CertifySettings, label_source, counts) -> CertifyReport:
    """The report of a finished job; the medians come from the per-row columns written,
    read block by block."""
    output = writer.target
    names = ("radius", "attack_eps", "pred_clean", *(("y",) if label_source == "labels" else ()))

    def brackets():
        for radius, attack_eps, predicted, *y in column_blocks(output, names):
            labels = predicted if not y else y[0] if y[0].ndim == 1 else np.argmax(y[0], axis=1)
            yield radius, attack_eps, predicted == labels

    medians = bracket_of(brackets)

    def fraction(count: int) -> float | None:
        return count / n_rows if n_rows else None

    return CertifyReport(
        output=output,
        n_rows=n_rows,
        norm=settings.norm,
        method=settings.method,
        eps_values=settings.eps_values,
        eps_max=settings.eps_max,
        tolerance=settings.tolerance,
        clip=settings.clip,
        attack=settings.attack,
        label_source=label_source,
        clean_accuracy=fraction(counts.clean_correct),
        certified_accuracy=tuple(fraction(c) for c in counts.certified),
        robust_accuracy=tuple(fraction(c) for c in counts.robust),
        contradictions=counts.contradictions,
        medians=medians,
        certify_seconds=counts.certify_seconds,
        attack_seconds=counts.attack_seconds,
        resumed_rows=writer.resumed_rows,
    )
