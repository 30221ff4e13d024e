"""Slow, plain NumPy float64 APGD and APGD-T, written from the paper (Croce & Hein 2020,
Algorithm 1) and the reference implementation's semantics, one row at a time, with the
losses' gradients derived by hand (not from advgrad's kernels or ``advgrad.apgd``).

The starts are shared with advgrad: X + eps u / ||u||_p with u from
``advgrad.attacks.random_in_ball`` (stream: the run's number), so that both start alike.
The loss, its gradient and the prediction come from an ``oracle(x, label, loss, target)``,
by default ``loss_and_gradient`` of the network. APGD decides on comparisons of losses
(a step raised the loss, a new best), some between values equal but for rounding (an
iterate that no longer moves); given another oracle (a backend's), the reference follows
that oracle's roundings, so its result must equal advgrad's bit for bit but for the
rounding of the update itself.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

from advgrad.attacks import random_in_ball, row_uniforms
from advgrad.kernels import apgd as apgd_kernels

DLR_OFFSET = 1e-12
"""Added to the DLR losses' denominators (the reference's 1e-12)."""


def sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def loss_and_gradient(x, network, label, loss, target=None):
    """(loss, dloss/dx (d,), predicted class) of one row x (d,), float64.

    ce: -log softmax(z)_y; dlr: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12);
    dlr-targeted: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), pi the classes
    sorted by decreasing logit. dloss/dz then back through the network:
    dz/dx = W1 diag(A (1 - A)) W2.
    """
    W1, b1, W2, b2 = (np.asarray(a, dtype=np.float64) for a in network)
    A = sigmoid(x @ W1 + b1)
    z = A @ W2 + b2
    order = np.argsort(-z, kind="stable")
    dz = np.zeros_like(z)
    if loss == "ce":
        shifted = z - z.max()
        log_p = shifted - np.log(np.exp(shifted).sum())
        value = -log_p[label]
        dz = np.exp(log_p)
        dz[label] -= 1.0
    else:
        if loss == "dlr":
            other = max((k for k in range(len(z)) if k != label), key=lambda k: z[k])
            low = {order[2]: 1.0}
        else:
            other = target
            low = {order[2]: 0.5, order[3]: 0.5}
        numerator = z[label] - z[other]
        denominator = z[order[0]] - sum(w * z[k] for k, w in low.items()) + DLR_OFFSET
        value = -numerator / denominator
        dz[label] -= 1.0 / denominator
        dz[other] += 1.0 / denominator
        dz[order[0]] += numerator / denominator**2
        for k, w in low.items():
            dz[k] -= w * numerator / denominator**2
    gradient = W1 @ ((W2 @ dz) * A * (1.0 - A))
    return value, gradient, int(np.argmax(z))


def checkpoints(steps):
    """{steps done: window length} of the paper's schedule, rounded as the reference does."""
    out, length, done = {}, max(int(0.22 * steps), 1), 0
    while done + length <= steps:
        done += length
        out[done] = length
        length = max(length - max(int(0.03 * steps), 1), max(int(0.06 * steps), 1))
    return out


def project(v, x, eps, p, x_min, x_max):
    """v into the eps-ball of norm p around x, then clipped to [x_min, x_max]; p = 1: the
    nearest point of the L1 ball intersected with the box (``project_l1_box``)."""
    if p == 1.0:
        return project_l1_box(v, x, eps, x_min, x_max)
    if p == np.inf:
        v = np.minimum(np.maximum(v, x - eps), x + eps)
    else:
        length = np.linalg.norm(v - x)
        if length > eps:
            v = x + (v - x) * (eps / length)
    return np.clip(v, x_min, x_max)


