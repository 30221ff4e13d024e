"""Robustness evaluation: accuracy under attack per method and eps, and minimal-eps summaries."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from advgrad.attacks import (
    DEFAULT_ATTACK,
    Attack,
    as_rows,
    attack_labels,
    check_radius,
    check_search,
    minimal_eps,
    perturb,
    quartiles,
)
from advgrad.backend import get_backend
from advgrad.batch import clip_range, open_for_model, rows_per_block
from advgrad.errors import InputFileError
from advgrad.model import MAX_WEIGHTS, Model

DEFAULT_EPS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)


@dataclass(frozen=True)
class CurvePoint:
    """Accuracy of one method at one eps (None for 0 rows); ``wrong_confidence`` is the mean
    probability the model gives its (wrong) prediction on the rows it gets wrong (None if
    there are none)."""

    method: str
    eps: float
    accuracy: float | None
    wrong_confidence: float | None


@dataclass(frozen=True)
class MinimalEpsSummary:
    """Quartiles of the per-row minimal eps of one method (inf: not found up to eps_max) and
    the fraction of rows where one was found; None for 0 rows."""

    method: str
    q25: float | None
    median: float | None
    q75: float | None
    found: float | None
    eps_max: float
    tolerance: float


@dataclass(frozen=True)
class Evaluation:
    """Result of ``evaluate``: one ``CurvePoint`` per (method, eps), one summary per method
    whose minimal eps was searched. ``clean_accuracy`` is None for 0 rows."""

    n_rows: int
    norm: str
    clean_accuracy: float | None
    points: tuple[CurvePoint, ...]
    minimal_eps: tuple[MinimalEpsSummary, ...]

    def accuracy(self, method: str, eps: float) -> float | None:
        """The accuracy of ``method`` at ``eps`` (None for 0 rows)."""
        for point in self.points:
            if point.method == method and point.eps == eps:
                return point.accuracy
        raise KeyError((method, eps))

    def to_json(self) -> str:
        """The evaluation as JSON (inf written as the string "inf")."""

        def clean(value):
            if isinstance(value, float) and math.isinf(value):
                return "inf"
            if isinstance(value, dict):
                return {key: clean(item) for key, item in value.items()}
            if isinstance(value, list | tuple):
                return [clean(item) for item in value]
            return value

        return json.dumps(clean(asdict(self)), indent=2)


class _Tally:
    """Running counts of one (method, eps) over blocks of rows."""

    def __init__(self) -> None:
        self.correct = 0
        self.wrong = 0
        self.wrong_confidence = 0.0

    def add(self, right: np.ndarray, probabilities: np.ndarray | None) -> None:
        """Count a block: ``right`` per row; ``probabilities`` (N, C) of the rows, or None."""
        self.correct += int(right.sum())
        self.wrong += int((~right).sum())
        if probabilities is not None:
            self.wrong_confidence += float(probabilities[~right].max(axis=1, initial=0.0).sum())

    def point(self, method: str, eps: float, n_rows: int) -> CurvePoint:
        has_confidence = self.wrong and method != "deepfool"
        confidence = self.wrong_confidence / self.wrong if has_confidence else None
        return CurvePoint(method, eps, _fraction(self.correct, n_rows), confidence)


def _fraction(count: float, n_rows: int) -> float | None:
    """count / n_rows, or None for 0 rows."""
    return count / n_rows if n_rows else None


def evaluate_blocks(
    model: Model,
    blocks,
    *,
    methods: Sequence[str] = ("fgsm",),
    eps_values: Sequence[float] = DEFAULT_EPS,
    attack: Attack = DEFAULT_ATTACK,
    clip: tuple[float, float] = (0.0, 1.0),
    use_labels: bool = True,
    min_eps_tolerance: float | None = 1e-3,
    eps_max: float | None = None,
    backend=None,
    progress: Callable[[int], None] | None = None,
) -> Evaluation:
    """Evaluate over an iterable of ``(first_row, X, y)`` blocks (y: int or soft labels).

    Every method in ``methods`` runs with the other parameters of ``attack`` (norm,
    steps, restarts, seed...) at every eps, against the labels (``use_labels``) or the
    clean predictions. DeepFool takes no eps: a row counts as robust at eps when it is
    classified correctly and DeepFool fails or needs a perturbation larger than eps. The
    minimal eps of each method is bisected in [0, eps_max] (default: the largest eps) to
    ``min_eps_tolerance`` (None: skipped, except for DeepFool, which needs it).

    Raises
    ------
    ValueError
        An eps or step size that is negative or not finite in the model's dtype; an eps_max
        or tolerance that a bisection cannot reach (``check_search``).
    """
    backend = backend or get_backend()
    eps_values = sorted({check_radius("eps", e, model.dtype) for e in eps_values})
    if not eps_values:
        raise ValueError("give at least one eps value")
    for eps in eps_values:
        for method in methods:
            replace(attack, method=method, eps=eps).check_range(model.dtype)
    eps_max = eps_max if eps_max is not None else max(eps_values)
    tolerance = min_eps_tolerance if min_eps_tolerance is not None else 1e-3
    searched = [m for m in methods if m == "deepfool" or min_eps_tolerance is not None]
    if searched:
        eps_max, tolerance = check_search(
            eps_max, tolerance, model.dtype, names=("eps_max", "min_eps_tolerance (--min-eps)")
        )
    tallies = {(method, eps): _Tally() for method in methods for eps in eps_values}
    minimal = {method: [] for method in searched}
    no_labels = np.zeros((0, model.n_classes), dtype=model.dtype)
    n_rows = clean_correct = 0
    for first_row, X, y in blocks:
        rows = as_rows(model, X)
        classes = y if y.ndim == 1 else np.argmax(y, axis=1)
        clean_right = backend.forward(model, rows, no_labels)[2] == classes
        clean_correct += int(clean_right.sum())
        for method in methods:
            config = replace(attack, method=method)
            labels = attack_labels(
                model, rows, y if use_labels else None, config, first_row, backend
            )
            if method in minimal:
                minimal[method].append(
                    minimal_eps(
                        model,
                        rows,
                        labels,
                        config,
                        clip,
                        eps_max=eps_max,
                        tolerance=tolerance,
                        first_row=first_row,
                        backend=backend,
                    )
                )
            for eps in eps_values:
                if method == "deepfool":
                    tallies[method, eps].add(clean_right & (minimal[method][-1] > eps), None)
                    continue
                X_adv = perturb(
                    model,
                    rows,
                    labels,
                    replace(config, eps=eps),
                    clip,
                    first_row=first_row,
                    backend=backend,
                )
                probabilities, _, predicted = backend.forward(model, X_adv, no_labels)
                tallies[method, eps].add(predicted == classes, probabilities)
        n_rows += len(rows)
        if progress is not None:
            progress(n_rows)
    summaries = []
    for method, parts in minimal.items():
        values = np.concatenate(parts) if parts else np.empty(0)
        summaries.append(
            MinimalEpsSummary(
                method,
                *(quartiles(values) or (None, None, None)),
                _fraction(int(np.isfinite(values).sum()), n_rows),
                eps_max,
                tolerance,
            )
        )
    points = tuple(tallies[key].point(*key, n_rows) for key in tallies)
    clean_accuracy = _fraction(clean_correct, n_rows)
    return Evaluation(n_rows, attack.norm, clean_accuracy, points, tuple(summaries))


def evaluate(model: Model, X, y, **options) -> Evaluation:
    """Evaluate in memory: X (N, ...), y (N,) int or (N, C) soft labels; see evaluate_blocks."""
    return evaluate_blocks(model, [(0, np.asarray(X), np.asarray(y))], **options)


def evaluate_file(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    *,
    batch_size: int = 8192,
    clip: tuple[float, float] | None = None,
    device: str = "cpu",
    max_weights: int = MAX_WEIGHTS,
    **options,
) -> Evaluation:
    """Evaluate a model on a labelled dataset file, streaming it in blocks of
    ``rows_per_block(batch_size, model)`` rows.

    ``clip`` defaults to the dataset's (else the model's) x_min/x_max, else none;
    ``max_weights`` bounds the model (``open_for_model``); ``options`` as in
    ``evaluate_blocks``. Computation runs in the dataset's dtype.
    """
    with open_for_model(model_path, data_path, max_weights=max_weights) as (model, reader):
        if not reader.has_labels:
            raise InputFileError(data_path, "/y", "is missing; evaluation needs labels")
        return evaluate_blocks(
            model,
            reader.chunks(rows_per_block(batch_size, model)),
            clip=clip_range(clip, reader, model),
            backend=get_backend(device),
            **options,
        )


def require_matplotlib():
    """matplotlib.pyplot on the non-interactive Agg backend; ValueError when missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ValueError("plotting needs matplotlib: pip install 'advgrad[plot]'") from error
    return plt


def plot_curves(evaluation: Evaluation, path: str | os.PathLike) -> Path:
    """Accuracy against eps, one line per method, saved as an image (needs matplotlib)."""
    plt = require_matplotlib()
    figure, axes = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(point.method for point in evaluation.points):
        points = [point for point in evaluation.points if point.method == method]
        axes.plot([p.eps for p in points], [p.accuracy for p in points], marker="o", label=method)
    axes.set_xlabel(f"eps (L{evaluation.norm})")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0.0, 1.0)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(f"Accuracy under attack ({evaluation.n_rows} rows)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
