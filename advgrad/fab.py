"""FAB-T, the targeted fast adaptive boundary attack (Croce & Hein, ICML 2020), written once
over a backend.

FAB looks for the adversarial point of smallest norm: at the current point it linearises the
boundary between the true class y and a target t (the zero set of z_t - z_y, the backend's
"logit-difference" loss, and its gradient), projects both the current point and the clean
row onto that hyperplane within the box [x_min, x_max], and steps to a mix of the two
projections biased toward the clean row. ``fab_targeted`` runs it against the highest
non-true classes of the clean row, one after another, as AutoAttack's FAB-T does.

The semantics are those of the reference implementation (fra31/auto-attack,
``autoattack/fab_base.py``, ``fab_pt.py``, ``fab_projections.py``), with AutoAttack's
"standard" settings (``TARGET_CLASSES`` targets, one restart, ``ALPHA_MAX``, ``OVERSHOOT``
and ``BACKWARD``):

- the hyperplane at the current point x: f + <g, v - x> = 0, with f = z_t - z_y at x and g
  its input gradient;
- the projections (``projection``): the smallest perturbation d in the norm with
  <g, d> = the hyperplane's gap and the point plus d in the box, in closed form after one
  sort of the coordinates (L-inf and L2: a level found on a piecewise linear function; L1:
  the coordinates of largest |g| first, equal ones in the sort's order, which changes the
  point but not its norm). Where the box does not reach the hyperplane every coordinate
  moves to the bound that gets closest, as the reference does;
- step: d1, d2 the projections of x and of the clean row x0, a1, a2 their norms (at least
  ``NORM_FLOOR``), alpha = min(a1 / (a1 + a2), ``ALPHA_MAX``); the next point is
  ((x + eta d1) (1 - alpha) + (x0 + eta d2) alpha) clipped to the box, eta = ``OVERSHOOT``;
- a point the model misclassifies (argmax != y, whatever the target) is kept when its
  distance to x0 is the smallest of the run so far, and the run goes on from
  x0 + ``BACKWARD`` (x - x0);
- the first run of each target starts at the clean row; a restart r >= 1 at
  x0 + eps / 2 u / ||u||_p, clipped to the box, u uniform in the cube (inf) or Gaussian
  (2 and 1, as the reference draws them);
- targets, and each target's restarts, run in turn, each only on the rows that no run has
  broken yet; a run breaks a row when its smallest adversarial point is within eps.

Rows no run breaks, and rows the model misclassifies already, are returned unchanged (the
reference keeps only adversarial points within eps). Differences from the reference: the
box is [x_min, x_max] where the reference fixes [0, 1] (an infinite bound: no box on that
side), a coordinate of a row outside the box may still move back toward it, and a zero
gradient coordinate is one that is exactly 0 (the reference's L2 projection takes
|g| < 1e-8 as 0).

Random starts come from ``seed``: restart r of target k draws from the stream
k * restarts + r of ``random_in_ball`` for the row's absolute index, so a row's result does
not depend on the batch it is processed in, as far as the backend's gradient of a row does
not depend on the rows beside it.

The gradients and the logits come from the backend; the projections and the steps run on
the host, in numpy, in float64, and each iterate is stored in the model's dtype.
"""

from __future__ import annotations

import math

import numpy as np