def project_l1_box(v, x, eps, x_min, x_max):
    """The nearest point to v of {u : ||u - x||_1 <= eps, x_min <= u <= x_max}: with
    y = v - x, sign(y) min(max(|y| - lam, 0), cap) (cap: the room to the box along y) for
    the lam >= 0 at which the L1 norm is eps. That norm, summed in index order, is
    piecewise linear in lam with breakpoints |y_i| and |y_i| - cap_i: every breakpoint is
    tried in increasing order for the first, ``above``, where the norm is below eps; with
    ``below`` the breakpoint before it (0 if none), lam = above - (eps - norm(above)) /
    (coordinates moving between them), kept within [below, above]. Exact zeros matter
    (l1-APGD counts the moved coordinates), so lam is computed as the kernel defines it;
    ``projection_by_bisection`` checks it another way."""
    y = v - x
    cap = np.maximum(np.where(y > 0.0, x_max - x, x - x_min), 0.0)

    def norm(lam):
        total = 0.0
        for y_i, cap_i in zip(y, cap, strict=True):
            total += min(max(abs(y_i) - lam, 0.0), cap_i)
        return total

    if norm(0.0) <= eps:
        return np.clip(v, x_min, x_max)
    saturation = np.abs(y) - cap
    breakpoints = sorted({*np.abs(y[y != 0.0]), *saturation[cap < np.abs(y)]})
    above = next(b for b in breakpoints if norm(b) < eps)
    below = max((b for b in breakpoints if b < above), default=0.0)
    moving = int(((np.abs(y) >= above) & ((cap >= np.abs(y)) | (saturation <= below))).sum())
    lam = min(max(above - (eps - norm(above)) / max(moving, 1), below), above)
    magnitude = np.minimum(np.maximum(np.abs(y) - lam, 0.0), cap)
    return np.clip(x + np.where(y > 0.0, magnitude, -magnitude), x_min, x_max)


def projection_by_bisection(v, x, eps, x_min, x_max):
    """``project_l1_box`` with lam found by 200 bisections (float64; slow, independent)."""
    y = v - x
    cap = np.maximum(np.where(y > 0.0, x_max - x, x - x_min), 0.0)

    def moved(lam):
        return np.minimum(np.maximum(np.abs(y) - lam, 0.0), cap)

    if moved(0.0).sum() <= eps:
        return np.clip(v, x_min, x_max)
    low, high = 0.0, float(np.abs(y).max())
    for _ in range(200):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if moved(middle).sum() > eps else (low, middle)
    return np.clip(x + np.sign(y) * moved(high), x_min, x_max)


def run_row(
    x, oracle, label, start, eps, p, loss, steps, x_min, x_max, target=None, topk_from_start=False
):
    """One APGD run of one row: (best point, its loss, last misclassified iterate or None).
    p = 1: l1-APGD (sparse steps, no momentum, the sparsity schedule of the paper); with
    ``topk_from_start`` (the reference's runs from a given start) topk and the sparsity
    count start from the start's moved coordinates (/ d / 1.5), not 0.2 and d."""

    def evaluate(v):
        return oracle(v, label, loss, target)

    def direction(g):
        if p == np.inf:
            return np.sign(g)
        if p == 1.0:
            magnitude = np.abs(g)
            k = min(max(int((1.0 - topk) * len(g)), 0), len(g) - 1)
            chosen = (magnitude >= np.sort(magnitude)[k]) & (g != 0.0)
            return np.sign(g) * chosen / (chosen.sum() + 1e-10)
        length = np.linalg.norm(g)
        return g / length if length > 0 else g

    eta = eps if p == 1.0 else 2.0 * eps
    topk, sparsity = 0.2, len(x)
    windows = l1_checkpoints(steps) if p == 1.0 else checkpoints(steps)
    x_now = project(start, x, eps, p, x_min, x_max)
    if topk_from_start:
        sparsity = int((x_now != x).sum())
        topk = sparsity / len(x) / 1.5
    value, g, predicted = evaluate(x_now)
    best, best_value, best_g = x_now, value, g
    adversarial = x_now if predicted != label else None
    x_before, value_before = x_now, value
    increases, halved_last, best_at_last = 0, True, best_value
    for i in range(steps):
        z = project(x_now + eta * direction(g), x, eps, p, x_min, x_max)
        if i > 0 and p != 1.0:
            moved = x_now + 0.75 * (z - x_now) + 0.25 * (x_now - x_before)
            z = project(moved, x, eps, p, x_min, x_max)
        x_before, x_now = x_now, z
        value, g, predicted = evaluate(x_now)
        if predicted != label:
            adversarial = x_now
        increases += value > value_before
        value_before = value
        if value > best_value:
            best, best_value, best_g = x_now, value, g
        if i + 1 in windows and p == 1.0:
            count = int((best != x).sum())
            back = count < 0.95 * sparsity
            topk, sparsity = count / len(x) / 1.5, count
            eta = min(max(eps if back else eta / 1.5, eps / 10.0), eps)
            if back:
                x_now, g = best, best_g
        elif i + 1 in windows:
            halve = increases <= 0.75 * windows[i + 1] or (
                not halved_last and best_at_last >= best_value
            )
            halved_last, best_at_last, increases = halve, best_value, 0
            if halve:
                eta /= 2.0
                x_now, g = best, best_g
    return best, best_value, adversarial


