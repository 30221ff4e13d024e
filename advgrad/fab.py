"""FAB, the fast adaptive boundary attack (Croce & Hein, ICML 2020), untargeted (``fab``) and
targeted (``fab_targeted``, AutoAttack's FAB-T), written once over a backend.

FAB looks for the adversarial point of smallest norm: at the current point it linearises a
boundary of the true class y (the zero set of f = z_k - z_y, with g its input gradient),
projects both the current point and the clean row onto that hyperplane within the box
[x_min, x_max], and steps to a mix of the two projections biased toward the clean row.
``fab_targeted`` takes the boundary of a target t, running against the highest non-true
classes of the clean row one after another, as AutoAttack's FAB-T does; ``fab`` takes at
each step the boundary of the class k != y nearest in its linearisation, |f_k| / ||g_k||_q
smallest with q the dual of the norm (1 for inf, 2 for 2, inf for 1), g_k the closed-form
logit Jacobian W1 diag(a (1 - a)) (W2[:, k] - W2[:, y]), as the reference's untargeted FAB
(AutoAttack's "plus" version) does.

The semantics are those of the reference implementation (fra31/auto-attack,
``autoattack/fab_base.py``, ``fab_pt.py``, ``fab_projections.py``) with ``ALPHA_MAX``,
``OVERSHOOT`` and ``BACKWARD`` (AutoAttack's settings):

- the hyperplane at the current point x: f + <g, v - x> = 0;
- the projections: the smallest perturbation d in the norm with <g, d> = the hyperplane's
  gap and the point plus d in the box (L-inf and L2: a level found on a piecewise linear
  function; L1: the coordinates of largest |g| first, equal ones by index, which changes
  the point but not its norm). Where the box does not reach the hyperplane every
  coordinate moves to the bound that gets closest, as the reference does;
- step: d1, d2 the projections of x and of the clean row x0, a1, a2 their norms (at least
  ``NORM_FLOOR``), alpha = min(a1 / (a1 + a2), ``ALPHA_MAX``); the next point is
  ((x + eta d1) (1 - alpha) + (x0 + eta d2) alpha) clipped to the box, eta = ``OVERSHOOT``;
- a point the model misclassifies (argmax != y, whatever the target) is kept when its
  distance to x0 is the smallest of the run so far, and the run goes on from
  x0 + ``BACKWARD`` (x - x0);
- the first run (of each target) starts at the clean row; a restart r >= 1 at
  x0 + eps / 2 u / ||u||_p, clipped to the box, u uniform in the cube (inf) or Gaussian
  (2 and 1, as the reference draws them);
- runs go in turn (FAB-T: targets, and each target's restarts), each only on the rows that
  no run has broken yet; a run breaks a row when its smallest adversarial point is within
  eps.

Rows no run breaks, and rows the model misclassifies already, are returned unchanged (the
reference keeps only adversarial points within eps). Differences from the reference: the
box is [x_min, x_max] where the reference fixes [0, 1] (an infinite bound: no box on that
side), a coordinate of a row outside the box may still move back toward it, and a zero
gradient coordinate is one that is exactly 0 (the reference's L2 projection takes
|g| < 1e-8 as 0).

Random starts come from ``seed``: restart r of target k draws from the stream
k * restarts + r of ``random_in_ball`` (untargeted: stream r) for the row's absolute index,
so a row's result does not depend on the batch it is processed in, as far as the backend's
gradient of a row does not depend on the rows beside it.

Each run is one call of ``backend.fab_run``: the backend runs every step of the run, the
gradients, the projections (in float64, by selection in expected linear time, no sort) and
the steps fused per block of rows (``advgrad.kernels.fab``); each iterate is stored in the
model's dtype. The hidden layer of a point the run backs up to is formed from those of the
two points it lies between (x -> x W1 is linear), equal to its own up to rounding.
"""

from __future__ import annotations

import math

import numpy as np

from advgrad.attacks import (
    TARGET_CLASSES,
    as_rows,
    check_count,
    check_radius,
    check_seed,
    norm_order,
    random_in_ball,
    ranked_targets,
    row_indices,
)
from advgrad.backend import get_backend
from advgrad.backend_common import loss_arguments
from advgrad.kernels.fab import ALPHA_MAX, BACKWARD, NORM_FLOOR, OVERSHOOT
from advgrad.model import Model

__all__ = ["ALPHA_MAX", "BACKWARD", "NORM_FLOOR", "OVERSHOOT", "fab", "fab_targeted"]

START_FRACTION = 0.5
"""A random start lies at START_FRACTION * eps from the clean row."""


def fab(
    model: Model,
    X,
    labels=None,
    *,
    eps: float,
    norm="inf",
    steps: int = 100,
    restarts: int = 1,
    seed: int = 0,
    x_min: float = -math.inf,
    x_max: float = math.inf,
    backend=None,
    first_row: int | np.ndarray = 0,
) -> np.ndarray:
    """Untargeted FAB: the smallest adversarial point FAB finds, stepping at each iterate
    toward the nearest linearised boundary of the true class, kept where it lies within
    ``eps`` (see the module docstring). AutoAttack's "plus" version runs it with 5
    restarts.

    Parameters
    ----------
    model : Model
    X : (N, ...) array, trailing dimensions flatten to d; computed in the model's dtype
    labels : (N,) int, the true classes; None: the model's predictions
    eps : float > 0, the radius in ``norm`` within which an adversarial point counts (and
        twice the distance of the random starts)
    norm : "inf", "2" or "1"
    steps : int >= 1, steps of each run
    restarts : int >= 1, runs; the first starts at the clean row, the others at random
        points
    seed : int in [0, 2**63), seeds the random starts
    x_min, x_max : float, the box every point stays in (infinite: none)
    backend : a backend (``advgrad.backend.get_backend``); None: the CPU's
    first_row : int >= 0, the absolute index of X's first row, or (N,) int that of every
        row: the random starts depend on it

    Returns
    -------
    X_adv : array shaped like X, in the model's dtype: for each row broken within eps the
        adversarial point of smallest norm of the first run that broke it, else the clean row

    Raises ValueError (one line) for a bad setting, label or shape.
    """
    settings = (eps, norm, steps, restarts, seed, x_min, x_max, backend, first_row)
    return _fab(model, X, labels, 0, *settings)


