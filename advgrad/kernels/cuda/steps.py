"""CUDA kernels of the attack steps, built per configuration where they take one.

The L2 / L1 step (``norm_step_kernel``) and the L-inf step (``sign_step_rows``) from a
gradient; the fused step of the iterative attacks (``iterate_step_kernel``); DeepFool's
start, gather, hidden slopes and step (``deepfool_step_kernel``).
``advgrad.kernels.cuda.launchers`` launches them.
"""

import functools
import math

import numpy as np

from advgrad.kernels.cuda.device import (
    clip,
    l1_threshold,
    row_reduce,
    segment_reduce,
    sigmoid,
    sign_step,
    top_coordinates,
)
from advgrad.kernels.cuda.internals import cuda

__all__ = [
    "deepfool_start",
    "deepfool_step_kernel",
    "gather_rows",
    "hidden_slopes",
    "iterate_step_kernel",
    "norm_step_kernel",
    "sign_step_rows",
]


@functools.cache
def norm_step_kernel(threads: int, row_threads: int):
    """The L2 / L1 step kernel: ``row_threads`` threads per row, several rows per block.

    ``norm_step[blocks, threads, stream](X, G, eps, p, q, scratch, x_min, x_max, X_adv)``
    (grid-stride over rows): for p = 2 each row of X_adv becomes ``clip(X + eps * G /
    ||G||_2, x_min, x_max)``, the norm taken in float64 after scaling by max |G|; for p = 1,
    ``clip(X + eps / q * sign(G))`` on the q coordinates of largest |G| and ``clip(X)``
    elsewhere (``cpu.step_row``; ``top_coordinates`` selects them on ``scratch`` (N, d), G's
    dtype, read only for p = 1). A zero row of G gives ``clip(X)``. X_adv may be G or X
    itself.
    """
    GROUPS = threads // row_threads

    @cuda.jit
    def norm_step(X, G, eps, p, q, scratch, x_min, x_max, X_adv):
        N, d = X.shape
        t = cuda.threadIdx.x
        lane = t % row_threads
        leader = t - lane  # red[leader] holds this row's reductions
        red = cuda.shared.array(threads, np.float64)
        for first in range(cuda.blockIdx.x * GROUPS, N, cuda.gridDim.x * GROUPS):
            n = first + t // row_threads
            if p == 1.0:
                threshold, last = top_coordinates(G, n, n < N, q, scratch, red, t, row_threads)
                size = eps / min(max(q, 1), d)
                if n < N:
                    for i in range(lane, d, row_threads):
                        g = G[n, i]
                        step = 0.0
                        if abs(g) > threshold or (abs(g) == threshold and i <= last):
                            step = size if g > 0.0 else (-size if g < 0.0 else 0.0)
                        X_adv[n, i] = clip(X[n, i] + step, x_min, x_max)
                continue
            scale = 0.0
            if n < N:
                for i in range(lane, d, row_threads):
                    scale = max(scale, abs(G[n, i]))
            red[t] = scale
            cuda.syncthreads()
            segment_reduce(red, t, row_threads, True)
            scale = red[leader]
            cuda.syncthreads()
            total = 0.0
            if n < N and scale > 0.0:
                for i in range(lane, d, row_threads):
                    g = G[n, i] / scale
                    total += g * g
            red[t] = total
            cuda.syncthreads()
            segment_reduce(red, t, row_threads, False)
            total = math.sqrt(red[leader])
            cuda.syncthreads()
            factor = eps / (scale * total) if scale > 0.0 else 0.0
            if n < N:
                for i in range(lane, d, row_threads):
                    X_adv[n, i] = clip(X[n, i] + factor * G[n, i], x_min, x_max)

    return norm_step