def l1_checkpoints(steps):
    """{steps done: window length} of l1-APGD: every max(int(0.04 steps), 1) steps."""
    window = max(int(0.04 * steps), 1)
    return {done: window for done in range(window, steps + 1, window)}


def surface_start(x, eps, p, seed, stream, row_index):
    """inf, 2: on the sphere of radius eps; 1: x plus standard normal noise (the reference's
    start, which the run projects)."""
    if p == 1.0:
        u = row_uniforms(seed, stream, np.array([row_index]), len(x))[0]
        return x + ndtri(np.clip(u, np.finfo(np.float64).tiny, None))
    u = random_in_ball(seed, stream, np.array([row_index]), len(x), p)[0]
    return x + eps * (u / np.linalg.norm(u, ord=p))


def analytic(network):
    """The default oracle: ``loss_and_gradient`` of ``network``."""

    def oracle(x, label, loss, target):
        return loss_and_gradient(x, network, label, loss, target)

    return oracle


def large_radii_stages(steps):
    """[(radius / eps, steps)] of the reference's ``use_largereps``: 3 eps and 2 eps for
    ceil(0.3 steps) each, then eps for the rest (``APGDAttack.perturb``)."""
    first = int(np.ceil(0.3 * steps))
    return [(3.0, first), (2.0, first), (1.0, steps - 2 * first)]


def attack(
    X, oracle, labels, runs, eps, p, steps, seed, x_min, x_max, first_row=0, large_radii=False
):
    """Rows of X (N, d) attacked by ``runs`` ((stream, loss, targets (N,) or None) each) in
    turn (row n starts from its ``surface_start`` of index first_row + n, or first_row[n]
    for an array), each row until one run breaks it; unbroken rows: the highest-loss point
    seen, the clean row included (its loss under the first run's loss). eps: a float, or
    one per row. ``large_radii`` (L1): each run is the reference's ``decr_eps_pgd``, runs
    at the radii and steps of ``large_radii_stages`` in turn, each from the best point of
    the one before (topk from the start), the last one's outcome the run's."""
    X = np.asarray(X, dtype=np.float64)
    out = X.copy()
    radii = np.broadcast_to(np.asarray(eps, dtype=np.float64), len(X))
    index = first_row + np.arange(len(X)) if np.ndim(first_row) == 0 else first_row
    for n, x in enumerate(X):
        first_targets = runs[0][2]
        value, _, predicted = oracle(
            x, labels[n], runs[0][1], None if first_targets is None else first_targets[n]
        )
        if predicted != labels[n]:
            continue
        best_value = value
        for stream, loss, targets in runs:
            target = None if targets is None else targets[n]
            best = surface_start(x, radii[n], p, seed, stream, index[n])
            for factor, stage_steps in large_radii_stages(steps) if large_radii else [(1, steps)]:
                best, value, adversarial = run_row(
                    *(x, oracle, labels[n], best, factor * radii[n], p, loss, stage_steps),
                    *(x_min, x_max, target, large_radii),
                )
            if adversarial is not None:
                out[n] = adversarial
                break
            if value > best_value:
                out[n], best_value = best, value
    return out


