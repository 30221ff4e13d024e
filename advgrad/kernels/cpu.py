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
def block_bounds(n_rows, blocks, block):
    """First and one-past-last row of ``block`` when ``n_rows`` are split in ``blocks``."""
    return (block * n_rows) // blocks, ((block + 1) * n_rows) // blocks


@njit(cache=True, error_model="numpy")
def softmax_columns(ZT, b, predicted, top, log_total):
    """Softmax of every column of ``ZT + b[:, None]``, in place, maximum subtracted first.

    Parameters
    ----------
    ZT : (C, B) float32 or float64, logits of B rows stored as columns (bias not added);
        overwritten with the probabilities P^T
    b : (C,) same dtype, the output bias b2
    predicted : (B,) int64, output: argmax of each column (the first one on ties)
    top : (B,) same dtype, output: the largest logit m of each column
    log_total : (B,) same dtype, output: log(sum_k exp(Z_k - m)) = logsumexp(Z) - m >= 0,
        from log1p of the non-maximal terms, so it keeps full precision near 0

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
    rest = np.zeros(B, dtype=ZT.dtype)
    for k in range(C):
        for n in range(B):
            e = exp(ZT[k, n] + b[k] - top[n])
            ZT[k, n] = e
            rest[n] += 0.0 if k == predicted[n] else e
    for k in range(C):
        for n in range(B):
            ZT[k, n] /= 1.0 + rest[n]
    for n in range(B):
        log_total[n] = math.log1p(rest[n])


@njit(cache=True, error_model="numpy")
def hidden_block_into(X, W1, b1, A):
    """A = sigmoid(X @ W1 + b1) for a block of rows: X (B, d) -> A (B, H), serial."""
    np.dot(X, W1, A)
    for n in range(A.shape[0]):
        for j in range(A.shape[1]):
            A[n, j] = sigmoid(A[n, j] + b1[j])


@njit(cache=True, error_model="numpy")
def gradient_block(X, W1, b1, W2, b2, Y, G, predicted):
    """dJ/dX for a block of rows, serial; writes G (B, d) and predicted (B,) int64.

    ``Y`` is (B, C), or has 0 rows to use the predictions as labels.
    """
    B = X.shape[0]
    A = np.empty((B, W1.shape[1]), dtype=X.dtype)
    hidden_block_into(X, W1, b1, A)
    D2T = np.dot(W2.T, A.T)  # logits as (C, B): the softmax loops run along rows
    softmax_columns(D2T, b2, predicted, np.empty(B, dtype=X.dtype), np.empty(B, dtype=X.dtype))
    for k in range(D2T.shape[0]):
        for n in range(B):
            label = (predicted[n] == k) if Y.shape[0] == 0 else Y[n, k]
            D2T[k, n] -= label
    D1 = np.dot(D2T.T, W2.T)
    for n in range(B):
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
    gradient_block(X, W1, b1, W2, b2, Y, G, predicted)
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
        gradient_block(X, W1, b1, W2, b2, Y, G, predicted)
        return
    for block in prange(blocks):
        start, stop = block_bounds(N, blocks, block)
        Yb = Y if Y.shape[0] == 0 else Y[start:stop]
        gradient_block(X[start:stop], W1, b1, W2, b2, Yb, G[start:stop], predicted[start:stop])


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
        start, stop = block_bounds(N, blocks, block)
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
        start, stop = block_bounds(N, blocks, block)
        hidden_block_into(X[start:stop], W1, b1, A[start:stop])
        ZT = np.dot(W2.T, A[start:stop].T)
        label_logit = np.zeros(stop - start, dtype=X.dtype)
        if Y.shape[0] != 0:
            for k in range(ZT.shape[0]):
                for n in range(stop - start):
                    label_logit[n] += Y[start + n, k] * (ZT[k, n] + b2[k])
        top = np.empty(stop - start, dtype=X.dtype)
        log_total = losses[start:stop]
        softmax_columns(ZT, b2, predicted[start:stop], top, log_total)
        if Y.shape[0] == 0:
            label_logit[:] = top  # the predicted class holds the largest logit
        for n in range(stop - start):
            # logsumexp(Z) - Y.Z = (m - Y.Z) + log(sum exp(Z - m)): no cancellation near 0
            log_total[n] += top[n] - label_logit[n]
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
