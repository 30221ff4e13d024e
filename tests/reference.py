"""Slow, plain NumPy float64 versions of the kernels, written from DESIGN.md section 1."""

from __future__ import annotations

import numpy as np


def forward(X, W1, b1, W2, b2):
    """A (N, H), logits Z2 (N, C), probabilities P (N, C), all float64."""
    X, W1, b1, W2, b2 = (np.asarray(a, dtype=np.float64) for a in (X, W1, b1, W2, b2))
    Z1 = X @ W1 + b1
    A = 0.5 * (1.0 + np.tanh(0.5 * Z1))  # sigmoid, written differently from the kernels
    Z2 = A @ W2 + b2
    shifted = Z2 - Z2.max(axis=1, keepdims=True)
    P = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    return A, Z2, P


def loss(X, W1, b1, W2, b2, Y):
    """Per-sample cross-entropy -sum_k Y_k log P_k, float64 (N,)."""
    _, Z2, _ = forward(X, W1, b1, W2, b2)
    shifted = Z2 - Z2.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -(np.asarray(Y, dtype=np.float64) * log_p).sum(axis=1)


def input_gradient(X, W1, b1, W2, b2, Y):
    """((P - Y) W2^T * A * (1 - A)) W1^T, float64 (N, d)."""
    A, _, P = forward(X, W1, b1, W2, b2)
    D2 = P - np.asarray(Y, dtype=np.float64)
    D1 = (D2 @ np.asarray(W2, dtype=np.float64).T) * A * (1.0 - A)
    return D1 @ np.asarray(W1, dtype=np.float64).T


def fgm_step(X, W1, b1, W2, b2, Y, eps, p, x_min, x_max):
    """clip(X + eps * direction_p(G), x_min, x_max) in float64, zero-gradient rows unchanged."""
    G = input_gradient(X, W1, b1, W2, b2, Y)
    if p == np.inf:
        direction = np.sign(G)
    else:
        norms = np.linalg.norm(G, ord=p, axis=1, keepdims=True)
        direction = np.divide(G, norms, out=np.zeros_like(G), where=norms > 0)
    return np.clip(np.asarray(X, dtype=np.float64) + eps * direction, x_min, x_max)
