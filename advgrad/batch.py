"""File-to-file attacks: stream a dataset through the kernels into an adversarial dataset."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import advgrad
from advgrad.attacks import DEFAULT_ATTACK, Attack, attack_labels, minimal_eps, perturb, success_of
from advgrad.backend import get_backend
from advgrad.errors import InputFileError
from advgrad.io import AdversarialWriter, load_model, open_dataset, sha256_file
from advgrad.kernels.cpu import ROWS_PER_BLOCK

DEFAULT_BATCH_SIZE = 8192


@dataclass(frozen=True)
class AttackReport:
    """What ``attack_file`` did.

    ``success_rate`` is the fraction of rows where the attack succeeded: the prediction
    moved off the attacked label (untargeted) or onto the target (targeted). The accuracies
    are None when the dataset has no labels. Perturbation norms are means over rows of
    ||X_adv - X|| on the flattened rows. ``eps_min`` holds the per-row minimal eps when it
    was searched. ``seconds`` covers reading, attacking and writing the rows (not loading
    the model or hashing the inputs).
    """

    output: Path
    attack: Attack
    n_rows: int
    labels: str
    clip: tuple[float, float]
    clean_accuracy: float | None
    adversarial_accuracy: float | None
    success_rate: float
    mean_linf: float
    mean_l2: float
    seconds: float
    eps_min: np.ndarray | None = None

    @property
    def rows_per_second(self) -> float:
        """Rows attacked per second, reading and writing included."""
        return self.n_rows / self.seconds if self.seconds > 0 else math.inf


def default_output_name(data_path: str | os.PathLike, attack: Attack) -> Path:
    """``<data stem>-<method>-l<norm>-eps<eps>.h5`` (DeepFool: no eps) in the current folder."""
    size = "" if attack.method == "deepfool" else f"-eps{attack.eps:g}"
    return Path(f"{Path(data_path).stem}-{attack.method}-l{attack.norm}{size}.h5")


def clip_range(clip, reader, model) -> tuple[float, float]:
    """The explicit clip, else the dataset's x_min/x_max, else the model's, else none."""
    if clip is not None:
        return float(clip[0]), float(clip[1])
    for source in (reader, model):
        if source.x_min is not None and source.x_max is not None:
            return source.x_min, source.x_max
    return -math.inf, math.inf


def aligned_batch_size(batch_size: int) -> int:
    """``batch_size`` rounded up to a multiple of ``ROWS_PER_BLOCK``.

    Kernel blocks and random draws are aligned to absolute row indices in groups of this
    size, so every aligned batch size gives bitwise the same output.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return -(-batch_size // ROWS_PER_BLOCK) * ROWS_PER_BLOCK


@contextmanager
def open_for_model(model_path, data_path, *, allow_nonfinite: bool = False):
    """Load a model and open a dataset it can read; yields (model, reader).

    Refuses data whose rows do not flatten to the model's d; the model comes back in the
    dataset's dtype, the compute dtype of every file-level job.
    """
    model = load_model(model_path)
    with open_dataset(
        data_path, n_classes=model.n_classes, allow_nonfinite=allow_nonfinite
    ) as reader:
        width = math.prod(reader.row_shape)
        if width != model.n_inputs:
            raise InputFileError(
                data_path,
                "/X",
                f"rows have shape {reader.row_shape} ({width} features); "
                f"the model expects {model.n_inputs}",
            )
        yield model.astype(reader.dtype), reader


def provenance(model_path, data_path) -> dict:
    """Output attributes naming the inputs (file names and SHA-256), version and time."""
    return {
        "model_sha256": sha256_file(model_path),
        "data_sha256": sha256_file(data_path),
        "model_file": Path(model_path).name,
        "data_file": Path(data_path).name,
        "advgrad_version": advgrad.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def attack_file(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    out_path: str | os.PathLike,
    attack: Attack = DEFAULT_ATTACK,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    use_labels: bool = False,
    clip: tuple[float, float] | None = None,
    min_eps_tolerance: float | None = None,
    eps_max: float | None = None,
    compression: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    allow_nonfinite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> AttackReport:
    """Attack every row of a dataset file and write the adversarial dataset.

    Rows stream from ``data_path`` in blocks of ``aligned_batch_size(batch_size)``, so
    memory does not grow with the number of rows; the output is written beside
    ``out_path`` and renamed into place once complete (DESIGN.md sections 3 and 4).
    Computation runs in the dataset's dtype. Labels are the model's predictions unless
    ``use_labels``, which takes the dataset's ``/y``. ``clip`` defaults to the dataset's
    (else the model's) x_min/x_max, else no clipping. With ``min_eps_tolerance``, the
    per-row minimal eps in [0, eps_max] is searched too and written as ``/eps_min``
    (eps_max defaults to x_max - x_min, or 10 eps without a clip range). Targeted attacks
    write their per-row targets as ``/target``. ``allow_nonfinite`` accepts NaN and inf
    in ``/X`` (they pass through to the output). ``progress(rows_done, n_rows)`` is called
    after each block.
    """
    rows_per_block = aligned_batch_size(batch_size)
    backend = get_backend(device)
    with open_for_model(model_path, data_path, allow_nonfinite=allow_nonfinite) as (
        model,
        reader,
    ):
        if use_labels and not reader.has_labels:
            raise InputFileError(data_path, "/y", "is missing; attack the predictions instead")
        x_min, x_max = clip_range(clip, reader, model)
        if not x_min <= x_max:
            raise ValueError(f"clip range ({x_min}, {x_max}) is empty")
        if eps_max is None:
            eps_max = x_max - x_min if math.isfinite(x_max - x_min) else 10 * attack.eps
        attrs = {
            **attack.describe(),
            "labels": "dataset" if use_labels else "predictions",
            "x_min": x_min if math.isfinite(x_min) else None,  # None: not stored
            "x_max": x_max if math.isfinite(x_max) else None,
            "min_eps_tolerance": min_eps_tolerance,
            "eps_max": eps_max if min_eps_tolerance is not None else None,
            **provenance(model_path, data_path),
        }
        columns = {}
        if attack.targeted:
            columns["target"] = np.int64
        if min_eps_tolerance is not None:
            columns["eps_min"] = np.float64
        clean_correct = adversarial_correct = succeeded = 0
        linf_total = l2_total = 0.0
        eps_min_parts = []
        with AdversarialWriter(
            out_path,
            n_rows=reader.n_rows,
            row_shape=reader.row_shape,
            dtype=reader.dtype,
            y_template=reader.y_template,
            attrs=attrs,
            rows_per_chunk=min(rows_per_block, max(reader.n_rows, 1)),
            compression=compression,
            overwrite=overwrite,
            inputs=(model_path, data_path),
            columns=columns,
        ) as writer:
            started = time.perf_counter()
            for start, X, y in reader.chunks(rows_per_block):
                rows = np.ascontiguousarray(X.reshape(len(X), -1))
                labels = attack_labels(
                    model, rows, y if use_labels else None, attack, start, backend
                )
                X_adv = perturb(
                    model, rows, labels, attack, (x_min, x_max), first_row=start, backend=backend
                )
                pred_adv = backend.forward(model, X_adv, labels.Y[:0])[2]
                extra = {}
                if attack.targeted:
                    extra["target"] = labels.reference
                if min_eps_tolerance is not None:
                    extra["eps_min"] = minimal_eps(
                        model,
                        rows,
                        labels,
                        attack,
                        (x_min, x_max),
                        eps_max=eps_max,
                        tolerance=min_eps_tolerance,
                        first_row=start,
                        backend=backend,
                    )
                    eps_min_parts.append(extra["eps_min"])
                writer.write(start, X_adv.reshape(X.shape), y, labels.predicted, pred_adv, **extra)
                delta = (X_adv - rows).astype(np.float64)
                linf_total += float(np.abs(delta).max(axis=1, initial=0.0).sum())
                l2_total += float(np.linalg.norm(delta, axis=1).sum())
                succeeded += int(success_of(labels, pred_adv, attack.targeted).sum())
                if y is not None:
                    classes = y if y.ndim == 1 else np.argmax(y, axis=1)
                    clean_correct += int((labels.predicted == classes).sum())
                    adversarial_correct += int((pred_adv == classes).sum())
                if progress is not None:
                    progress(start + len(rows), reader.n_rows)
        n_rows = reader.n_rows
        labelled = reader.has_labels
    denominator = max(n_rows, 1)
    return AttackReport(
        output=Path(out_path),
        attack=attack,
        n_rows=n_rows,
        labels=attrs["labels"],
        clip=(x_min, x_max),
        clean_accuracy=clean_correct / denominator if labelled else None,
        adversarial_accuracy=adversarial_correct / denominator if labelled else None,
        success_rate=succeeded / denominator,
        mean_linf=linf_total / denominator,
        mean_l2=l2_total / denominator,
        seconds=time.perf_counter() - started,
        eps_min=np.concatenate(eps_min_parts) if eps_min_parts else None,
    )
