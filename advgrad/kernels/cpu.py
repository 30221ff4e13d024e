"""Numba CPU kernels for the two-layer sigmoid network (DESIGN.md section 1).

Every function here is ``@njit`` on plain arrays: no Python objects, no I/O, no global
state. They can be called from Python or from a user's own ``@njit`` code.

Shapes (row-vector convention): ``X (N, d)``, ``W1 (d, H)``, ``b1 (H,)``, ``W2 (H, C)``,
``b2 (C,)``, ``Y (N, C)``. All arrays of one call share one dtype, float32 or float64, and
are C-contiguous. Nothing is checked here: ``advgrad``'s Python functions check once.

Batch kernels split the rows into blocks of at most ``ROWS_PER_BLOCK`` rows that depend
only on N, and ``prange`` over them; each block runs the four matrix products through
``np.dot`` (BLAS) and fuses the element-wise work between them. A block writes only its
own rows, so results do not depend on the thread count. ``np.dot`` inside ``prange`` must
see a single-threaded BLAS (see ``advgrad.backend.blas_threads``); with one block the
kernels run serially and BLAS may use its own threads.

Labels ``Y`` are float (N, C), one-hot or soft (each row sums to 1). Kernels that take an
output for predictions also accept ``Y`` with 0 rows: the model's own predictions are
then the labels (one-hot of the argmax of the logits).
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

ROWS_PER_BLOCK = 256


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (inlined, so loops vectorise)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(cache=True, error_model="numpy")
def _power_of_two_float32(k):
    return _float32_from_bits((k + np.int32(127)) << np.int32(23))


@njit(cache=True, error_model="numpy")
def exp_float32(x):
    """exp(x) in float32 within 0.54 ulp, branch-free so that loops over it vectorise.

    Cody-Waite reduction x = k ln2 + r and the Cephes expf polynomial on |r| <= ln2/2;
    2**k is applied in two halves so that subnormal results are exact to rounding.
    """
    xc = min(max(x, np.float32(-104.0)), np.float32(88.72283))
    k = math.floor(xc * np.float32(1.44269504) + np.float32(0.5))
    r = xc - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4) * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * (r * r) + r + np.float32(1.0)
    ki = np.int32(k)
    half = ki >> np.int32(1)
    y = y * _power_of_two_float32(half) * _power_of_two_float32(ki - half)
    if x < np.float32(-104.0):
        return np.float32(0.0)
    return np.float32(np.inf) if x > np.float32(88.72283) else y


def exp(x):
    """exp(x): ``exp_float32`` for float32 arguments in jitted code, ``math.exp`` otherwise."""
    return math.exp(x)


@overload(exp)
def _exp_for_type(x):
    if x == types.float32:
        return lambda x: exp_float32(x)
    return lambda x: math.exp(x)


@njit(cache=True, error_model="numpy")
def sigmoid(z):
    """Logistic function 1 / (1 + exp(-z)), without overflow for any finite z."""
    t = exp(-abs(z))  # exp of a non-positive number cannot overflow
    r = 1.0 / (1.0 + t)
    return r if z >= 0.0 else t * r


@njit(cache=True, error_model="numpy")
def n_blocks(n_rows):
    """Number of row blocks a batch kernel splits ``n_rows`` rows into."""
    return (n_rows + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK


@njit(cache=True, error_model="numpy")
def block_rows(n_rows, block):
    """First and one-past-last row of ``block``: ``ROWS_PER_BLOCK`` rows, the last shorter.

    Blocks start at multiples of ``ROWS_PER_BLOCK``, so a row's result depends only on the
    aligned block it falls in: streaming in chunks of a multiple of ``ROWS_PER_BLOCK`` rows
    gives bitwise the same results as one call on the whole array.
    """
    start = block * ROWS_PER_BLOCK
    return start, min(start + ROWS_PER_BLOCK, n_rows)


@njit(cache=True, error_model="numpy")
def softmax_columns(ZT, b, predicted, top, rest):
    """Softmax of every column of ``ZT + b[:, None]``, in place, maximum subtracted first.

    Parameters
    ----------
    ZT : (C, B) float32 or float64, logits of B rows stored as columns (bias not added);
        overwritten with the probabilities P^T
    b : (C,) same dtype, the output bias b2
    predicted : (B,) int64, output: argmax of each column (the first one on ties)
    top : (B,) same dtype, output: the largest logit m of each column
    rest : (B,) same dtype, output: sum over the other classes of exp(Z_k - m), so that
        P_top = 1 / (1 + rest), 1 - P_top = rest * P_top and logsumexp(Z) = m + log1p(rest)
        all keep full precision when one class dominates

    Columns make the loops over rows contiguous, so they vectorise for any C.
    """
    C, B = ZT.shape
    for n in range(B):
        top[n] = ZT[0, n] + b[0]
        predicted[n] = 0
    for k in range(1, C):
        for n in range(B):
            z = ZT[k, n] + b[k]
            larger = z > top[n]
            top[n] = z if larger else top[n]
            predicted[n] = k if larger else predicted[n]
    rest[:] = 0.0
    for k in range(C):
        for n in range(B):
            e = exp(ZT[k, n] + b[k] - top[n])
            ZT[k, n] = e
            rest[n] += 0.0 if k == predicted[n] else e
    for k in range(C):
        for n in range(B):
            ZT[k, n] /= 1.0 + rest[n]


@njit(cache=True, error_model="numpy")
def hidden_block_into(X, W1, b1, A):
    """A = sigmoid(X @ W1 + b1) for a block of rows: X (B, d) -> A (B, H), serial."""
    np.dot(X, W1, A)
    for n in range(A.shape[0]):
        for j in range(A.shape[1]):
            A[n, j] = sigmoid(A[n, j] + b1[j])


@njit(cache=True, error_model="numpy")
def gradient_workspace(n_rows, W1, W2):
    """Scratch arrays of ``gradient_block`` for blocks of ``n_rows`` rows.

    Returns (A (B, H), D2T (C, B), D1 (B, H), top (B,), rest (B,)) in W1's dtype;
    iterative attacks allocate one per block and reuse it at every step.
    """
    H, C = W2.shape
    return (
        np.empty((n_rows, H), dtype=W1.dtype),
        np.empty((C, n_rows), dtype=W1.dtype),
        np.empty((n_rows, H), dtype=W1.dtype),
        np.empty(n_rows, dtype=W1.dtype),
        np.empty(n_rows, dtype=W1.dtype),
    )


@njit(cache=True, error_model="numpy")
def gradient_block(X, W1, b1, W2, b2, Y, G, predicted, work):
    """dJ/dX for a block of B rows, serial; writes G (B, d) and predicted (B,) int64.

    ``Y`` is (B, C), or has 0 rows to use the predictions as labels. ``work`` is a
    ``gradient_workspace(B, W1, W2)``.
    """
    A, D2T, D1, top, rest = work
    hidden_block_into(X, W1, b1, A)
    np.dot(W2.T, A.T, D2T)  # logits as (C, B): the softmax loops run along rows
    softmax_columns(D2T, b2, predicted, top, rest)
    for k in range(D2T.shape[0]):
        for n in range(X.shape[0]):
            label = (predicted[n] == k) if Y.shape[0] == 0 else Y[n, k]
            # P - Y; for the top class as (1 - Y) - (1 - P), exact when P rounds to 1
            top_class = (1.0 - label) - rest[n] * D2T[k, n]
            D2T[k, n] = top_class if k == predicted[n] else D2T[k, n] - label
    np.dot(D2T.T, W2.T, D1)
    for n in range(X.shape[0]):
        for j in range(D1.shape[1]):
            a = A[n, j]
            D1[n, j] *= a * (1.0 - a)
    np.dot(D1, W1.T, G)


@njit(cache=True, error_model="numpy")
def clip(v, lo, hi):
    """v limited to [lo, hi], branch-free (NaN passes through)."""
    v = lo if v < lo else v
    return hi if v > hi else v


@njit(cache=True, error_model="numpy")
def step_row(x, g, eps, p, x_min, x_max, out):
    """One FGM step on one row: out = clip(x + eps * direction(g), x_min, x_max).

    The direction is sign(g) for p = inf, g / ||g||_2 for p = 2, g / ||g||_1 for p = 1.
    A zero gradient leaves the row unchanged (but clipped). A negative eps descends the loss.
    """
    if p == np.inf:
        for i in range(x.shape[0]):
            step = eps if g[i] > 0.0 else (-eps if g[i] < 0.0 else 0.0)
            out[i] = clip(x[i] + step, x_min, x_max)
        return
    scale = 0.0
    for i in range(g.shape[0]):
        scale = max(scale, abs(g[i]))
    total = 0.0
    if p == 2.0:
        for i in range(g.shape[0]):
            total += (g[i] / scale) ** 2 if scale > 0.0 else 0.0
        total = math.sqrt(total)
    else:
        for i in range(g.shape[0]):
            total += abs(g[i]) / scale if scale > 0.0 else 0.0
    factor = eps / (scale * total) if scale > 0.0 else 0.0
    for i in range(x.shape[0]):
        out[i] = clip(x[i] + factor * g[i], x_min, x_max)


@njit(cache=True, error_model="numpy")
def fgm_block(X, W1, b1, W2, b2, Y, eps, p, x_min, x_max, X_adv, predicted):
    """One FGM step on a block of rows, serial (see ``fgm_step_into``)."""
    G = np.empty_like(X)
    gradient_block(X, W1, b1, W2, b2, Y, G, predicted, gradient_workspace(X.shape[0], W1, W2))
    for n in range(X.shape[0]):
        step_row(X[n], G[n], eps, p, x_min, x_max, X_adv[n])


@njit(parallel=True, cache=True, error_model="numpy")
def input_gradient_into(X, W1, b1, W2, b2, Y, G, predicted):
    """dJ/dX of the per-sample cross-entropy, for every row.

    Parameters
    ----------
    X : (N, d) float32 or float64
    W1, b1, W2, b2 : the network, same dtype as X
    Y : (N, C) same dtype, one-hot or soft labels; or 0 rows to use the predictions
    G : (N, d) same dtype, output: ((P - Y) W2^T * A * (1 - A)) W1^T
    predicted : (N,) int64, output: the model's predicted class of each row
    """
    N = X.shape[0]
    blocks = n_blocks(N)
    if blocks == 1:
        gradient_block(X, W1, b1, W2, b2, Y, G, predicted, gradient_workspace(N, W1, W2))
        return
    for block in prange(blocks):
        start, stop = block_rows(N, block)
        Yb = Y if Y.shape[0] == 0 else Y[start:stop]
        work = gradient_workspace(stop - start, W1, W2)
        gradient_block(
            X[start:stop], W1, b1, W2, b2, Yb, G[start:stop], predicted[start:stop], work
        )


@njit(cache=True, error_model="numpy")
def input_gradient(X, W1, b1, W2, b2, Y):
    """dJ/dX of the per-sample cross-entropy J_n = CE(Y_n, softmax(Z2_n)).

    Parameters
    ----------
    X : (N, d) float32 or float64
    W1 : (d, H), b1 : (H,), W2 : (H, C), b2 : (C,), same dtype as X
    Y : (N, C) same dtype, one-hot or soft labels (rows sum to 1)

    Returns
    -------
    G : (N, d) same dtype, ((P - Y) W2^T * A * (1 - A)) W1^T
    """
    G = np.empty_like(X)
    predicted = np.empty(X.shape[0], dtype=np.int64)
    input_gradient_into(X, W1, b1, W2, b2, Y, G, predicted)
    return G


@njit(parallel=True, cache=True, error_model="numpy")
def fgm_step_into(X, W1, b1, W2, b2, Y, eps, p, x_min, x_max, X_adv, predicted):
    """One fast-gradient step of norm p on every row, gradient fused per block.

    Parameters
    ----------
    X : (N, d) float32 or float64
    W1, b1, W2, b2 : the network, same dtype as X
    Y : (N, C) same dtype, labels; or 0 rows to use the predictions
    eps : float, step length; negative to descend the loss (targeted attacks)
    p : float, np.inf (sign of G), 2.0 (G / ||G||_2) or 1.0 (G / ||G||_1)
    x_min, x_max : float, the clip range
    X_adv : (N, d) same dtype, output: clip(X + eps * direction(G), x_min, x_max)
    predicted : (N,) int64, output: the model's predicted class of each clean row
    """
    N = X.shape[0]
    blocks = n_blocks(N)
    if blocks == 1:
        fgm_block(X, W1, b1, W2, b2, Y, eps, p, x_min, x_max, X_adv, predicted)
        return
    for block in prange(blocks):
        start, stop = block_rows(N, block)
        Yb = Y if Y.shape[0] == 0 else Y[start:stop]
        fgm_block(
            X[start:stop],
            W1,
            b1,
            W2,
            b2,
            Yb,
            eps,
            p,
            x_min,
            x_max,
            X_adv[start:stop],
            predicted[start:stop],
        )


@njit(cache=True, error_model="numpy")
def fgm_step(X, W1, b1, W2, b2, Y, eps, p, x_min, x_max):
    """X_adv = clip(X + eps * direction_p(dJ/dX), x_min, x_max); see ``fgm_step_into``."""
    X_adv = np.empty_like(X)
    predicted = np.empty(X.shape[0], dtype=np.int64)
    fgm_step_into(X, W1, b1, W2, b2, Y, eps, p, x_min, x_max, X_adv, predicted)
    return X_adv


@njit(cache=True, error_model="numpy")
def fgsm_step(X, W1, b1, W2, b2, Y, eps, x_min, x_max):
    """FGSM: X_adv = clip(X + eps * sign(dJ/dX), x_min, x_max).

    Parameters
    ----------
    X : (N, d) float32 or float64
    W1, b1, W2, b2 : the network, same dtype as X
    Y : (N, C) same dtype, one-hot or soft labels
    eps : float, L-inf step; negative to descend the loss
    x_min, x_max : float, the clip range

    Returns
    -------
    X_adv : (N, d) same dtype
    """
    return fgm_step(X, W1, b1, W2, b2, Y, eps, np.inf, x_min, x_max)


@njit(parallel=True, cache=True, error_model="numpy")
def forward_into(X, W1, b1, W2, b2, Y, A, P, losses, predicted):
    """Forward pass of every row.

    Parameters
    ----------
    X : (N, d) float32 or float64
    W1, b1, W2, b2 : the network, same dtype as X
    Y : (N, C) same dtype, labels for the loss; or 0 rows for the loss against predictions
    A : (N, H) same dtype, output: hidden activations sigmoid(X W1 + b1)
    P : (N, C) same dtype, output: probabilities softmax(A W2 + b2)
    losses : (N,) same dtype, output: logsumexp(Z2) - sum_k Y_k Z2_k per row
    predicted : (N,) int64, output: argmax of the logits Z2 per row
    """
    N = X.shape[0]
    blocks = n_blocks(N)
    for block in prange(blocks):
        start, stop = block_rows(N, block)
        hidden_block_into(X[start:stop], W1, b1, A[start:stop])
        ZT = np.dot(W2.T, A[start:stop].T)
        label_logit = np.zeros(stop - start, dtype=X.dtype)
        if Y.shape[0] != 0:
            for k in range(ZT.shape[0]):
                for n in range(stop - start):
                    label_logit[n] += Y[start + n, k] * (ZT[k, n] + b2[k])
        top = np.empty(stop - start, dtype=X.dtype)
        rest = np.empty(stop - start, dtype=X.dtype)
        softmax_columns(ZT, b2, predicted[start:stop], top, rest)
        if Y.shape[0] == 0:
            label_logit[:] = top  # the predicted class holds the largest logit
        for n in range(stop - start):
            # logsumexp(Z) - Y.Z = (m - Y.Z) + log1p(rest): no cancellation near 0
            losses[start + n] = (top[n] - label_logit[n]) + math.log1p(rest[n])
        P[start:stop] = ZT.T


@njit(cache=True, error_model="numpy")
def forward(X, W1, b1, W2, b2):
    """Hidden activations A (N, H), probabilities P (N, C) and predictions (N,) int64 of X."""
    N = X.shape[0]
    A = np.empty((N, W1.shape[1]), dtype=X.dtype)
    P = np.empty((N, W2.shape[1]), dtype=X.dtype)
    losses = np.empty(N, dtype=X.dtype)
    predicted = np.empty(N, dtype=np.int64)
    forward_into(X, W1, b1, W2, b2, P[:0], A, P, losses, predicted)
    return A, P, predicted


@njit(cache=True, error_model="numpy")
def loss(X, W1, b1, W2, b2, Y):
    """Per-sample cross-entropy J (N,) of X (N, d) against labels Y (N, C), via logsumexp."""
    N = X.shape[0]
    A = np.empty((N, W1.shape[1]), dtype=X.dtype)
    P = np.empty((N, W2.shape[1]), dtype=X.dtype)
    losses = np.empty(N, dtype=X.dtype)
    predicted = np.empty(N, dtype=np.int64)
    forward_into(X, W1, b1, W2, b2, Y, A, P, losses, predicted)
    return losses


@njit(cache=True, error_model="numpy")
def project_row(x, x0, eps, p, x_min, x_max, scratch):
    """Move x (d,) in place into the eps-ball of norm p around x0, then into [x_min, x_max].

    p = inf clips each coordinate; p = 2 scales the perturbation down to length eps; p = 1
    is the exact Euclidean projection onto the L1 ball (Duchi et al. 2008, by sorting).
    Clipping afterwards only shrinks each coordinate's perturbation, so the result stays in
    the ball. ``scratch`` is a (d,) array of x's dtype (used for p = 1).
    """
    d = x.shape[0]
    if p == np.inf:
        for i in range(d):
            x[i] = clip(clip(x[i], x0[i] - eps, x0[i] + eps), x_min, x_max)
        return
    total = 0.0
    if p == 2.0:
        for i in range(d):
            total += (x[i] - x0[i]) ** 2
        total = math.sqrt(total)
    else:
        for i in range(d):
            total += abs(x[i] - x0[i])
    shrink = 0.0  # L1: amount subtracted from every |perturbation| (soft threshold)
    factor = 1.0
    if total > eps:
        if p == 2.0:
            factor = eps / total
        else:
            for i in range(d):
                scratch[i] = abs(x[i] - x0[i])
            scratch[:] = np.sort(scratch)[::-1]
            running = 0.0
            for j in range(d):
                running += scratch[j]
                if scratch[j] - (running - eps) / (j + 1) > 0.0:
                    shrink = (running - eps) / (j + 1)
    for i in range(d):
        delta = factor * (x[i] - x0[i])
        magnitude = max(abs(delta) - shrink, 0.0)
        delta = magnitude if delta > 0.0 else -magnitude
        x[i] = clip(x0[i] + delta, x_min, x_max)


@njit(cache=True, error_model="numpy")
def add_momentum_row(momentum, g, decay):
    """MI-FGSM accumulation, in place: momentum = decay * momentum + g / ||g||_1."""
    total = 0.0
    for i in range(g.shape[0]):
        total += abs(g[i])
    inv = 1.0 / total if total > 0.0 else 0.0
    for i in range(g.shape[0]):
        momentum[i] = decay * momentum[i] + g[i] * inv


@njit(cache=True, error_model="numpy")
def iterate_block(X, W1, b1, W2, b2, Y, X_start, eps, alpha, steps, p, decay, x_min, x_max, X_adv):
    """Iterative FGM on a block of rows, serial (see ``iterate_into``); buffers are reused."""
    B = X.shape[0]
    work = gradient_workspace(B, W1, W2)
    G = np.empty_like(X)
    momentum = np.zeros_like(X)
    predicted = np.empty(B, dtype=np.int64)
    scratch = np.empty(X.shape[1], dtype=X.dtype)
    for n in range(B):
        X_adv[n] = X_start[n]
        project_row(X_adv[n], X[n], eps[n], p, x_min, x_max, scratch)
    for _ in range(steps):
        gradient_block(X_adv, W1, b1, W2, b2, Y, G, predicted, work)
        for n in range(B):
            direction = G[n]
            if decay > 0.0:
                add_momentum_row(momentum[n], G[n], decay)
                direction = momentum[n]
            step_row(X_adv[n], direction, alpha[n], p, -np.inf, np.inf, X_adv[n])
            project_row(X_adv[n], X[n], eps[n], p, x_min, x_max, scratch)


@njit(parallel=True, cache=True, error_model="numpy")
def iterate_into(X, W1, b1, W2, b2, Y, X_start, eps, alpha, steps, p, decay, x_min, x_max, X_adv):
    """Iterative fast-gradient attack (BIM, PGD, MI-FGSM) on every row, in one jitted loop.

    From X_start projected into the ball, ``steps`` times: G = dJ/dX at the iterate (with
    ``decay > 0``, the direction is the MI-FGSM momentum of G / ||G||_1 instead), a step
    of length alpha in norm p as in ``step_row``, then ``project_row`` back into the
    eps-ball around X and into [x_min, x_max].

    Parameters
    ----------
    X : (N, d) float32 or float64, the clean rows (centres of the balls)
    W1, b1, W2, b2 : the network, same dtype as X
    Y : (N, C) same dtype, labels held fixed over the steps
    X_start : (N, d) same dtype, the first iterate (X for BIM, a random point for PGD)
    eps : (N,) float64, radius per row
    alpha : (N,) float64, step length per row; negative to descend (targeted attacks)
    steps : int
    p : float, np.inf, 2.0 or 1.0
    decay : float, momentum decay; 0 for plain BIM/PGD
    x_min, x_max : float, the clip range
    X_adv : (N, d) same dtype, output; may be X_start itself
    """
    N = X.shape[0]
    for block in prange(n_blocks(N)):
        start, stop = block_rows(N, block)
        iterate_block(
            X[start:stop],
            W1,
            b1,
            W2,
            b2,
            Y[start:stop],
            X_start[start:stop],
            eps[start:stop],
            alpha[start:stop],
            steps,
            p,
            decay,
            x_min,
            x_max,
            X_adv[start:stop],
        )


@njit(cache=True, error_model="numpy")
def logits_and_jacobian_row(x, W1, b1, W2, b2, a, M, z, J):
    """Logits z (C,) of one row x (d,) and all their gradients at once, J (d, C) = dz/dx.

    J = W1 diag(a (1 - a)) W2 with a = sigmoid(x W1 + b1): one (d, H) x (H, C) product, not
    C backward passes. ``a`` (H,) and ``M`` (H, C) are scratch.
    """
    np.dot(x, W1, a)
    for j in range(a.shape[0]):
        a[j] = sigmoid(a[j] + b1[j])
    np.dot(a, W2, z)
    for k in range(z.shape[0]):
        z[k] += b2[k]
    for j in range(M.shape[0]):
        slope = a[j] * (1.0 - a[j])
        for k in range(M.shape[1]):
            M[j, k] = slope * W2[j, k]
    np.dot(W1, M, J)


@njit(cache=True, error_model="numpy")
def deepfool_block(X, W1, b1, W2, b2, p, overshoot, max_iter, x_min, x_max, X_adv, iterations):
    """DeepFool on a block of rows, serial (see ``deepfool_into``)."""
    d, H = W1.shape
    C = W2.shape[1]
    a = np.empty(H, dtype=X.dtype)
    M = np.empty((H, C), dtype=X.dtype)
    z = np.empty(C, dtype=X.dtype)
    J = np.empty((d, C), dtype=X.dtype)
    total = np.empty(d, dtype=np.float64)
    for n in range(X.shape[0]):
        x = X_adv[n]
        x[:] = X[n]
        total[:] = 0.0
        logits_and_jacobian_row(x, W1, b1, W2, b2, a, M, z, J)
        original = np.argmax(z)
        done = 0
        while done < max_iter and np.argmax(z) == original:
            best, best_ratio, best_norm = -1, np.inf, 0.0
            for k in range(C):
                if k == original:
                    continue
                norm = 0.0
                for i in range(d):
                    w = J[i, k] - J[i, original]
                    norm += w * w if p == 2.0 else abs(w)
                norm = math.sqrt(norm) if p == 2.0 else norm
                ratio = abs(z[k] - z[original]) / norm if norm > 0.0 else np.inf
                if ratio < best_ratio:
                    best, best_ratio, best_norm = k, ratio, norm
            if best < 0:
                break  # every logit difference is flat: no direction to move in
            # the linearised boundary is (|f| + 1e-4) / ||w||_q away, q the dual norm of p
            length = (abs(z[best] - z[original]) + 1e-4) / best_norm
            for i in range(d):
                w = J[i, best] - J[i, original]
                total[i] += length * w / best_norm if p == 2.0 else length * np.sign(w)
                x[i] = clip(X[n, i] + (1.0 + overshoot) * total[i], x_min, x_max)
            done += 1
            logits_and_jacobian_row(x, W1, b1, W2, b2, a, M, z, J)
        iterations[n] = done


@njit(parallel=True, cache=True, error_model="numpy")
def deepfool_into(X, W1, b1, W2, b2, p, overshoot, max_iter, x_min, x_max, X_adv, iterations):
    """DeepFool (Moosavi-Dezfooli et al. 2016), multi-class, for every row.

    Each iteration linearises all C logits at the iterate (``logits_and_jacobian_row``),
    moves to the nearest linearised class boundary in norm p (2.0, or np.inf with the
    L1 dual norm and a sign step), and stops when the predicted class changes or after
    ``max_iter`` iterations. The accumulated perturbation is scaled by 1 + overshoot.

    Parameters
    ----------
    X : (N, d) float32 or float64
    W1, b1, W2, b2 : the network, same dtype as X
    p : float, 2.0 or np.inf
    overshoot : float, e.g. 0.02
    max_iter : int
    x_min, x_max : float, the clip range
    X_adv : (N, d) same dtype, output
    iterations : (N,) int64, output: iterations used per row (max_iter when it failed)
    """
    N = X.shape[0]
    for block in prange(n_blocks(N)):
        start, stop = block_rows(N, block)
        deepfool_block(
            X[start:stop],
            W1,
            b1,
            W2,
            b2,
            p,
            overshoot,
            max_iter,
            x_min,
            x_max,
            X_adv[start:stop],
            iterations[start:stop],
        )
