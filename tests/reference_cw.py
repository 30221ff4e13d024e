"""Slow, plain NumPy float64 Carlini & Wagner L2, written from the paper (Carlini & Wagner
2017, section V) and the authors' code (carlini/nn_robust_attacks, ``l2_attack.py``), one
row at a time, with the margin loss's gradient derived by hand (not from advgrad's kernels
or ``advgrad.cw``).

The differences from the authors' code are ``advgrad.cw``'s: each row aborts on its own
objective, distances are measured from the row itself, and a row whose clean point already
meets the goal is left as it is (l2 = 0).
"""

from __future__ import annotations

import numpy as np


def sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def margin_and_gradient(x, network, label, kappa, target=None):
    """(m, dm/dx (d,), predicted class) of one row x (d,), float64.

    m = min(max_{i != y} z_i - z_y, kappa), targeted min(z_t - max_{i != t} z_i, kappa):
    the quantity C&W's f is the negative of; a tied maximum counts through its first class,
    and where m is clipped at kappa its gradient is 0. dm/dz back through the network:
    dz/dx = W1 diag(A (1 - A)) W2.
    """
    W1, b1, W2, b2 = (np.asarray(a, dtype=np.float64) for a in network)
    A = sigmoid(x @ W1 + b1)
    z = A @ W2 + b2
    wanted = label if target is None else target
    others = [k for k in range(len(z)) if k != wanted]
    rival = others[int(np.argmax(z[others]))]
    up, down = (rival, label) if target is None else (target, rival)
    margin = z[up] - z[down]
    dz = np.zeros_like(z)
    if margin < kappa:
        dz[up], dz[down] = 1.0, -1.0
    gradient = W1 @ ((W2 @ dz) * A * (1.0 - A))
    return min(margin, kappa), gradient, int(np.argmax(z))


def meets_goal(value, predicted, label, kappa, target=None):
    """The attack's goal: another class than the label (or the target), margin >= kappa."""
    wanted = predicted != label if target is None else predicted == target
    return wanted and value >= kappa


def descend(x0, oracle, c, x_min, x_max, steps, learning_rate, abort_early):
    """One search step of one row: Adam in tanh space from x0 with constant c; returns
    (whether some iterate met the goal, the closest such iterate or None, its squared
    distance)."""
    half = (x_max - x_min) / 2.0
    w = np.arctanh(((np.clip(x0, x_min, x_max) - x_min) / half - 1.0) * 0.999999)
    first, second = np.zeros_like(w), np.zeros_like(w)
    met, best, best_squared, previous = False, None, np.inf, np.inf
    for step in range(steps):
        x = np.clip(x_min + (np.tanh(w) + 1.0) * half, x_min, x_max)
        value, g, goal = oracle(x)
        squared = float(np.sum((x - x0) ** 2))
        if goal:
            met = True
            if squared < best_squared:
                best, best_squared = x, squared
        # d/dw of ||x - x0||^2 + c (kappa - m(x)), x = x_min + (tanh(w) + 1) half
        gradient = (2.0 * (x - x0) - c * g) * half * (1.0 - np.tanh(w) ** 2)
        first = 0.9 * first + (1.0 - 0.9) * gradient
        second = 0.999 * second + (1.0 - 0.999) * gradient**2
        # lr m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - 0.9^t), v_hat = v / (1 - 0.999^t)
        root = np.sqrt(1.0 - 0.999 ** (step + 1))
        w = w - first / (np.sqrt(second) + 1e-8 * root) * (
            learning_rate * root / (1.0 - 0.9 ** (step + 1))
        )
        if abort_early and step % max(steps // 10, 1) == 0:
            objective = squared + c * (oracle.kappa - value)
            if objective > 0.9999 * previous:
                break
            previous = objective
    return met, best, best_squared


def carlini_wagner_l2(
    X,
    network,
    labels,
    *,
    x_min,
    x_max,
    confidence=0.0,
    c_init=1e-2,
    search_steps=9,
    steps=1000,
    learning_rate=0.01,
    targets=None,
    abort_early=True,
):
    """C&W-L2 on X (N, d), float64: (X_adv (N, d), l2 (N,), inf where none)."""
    X = np.asarray(X, dtype=np.float64)
    X_adv, l2 = X.copy(), np.full(len(X), np.inf)
    for n, x0 in enumerate(X):
        target = None if targets is None else int(targets[n])
        oracle = Oracle(network, int(labels[n]), confidence, target)
        if oracle(x0)[2]:
            l2[n] = 0.0
            continue
        c, lower, upper, best_squared = c_init, 0.0, 1e10, np.inf
        for _ in range(search_steps):
            met, best, squared = descend(
                x0, oracle, c, x_min, x_max, steps, learning_rate, abort_early
            )
            if squared < best_squared:
                X_adv[n], best_squared = best, squared
            if met:
                upper = min(upper, c)
            else:
                lower = max(lower, c)
            if upper < 1e9:
                c = (lower + upper) / 2.0
            elif not met:
                c *= 10.0
        l2[n] = np.sqrt(best_squared)
    return X_adv, l2


class Oracle:
    """x -> (m(x), dm/dx, goal met) of one row, from ``margin_and_gradient``."""

    def __init__(self, network, label, kappa, target):
        self.network, self.label, self.kappa, self.target = network, label, kappa, target

    def __call__(self, x):
        value, gradient, predicted = margin_and_gradient(
            x, self.network, self.label, self.kappa, self.target
        )
        return value, gradient, meets_goal(value, predicted, self.label, self.kappa, self.target)


def network_of(model):
    return (model.W1, model.b1, model.W2, model.b2)
