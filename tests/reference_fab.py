"""Slow, plain NumPy float64 FAB (untargeted) and FAB-T, one row at a time, written from the
paper (Croce & Hein, ICML 2020, "Minimally distorted adversarial examples with a fast
adaptive boundary attack") and the semantics of the reference implementation
(fra31/auto-attack ``fab_base.py``), with the gradients of z_k - z_y derived by hand and
projections found another way than ``advgrad.kernels.fab``'s selection (not from advgrad's
kernels or ``advgrad.fab``): ``project_row`` per row, and ``sorted_projection``, the
sort-based batch projection ``advgrad.fab`` ran on the host before its kernel.

The random starts are shared with advgrad: x + eps / 2 u / ||u||_p with u from
``advgrad.attacks.random_in_ball`` (the cube for inf, a Gaussian direction for 2 and 1),
stream k * restarts + r for restart r of target k (untargeted: stream r).
"""

from __future__ import annotations

import numpy as np

from advgrad.attacks import random_in_ball

ALPHA_MAX, ETA, BETA = 0.1, 1.05, 0.9
"""AutoAttack's FAB-T settings: the largest weight of the clean side, overshoot, backstep."""


def sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def difference_and_gradient(x, network, label, target):
    """(z_t - z_y, its gradient (d,), the predicted class) of one row x (d,), float64:
    d(z_t - z_y)/dx = W1 diag(A (1 - A)) (W2[:, t] - W2[:, y])."""
    W1, b1, W2, b2 = (np.asarray(a, dtype=np.float64) for a in network)
    A = sigmoid(x @ W1 + b1)
    z = A @ W2 + b2
    gradient = W1 @ ((W2[:, target] - W2[:, label]) * A * (1.0 - A))
    return z[target] - z[label], gradient, int(np.argmax(z))


def nearest_boundary(x, network, label, p):
    """Untargeted FAB's hyperplane at one row x (d,): of the classes k != y, the one of
    smallest |f_k| / (1e-12 + ||g_k||_q) (the first on ties), q the dual norm of p; returns
    (f_k, g_k (d,), the predicted class)."""
    W1, b1, W2, b2 = (np.asarray(a, dtype=np.float64) for a in network)
    A = sigmoid(x @ W1 + b1)
    z = A @ W2 + b2
    q = {np.inf: 1.0, 2.0: 2.0, 1.0: np.inf}[p]
    best = None
    for k in range(len(z)):
        if k == label:
            continue
        gradient = W1 @ ((W2[:, k] - W2[:, label]) * A * (1.0 - A))
        distance = abs(z[k] - z[label]) / (1e-12 + np.linalg.norm(gradient, ord=q))
        if best is None or distance < best[0]:
            best = (distance, z[k] - z[label], gradient)
    return best[1], best[2], int(np.argmax(z))


def project_row(p, t, w, gap, x_min, x_max):
    """The perturbation d (d,) of smallest norm p with w . d = gap and t + d in
    [x_min, x_max]; where none exists, each coordinate of nonzero w at the bound on its side.

    L1: a greedy loop over the coordinates by decreasing |w|. L-inf and L2: d_i = s_i
    min(l scale_i, room_i) (scale 1, or |w_i| for L2), with l found among the breakpoints
    l_i = room_i / scale_i by evaluating w . d at each of them, then solved on its segment.
    """
    s = np.sign(w) * (1.0 if gap >= 0 else -1.0)
    need = abs(gap)
    k = np.abs(w)
    room = np.zeros_like(t)
    for i in range(len(t)):
        if s[i] > 0:
            room[i] = max(x_max - t[i], 0.0)
        elif s[i] < 0:
            room[i] = max(t[i] - x_min, 0.0)
    moving = np.flatnonzero(k > 0)
    d = np.zeros_like(t)
    if np.sum(k[moving] * room[moving]) < need:  # the box does not reach the hyperplane
        d[moving] = s[moving] * room[moving]
        return d
    if p == 1.0:
        got = 0.0
        for i in sorted(moving, key=lambda i: -k[i]):
            if got + k[i] * room[i] >= need:
                d[i] = s[i] * (need - got) / k[i]
                return d
            d[i] = s[i] * room[i]
            got += k[i] * room[i]
    scale = np.ones_like(k) if p == np.inf else k
    breaks = room[moving] / scale[moving]
    levels = np.concatenate([[0.0], np.sort(breaks[np.isfinite(breaks)])])
    reached = np.minimum(levels[:, None] * scale[moving], room[moving]) @ k[moving]
    below = levels[reached < need]
    if not below.size:  # need == 0
        return d
    saturated = breaks <= below.max()
    level = (need - k[moving][saturated] @ room[moving][saturated]) / (
        k[moving][~saturated] @ scale[moving][~saturated]
    )
    d[moving] = s[moving] * np.minimum(level * scale[moving], room[moving])
    return d


