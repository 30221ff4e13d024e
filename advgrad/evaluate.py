"""Robustness evaluation: accuracy under attack per method and eps, and minimal-eps summaries."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, astuple, dataclass, replace

import numpy as np

from advgrad.attacks import (
    DEFAULT_ATTACK,
    MINIMAL_NORM_METHODS,
    PER_ROW_EPS_METHODS,
    Attack,
    as_rows,
    attack_labels,
    check_radius,
    check_search,
    minimal_eps,
    perturb,
)
from advgrad.autoattack import components, ensemble
from advgrad.backend import get_backend
from advgrad.model import Model
from advgrad.quantiles import spread_of

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


@dataclass(frozen=True)
class EvaluationSettings:
    """Checked settings of an evaluation (``evaluation_settings``): the methods, the
    ascending eps values, the attack whose other parameters every method runs with, the
    clip range, the labels used, and the minimal-eps search of the ``searched`` methods."""

    methods: tuple[str, ...]
    eps_values: tuple[float, ...]
    attack: Attack
    clip: tuple[float, float]
    use_labels: bool
    searched: tuple[str, ...]
    eps_max: float
    tolerance: float
    image_shape: tuple[int, ...] | None = None

    @property
    def curves(self) -> tuple[str, ...]:
        """The methods of the accuracy curves: ``methods`` with AutoAttack in its stages,
        each attack of its version (the accuracy after it and those before) then
        "autoattack"."""
        curves = []
        for method in self.methods:
            if method == "autoattack":
                curves += components(self.attack.version, self.attack.norm)
            curves.append(method)
        return tuple(curves)


def evaluation_settings(
    model: Model,
    *,
    methods: Sequence[str] = ("fgsm",),
    eps_values: Sequence[float] = DEFAULT_EPS,
    attack: Attack = DEFAULT_ATTACK,
    clip: tuple[float, float] = (0.0, 1.0),
    use_labels: bool = True,
    min_eps_tolerance: float | None = 1e-3,
    eps_max: float | None = None,
    image_shape: tuple[int, ...] | None = None,
) -> EvaluationSettings:
    """The settings of ``evaluate``, checked (see there).

    Raises
    ------
    ValueError
        An eps or step size that is negative or not finite in the model's dtype; an eps_max
        or tolerance that a bisection cannot reach (``check_search``).
    """
    eps_values = tuple(sorted({check_radius("eps", e, model.dtype) for e in eps_values}))
    if not eps_values:
        raise ValueError("give at least one eps value")
    for eps in eps_values:
        for method in methods:
            replace(attack, method=method, eps=eps).check_range(model.dtype)
    eps_max = eps_max if eps_max is not None else max(eps_values)
    tolerance = min_eps_tolerance if min_eps_tolerance is not None else 1e-3
    searched = tuple(
        m
        for m in methods
        if m in MINIMAL_NORM_METHODS or (min_eps_tolerance is not None and m in PER_ROW_EPS_METHODS)
    )
    if "autoattack" in methods:
        stages = components(attack.version, attack.norm)
        if both := [m for m in methods if m in stages]:
            raise ValueError(
                f"{', '.join(both)} already run inside autoattack ({attack.version}): "
                "its accuracy after each of them is reported; drop them from the methods"
            )
    if searched:
        eps_max, tolerance = check_search(
            eps_max, tolerance, model.dtype, names=("eps_max", "min_eps_tolerance (--min-eps)")
        )
    clip = (float(clip[0]), float(clip[1]))
    return EvaluationSettings(
        *(tuple(methods), eps_values, attack, clip, use_labels, searched, eps_max, tolerance),
        image_shape,
    )


@dataclass(frozen=True)
class EvaluatedRows:
    """What ``evaluate_rows`` found on a block of rows: its clean correct count; per
    (method, eps), the rows classified correctly under attack, the rows not, and the sum
    over the latter of the probability of their (wrong) prediction; per searched method,
    the rows' minimal eps (m,) float64."""

    n_rows: int
    clean_correct: int
    tallies: dict[tuple[str, float], tuple[int, int, float]]
    minimal: dict[str, np.ndarray]


def evaluate_rows(
    model: Model, rows: np.ndarray, y, settings: EvaluationSettings, first_row: int, backend
) -> EvaluatedRows:
    """Evaluate prepared rows (m, d) with labels y (m,) int or (m, C) soft; ``first_row``
    is the absolute index of the first row (seeds random starts and targets)."""
    classes = y if y.ndim == 1 else np.argmax(y, axis=1)
    no_labels = np.zeros((0, model.n_classes), dtype=model.dtype)
    clean_probabilities, _, clean_predicted = backend.forward(model, rows, no_labels)
    clean_right = clean_predicted == classes
    tallies, minimal = {}, {}
    for method in settings.methods:
        config = replace(settings.attack, method=method)
        labels = attack_labels(
            model, rows, y if settings.use_labels else None, config, first_row, backend
        )
        if method in settings.searched:
            minimal[method] = minimal_eps(
                model,
                rows,
                labels,
                config,
                settings.clip,
                eps_max=settings.eps_max,
                tolerance=settings.tolerance,
                first_row=first_row,
                backend=backend,
            )
        for eps in settings.eps_values:
            if method in MINIMAL_NORM_METHODS:
                right = clean_right & (minimal[method] > eps)
                tallies[method, eps] = (int(right.sum()), int((~right).sum()), 0.0)
                continue
            if method == "autoattack":
                found = ensemble(
                    *(model, rows, labels.reference, replace(config, eps=eps), settings.clip),
                    first_row=first_row,
                    backend=backend,
                    image_shape=settings.image_shape,
                )
                probabilities, _, predicted = backend.forward(model, found.X_adv, no_labels)
                for k, stage in enumerate((*found.components, method), start=1):
                    moved = (found.broken_by >= 1) & (found.broken_by <= k)  # the points then
                    right = np.where(moved, predicted, clean_predicted) == classes
                    stage_probabilities = np.where(
                        moved[:, None], probabilities, clean_probabilities
                    )
                    tallies[stage, eps] = _tally(right, stage_probabilities)
                continue
            X_adv = perturb(
                model,
                rows,
                labels,
                replace(config, eps=eps),
                settings.clip,
                first_row=first_row,
                backend=backend,
                image_shape=settings.image_shape,
            )
            probabilities, _, predicted = backend.forward(model, X_adv, no_labels)
            tallies[method, eps] = _tally(predicted == classes, probabilities)
    return EvaluatedRows(len(rows), int(clean_right.sum()), tallies, minimal)