def apgd(
    X,
    network,
    labels,
    eps,
    p,
    loss,
    steps,
    restarts,
    seed,
    x_min,
    x_max,
    oracle=None,
    first_row=0,
    large_radii=False,
):
    """APGD-CE / APGD-DLR, float64 (N, d); rows of absolute index first_row + 0, 1, ..."""
    runs = [(r, loss, None) for r in range(restarts)]
    oracle = oracle or analytic(network)
    return attack(
        X, oracle, labels, runs, eps, p, steps, seed, x_min, x_max, first_row, large_radii
    )


def apgd_targeted(
    X,
    network,
    labels,
    eps,
    p,
    steps,
    restarts,
    target_classes,
    seed,
    x_min,
    x_max,
    oracle=None,
    large_radii=False,
):
    """APGD-T, float64 (N, d): targets the highest non-true clean logits, one after another."""
    W1, b1, W2, b2 = (np.asarray(a, dtype=np.float64) for a in network)
    Z = sigmoid(np.asarray(X, dtype=np.float64) @ W1 + b1) @ W2 + b2
    n_targets = min(target_classes, Z.shape[1] - 1)
    ranked = np.array(
        [
            [k for k in np.argsort(-z, kind="stable") if k != y][:n_targets]
            for z, y in zip(Z, labels, strict=True)
        ]
    )
    runs = [
        (rank * restarts + r, "dlr-targeted", ranked[:, rank])
        for rank in range(n_targets)
        for r in range(restarts)
    ]
    oracle = oracle or analytic(network)
    return attack(X, oracle, labels, runs, eps, p, steps, seed, x_min, x_max, 0, large_radii)


def unfused_apgd_run(
    loss_gradient,
    model,
    X,
    labels,
    start,
    loss,
    *,
    targets,
    eps,
    p,
    windows,
    x_min,
    x_max,
    topk_from_start=False,
):
    """A backend's ``apgd_run`` with the gradients from ``loss_gradient`` (a backend's
    method) and the update by ``advgrad.kernels.apgd.apgd_update_into``, one iteration
    after the other: what ``CpuBackend.apgd_run`` fuses."""
    labels = np.asarray(labels, dtype=np.int64)
    current, previous, best, best_G, adversarial = (np.empty_like(X) for _ in range(5))
    state = np.empty((len(X), apgd_kernels.STATE_FIELDS))
    apgd_kernels.apgd_start_into(X, start, eps, p, x_min, x_max, current)
    for step in range(len(windows)):
        G, values, predicted = loss_gradient(model, current, labels, loss, targets=targets)
        apgd_kernels.apgd_update_into(
            *(X, eps, p, x_min, x_max, windows, step, labels, G, values, predicted),
            *(current, previous, best, best_G, adversarial, state),
            topk_from_start,
        )
    values = state[:, apgd_kernels.STATE_BEST].astype(X.dtype)
    return best, values, adversarial, state[:, apgd_kernels.STATE_BROKEN] != 0.0


class ReferenceBackend:
    """A backend's ``logits`` and ``loss_gradient`` over ``loss_and_gradient``, row by row
    in float64 (returned in X's dtype), and ``apgd_run`` over them (``unfused_apgd_run``):
    ``advgrad.apgd`` run on it sees, for a given point, bitwise the losses the reference
    sees."""

    def apgd_run(self, model, X, labels, start, loss, **settings):
        return unfused_apgd_run(self.loss_gradient, model, X, labels, start, loss, **settings)

    @staticmethod
    def logits(model, X):
        W1, b1, W2, b2 = (np.asarray(a, dtype=np.float64) for a in network_of(model))
        return (sigmoid(np.asarray(X, dtype=np.float64) @ W1 + b1) @ W2 + b2).astype(X.dtype)

    @staticmethod
    def loss_gradient(model, X, labels, loss, *, targets=None):
        rows = [
            loss_and_gradient(x, network_of(model), label, loss, None if targets is None else t)
            for x, label, t in zip(X, labels, labels if targets is None else targets, strict=True)
        ]
        values, gradients, predicted = zip(*rows, strict=True)
        return (
            np.array(gradients, dtype=X.dtype).reshape(X.shape),
            np.array(values, dtype=X.dtype),
            np.array(predicted, dtype=np.int64),
        )


def network_of(model):
    return (model.W1, model.b1, model.W2, model.b2)