@functools.cache
def iterate_step_kernel(threads: int, row_threads: int):
    """One step of the iterative attacks, fused: ``row_threads`` threads per row.

    ``iterate_step[blocks, threads, stream](X, source, G, momentum, eps, alpha, p, q,
    scratch, decay, x_min, x_max, step, X_adv)`` (grid-stride over rows), the per-row work of
    ``cpu.iterate_block``. With ``step``: with ``decay > 0`` first ``momentum = decay *
    momentum + G / ||G||_1`` (``cpu.add_momentum_row``), then a step of length alpha[n] along
    the momentum (else along G) as in ``cpu.step_row`` (L-inf: sign; L2: divided by its
    norm, taken in float64 after scaling by the largest |entry|; L1: sign / q on its q
    entries of largest magnitude, selected on ``scratch`` (N, d)), rounded to X's dtype.
    Without ``step`` the row is ``source`` as it is (and the momentum is set to 0). Either way
    the row is then projected as in ``cpu.project_row``: into the eps[n]-ball of norm p
    around X[n] (L1: the exact Euclidean projection, ``l1_threshold``), then into [x_min,
    x_max], and stored in X_adv. ``source`` is X_adv itself or the starting points.
    """
    GROUPS = threads // row_threads

    @cuda.jit
    def iterate_step(
        X, source, G, momentum, eps, alpha, p, q, scratch, decay, x_min, x_max, step, X_adv
    ):
        N, d = X.shape
        t = cuda.threadIdx.x
        lane = t % row_threads
        red = cuda.shared.array(threads, np.float64)
        for first in range(cuda.blockIdx.x * GROUPS, N, cuda.gridDim.x * GROUPS):
            n = first + t // row_threads
            live = n < N
            radius = eps[n] if live else 0.0
            length = alpha[n] if live else 0.0
            direction = G
            if decay > 0.0 and step:
                total = 0.0
                if live:
                    for i in range(lane, d, row_threads):
                        total += float(abs(G[n, i]))
                total = row_reduce(red, t, row_threads, total, False)
                inv = 1.0 / total if total > 0.0 else 0.0
                if live:
                    for i in range(lane, d, row_threads):
                        momentum[n, i] = decay * float(momentum[n, i]) + G[n, i] * inv
                direction = momentum
            elif decay > 0.0 and live:
                for i in range(lane, d, row_threads):
                    momentum[n, i] = 0.0
            if p == math.inf:
                if live:
                    for i in range(lane, d, row_threads):
                        v = source[n, i]
                        if step:
                            g = direction[n, i]
                            shift = length if g > 0.0 else (-length if g < 0.0 else 0.0)
                            v = X_adv.dtype.type(v + shift)
                        x0 = X[n, i]
                        X_adv[n, i] = clip(clip(v, x0 - radius, x0 + radius), x_min, x_max)
                continue
            factor = 0.0
            threshold = 0.0
            last = -1
            if step and p == 1.0:
                threshold, last = top_coordinates(
                    direction, n, live, q, scratch, red, t, row_threads
                )
                factor = length / min(max(q, 1), d)
            elif step:
                scale = 0.0
                if live:
                    for i in range(lane, d, row_threads):
                        scale = max(scale, abs(direction[n, i]))
                scale = row_reduce(red, t, row_threads, scale, True)
                total = 0.0
                if live and scale > 0.0:
                    for i in range(lane, d, row_threads):
                        g = direction[n, i] / scale
                        total += g * g
                total = row_reduce(red, t, row_threads, total, False)
                total = math.sqrt(total)
                factor = length / (scale * total) if scale > 0.0 else 0.0
            total = 0.0
            if live:
                for i in range(lane, d, row_threads):
                    v = source[n, i]
                    g = direction[n, i]
                    if step and p == 1.0:
                        if abs(g) > threshold or (abs(g) == threshold and i <= last):
                            v += factor if g > 0.0 else (-factor if g < 0.0 else 0.0)
                    elif step:
                        v += factor * g
                    X_adv[n, i] = v
                    diff = X_adv[n, i] - X[n, i]
                    total += float(diff * diff if p == 2.0 else abs(diff))
            total = row_reduce(red, t, row_threads, total, False)
            factor = 1.0
            shrink = 0.0
            if p == 2.0:
                total = math.sqrt(total)
                if total > radius:
                    factor = radius / total
            else:
                shrink = l1_threshold(X_adv, X, n, live, radius, total, red, t, row_threads)
            if live:
                for i in range(lane, d, row_threads):
                    x0 = X[n, i]
                    delta = factor * (X_adv[n, i] - x0)
                    magnitude = max(abs(delta) - shrink, 0.0)
                    delta = magnitude if delta > 0.0 else -magnitude
                    X_adv[n, i] = clip(x0 + delta, x_min, x_max)

    return iterate_step


@cuda.jit
def sign_step_rows(X, G, eps, x_min, x_max, X_adv):
    """X_adv = clip(X + eps * sign(G), x_min, x_max), element-wise (grid-stride)."""
    N, d = X.shape
    for e in range(cuda.grid(1), N * d, cuda.gridsize(1)):
        n = e // d
        i = e - n * d
        X_adv[n, i] = sign_step(X[n, i], G[n, i], eps, x_min, x_max)


@cuda.jit
def deepfool_start(X, total, X_adv, iterations):
    """DeepFool's first iterate (grid-stride): X_adv = X, total = 0, iterations = 0."""
    N, d = X.shape
    for e in range(cuda.grid(1), N * d, cuda.gridsize(1)):
        n = e // d
        i = e - n * d
        X_adv[n, i] = X[n, i]
        total[n, i] = 0.0
        if i == 0:
            iterations[n] = 0


@cuda.jit
def gather_rows(source, rows, out):
    """out[r] = source[rows[r]] for every r (grid-stride over elements); rows (M,) int64."""
    M, d = out.shape
    for e in range(cuda.grid(1), M * d, cuda.gridsize(1)):
        r = e // d
        i = e - r * d
        out[r, i] = source[rows[r], i]


