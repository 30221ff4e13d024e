"""Array-level attacks on a ``Model``: input gradients and fast-gradient (FGSM-family) steps.

Every function takes inputs ``X`` of shape (N, ...) whose trailing dimensions flatten to the
model's d, computes in the model's dtype, and returns arrays shaped like ``X``.
"""

from __future__ import annotations

import numpy as np

from advgrad.backend import get_backend
from advgrad.model import Model

NORMS = {"inf": np.inf, "2": 2.0, "1": 1.0}
SOFT_LABEL_TOLERANCE = 1e-3  # largest |sum_k Y_nk - 1| accepted for soft labels


def as_rows(model: Model, X) -> np.ndarray:
    """X (N, ...) as a C-contiguous (N, d) array of the model's dtype; validates d."""
    X = np.asarray(X)
    if X.ndim < 1:
        raise ValueError("X must have a leading row dimension, got a scalar")
    if X.dtype.kind not in "fiu":
        raise ValueError(f"X must be numeric, got dtype {X.dtype}")
    rows = X.reshape(X.shape[0], -1) if X.ndim != 2 else X
    if rows.shape[1] != model.n_inputs:
        raise ValueError(
            f"X rows have {rows.shape[1]} features (shape {X.shape}); the model expects "
            f"d = {model.n_inputs}"
        )
    return np.ascontiguousarray(rows, dtype=model.dtype)


def label_matrix(model: Model, y, n_rows: int) -> np.ndarray:
    """Labels as a (N, C) float matrix of the model's dtype; (0, C) when ``y`` is None.

    ``y`` holds integer classes (N,) in [0, C), or soft labels (N, C) with rows summing to 1.
    None means "use the model's own predictions" (the kernels' 0-row convention).
    """
    C = model.n_classes
    if y is None:
        return np.zeros((0, C), dtype=model.dtype)
    y = np.asarray(y)
    if y.shape[:1] != (n_rows,):
        raise ValueError(f"y has {y.shape[:1] or 'no'} rows, X has {n_rows}")
    if y.ndim == 1:
        if y.dtype.kind not in "iu":
            raise ValueError(f"integer labels expected for 1-D y, got dtype {y.dtype}")
        bad = np.flatnonzero((y < 0) | (y >= C))
        if bad.size:
            raise ValueError(f"label {y[bad[0]]} at row {bad[0]} is outside [0, {C})")
        Y = np.zeros((n_rows, C), dtype=model.dtype)
        Y[np.arange(n_rows), y] = 1.0
        return Y
    if y.ndim != 2 or y.shape[1] != C or y.dtype.kind != "f":
        raise ValueError(f"soft labels must be float (N, {C}), got {y.dtype} {y.shape}")
    if not np.isfinite(y).all() or (y < 0).any():
        raise ValueError("soft labels must be finite and non-negative")
    worst = np.abs(y.sum(axis=1) - 1.0).max(initial=0.0)
    if worst > SOFT_LABEL_TOLERANCE:
        raise ValueError(f"soft label rows must sum to 1 (off by up to {worst:.3g})")
    return np.ascontiguousarray(y, dtype=model.dtype)


def _norm_order(norm) -> float:
    key = str(norm).removesuffix(".0")
    if key not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return NORMS[key]


def input_gradient(model: Model, X, y=None, *, device: str = "cpu") -> np.ndarray:
    """dJ/dX of the per-sample softmax cross-entropy.

    Parameters
    ----------
    model : Model
    X : (N, ...) array, trailing dimensions flatten to d
    y : (N,) int labels, (N, C) float soft labels, or None for the model's predictions

    Returns
    -------
    G : array shaped like X, in the model's dtype (float32 or float64)
    """
    rows = as_rows(model, X)
    G, _ = get_backend(device).input_gradient(model, rows, label_matrix(model, y, len(rows)))
    return G.reshape(np.shape(X))


def fgsm(
    model: Model,
    X,
    y=None,
    *,
    eps: float,
    norm="inf",
    clip: tuple[float, float] | None = (0.0, 1.0),
    targeted: bool = False,
    device: str = "cpu",
) -> np.ndarray:
    """One fast-gradient step: X' = clip(X + eps * direction(dJ/dX)).

    Parameters
    ----------
    model : Model
    X : (N, ...) array, trailing dimensions flatten to d
    y : (N,) int labels, (N, C) soft labels, or None to attack the model's predictions;
        with ``targeted=True`` the target classes (required)
    eps : float >= 0, the step length in the chosen norm
    norm : "inf" (sign of the gradient), "2" (G / ||G||_2) or "1" (G / ||G||_1)
    clip : (x_min, x_max) or None for no clipping
    targeted : descend the loss toward ``y`` instead of ascending it

    Returns
    -------
    X_adv : array shaped like X, in the model's dtype
    """
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if targeted and y is None:
        raise ValueError("a targeted attack needs the target classes as y")
    x_min, x_max = (-np.inf, np.inf) if clip is None else (float(clip[0]), float(clip[1]))
    if not x_min <= x_max:
        raise ValueError(f"clip range ({x_min}, {x_max}) is empty")
    rows = as_rows(model, X)
    step = -eps if targeted else eps
    X_adv, _ = get_backend(device).fgm_step(
        model, rows, label_matrix(model, y, len(rows)), step, _norm_order(norm), x_min, x_max
    )
    return X_adv.reshape(np.shape(X))


def predict_proba(model: Model, X, *, device: str = "cpu") -> np.ndarray:
    """Class probabilities (N, C) of X (N, ...), in the model's dtype."""
    rows = as_rows(model, X)
    P, _, _ = get_backend(device).forward(model, rows, label_matrix(model, None, len(rows)))
    return P


def predict(model: Model, X, *, device: str = "cpu") -> np.ndarray:
    """Predicted classes (N,) int64 of X (N, ...)."""
    rows = as_rows(model, X)
    _, _, predicted = get_backend(device).forward(model, rows, label_matrix(model, None, len(rows)))
    return predicted


def loss(model: Model, X, y=None, *, device: str = "cpu") -> np.ndarray:
    """Per-sample cross-entropy (N,) of X against y (None: against the predictions)."""
    rows = as_rows(model, X)
    _, losses, _ = get_backend(device).forward(model, rows, label_matrix(model, y, len(rows)))
    return losses