def run_row(x, network, label, target, start, p, steps, x_min, x_max):
    """One FAB run of one row toward ``target`` (None: untargeted, the nearest boundary at
    each step): (the closest misclassified point, its distance), (None, inf) where none."""
    current, closest, distance = start, None, np.inf
    for _ in range(steps):
        if target is None:
            f, g, _ = nearest_boundary(current, network, label, p)
        else:
            f, g, _ = difference_and_gradient(current, network, label, target)
        d1 = project_row(p, current, g, -f, x_min, x_max)
        d2 = project_row(p, x, g, -f - g @ (x - current), x_min, x_max)
        a1 = max(np.linalg.norm(d1, ord=p), 1e-8)
        a2 = max(np.linalg.norm(d2, ord=p), 1e-8)
        alpha = min(a1 / (a1 + a2), ALPHA_MAX)
        current = np.clip((current + ETA * d1) * (1 - alpha) + (x + ETA * d2) * alpha, x_min, x_max)
        if difference_and_gradient(current, network, label, label)[2] != label:
            length = np.linalg.norm(current - x, ord=p)
            if length < distance:
                closest, distance = current, length
            current = x + BETA * (current - x)
    return closest, distance


def fab_targeted(
    X, network, labels, eps, p, steps, restarts, target_classes, seed, x_min, x_max, first_row=0
):
    """FAB-T, float64 (N, d): the highest non-true clean logits as targets in turn, each with
    ``restarts`` runs (the first from the row itself); a row takes the closest point of the
    first run whose closest point is within eps, else stays clean."""
    X = np.asarray(X, dtype=np.float64)
    out = X.copy()
    for n, x in enumerate(X):
        _, _, predicted = difference_and_gradient(x, network, labels[n], labels[n])
        if predicted != labels[n]:
            continue
        W1, b1, W2, b2 = (np.asarray(a, dtype=np.float64) for a in network)
        z = sigmoid(x @ W1 + b1) @ W2 + b2
        ranked = [k for k in np.argsort(-z, kind="stable") if k != labels[n]][:target_classes]
        runs = [(rank, target, r) for rank, target in enumerate(ranked) for r in range(restarts)]
        for rank, target, r in runs:
            start = x
            if r > 0:
                start = random_start(x, eps, p, seed, rank * restarts + r, first_row + n)
                start = np.clip(start, x_min, x_max)
            closest, distance = run_row(
                x, network, labels[n], target, start, p, steps, x_min, x_max
            )
            if distance <= eps:
                out[n] = closest
                break
    return out


def random_start(x, eps, p, seed, stream, index):
    """x + eps / 2 u / ||u||_p, u from ``random_in_ball`` (the cube for inf, the reference's
    Gaussian for 2 and 1), unclipped."""
    cube = np.inf if p == np.inf else 2.0
    u = random_in_ball(seed, stream, np.array([index]), len(x), cube)[0]
    return x + 0.5 * eps * u / np.linalg.norm(u, ord=p)


def fab(X, network, labels, eps, p, steps, restarts, seed, x_min, x_max, first_row=0):
    """Untargeted FAB, float64 (N, d): ``restarts`` runs (the first from the row itself,
    restart r from random stream r); a row takes the closest point of the first run whose
    closest point is within eps, else stays clean."""
    X = np.asarray(X, dtype=np.float64)
    out = X.copy()
    for n, x in enumerate(X):
        if difference_and_gradient(x, network, labels[n], labels[n])[2] != labels[n]:
            continue
        for r in range(restarts):
            start = x
            if r > 0:
                start = np.clip(random_start(x, eps, p, seed, r, first_row + n), x_min, x_max)
            closest, distance = run_row(x, network, labels[n], None, start, p, steps, x_min, x_max)
            if distance <= eps:
                out[n] = closest
                break
    return out


def sorted_projection(p: float, X, W, gap, box) -> np.ndarray:
    """The perturbation D (N, d) float64 of smallest norm p with <W_n, D_n> = gap_n and
    X_n + D_n in the box, for each row, by one sort of each row's breakpoints (L-inf, L2)
    or of its |W| (L1, equal ones by index); where the box does not reach the
    hyperplane every coordinate of nonzero W moves to the bound on its side."""
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
            return _sorted_l1_projection(side, weight, room, gain, gap)
        if p == np.inf:  # D_i = side_i min(l, room_i)
            key, slope = room, weight
        else:  # D_i = side_i min(l weight_i, room_i)
            key = np.where(moves, room / np.where(moves, weight, 1.0), np.inf)
            slope = weight * weight
        level = sorted_level(key, gain, slope, gap)[:, None]
        reach = level if p == np.inf else level * weight
        return np.where(moves, side * np.minimum(reach, room), 0.0)


def sorted_level(key, gain, slope, gap):
    """Per row of key, gain, slope (N, m) and gap (N,), the level l >= 0 at which F(l) =
    sum_i (gain_i where key_i < l, else l slope_i) reaches gap, inf where it never does,
    from the sorted keys."""
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


def _sorted_l1_projection(side, weight, room, gain, gap):
    """The L1 projection: the coordinates of largest weight move to their bound in turn
    until the gap is reached, the last one partly."""
    order = np.argsort(-weight, axis=1, kind="stable")
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


def _exclusive_cumsum(A):
    """The sums of the entries before each entry of a row of A (N, d): 0 first."""
    out = np.zeros_like(A)
    np.cumsum(A[:, :-1], axis=1, out=out[:, 1:])
    return out