def fab_targeted(
    model: Model,
    X,
    labels=None,
    *,
    eps: float,
    norm="inf",
    steps: int = 100,
    restarts: int = 1,
    target_classes: int = TARGET_CLASSES,
    seed: int = 0,
    x_min: float = -math.inf,
    x_max: float = math.inf,
    backend=None,
    first_row: int | np.ndarray = 0,
) -> np.ndarray:
    """FAB-T: the smallest adversarial point FAB finds against each of the
    ``target_classes`` highest non-true logits of the clean row in turn, kept where it lies
    within ``eps`` (see the module docstring).

    Parameters
    ----------
    model : Model
    X : (N, ...) array, trailing dimensions flatten to d; computed in the model's dtype
    labels : (N,) int, the true classes; None: the model's predictions
    eps : float > 0, the radius in ``norm`` within which an adversarial point counts (and
        twice the distance of the random starts)
    norm : "inf", "2" or "1"
    steps : int >= 1, steps of each run
    restarts : int >= 1, runs per target; the first starts at the clean row, the others at
        random points
    target_classes : int >= 1, the number of targets; at most C - 1 are used
    seed : int in [0, 2**63), seeds the random starts
    x_min, x_max : float, the box every point stays in (infinite: none)
    backend : a backend (``advgrad.backend.get_backend``); None: the CPU's
    first_row : int >= 0, the absolute index of X's first row, or (N,) int that of every
        row: the random starts depend on it

    Returns
    -------
    X_adv : array shaped like X, in the model's dtype: for each row broken within eps the
        adversarial point of smallest norm of the first run that broke it, else the clean row

    Raises ValueError (one line) for a bad setting, label or shape.
    """
    n_targets = min(check_count("target_classes", target_classes), model.n_classes - 1)
    settings = (eps, norm, steps, restarts, seed, x_min, x_max, backend, first_row)
    return _fab(model, X, labels, n_targets, *settings)


def _fab(
    model,
    X,
    labels,
    target_classes,
    eps,
    norm,
    steps,
    restarts,
    seed,
    x_min,
    x_max,
    backend,
    first_row,
) -> np.ndarray:
    """``fab`` (target_classes 0) or ``fab_targeted``: checks the settings, then runs
    ``restarts`` runs (for each of the ``target_classes`` targets in turn) on the rows no
    run has broken yet."""
    p = norm_order(norm)
    if not check_radius("eps", eps, model.dtype) > 0.0:
        raise ValueError("eps must be > 0")
    steps = check_count("steps", steps)
    n_restarts = check_count("restarts", restarts)
    seed = check_seed(seed)
    x_min, x_max = float(x_min), float(x_max)
    if not x_min <= x_max:
        raise ValueError(f"clip range ({x_min}, {x_max}) is empty")
    backend = backend or get_backend()
    rows = as_rows(model, X)
    index = row_indices(first_row, len(rows))
    Z = backend.logits(model, rows)
    if labels is None:
        labels = np.argmax(Z, axis=1)
    _, labels, _, _ = loss_arguments(model.n_classes, len(rows), "ce", labels, None, 0.0)
    targets = ranked_targets(Z, labels, target_classes) if target_classes else None
    box = (x_min, x_max)
    X_adv = rows.copy()
    broken = np.argmax(Z, axis=1) != labels
    for run in range(max(target_classes, 1) * n_restarts):  # restart r of target k
        todo = np.flatnonzero(~broken)
        if not todo.size:
            break
        start = rows[todo]
        if run % n_restarts:
            start = random_start(start, eps, p, seed, run, index[todo], box)
        closest, distance = backend.fab_run(
            model,
            rows[todo],
            labels[todo],
            start,
            targets=None if targets is None else targets[todo, run // n_restarts],
            p=p,
            steps=steps,
            x_min=x_min,
            x_max=x_max,
        )
        hit = distance <= eps
        X_adv[todo[hit]] = closest[hit]
        broken[todo[hit]] = True
    return X_adv.reshape(np.shape(X))


def random_start(rows, eps, p, seed, stream, index, box) -> np.ndarray:
    """rows + START_FRACTION eps u / ||u||_p, clipped to the box, in the rows' dtype: u
    uniform in the cube (inf) or Gaussian (2 and 1), from ``random_in_ball``."""
    u = random_in_ball(seed, stream, index, rows.shape[1], np.inf if p == np.inf else 2.0)
    length = np.linalg.norm(u, ord=p, axis=1, keepdims=True)
    start = rows + START_FRACTION * eps * (u / np.where(length > 0.0, length, 1.0))
    with np.errstate(over="ignore"):  # inf past the dtype's range, like APGD's starts
        return np.clip(start, *box).astype(rows.dtype)