@cuda.jit
def hidden_slopes(Z1, b1, W2, n_rows, S):
    """Activations and the rows of every logit's hidden-layer gradient (grid-stride).

    ``Z1 (splits * n_rows, H)`` holds the split partial sums of ``X @ W1``; its first n_rows
    rows become ``A = sigmoid(Z1 + b1)``, and ``S (n_rows * C, H)`` receives
    ``S[n * C + k, j] = A[n, j] (1 - A[n, j]) W2[j, k]``, so that the Jacobian of row n's
    logits, J (C, d) with dz_k/dx = W1 diag(A (1 - A)) W2[:, k], is rows n * C.. of S @ W1^T
    (as in ``cpu.logits_and_jacobian_row``).
    """
    H = Z1.shape[1]
    C = W2.shape[1]
    splits = Z1.shape[0] // n_rows
    for e in range(cuda.grid(1), n_rows * H, cuda.gridsize(1)):
        n = e // H
        j = e - n * H
        z = Z1[n, j]
        for split in range(1, splits):
            z += Z1[split * n_rows + n, j]
        Z1[n, j] = sigmoid(z + b1[j])
        a = float(Z1[n, j])
        slope = a * (1.0 - a)
        for k in range(C):
            S[n * C + k, j] = slope * W2[j, k]


@functools.cache
def deepfool_step_kernel(threads: int, row_threads: int):
    """One DeepFool iteration of the working rows: ``row_threads`` threads per row.

    ``deepfool_step[blocks, threads, stream](X, rows, Z, b2, J, p, overshoot, x_min, x_max,
    first, original, total, active, iterations, X_adv)`` (grid-stride over the M working
    rows), the body of the loop of ``cpu.deepfool_block``. Working row r is row ``rows[r]``
    (int64) of X (N, d); ``Z (M, C)`` holds its logits less b2 and rows r * C.. of
    ``J (M * C, d)`` their gradients, at its iterate ``X_adv[rows[r]]``. With ``first`` the
    predicted class is stored in ``original`` (N,) int64. A row whose prediction still is
    ``original`` moves to the nearest linearised boundary in norm p (2.0, or np.inf: the L1
    dual norm and a sign step): its accumulated perturbation ``total`` (N, d) float64 grows,
    X_adv becomes ``clip(X + (1 + overshoot) total)`` and ``iterations`` (N,) int64 counts
    one more; ``active`` (N,) uint8 says whether it moved.
    """
    GROUPS = threads // row_threads

    @cuda.jit
    def deepfool_step(
        X,
        rows,
        Z,
        b2,
        J,
        p,
        overshoot,
        x_min,
        x_max,
        first,
        original,
        total,
        active,
        iterations,
        X_adv,
    ):
        M = rows.shape[0]
        d = X.shape[1]
        C = Z.shape[1]
        t = cuda.threadIdx.x
        lane = t % row_threads
        red = cuda.shared.array(threads, np.float64)
        for group in range(cuda.blockIdx.x * GROUPS, M, cuda.gridDim.x * GROUPS):
            live = group + t // row_threads < M
            r = min(group + t // row_threads, M - 1)  # threads past the end read the last row
            n = rows[r]
            top = 0
            for k in range(1, C):
                if Z[r, k] + b2[k] > Z[r, top] + b2[top]:
                    top = k
            label = top if first else original[n]
            moving = live and top == label
            z_label = Z[r, label] + b2[label]  # in Z's dtype, as the CPU's logits
            best = -1
            best_ratio = math.inf
            best_norm = 0.0
            for k in range(C):
                norm = 0.0
                if moving and k != label:
                    for i in range(lane, d, row_threads):
                        w = J[r * C + k, i] - J[r * C + label, i]
                        norm += float(w * w if p == 2.0 else abs(w))
                norm = row_reduce(red, t, row_threads, norm, False)
                if moving and k != label:
                    norm = math.sqrt(norm) if p == 2.0 else norm
                    gap = float(abs((Z[r, k] + b2[k]) - z_label))
                    ratio = gap / norm if norm > 0.0 else math.inf
                    if ratio < best_ratio:
                        best = k
                        best_ratio = ratio
                        best_norm = norm
            moving = moving and best >= 0
            if moving:
                length = (float(abs((Z[r, best] + b2[best]) - z_label)) + 1e-4) / best_norm
                for i in range(lane, d, row_threads):
                    w = float(J[r * C + best, i] - J[r * C + label, i])
                    if p == 2.0:
                        total[n, i] += length * w / best_norm
                    else:
                        total[n, i] += length if w > 0.0 else (-length if w < 0.0 else 0.0)
                    X_adv[n, i] = clip(X[n, i] + (1.0 + overshoot) * total[n, i], x_min, x_max)
            if live and lane == 0:
                if first:
                    original[n] = label
                active[n] = 1 if moving else 0
                if moving:
                    iterations[n] += 1

    return deepfool_step