from advgrad.attacks import (
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
from advgrad.model import Model

TARGET_CLASSES = 9
"""FAB-T's default number of target classes (at most C - 1 are used)."""
ALPHA_MAX = 0.1
"""The largest weight of the clean row's projection in a step (the reference's alpha_max)."""
OVERSHOOT = 1.05
"""Each projection is stretched by this factor (the reference's eta)."""
BACKWARD = 0.9
"""After an adversarial point the run goes on from x0 + BACKWARD (x - x0) (beta)."""
START_FRACTION = 0.5
"""A random start lies at START_FRACTION * eps from the clean row."""
NORM_FLOOR = 1e-8
"""The norms of the projections weighed in a step are at least this."""


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
    p = norm_order(norm)
    if not check_radius("eps", eps, model.dtype) > 0.0:
        raise ValueError("eps must be > 0")
    steps = check_count("steps", steps)
    n_restarts = check_count("restarts", restarts)
    n_targets = min(check_count("target_classes", target_classes), model.n_classes - 1)
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
    targets = ranked_targets(Z, labels, n_targets)
    box = (x_min, x_max)
    X_adv = rows.copy()
    broken = np.argmax(Z, axis=1) != labels
    for run in range(n_targets * n_restarts):  # run k * restarts + r: restart r of target k
        todo = np.flatnonzero(~broken)
        if not todo.size:
            break
        start = rows[todo]
        if run % n_restarts:
            start = random_start(start, eps, p, seed, run, index[todo], box)
        target = targets[todo, run // n_restarts]
        closest, distance = _run(
            model, rows[todo], labels[todo], target, start, p, steps, box, backend
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


def projection(p: float, X, W, gap, box) -> np.ndarray:
    """The perturbation D (N, d) float64 of smallest norm p with <W_n, D_n> = gap_n and
    X_n + D_n in the box, for each row.

    Parameters
    ----------
    p : np.inf, 2.0 or 1.0
    X : (N, d) float64, the points
    W : (N, d) float64, the hyperplanes' normals
    gap : (N,) float64, the change of <W_n, x> that reaches the hyperplane from X_n
    box : (x_min, x_max), floats, infinite for no bound

    Where the box does not reach a hyperplane, every coordinate of nonzero W moves to the
    bound on its side (the reference's answer); coordinates of zero W never move. A
    coordinate outside the box may move back toward it but not further out.
    """
    side = np.sign(W) * np.where(gap < 0.0, -1.0, 1.0)[:, None]
    gap = np.abs(gap)
    weight = np.abs(W)
    moves = weight > 0.0
    # inf * 0 and inf - inf below arise only where a coordinate does not move (zero W, no
    # bound on its side) and are masked out
    with np.errstate(invalid="ignore"):
        room = np.maximum(np.where(side > 0.0, box[1] - X, X - box[0]), 0.0)
        gain = np.where(moves, weight * room, 0.0)  # the most a coordinate adds to <W, D>
        if p == 1.0:
            return _l1_projection(side, weight, room, gain, gap)
        if p == np.inf:  # D_i = side_i min(l, room_i)
            key, slope = room, weight
        else:  # D_i = side_i min(l weight_i, room_i)
            key = np.where(moves, room / np.where(moves, weight, 1.0), np.inf)
            slope = weight * weight
        level = _level(key, gain, slope, gap)[:, None]
        reach = level if p == np.inf else level * weight
        return np.where(moves, side * np.minimum(reach, room), 0.0)


def _level(key, gain, slope, gap) -> np.ndarray:
    """Per row, the level l >= 0 at which F(l) = sum_i (gain_i where key_i < l, else
    l slope_i) reaches gap, inf where it never does. F is continuous and nondecreasing
    (gain_i = key_i slope_i), linear between consecutive keys."""
    order = np.argsort(key, axis=1)
    key, gain, slope = (np.take_along_axis(a, order, axis=1) for a in (key, gain, slope))
    before = _exclusive_cumsum(gain)
    after = np.cumsum(slope[:, ::-1], axis=1)[:, ::-1]
    reached = before + np.where(after > 0.0, key * after, 0.0) >= gap[:, None]
    rows = np.arange(len(key))
    m = np.argmax(reached, axis=1)
    rest = after[rows, m]
    level = np.where(rest > 0.0, (gap - before[rows, m]) / np.where(rest > 0.0, rest, 1.0), 0.0)
    return np.where(reached.any(axis=1), level, np.inf)


def _l1_projection(side, weight, room, gain, gap) -> np.ndarray:
    """The L1 projection: the coordinates of largest weight move to their bound in turn
    (equal weights in the order of numpy's sort) until the gap is reached, the last one
    partly."""
    order = np.argsort(-weight, axis=1)
    before = _exclusive_cumsum(np.take_along_axis(gain, order, axis=1))
    reached = before + np.take_along_axis(gain, order, axis=1) >= gap[:, None]
    feasible = reached.any(axis=1)
    rows = np.arange(len(order))
    m = np.argmax(reached, axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :], axis=1)
    saturated = (rank < m[:, None]) | ~feasible[:, None]
    D = np.where(saturated & (weight > 0.0), side * room, 0.0)
    last = order[rows, m]
    last_weight = weight[rows, last]
    partial = np.where(last_weight > 0.0, gap - before[rows, m], 0.0)
    partial /= np.where(last_weight > 0.0, last_weight, 1.0)
    D[rows[feasible], last[feasible]] = (side[rows, last] * partial)[feasible]
    return D


def _exclusive_cumsum(A) -> np.ndarray:
    """The sums of the entries before each entry of a row of A (N, d): 0 first."""
    out = np.zeros_like(A)
    np.cumsum(A[:, :-1], axis=1, out=out[:, 1:])
    return out


def _norms(D, p) -> np.ndarray:
    """The norm p of each row of D (N, d)."""
    return np.linalg.norm(D, ord=p, axis=1)


def _run(model, rows, labels, targets, start, p, steps, box, backend):
    """One FAB run toward ``targets`` from ``start`` (N, d); returns (the closest
    misclassified point of each row (N, d), the clean row where none, its distance to the
    row in norm p (N,) float64, inf where none)."""
    clean = rows.astype(np.float64)
    current = start.copy()
    closest = rows.copy()
    distance = np.full(len(rows), np.inf)
    for _ in range(steps):
        G, values, _ = backend.loss_gradient(
            model, current, labels, "logit-difference", targets=targets
        )
        W = G.astype(np.float64)
        here = current.astype(np.float64)
        gap = -values.astype(np.float64)
        to_current = projection(p, here, W, gap, box)
        to_clean = projection(p, clean, W, gap - np.einsum("ij,ij->i", W, clean - here), box)
        current_length = np.maximum(_norms(to_current, p), NORM_FLOOR)
        clean_length = np.maximum(_norms(to_clean, p), NORM_FLOOR)
        alpha = current_length / (current_length + clean_length)
        alpha = np.minimum(alpha, ALPHA_MAX)[:, None]
        moved = (here + OVERSHOOT * to_current) * (1.0 - alpha)
        moved += (clean + OVERSHOOT * to_clean) * alpha
        current = np.clip(moved, *box).astype(rows.dtype)
        hit = np.flatnonzero(np.argmax(backend.logits(model, current), axis=1) != labels)
        if not hit.size:
            continue
        offset = current[hit].astype(np.float64) - clean[hit]
        length = _norms(offset, p)
        closer = length < distance[hit]
        closest[hit[closer]] = current[hit[closer]]
        distance[hit[closer]] = length[closer]
        current[hit] = (clean[hit] + BACKWARD * offset).astype(rows.dtype)
    return closest, distance
