"""Slow, plain NumPy float64 FAB-T, one row at a time, written from the paper (Croce & Hein,
ICML 2020, "Minimally distorted adversarial examples with a fast adaptive boundary attack")
and the semantics of the reference implementation (fra31/auto-attack ``fab_base.py``), with
the gradient of z_t - z_y derived by hand and projections found another way than
``advgrad.fab``'s (not from advgrad's kernels or ``advgrad.fab``).

The random starts are shared with advgrad: x + eps / 2 u / ||u||_p with u from
``advgrad.attacks.random_in_ball`` (the cube for inf, a Gaussian direction for 2 and 1),
stream k * restarts + r for restart r of target k.
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
    """One FAB run of one row: (the closest misclassified point, its distance), (None, inf)
    where none."""
    current, closest, distance = start, None, np.inf
    for _ in range(steps):
        f, g, _ = difference_and_gradient(current, network, label, target)
        d1 = project_row(p, current, g, -f, x_min, x_max)
        d2 = project_row(p, x, g, -f - g @ (x - current), x_min, x_max)
        a1 = max(np.linalg.norm(d1, ord=p), 1e-8)
        a2 = max(np.linalg.norm(d2, ord=p), 1e-8)
        alpha = min(a1 / (a1 + a2), ALPHA_MAX)
        current = np.clip((current + ETA * d1) * (1 - alpha) + (x + ETA * d2) * alpha, x_min, x_max)
        if difference_and_gradient(current, network, label, target)[2] != label:
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
                cube = np.inf if p == np.inf else 2.0  # the reference: Gaussian for 2 and 1
                u = random_in_ball(
                    seed, rank * restarts + r, np.array([first_row + n]), len(x), cube
                )[0]
                start = np.clip(x + 0.5 * eps * u / np.linalg.norm(u, ord=p), x_min, x_max)
            closest, distance = run_row(
                x, network, labels[n], target, start, p, steps, x_min, x_max
            )
            if distance <= eps:
                out[n] = closest
                break
    return out