def _tally(right: np.ndarray, probabilities: np.ndarray) -> tuple[int, int, float]:
    """(rows right, rows wrong, sum over the wrong rows of their largest probability)."""
    confidence = float(probabilities[~right].max(axis=1, initial=0.0).sum())
    return int(right.sum()), int((~right).sum()), confidence


class EvaluationTotals:
    """Running counts of an evaluation over blocks of rows, in order; ``state`` is what a
    checkpoint saves of them, and ``EvaluationTotals(settings, state)`` takes it back."""

    def __init__(self, settings: EvaluationSettings, state: dict | None = None) -> None:
        self.settings = settings
        keys = [(method, eps) for method in settings.curves for eps in settings.eps_values]
        state = state or {"n_rows": 0, "clean_correct": 0, "tallies": [[0, 0, 0.0]] * len(keys)}
        self.n_rows = state["n_rows"]
        self.clean_correct = state["clean_correct"]
        self.tallies = {key: list(tally) for key, tally in zip(keys, state["tallies"], strict=True)}

    @property
    def state(self) -> dict:
        """The counts as JSON-serialisable values."""
        return {
            "n_rows": self.n_rows,
            "clean_correct": self.clean_correct,
            "tallies": list(self.tallies.values()),
        }

    def add(self, block: EvaluatedRows) -> None:
        """Count a block's rows (blocks in the order of their rows)."""
        self.n_rows += block.n_rows
        self.clean_correct += block.clean_correct
        for key, (correct, wrong, confidence) in block.tallies.items():
            tally = self.tallies[key]
            tally[0] += correct
            tally[1] += wrong
            tally[2] += confidence

    def evaluation(self, minimal: Mapping[str, Callable[[], Iterable[np.ndarray]]]) -> Evaluation:
        """The ``Evaluation`` of the rows counted, with ``minimal``: for each searched method,
        a function giving every row's minimal eps (float64) in blocks, each time it is called
        (``advgrad.quantiles.lower_quantiles`` reads them a few times); for an array in
        memory, ``lambda: [values]``."""
        settings, n_rows = self.settings, self.n_rows
        points = []
        for (method, eps), (correct, wrong, confidence) in self.tallies.items():
            has_confidence = wrong and method not in MINIMAL_NORM_METHODS
            mean_confidence = confidence / wrong if has_confidence else None
            points.append(CurvePoint(method, eps, _fraction(correct, n_rows), mean_confidence))
        summaries = []
        for method in settings.searched:
            spread = spread_of(minimal[method])
            summaries.append(
                MinimalEpsSummary(
                    method,
                    *((None,) * 4 if spread is None else astuple(spread)),
                    settings.eps_max,
                    settings.tolerance,
                )
            )
        clean_accuracy = _fraction(self.clean_correct, n_rows)
        return Evaluation(
            n_rows, settings.attack.norm, clean_accuracy, tuple(points), tuple(summaries)
        )


def _fraction(count: float, n_rows: int) -> float | None:
    """count / n_rows, or None for 0 rows."""
    return count / n_rows if n_rows else None


def evaluate(model: Model, X, y, *, backend=None, **options) -> Evaluation:
    """Evaluate a model under attack on rows X (N, ...) with labels y (N,) int or (N, C) soft.

    Every method in ``methods`` runs with the other parameters of ``attack`` (norm,
    steps, restarts, seed...) at every eps in ``eps_values``, against the labels
    (``use_labels``) or the clean predictions, clipped to ``clip``. DeepFool takes no eps:
    a row counts as robust at eps when it is classified correctly and DeepFool fails or
    needs a perturbation larger than eps. The minimal eps of each method is bisected in
    [0, eps_max] (default: the largest eps) to ``min_eps_tolerance`` (None: skipped, except
    for DeepFool, which needs it). ``options`` are those of ``evaluation_settings``;
    ``backend`` defaults to the CPU's.
    """
    settings = evaluation_settings(model, **options)
    totals = EvaluationTotals(settings)
    rows, y = as_rows(model, X), np.asarray(y)
    block = evaluate_rows(model, rows, y, settings, 0, backend or get_backend())
    totals.add(block)
    return totals.evaluation({m: (lambda v=v: [v]) for m, v in block.minimal.items()})
