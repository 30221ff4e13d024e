"""Check the analytic input gradient against central finite differences in float64."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from advgrad.attacks import as_rows, input_gradient, label_matrix, loss, predict
from advgrad.model import Model

DEFAULT_STEP = 1e-6
DEFAULT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class GradcheckResult:
    """Outcome of ``gradcheck``.

    ``relative_error`` is ||G - F|| / ||F|| over all checked rows (Frobenius norms), G the
    analytic and F the finite-difference gradient; ``max_abs_error`` the largest |G - F|.
    Central differences carry rounding noise of about 1e-16 |J| / h per entry, so the
    relative error of a single tiny gradient entry says little; the batch norm does.
    """

    relative_error: float
    max_abs_error: float
    n_rows: int
    n_inputs: int
    step: float

    def passed(self, tolerance: float = DEFAULT_TOLERANCE) -> bool:
        """True when the relative error is at most ``tolerance``."""
        return self.relative_error <= tolerance


def finite_difference_gradient(model: Model, X, Y, *, step: float = DEFAULT_STEP) -> np.ndarray:
    """dJ/dX by central differences of the float64 per-sample loss.

    Parameters
    ----------
    model : Model (computed in float64)
    X : (N, d) array
    Y : (N, C) float labels, one-hot or soft
    step : float, the finite-difference step h

    Returns
    -------
    (N, d) float64. Each coordinate moves by +-h in every row at once: 2 d forward passes.
    """
    model = model.astype(np.float64)
    rows = as_rows(model, X)
    gradient = np.empty_like(rows)
    moved = rows.copy()
    for i in range(rows.shape[1]):
        moved[:, i] = rows[:, i] + step
        upper = loss(model, moved, Y)
        moved[:, i] = rows[:, i] - step
        lower = loss(model, moved, Y)
        moved[:, i] = rows[:, i]
        gradient[:, i] = (upper - lower) / (2.0 * step)
    return gradient


def gradcheck(model: Model, X, y=None, *, step: float = DEFAULT_STEP) -> GradcheckResult:
    """Compare ``input_gradient`` with central finite differences, both in float64.

    ``X`` (N, ...) and ``y`` as in ``input_gradient``; None takes the predictions at X.
    """
    if not (math.isfinite(step) and step > 0.0):
        raise ValueError(f"the finite-difference step must be finite and > 0, got {step}")
    model = model.astype(np.float64)
    rows = as_rows(model, X)
    if not len(rows):
        raise ValueError("gradcheck needs at least one row")
    labels = predict(model, rows) if y is None else y
    Y = label_matrix(model, labels, len(rows))
    analytic = input_gradient(model, rows, Y)
    numeric = finite_difference_gradient(model, rows, Y, step=step)
    error = analytic - numeric
    error_norm = np.linalg.norm(error)
    # a step too small or too large for the rows leaves F at 0 or tiny: the error is then inf
    with np.errstate(over="ignore", divide="ignore"):
        relative = error_norm / np.linalg.norm(numeric) if error_norm else 0.0
    return GradcheckResult(
        float(relative), float(np.abs(error).max()), rows.shape[0], rows.shape[1], step
    )
