"""File-to-file attacks: stream a dataset through the kernels into an adversarial dataset."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import advgrad
from advgrad.attacks import NORMS, label_matrix
from advgrad.backend import get_backend
from advgrad.errors import InputFileError
from advgrad.io import AdversarialWriter, load_model, open_dataset, sha256_file

DEFAULT_BATCH_SIZE = 8192


@dataclass(frozen=True)
class AttackReport:
    """What ``attack_file`` did.

    ``success_rate`` is the fraction of rows whose predicted class changed; the accuracies
    are None when the dataset has no labels. Perturbation norms are means over rows of
    ||X_adv - X|| on the flattened rows. ``seconds`` covers reading, attacking and writing
    the rows (not loading the model or hashing the inputs).
    """

    output: Path
    n_rows: int
    eps: float
    norm: str
    labels: str
    clip: tuple[float, float]
    clean_accuracy: float | None
    adversarial_accuracy: float | None
    success_rate: float
    mean_linf: float
    mean_l2: float
    seconds: float

    @property
    def rows_per_second(self) -> float:
        """Rows attacked per second, reading and writing included."""
        return self.n_rows / self.seconds if self.seconds > 0 else math.inf


def default_output_name(data_path: str | os.PathLike, eps: float, norm: str) -> Path:
    """``<data stem>-fgsm-l<norm>-eps<eps>.h5`` in the current directory."""
    return Path(f"{Path(data_path).stem}-fgsm-l{norm}-eps{eps:g}.h5")


def _clip_range(clip, reader, model) -> tuple[float, float]:
    """The explicit clip, else the dataset's x_min/x_max, else the model's, else none."""
    if clip is not None:
        return float(clip[0]), float(clip[1])
    for source in (reader, model):
        if source.x_min is not None and source.x_max is not None:
            return source.x_min, source.x_max
    return -math.inf, math.inf


def _class_of(y: np.ndarray) -> np.ndarray:
    """Integer classes of a block of labels: as they are, or the argmax of soft labels."""
    return y if y.ndim == 1 else np.argmax(y, axis=1)


def attack_file(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    eps: float = 0.1,
    norm: str = "inf",
    batch_size: int = DEFAULT_BATCH_SIZE,
    use_labels: bool = False,
    clip: tuple[float, float] | None = None,
    compression: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> AttackReport:
    """FGM-attack every row of a dataset file and write the adversarial dataset.

    Rows stream from ``data_path`` in blocks of ``batch_size``, so memory does not grow
    with the number of rows; the output is written beside ``out_path`` and renamed into
    place once complete (DESIGN.md sections 3 and 4). Computation runs in the dataset's
    dtype. Labels are the model's predictions unless ``use_labels``, which takes the
    dataset's ``/y``. ``clip`` defaults to the dataset's (else the model's) x_min/x_max,
    else no clipping. ``progress(rows_done, n_rows)`` is called after each block.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    model = load_model(model_path)
    backend = get_backend(device)
    with open_dataset(data_path, n_classes=model.n_classes) as reader:
        if math.prod(reader.row_shape) != model.n_inputs:
            raise InputFileError(
                data_path,
                "/X",
                f"rows have shape {reader.row_shape} ({math.prod(reader.row_shape)} features); "
                f"the model expects {model.n_inputs}",
            )
        if use_labels and not reader.has_labels:
            raise InputFileError(data_path, "/y", "is missing; attack the predictions instead")
        model = model.astype(reader.dtype)
        x_min, x_max = _clip_range(clip, reader, model)
        if not x_min <= x_max:
            raise ValueError(f"clip range ({x_min}, {x_max}) is empty")
        attrs = {
            "attack": "fgsm" if norm == "inf" else "fgm",
            "norm": norm,
            "eps": float(eps),
            "step_size": float(eps),
            "steps": 1,
            "targeted": False,
            "labels": "dataset" if use_labels else "predictions",
            "x_min": x_min if math.isfinite(x_min) else None,  # None: not stored
            "x_max": x_max if math.isfinite(x_max) else None,
            "model_sha256": sha256_file(model_path),
            "data_sha256": sha256_file(data_path),
            "model_file": Path(model_path).name,
            "data_file": Path(data_path).name,
            "advgrad_version": advgrad.__version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        clean_correct = adversarial_correct = changed = 0
        linf_total = l2_total = 0.0
        with AdversarialWriter(
            out_path,
            n_rows=reader.n_rows,
            row_shape=reader.row_shape,
            dtype=reader.dtype,
            y_template=reader.y_template,
            attrs=attrs,
            rows_per_chunk=min(batch_size, max(reader.n_rows, 1)),
            compression=compression,
            overwrite=overwrite,
            inputs=(model_path, data_path),
        ) as writer:
            started = time.perf_counter()
            for start, X, y in reader.chunks(batch_size):
                rows = np.ascontiguousarray(X.reshape(len(X), -1))
                Y = label_matrix(model, y if use_labels else None, len(rows))
                X_adv, pred_clean = backend.fgm_step(model, rows, Y, eps, NORMS[norm], x_min, x_max)
                pred_adv = backend.forward(model, X_adv, Y[:0])[2]
                writer.write(start, X_adv.reshape(X.shape), y, pred_clean, pred_adv)
                delta = (X_adv - rows).astype(np.float64)
                linf_total += float(np.abs(delta).max(axis=1, initial=0.0).sum())
                l2_total += float(np.linalg.norm(delta, axis=1).sum())
                changed += int((pred_adv != pred_clean).sum())
                if y is not None:
                    classes = _class_of(y)
                    clean_correct += int((pred_clean == classes).sum())
                    adversarial_correct += int((pred_adv == classes).sum())
                if progress is not None:
                    progress(start + len(rows), reader.n_rows)
        n_rows = reader.n_rows
        labelled = reader.has_labels
    denominator = max(n_rows, 1)
    return AttackReport(
        output=Path(out_path),
        n_rows=n_rows,
        eps=float(eps),
        norm=norm,
        labels=attrs["labels"],
        clip=(x_min, x_max),
        clean_accuracy=clean_correct / denominator if labelled else None,
        adversarial_accuracy=adversarial_correct / denominator if labelled else None,
        success_rate=changed / denominator,
        mean_linf=linf_total / denominator,
        mean_l2=l2_total / denominator,
        seconds=time.perf_counter() - started,
    )
