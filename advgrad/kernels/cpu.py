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
see a single-threaded BLAS: a kernel that runs more than one block pins it to one thread
for their run and restores it after (``advgrad.kernels.blas.pin_blas``), so the kernels
are safe to call at any N with nothing around them; with one block they run serially and
BLAS may use its own threads.

Labels ``Y`` are float (N, C), one-hot or soft (each row sums to 1). Kernels that take an
output for predictions also accept ``Y`` with 0 rows: the model's own predictions are
then the labels (one-hot of the argmax of the logits). ``loss_gradient`` takes int64 class
labels instead, and switches between the losses that attacks maximise (cross-entropy, DLR,
targeted DLR, C&W margin, FAB's logit difference): each loss's gradient with respect to
the logits, then the one back-propagation (``backpropagate_block``) that every gradient
here shares.
"""

import math

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.extending import intrinsic, overload

from advgrad.kernels.blas import pin_blas, unpin_blas
from advgrad.kernels.memory import advise_huge_pages

# Numba starts its parallel runtime when it loads a cached parallel kernel from the cache,
# but not when it loads a cached serial function that calls one (``fgsm_step``, or a user's
# own) compiled while that kernel came from the cache: the call then jumps to an unresolved
# symbol and crashes (numba issues 8578 and 9938). Starting the runtime here covers them all.
get_num_threads()

ROWS_PER_BLOCK = 256
EXP_COEFFICIENTS = tuple(1.0 / math.factorial(n) for n in range(13, -1, -1))
"""1 / n! for n = 13, ..., 0: ``exp_nonpositive``'s polynomial, highest degree first."""


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


@intrinsic
def _float64_from_bits(typingctx, bits):
    """Reinterpret the bits of an int64 as a float64 (inlined, so loops vectorise)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@intrinsic
def _bits_moved(typingctx, x, by):
    """x (float32 or float64) whose bits, read as a signed integer of its width, are moved
    by the integer ``by``."""

    def codegen(context, builder, signature, args):
        integer = ir.IntType(signature.args[0].bitwidth)
        step = context.cast(builder, args[1], signature.args[1], types.int64)
        step = builder.trunc(step, integer) if integer.width < 64 else step
        moved = builder.add(builder.bitcast(args[0], integer), step)
        return builder.bitcast(moved, args[0].type)

    return x(x, by), codegen


@njit(cache=True, error_model="numpy")
def next_toward(value, target):
    """``np.nextafter(value, target)`` for finite value and target of one float dtype: the
    next representable number after value in the direction of target (target if equal),
    from the bits alone, so that it compiles for CUDA too."""
    if value == target:
        return target
    if value == 0.0:
        zero = value - value
        return _bits_moved(-zero if target < 0.0 else zero, 1)
    return _bits_moved(value, 1 if (target > value) == (value > 0.0) else -1)


@njit(cache=True, error_model="numpy")
def _power_of_two_float64(k):
    return _float64_from_bits((k + np.int64(1023)) << np.int64(52))


@njit(cache=True, error_model="numpy", fastmath={"contract"})  # multiply-adds fused
def exp_nonpositive(x):
    """exp(x) in float64 for x <= 0, within 2 ulp, branch-free and division-free so that
    loops over it vectorise (libm's exp does not, and a sigmoid per hidden unit is much
    of a query).

    Cody-Waite reduction x = k ln2 + r (|r| <= ln2/2) and the Taylor polynomial of exp(r)
    to degree 13 (its remainder is below 2e-16 relative); 2**k is applied in two halves so
    that subnormal results are exact to rounding.
    """
    xc = max(x, -745.2)
    k = math.floor(xc * 1.4426950408889634 + 0.5)
    r = xc - k * 6.93145751953125e-1 - k * 1.42860682030941723212e-6
    y = 0.0
    for coefficient in EXP_COEFFICIENTS:
        y = y * r + coefficient
    ki = np.int64(k)
    half = ki >> np.int64(1)
    y = y * _power_of_two_float64(half) * _power_of_two_float64(ki - half)
    return 0.0 if x < -745.2 else y


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
def logits_block_into(X, W1, b1, W2, A, ZT):
    """Hidden activations A (B, H) and logits ZT (C, B) of a block of rows X (B, d), serial.

    ZT holds the logits as columns, without the bias b2 (``softmax_columns`` adds it): the
    loops over the rows of a class then run along memory. Every kernel that needs logits
    forms them here, so that its z_k = ZT[k, n] + b2[k] are bitwise those of ``logits``.
    """
    hidden_block_into(X, W1, b1, A)
    np.dot(W2.T, A.T, ZT)


@njit(cache=True, error_model="numpy")
def backpropagate_block(A, D2T, W1, W2, D1, G):
    """G (B, d) = ((D2 W2^T) * A * (1 - A)) W1^T for a block of rows, serial: the input
    gradient of any loss whose gradient with respect to the logits is D2 (B, C), given as
    D2T (C, B). D1 (B, H) receives D2 W2^T * A * (1 - A), the gradient at Z1."""
    np.dot(D2T.T, W2.T, D1)
    for n in range(D1.shape[0]):
        for j in range(D1.shape[1]):
            a = A[n, j]
            D1[n, j] *= a * (1.0 - a)
    np.dot(D1, W1.T, G)


def _label(Y, predicted, n, k):
    """The weight of class k in the label of row n, for jitted code: Y[n, k] for float labels
    Y (N, C), or the one-hot of predicted[n] when Y has 0 rows; labels[n] == k for int
    labels Y (N,)."""


@overload(_label)
def _label_for_type(Y, predicted, n, k):
    if Y.ndim == 1:
        return lambda Y, predicted, n, k: Y[n] == k
    return lambda Y, predicted, n, k: (predicted[n] == k) if Y.shape[0] == 0 else Y[n, k]


@njit(cache=True, error_model="numpy")
def cross_entropy_logit_gradient(ZT, b2, Y, predicted, top, rest):
    """dJ/dZ2 = P - Y of the cross-entropy for a block of B rows, in place, serial.

    Parameters
    ----------
    ZT : (C, B) float32 or float64, logits as columns without the bias (as
        ``logits_block_into`` leaves them); overwritten with (P - Y)^T
    b2 : (C,) same dtype, the output bias
    Y : (B, C) same dtype, one-hot or soft labels, or 0 rows for the predictions; or
        (B,) int64 class labels
    predicted, top, rest : (B,) outputs of ``softmax_columns``
    """
    softmax_columns(ZT, b2, predicted, top, rest)
    for k in range(ZT.shape[0]):
        for n in range(ZT.shape[1]):
            label = _label(Y, predicted, n, k)
            # P - Y; for the top class as (1 - Y) - (1 - P), exact when P rounds to 1
            top_class = (1.0 - label) - rest[n] * ZT[k, n]
            ZT[k, n] = top_class if k == predicted[n] else ZT[k, n] - label


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
    logits_block_into(X, W1, b1, W2, A, D2T)
    cross_entropy_logit_gradient(D2T, b2, Y, predicted, top, rest)
    backpropagate_block(A, D2T, W1, W2, D1, G)


@njit(cache=True, error_model="numpy")
def clip(v, lo, hi):
    """v limited to [lo, hi], branch-free (NaN passes through)."""
    v = lo if v < lo else v
    return hi if v > hi else v


@njit(cache=True, error_model="numpy")
def largest_magnitudes(g, q, scratch):
    """The q coordinates of g (d,) of largest |g_i|, the first index first on ties.

    Returns (threshold, last): coordinate i is one of them exactly when |g_i| > threshold,
    or |g_i| == threshold and i <= last. The threshold is the q-th largest |g_i| (q is
    clamped to [1, d]), found by Hoare's selection (quickselect, Wirth's loop with a
    median-of-three pivot) on a copy of |g| in ``scratch`` (d,): expected O(d), no sort.
    """
    d = g.shape[0]
    if d == 0:
        return 0.0, -1
    for i in range(d):
        scratch[i] = abs(g[i])
    k = min(max(q, 1), d) - 1  # rank of the threshold in descending order
    lo, hi = 0, d - 1
    while lo < hi:
        a, b, c = scratch[lo], scratch[(lo + hi) // 2], scratch[hi]
        pivot = max(min(a, b), min(max(a, b), c))  # the median of the three
        i, j = lo, hi
        while i <= j:
            while scratch[i] > pivot:
                i += 1
            while scratch[j] < pivot:
                j -= 1
            if i <= j:
                scratch[i], scratch[j] = scratch[j], scratch[i]
                i += 1
                j -= 1
        if j < k:
            lo = i
        if k < i:
            hi = j
    threshold = scratch[k]
    ties = k + 1  # coordinates equal to the threshold still to take, once those above go
    for i in range(d):
        if abs(g[i]) > threshold:
            ties -= 1
    last = -1
    for i in range(d):
        if ties == 0:
            break
        if abs(g[i]) == threshold:
            last = i
            ties -= 1
    return threshold, last


@njit(cache=True, error_model="numpy")
def step_row(x, g, eps, p, q, x_min, x_max, out, scratch):
    """One FGM step on one row: out = clip(x + eps * direction(g), x_min, x_max).

    The direction is sign(g) for p = inf and g / ||g||_2 for p = 2. For p = 1 it is the
    steepest sparse L1 direction (SLIDE, Tramer & Boneh 2019): sign(g_i) / q on the q
    coordinates of largest |g_i| (``largest_magnitudes``, q clamped to [1, d]), 0 elsewhere,
    so the step gains eps times the mean of the q largest |g_i| to first order; q = 1 is
    the steepest L1 step (all of eps on the largest |g_i|). ``scratch`` is a (d,) array of
    x's dtype (used for p = 1). A zero gradient leaves the row unchanged (but clipped). A
    negative eps descends the loss. out may be x or g.
    """
    if p == np.inf:
        for i in range(x.shape[0]):
            step = eps if g[i] > 0.0 else (-eps if g[i] < 0.0 else 0.0)
            out[i] = clip(x[i] + step, x_min, x_max)
        return
    if p == 1.0:
        threshold, last = largest_magnitudes(g, q, scratch)
        size = eps / min(max(q, 1), x.shape[0])
        for i in range(x.shape[0]):
            chosen = abs(g[i]) > threshold or (abs(g[i]) == threshold and i <= last)
            step = 0.0
            if chosen:
                step = size if g[i] > 0.0 else (-size if g[i] < 0.0 else 0.0)
            out[i] = clip(x[i] + step, x_min, x_max)
        return
    scale = 0.0
    for i in range(g.shape[0]):
        scale = max(scale, abs(g[i]))
    total = 0.0
    for i in range(g.shape[0]):
        total += (g[i] / scale) ** 2 if scale > 0.0 else 0.0
    total = math.sqrt(total)
    factor = eps / (scale * total) if scale > 0.0 else 0.0
    for i in range(x.shape[0]):
        out[i] = clip(x[i] + factor * g[i], x_min, x_max)


@njit(cache=True, error_model="numpy")
def fgm_block(X, W1, b1, W2, b2, Y, eps, p, x_min, x_max, X_adv, predicted, q=1):
    """One FGM step on a block of rows, serial (see ``fgm_step_into``)."""
    G = np.empty_like(X)
    gradient_block(X, W1, b1, W2, b2, Y, G, predicted, gradient_workspace(X.shape[0], W1, W2))
    steps_from_gradient_block(X, G, eps, p, q, x_min, x_max, X_adv)


@njit(cache=True, error_model="numpy")
def steps_from_gradient_block(X, G, eps, p, q, x_min, x_max, X_adv):
    """``step_row`` on every row of a block, serial, with one scratch row for them all."""
    scratch = np.empty(X.shape[1] if p == 1.0 else 0, dtype=X.dtype)
    for n in range(X.shape[0]):
        step_row(X[n], G[n], eps, p, q, x_min, x_max, X_adv[n], scratch)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
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
    pinned = pin_blas(blocks)
    for block in prange(blocks):
        start, stop = block_rows(N, block)
        Yb = Y if Y.shape[0] == 0 else Y[start:stop]
        work = gradient_workspace(stop - start, W1, W2)
        gradient_block(
            X[start:stop], W1, b1, W2, b2, Yb, G[start:stop], predicted[start:stop], work
        )
    unpin_blas(pinned)


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
    advise_huge_pages(G)
    predicted = np.empty(X.shape[0], dtype=np.int64)
    input_gradient_into(X, W1, b1, W2, b2, Y, G, predicted)
    return G


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def fgm_step_into(X, W1, b1, W2, b2, Y, eps, p, x_min, x_max, X_adv, predicted, q=1):
    """One fast-gradient step of norm p on every row, gradient fused per block.

    Parameters
    ----------
    X : (N, d) float32 or float64
    W1, b1, W2, b2 : the network, same dtype as X
    Y : (N, C) same dtype, labels; or 0 rows to use the predictions
    eps : float, step length; negative to descend the loss (targeted attacks)
    p : float, np.inf (sign of G), 2.0 (G / ||G||_2) or 1.0 (sign(G) / q on the q
        coordinates of largest |G|, ``step_row``)
    x_min, x_max : float, the clip range
    X_adv : (N, d) same dtype, output: clip(X + eps * direction(G), x_min, x_max)
    predicted : (N,) int64, output: the model's predicted class of each clean row
    q : int, the coordinates an L1 step moves (default 1: the steepest L1 step)
    """
    N = X.shape[0]
    blocks = n_blocks(N)
    if blocks == 1:
        fgm_block(X, W1, b1, W2, b2, Y, eps, p, x_min, x_max, X_adv, predicted, q)
        return
    pinned = pin_blas(blocks)
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
            q,
        )
    unpin_blas(pinned)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def fgm_from_gradient_into(X, G, eps, p, x_min, x_max, X_adv, q=1):
    """One fast-gradient step of norm p on every row, from a gradient computed before.

    ``fgm_step_into`` gives bitwise the same X_adv; this one lets several eps (or norms)
    share one gradient.

    Parameters
    ----------
    X : (N, d) float32 or float64
    G : (N, d) same dtype, the loss gradient (e.g. from ``input_gradient_into``)
    eps : float, step length; negative to descend the loss (targeted attacks)
    p : float, np.inf, 2.0 or 1.0
    x_min, x_max : float, the clip range
    X_adv : (N, d) same dtype, output: clip(X + eps * direction(G), x_min, x_max)
    q : int, the coordinates an L1 step moves (default 1: the steepest L1 step)
    """
    N = X.shape[0]
    for block in prange(n_blocks(N)):
        start, stop = block_rows(N, block)
        steps_from_gradient_block(
            X[start:stop], G[start:stop], eps, p, q, x_min, x_max, X_adv[start:stop]
        )


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def perturbation_norms_into(X_adv, X, linf, l2):
    """The L-inf and L2 norms of every row of X_adv - X, in float64.

    Parameters
    ----------
    X_adv, X : (N, d) float32 or float64
    linf, l2 : (N,) float64, outputs (NaN where a row holds NaN)
    """
    for n in prange(X.shape[0]):
        largest = 0.0
        total = 0.0
        for i in range(X.shape[1]):
            delta = abs(np.float64(X_adv[n, i]) - np.float64(X[n, i]))
            if delta > largest or delta != delta:
                largest = delta if largest == largest else largest
            total += delta * delta
        linf[n] = largest
        l2[n] = math.sqrt(total)


@njit(cache=True, error_model="numpy")
def fgm_step(X, W1, b1, W2, b2, Y, eps, p, x_min, x_max, q=1):
    """X_adv = clip(X + eps * direction_p(dJ/dX), x_min, x_max); see ``fgm_step_into``."""
    X_adv = np.empty_like(X)
    advise_huge_pages(X_adv)
    predicted = np.empty(X.shape[0], dtype=np.int64)
    fgm_step_into(X, W1, b1, W2, b2, Y, eps, p, x_min, x_max, X_adv, predicted, q)
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


@njit(cache=True, error_model="numpy")
def forward_block(X, W1, b1, W2, b2, Y, A, P, losses, predicted):
    """Forward pass of a block of rows, serial (see ``forward_into``; Y has the block's
    rows or 0 rows)."""
    B = X.shape[0]
    hidden_block_into(X, W1, b1, A)
    ZT = np.dot(W2.T, A.T)
    label_logit = np.zeros(B, dtype=X.dtype)
    if Y.shape[0] != 0:
        for k in range(ZT.shape[0]):
            for n in range(B):
                label_logit[n] += Y[n, k] * (ZT[k, n] + b2[k])
    top = np.empty(B, dtype=X.dtype)
    rest = np.empty(B, dtype=X.dtype)
    softmax_columns(ZT, b2, predicted, top, rest)
    if Y.shape[0] == 0:
        label_logit = top  # the predicted class holds the largest logit
    for n in range(B):
        # logsumexp(Z) - Y.Z = (m - Y.Z) + log1p(rest): no cancellation near 0
        losses[n] = (top[n] - label_logit[n]) + math.log1p(rest[n])
        for k in range(ZT.shape[0]):  # loops, not slice copies: they compile seconds faster
            P[n, k] = ZT[k, n]


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
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
    if blocks == 1:
        forward_block(X, W1, b1, W2, b2, Y, A, P, losses, predicted)
        return
    pinned = pin_blas(blocks)
    for block in prange(blocks):
        start, stop = block_rows(N, block)
        Yb = Y if Y.shape[0] == 0 else Y[start:stop]
        forward_block(
            X[start:stop],
            W1,
            b1,
            W2,
            b2,
            Yb,
            A[start:stop],
            P[start:stop],
            losses[start:stop],
            predicted[start:stop],
        )
    unpin_blas(pinned)


@njit(cache=True, error_model="numpy")
def forward(X, W1, b1, W2, b2):
    """Hidden activations A (N, H), probabilities P (N, C) and predictions (N,) int64 of X."""
    N = X.shape[0]
    A = np.empty((N, W1.shape[1]), dtype=X.dtype)
    P = np.empty((N, W2.shape[1]), dtype=X.dtype)
    advise_huge_pages(A)
    advise_huge_pages(P)
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
    advise_huge_pages(A)
    advise_huge_pages(P)
    losses = np.empty(N, dtype=X.dtype)
    predicted = np.empty(N, dtype=np.int64)
    forward_into(X, W1, b1, W2, b2, Y, A, P, losses, predicted)
    return losses


# ---- the loss switch
#
# ``loss_gradient`` takes the input gradient of any of five per-row losses of the logits
# z = Z2 (bias included), each a quantity an attack maximises: the cross-entropy, the
# three margin losses of evaluation-grade attacks (Croce and Hein 2020, Carlini and Wagner
# 2017) and the logit difference whose boundary FAB linearises. A loss differs from another
# only in its gradient dL/dz; the back-propagation from there to the inputs is
# ``backpropagate_block``, the same for all.

LOSS_CE = 0
"""-log softmax(z)_y, the cross-entropy (``input_gradient`` with one-hot labels)."""
LOSS_DLR = 1
"""-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + DLR_OFFSET), the difference of logits ratio;
pi1, pi2, ... order the classes by descending logit (C >= 3)."""
LOSS_DLR_TARGETED = 2
"""-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + DLR_OFFSET), towards target t (C >= 4)."""
LOSS_CW = 3
"""The Carlini-Wagner margin min(max_{i != y} z_i - z_y, kappa); towards a target t,
min(z_t - max_{i != t} z_i, kappa) (C >= 2)."""
LOSS_LOGIT_DIFFERENCE = 4
"""z_t - z_y, the logit of the target t less that of the true class y, whose zero set is
the boundary FAB-T linearises (C >= 2); its gradient is e_t - e_y."""
DLR_OFFSET = 1e-12
"""Added to the DLR losses' denominators, as the reference implementation (AutoAttack) does."""


@njit(cache=True, error_model="numpy")
def largest_four(z):
    """Indices of the four largest entries of z (C,) in descending order, -1 past C.

    Of equal entries the first index comes first (the order of a stable sort), so the
    first one is ``np.argmax(z)``.
    """
    i1 = i2 = i3 = i4 = -1
    for k in range(z.shape[0]):
        v = z[k]
        if i1 < 0 or v > z[i1]:
            i1, i2, i3, i4 = k, i1, i2, i3
        elif i2 < 0 or v > z[i2]:
            i2, i3, i4 = k, i2, i3
        elif i3 < 0 or v > z[i3]:
            i3, i4 = k, i3
        elif i4 < 0 or v > z[i4]:
            i4 = k
    return i1, i2, i3, i4


@njit(cache=True, error_model="numpy")
def margin_loss_row(z, label, target, loss, kappa, dz):
    """One row's margin loss (``LOSS_DLR``, ``LOSS_DLR_TARGETED``, ``LOSS_CW`` or
    ``LOSS_LOGIT_DIFFERENCE``) and its gradient with respect to the logits.

    Parameters
    ----------
    z : (C,) float32 or float64, the logits, bias included
    label : int, the true class y
    target : int, the target class t; -1 for none (``LOSS_CW`` is then untargeted;
        ``LOSS_DLR_TARGETED`` and ``LOSS_LOGIT_DIFFERENCE`` need one)
    loss : int, the loss code
    kappa : float, the confidence at which ``LOSS_CW`` is clipped
    dz : (C,) z's dtype, output: dL/dz; it may be z itself. A maximum over classes is
        differentiated through its first index on ties; where ``LOSS_CW`` is clipped at
        kappa (margin >= kappa) the gradient is 0.

    Returns
    -------
    value : float64, the loss
    predicted : int, argmax of z (the first on ties)
    """
    i1, i2, i3, i4 = largest_four(z)
    if loss == LOSS_LOGIT_DIFFERENCE:
        difference = np.float64(z[target]) - np.float64(z[label])
        dz[:] = 0.0
        dz[target] += 1.0
        dz[label] -= 1.0
        return difference, i1
    if loss == LOSS_CW:
        up = i2 if i1 == label else i1  # untargeted: the best other class against y
        down = label
        if target >= 0:  # targeted: t against the best other class
            up = target
            down = i2 if i1 == target else i1
        margin = np.float64(z[up]) - np.float64(z[down])
        slope = 1.0 if margin < kappa else 0.0
        dz[:] = 0.0
        dz[up] += slope
        dz[down] -= slope
        return min(margin, kappa), i1
    # DLR: the gap between y and its rival, over the spread z_pi1 - (z_pi3 + z_low) / 2,
    # with z_low = z_pi3 untargeted (halves of one number add up to it exactly)
    rival = target if loss == LOSS_DLR_TARGETED else (i2 if i1 == label else i1)
    low = i4 if loss == LOSS_DLR_TARGETED else i3
    gap = np.float64(z[label]) - np.float64(z[rival])
    spread = np.float64(z[i1]) - 0.5 * (np.float64(z[i3]) + np.float64(z[low])) + DLR_OFFSET
    inverse = 1.0 / spread
    ratio = gap * inverse * inverse  # dL/dspread
    dz[:] = 0.0
    dz[label] -= inverse
    dz[rival] += inverse
    dz[i1] += ratio
    dz[i3] -= 0.5 * ratio
    dz[low] -= 0.5 * ratio
    return -gap * inverse, i1


@njit(cache=True, error_model="numpy")
def loss_gradient_block(X, W1, b1, W2, b2, labels, targets, loss, kappa, G, values, predicted):
    """``loss_gradient_into`` on a block of rows, serial (targets: the block's rows or 0)."""
    A, ZT, D1, top, rest = gradient_workspace(X.shape[0], W1, W2)
    logits_block_into(X, W1, b1, W2, A, ZT)
    if loss == LOSS_CE:
        for n in range(X.shape[0]):
            values[n] = ZT[labels[n], n] + b2[labels[n]]  # z_y, before the softmax
        cross_entropy_logit_gradient(ZT, b2, labels, predicted, top, rest)
        for n in range(X.shape[0]):
            # logsumexp(z) - z_y = (max - z_y) + log1p(rest): no cancellation near 0
            values[n] = (top[n] - values[n]) + math.log1p(rest[n])
    else:
        for k in range(ZT.shape[0]):
            for n in range(X.shape[0]):
                ZT[k, n] += b2[k]
        for n in range(X.shape[0]):
            target = targets[n] if targets.shape[0] != 0 else -1
            z = ZT[:, n]
            values[n], predicted[n] = margin_loss_row(z, labels[n], target, loss, kappa, z)
    backpropagate_block(A, ZT, W1, W2, D1, G)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def loss_gradient_into(X, W1, b1, W2, b2, labels, targets, loss, kappa, G, values, predicted):
    """The input gradient of a per-row loss of the logits, for every row.

    Parameters
    ----------
    X : (N, d) float32 or float64
    W1, b1, W2, b2 : the network, same dtype as X
    labels : (N,) int64, the true class of each row, in [0, C)
    targets : (N,) int64, the target class of each row, in [0, C), for ``LOSS_DLR_TARGETED``,
        ``LOSS_LOGIT_DIFFERENCE`` and a targeted ``LOSS_CW``; 0 rows otherwise
    loss : int, ``LOSS_CE``, ``LOSS_DLR`` (C >= 3), ``LOSS_DLR_TARGETED`` (C >= 4),
        ``LOSS_CW`` or ``LOSS_LOGIT_DIFFERENCE``: a quantity an attack maximises (see the
        constants)
    kappa : float, the confidence of ``LOSS_CW`` (unused by the others)
    G : (N, d) same dtype, output: d(loss)/dX per row
    values : (N,) same dtype, output: the loss of each row
    predicted : (N,) int64, output: argmax of the logits of each row (the first on ties)

    ``LOSS_CE`` gives bitwise the G and predictions of ``input_gradient_into`` with one-hot
    labels. Nothing is checked here: the classes must be in range and C large enough.
    """
    N = X.shape[0]
    blocks = n_blocks(N)
    if blocks == 1:
        loss_gradient_block(X, W1, b1, W2, b2, labels, targets, loss, kappa, G, values, predicted)
        return
    pinned = pin_blas(blocks)
    for block in prange(blocks):
        start, stop = block_rows(N, block)
        loss_gradient_block(
            X[start:stop],
            W1,
            b1,
            W2,
            b2,
            labels[start:stop],
            targets if targets.shape[0] == 0 else targets[start:stop],
            loss,
            kappa,
            G[start:stop],
            values[start:stop],
            predicted[start:stop],
        )
    unpin_blas(pinned)


@njit(cache=True, error_model="numpy")
def loss_gradient(X, W1, b1, W2, b2, labels, targets, loss, kappa):
    """The input gradient of a per-row loss of the logits; see ``loss_gradient_into``.

    Parameters
    ----------
    X : (N, d) float32 or float64
    W1 : (d, H), b1 : (H,), W2 : (H, C), b2 : (C,), same dtype as X
    labels : (N,) int64, the true classes
    targets : (N,) int64, the target classes, or 0 rows for none
    loss : int, ``LOSS_CE``, ``LOSS_DLR``, ``LOSS_DLR_TARGETED``, ``LOSS_CW`` or
        ``LOSS_LOGIT_DIFFERENCE``
    kappa : float, the confidence of ``LOSS_CW``

    Returns
    -------
    G : (N, d) same dtype, d(loss)/dX
    values : (N,) same dtype, the loss of each row
    predicted : (N,) int64, argmax of the logits of each row
    """
    N = X.shape[0]
    G = np.empty_like(X)
    advise_huge_pages(G)
    values = np.empty(N, dtype=X.dtype)
    predicted = np.empty(N, dtype=np.int64)
    loss_gradient_into(X, W1, b1, W2, b2, labels, targets, loss, kappa, G, values, predicted)
    return G, values, predicted


@njit(cache=True, error_model="numpy")
def logits_block(X, W1, b1, W2, b2, Z):
    """``logits_into`` on a block of rows, serial."""
    A = np.empty((X.shape[0], W1.shape[1]), dtype=X.dtype)
    ZT = np.empty((W2.shape[1], X.shape[0]), dtype=X.dtype)
    logits_block_into(X, W1, b1, W2, A, ZT)
    for n in range(X.shape[0]):
        for k in range(ZT.shape[0]):  # loops, not slice copies: they compile seconds faster
            Z[n, k] = ZT[k, n] + b2[k]


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def logits_into(X, W1, b1, W2, b2, Z):
    """The logits of every row.

    Parameters
    ----------
    X : (N, d) float32 or float64
    W1, b1, W2, b2 : the network, same dtype as X
    Z : (N, C) same dtype, output: A @ W2 + b2 with A = sigmoid(X @ W1 + b1), bitwise the
        logits that ``loss_gradient_into`` differentiates
    """
    N = X.shape[0]
    blocks = n_blocks(N)
    if blocks == 1:
        logits_block(X, W1, b1, W2, b2, Z)
        return
    pinned = pin_blas(blocks)
    for block in prange(blocks):
        start, stop = block_rows(N, block)
        logits_block(X[start:stop], W1, b1, W2, b2, Z[start:stop])
    unpin_blas(pinned)


@njit(cache=True, error_model="numpy")
def logits(X, W1, b1, W2, b2):
    """Logits Z (N, C) of X (N, d) in X's dtype: A @ W2 + b2; see ``logits_into``."""
    Z = np.empty((X.shape[0], W2.shape[1]), dtype=X.dtype)
    advise_huge_pages(Z)
    logits_into(X, W1, b1, W2, b2, Z)
    return Z


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
            ascending = np.sort(scratch)
            for i in range(d):  # descending; a loop compiles far faster than a slice copy
                scratch[i] = ascending[d - 1 - i]
            shrink = scratch[0]  # eps = 0: every perturbation goes
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
def iterate_start_block(X, X_start, eps, p, decay, x_min, x_max, X_adv, momentum):
    """The first iterate of a block of rows, serial (see ``iterate_start_into``)."""
    scratch = np.empty(X.shape[1], dtype=X.dtype)
    for n in range(X.shape[0]):
        X_adv[n] = X_start[n]
        project_row(X_adv[n], X[n], eps[n], p, x_min, x_max, scratch)
        if decay > 0.0:
            momentum[n] = 0.0


@njit(cache=True, error_model="numpy")
def iterate_steps_block(
    X, W1, b1, W2, b2, Y, eps, alpha, steps, p, decay, x_min, x_max, X_adv, momentum, q=1
):
    """``steps`` more iterative FGM steps on a block of rows, serial (see
    ``iterate_steps_into``); buffers are reused across the steps."""
    B = X.shape[0]
    work = gradient_workspace(B, W1, W2)
    G = np.empty_like(X)
    predicted = np.empty(B, dtype=np.int64)
    scratch = np.empty(X.shape[1], dtype=X.dtype)
    for _ in range(steps):
        gradient_block(X_adv, W1, b1, W2, b2, Y, G, predicted, work)
        for n in range(B):
            direction = G[n]
            if decay > 0.0:
                add_momentum_row(momentum[n], G[n], decay)
                direction = momentum[n]
            step_row(X_adv[n], direction, alpha[n], p, q, -np.inf, np.inf, X_adv[n], scratch)
            project_row(X_adv[n], X[n], eps[n], p, x_min, x_max, scratch)


@njit(cache=True, error_model="numpy")
def iterate_block(
    X, W1, b1, W2, b2, Y, X_start, eps, alpha, steps, p, decay, x_min, x_max, X_adv, q=1
):
    """Iterative FGM on a block of rows, serial (see ``iterate_into``)."""
    momentum = np.empty((X.shape[0] if decay > 0.0 else 0, X.shape[1]), dtype=X.dtype)
    iterate_start_block(X, X_start, eps, p, decay, x_min, x_max, X_adv, momentum)
    iterate_steps_block(
        X, W1, b1, W2, b2, Y, eps, alpha, steps, p, decay, x_min, x_max, X_adv, momentum, q
    )


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def iterate_start_into(X, X_start, eps, p, decay, x_min, x_max, X_adv, momentum):
    """The first iterate of ``iterate_steps_into``: X_start projected as ``project_row`` does
    into the eps-ball of norm p around X and into [x_min, x_max], and a zero momentum.

    Parameters
    ----------
    X : (N, d) float32 or float64, the clean rows (centres of the balls)
    X_start : (N, d) same dtype, X for BIM, a random point of the ball for PGD
    eps : (N,) float64, radius per row
    p : float, np.inf, 2.0 or 1.0
    decay : float, momentum decay; 0 for plain BIM/PGD
    x_min, x_max : float, the clip range
    X_adv : (N, d) same dtype, output: the first iterate; may be X_start itself
    momentum : (N, d) same dtype, output: zeros when decay > 0; unused (0 rows allowed)
        otherwise
    """
    N = X.shape[0]
    for block in prange(n_blocks(N)):
        start, stop = block_rows(N, block)
        iterate_start_block(
            X[start:stop],
            X_start[start:stop],
            eps[start:stop],
            p,
            decay,
            x_min,
            x_max,
            X_adv[start:stop],
            momentum[start:stop],  # 0 rows when unused
        )


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def iterate_steps_into(
    X, W1, b1, W2, b2, Y, eps, alpha, steps, p, decay, x_min, x_max, X_adv, momentum, q=1
):
    """``steps`` more steps of the iterative attack from the iterate X_adv and momentum.

    ``iterate_start_into`` then ``iterate_steps_into`` with s_1, s_2, ... steps gives
    bitwise what ``iterate_into`` gives with s_1 + s_2 + ... steps, so that a long attack
    can run in slices with control back to the caller between them.

    Parameters
    ----------
    X, W1, b1, W2, b2, Y, eps, alpha, p, decay, x_min, x_max : as in ``iterate_into``
    steps : int, the steps of this slice
    X_adv : (N, d) same dtype as X, the iterate; updated
    momentum : (N, d) same dtype, the MI-FGSM momentum when decay > 0; updated. Unused
        (0 rows allowed) otherwise
    q : int, the coordinates an L1 step moves, as in ``iterate_into``
    """
    N = X.shape[0]
    blocks = n_blocks(N)
    pinned = pin_blas(blocks)
    for block in prange(blocks):
        start, stop = block_rows(N, block)
        iterate_steps_block(
            X[start:stop],
            W1,
            b1,
            W2,
            b2,
            Y[start:stop],
            eps[start:stop],
            alpha[start:stop],
            steps,
            p,
            decay,
            x_min,
            x_max,
            X_adv[start:stop],
            momentum[start:stop],  # 0 rows when unused
            q,
        )
    unpin_blas(pinned)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def iterate_into(
    X, W1, b1, W2, b2, Y, X_start, eps, alpha, steps, p, decay, x_min, x_max, X_adv, q=1
):
    """Iterative fast-gradient attack (BIM, PGD, MI-FGSM) on every row, in one jitted loop.

    From X_start projected into the ball, ``steps`` times: G = dJ/dX at the iterate (with
    ``decay > 0``, the direction is the MI-FGSM momentum of G / ||G||_1 instead), a step
    of length alpha in norm p as in ``step_row``, then ``project_row`` back into the
    eps-ball around X and into [x_min, x_max]. ``iterate_start_into`` and
    ``iterate_steps_into`` run the same in slices of steps.

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
    q : int, the coordinates an L1 step moves (``step_row``; default 1, the steepest;
        SLIDE takes the top 1 %, ``advgrad.attacks.Attack.l1_step_coordinates``)
    """
    N = X.shape[0]
    blocks = n_blocks(N)
    pinned = pin_blas(blocks)
    for block in prange(blocks):
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
            q,
        )
    unpin_blas(pinned)


@njit(cache=True, error_model="numpy")
def logits_row(x, W1, b1, W2, b2, a, z):
    """Logits z (C,) of one row x (d,); ``a`` (H,) receives its hidden activations."""
    np.dot(x, W1, a)
    for j in range(a.shape[0]):
        a[j] = sigmoid(a[j] + b1[j])
    np.dot(a, W2, z)
    for k in range(z.shape[0]):
        z[k] += b2[k]


@njit(cache=True, error_model="numpy")
def logits_and_jacobian_row(x, W1, b1, W2, b2, a, M, z, J):
    """Logits z (C,) of one row x (d,) and all their gradients at once, J (d, C) = dz/dx.

    J = W1 diag(a (1 - a)) W2 with a = sigmoid(x W1 + b1): one (d, H) x (H, C) product, not
    C backward passes. ``a`` (H,) and ``M`` (H, C) are scratch.
    """
    logits_row(x, W1, b1, W2, b2, a, z)
    for j in range(M.shape[0]):
        slope = a[j] * (1.0 - a[j])
        for k in range(M.shape[1]):
            M[j, k] = slope * W2[j, k]
    np.dot(W1, M, J)


@njit(cache=True, error_model="numpy")
def deepfool_start_block(X, X_adv, total, original, active, iterations):
    """DeepFool's state before its first iteration, for a block of rows, serial (see
    ``deepfool_start_into``)."""
    for n in range(X.shape[0]):
        X_adv[n] = X[n]
        total[n] = 0.0
        original[n] = -1
        active[n] = True
        iterations[n] = 0


@njit(cache=True, error_model="numpy")
def deepfool_steps_block(
    X, W1, b1, W2, b2, p, overshoot, steps, x_min, x_max, X_adv, total, original, active, iterations
):
    """At most ``steps`` more DeepFool iterations of a block of rows, serial (see
    ``deepfool_steps_into``)."""
    d, H = W1.shape
    C = W2.shape[1]
    a = np.empty(H, dtype=X.dtype)
    M = np.empty((H, C), dtype=X.dtype)
    z = np.empty(C, dtype=X.dtype)
    J = np.empty((d, C), dtype=X.dtype)
    for n in range(X.shape[0]):
        if not active[n]:
            continue
        x = X_adv[n]
        logits_and_jacobian_row(x, W1, b1, W2, b2, a, M, z, J)
        if original[n] < 0:
            original[n] = np.argmax(z)
        label = original[n]
        for taken in range(steps):
            if np.argmax(z) != label:
                break
            best, best_ratio, best_norm = -1, np.inf, 0.0
            for k in range(C):
                if k == label:
                    continue
                norm = 0.0
                for i in range(d):
                    w = J[i, k] - J[i, label]
                    norm += w * w if p == 2.0 else abs(w)
                norm = math.sqrt(norm) if p == 2.0 else norm
                ratio = abs(z[k] - z[label]) / norm if norm > 0.0 else np.inf
                if ratio < best_ratio:
                    best, best_ratio, best_norm = k, ratio, norm
            if best < 0:
                active[n] = False  # every logit difference is flat: no direction to move in
                break
            # the linearised boundary is (|f| + 1e-4) / ||w||_q away, q the dual norm of p
            length = (abs(z[best] - z[label]) + 1e-4) / best_norm
            for i in range(d):
                w = J[i, best] - J[i, label]
                total[n, i] += length * w / best_norm if p == 2.0 else length * np.sign(w)
                x[i] = clip(X[n, i] + (1.0 + overshoot) * total[n, i], x_min, x_max)
            iterations[n] += 1
            if taken + 1 < steps:
                logits_and_jacobian_row(x, W1, b1, W2, b2, a, M, z, J)
            else:  # the slice is over: the next one computes the Jacobian
                logits_row(x, W1, b1, W2, b2, a, z)
        if np.argmax(z) != label:
            active[n] = False  # the prediction changed: done


@njit(cache=True, error_model="numpy")
def deepfool_block(X, W1, b1, W2, b2, p, overshoot, max_iter, x_min, x_max, X_adv, iterations):
    """DeepFool on a block of rows, serial (see ``deepfool_into``)."""
    B, d = X.shape
    total = np.empty((B, d), dtype=np.float64)
    original = np.empty(B, dtype=np.int64)
    active = np.empty(B, dtype=np.bool_)
    deepfool_start_block(X, X_adv, total, original, active, iterations)
    deepfool_steps_block(
        X,
        W1,
        b1,
        W2,
        b2,
        p,
        overshoot,
        max_iter,
        x_min,
        x_max,
        X_adv,
        total,
        original,
        active,
        iterations,
    )


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def deepfool_start_into(X, X_adv, total, original, active, iterations):
    """DeepFool's state before its first iteration (for ``deepfool_steps_into``).

    Parameters
    ----------
    X : (N, d) float32 or float64
    X_adv : (N, d) same dtype, output: X
    total : (N, d) float64, output: zeros, the accumulated perturbation
    original : (N,) int64, output: -1, the clean prediction not yet known
    active : (N,) bool, output: True, every row may move
    iterations : (N,) int64, output: zeros
    """
    N = X.shape[0]
    for block in prange(n_blocks(N)):
        start, stop = block_rows(N, block)
        deepfool_start_block(
            X[start:stop],
            X_adv[start:stop],
            total[start:stop],
            original[start:stop],
            active[start:stop],
            iterations[start:stop],
        )


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def deepfool_steps_into(
    X, W1, b1, W2, b2, p, overshoot, steps, x_min, x_max, X_adv, total, original, active, iterations
):
    """At most ``steps`` more DeepFool iterations of every row still active.

    ``deepfool_start_into`` then ``deepfool_steps_into`` with s_1, s_2, ... steps gives
    bitwise the X_adv and iterations of ``deepfool_into`` with max_iter = s_1 + s_2 + ...,
    so that a long attack can run in slices with control back to the caller between them
    (stop once no row is active). A slice ends with each row's logits only; the next one
    starts with its Jacobian, so slicing adds no Jacobian to the work.

    Parameters
    ----------
    X, W1, b1, W2, b2, p, overshoot, x_min, x_max : as in ``deepfool_into``
    steps : int, the iterations of this slice
    X_adv : (N, d) same dtype as X, the iterate; updated
    total : (N, d) float64, the accumulated perturbation; updated
    original : (N,) int64, the clean prediction (-1 before the first slice); updated
    active : (N,) bool, whether the row may move further: its prediction is still the
        original class and it found a boundary to move to; updated
    iterations : (N,) int64, iterations used per row; updated
    """
    N = X.shape[0]
    blocks = n_blocks(N)
    pinned = pin_blas(blocks)
    for block in prange(blocks):
        start, stop = block_rows(N, block)
        deepfool_steps_block(
            X[start:stop],
            W1,
            b1,
            W2,
            b2,
            p,
            overshoot,
            steps,
            x_min,
            x_max,
            X_adv[start:stop],
            total[start:stop],
            original[start:stop],
            active[start:stop],
            iterations[start:stop],
        )
    unpin_blas(pinned)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def deepfool_into(X, W1, b1, W2, b2, p, overshoot, max_iter, x_min, x_max, X_adv, iterations):
    """DeepFool (Moosavi-Dezfooli et al. 2016), multi-class, for every row.

    Each iteration linearises all C logits at the iterate (``logits_and_jacobian_row``),
    moves to the nearest linearised class boundary in norm p (2.0, or np.inf with the
    L1 dual norm and a sign step), and stops when the predicted class changes or after
    ``max_iter`` iterations. The accumulated perturbation is scaled by 1 + overshoot.
    ``deepfool_start_into`` and ``deepfool_steps_into`` run the same in slices of
    iterations.

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
    blocks = n_blocks(N)
    pinned = pin_blas(blocks)
    for block in prange(blocks):
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
    unpin_blas(pinned)


# ---- training


@njit(cache=True, error_model="numpy")
def parameter_gradient_block(X, W1, b1, W2, b2, Y, weight, G, predicted, work, dW1, db1, dW2, db2):
    """Add ``weight`` times the parameter gradients of the summed loss of a block, serial.

    Runs ``gradient_block`` (so G (B, d) = dJ/dX and predicted (B,) are written too), then
    from its workspace, with D2 = P - Y and D1 = dJ/dZ1:
    dW1 += weight X^T D1, db1 += weight sum_n D1, dW2 += weight A^T D2, db2 += weight sum_n D2.
    """
    gradient_block(X, W1, b1, W2, b2, Y, G, predicted, work)
    A, D2T, D1, _, _ = work
    product = np.dot(X.T, D1)
    for i in range(dW1.shape[0]):
        for j in range(dW1.shape[1]):
            dW1[i, j] += weight * product[i, j]
    product = np.dot(A.T, D2T.T)
    for j in range(dW2.shape[0]):
        for k in range(dW2.shape[1]):
            dW2[j, k] += weight * product[j, k]
    for n in range(X.shape[0]):
        for j in range(db1.shape[0]):
            db1[j] += weight * D1[n, j]
    for k in range(db2.shape[0]):
        for n in range(X.shape[0]):
            db2[k] += weight * D2T[k, n]


@njit(cache=True, error_model="numpy")
def training_gradient_block(
    X, W1, b1, W2, b2, Y, clean_weight, adv_weight, eps, x_min, x_max, dW1, db1, dW2, db2
):
    """``parameter_gradient_into`` on one block of rows, serial; adds into dW1 .. db2."""
    work = gradient_workspace(X.shape[0], W1, W2)
    G = np.empty_like(X)
    predicted = np.empty(X.shape[0], dtype=np.int64)
    parameter_gradient_block(
        X, W1, b1, W2, b2, Y, clean_weight, G, predicted, work, dW1, db1, dW2, db2
    )
    if adv_weight == 0.0:
        return
    X_adv = np.empty_like(X)
    for n in range(X.shape[0]):  # fgm_block's FGSM step, on the gradient just computed
        step_row(X[n], G[n], eps, np.inf, 1, x_min, x_max, X_adv[n], X[n, :0])
    parameter_gradient_block(
        X_adv, W1, b1, W2, b2, Y, adv_weight, G, predicted, work, dW1, db1, dW2, db2
    )


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def parameter_gradient_into(
    X, W1, b1, W2, b2, Y, clean_weight, adv_weight, eps, x_min, x_max, dW1, db1, dW2, db2
):
    """Gradients of the (adversarial) training loss with respect to W1, b1, W2, b2, added in.

    The loss is ``clean_weight * sum_n J(X_n, Y_n) + adv_weight * sum_n J(X'_n, Y_n)`` with
    X' = clip(X + eps * sign(dJ/dX), x_min, x_max), the FGSM step of ``fgsm_step`` (Goodfellow
    et al. 2015, held fixed: no gradient flows through the sign). ``adv_weight = 0`` skips
    the adversarial pass. Per sample, with D2 = P - Y and D1 = (D2 W2^T) * A * (1 - A):
    dJ/dW1 = x^T D1, dJ/db1 = D1, dJ/dW2 = A^T D2, dJ/db2 = D2.

    Parameters
    ----------
    X : (N, d) float32 or float64
    W1, b1, W2, b2 : the network, same dtype as X
    Y : (N, C) same dtype, one-hot or soft labels
    clean_weight, adv_weight : float, weights of the clean and the adversarial loss
        (1 / N and 0 for the mean loss; alpha / N and (1 - alpha) / N for the paper's mix)
    eps : float, L-inf radius of the adversarial rows
    x_min, x_max : float, their clip range
    dW1 (d, H), db1 (H,), dW2 (H, C), db2 (C,) : same dtype, the gradients are *added* to them

    Each row block accumulates its own partial sums, which are then added in block order:
    the result does not depend on the thread count.
    """
    N = X.shape[0]
    blocks = n_blocks(N)
    if blocks == 1:
        training_gradient_block(
            X, W1, b1, W2, b2, Y, clean_weight, adv_weight, eps, x_min, x_max, dW1, db1, dW2, db2
        )
        return
    d, H = W1.shape
    C = W2.shape[1]
    partial_W1 = np.zeros((blocks, d, H), dtype=dW1.dtype)
    partial_b1 = np.zeros((blocks, H), dtype=db1.dtype)
    partial_W2 = np.zeros((blocks, H, C), dtype=dW2.dtype)
    partial_b2 = np.zeros((blocks, C), dtype=db2.dtype)
    pinned = pin_blas(blocks)
    for block in prange(blocks):
        start, stop = block_rows(N, block)
        training_gradient_block(
            X[start:stop],
            W1,
            b1,
            W2,
            b2,
            Y[start:stop],
            clean_weight,
            adv_weight,
            eps,
            x_min,
            x_max,
            partial_W1[block],
            partial_b1[block],
            partial_W2[block],
            partial_b2[block],
        )
    unpin_blas(pinned)
    for block in range(blocks):
        dW1 += partial_W1[block]
        db1 += partial_b1[block]
        dW2 += partial_W2[block]
        db2 += partial_b2[block]


@njit(cache=True, error_model="numpy")
def adam_update(theta, grad, m, v, step, lr, beta1, beta2, epsilon, weight_decay, n_decayed):
    """One Adam step (Kingma and Ba 2015), in place, on flat parameters.

    Parameters
    ----------
    theta : (P,) float32 or float64, the parameters; updated
    grad : (P,) same dtype, the gradient of the loss; ``weight_decay * theta`` is added to
        its first ``n_decayed`` entries (an L2 penalty weight_decay / 2 ||theta[:n]||^2)
    m, v : (P,) same dtype, first and second moment estimates; updated
    step : int, the number of this step, from 1 (for the bias corrections)
    lr, beta1, beta2, epsilon : float, Adam's hyper-parameters
    weight_decay : float
    n_decayed : int
    """
    correction1 = 1.0 - beta1**step
    correction2 = 1.0 - beta2**step
    for i in range(theta.shape[0]):
        g = grad[i] + (weight_decay * theta[i] if i < n_decayed else 0.0)
        m[i] = beta1 * m[i] + (1.0 - beta1) * g
        v[i] = beta2 * v[i] + (1.0 - beta2) * g * g
        theta[i] -= lr * (m[i] / correction1) / (math.sqrt(v[i] / correction2) + epsilon)


@njit(cache=True, error_model="numpy")
def momentum_update(theta, grad, velocity, lr, momentum, weight_decay, n_decayed):
    """One step of SGD with momentum, in place: velocity = momentum velocity + g, theta -= lr
    velocity, with g = grad + weight_decay theta on the first ``n_decayed`` entries.

    ``theta``, ``grad``, ``velocity`` are (P,) arrays of one float dtype; see ``adam_update``.
    """
    for i in range(theta.shape[0]):
        g = grad[i] + (weight_decay * theta[i] if i < n_decayed else 0.0)
        velocity[i] = momentum * velocity[i] + g
        theta[i] -= lr * velocity[i]


# ---- certified bounds
#
# Lower bounds on the class margins z_y - z_k (logits Z2 = A W2 + b2) of a row x over a
# region around it, for certification (``advgrad.certify``). The region holds x and every
# point an attack can reach, clip(x + delta, x_min, x_max) with ||delta|| <= eps: for L-inf
# the box [clip(x - eps), clip(x + eps)]; for L2 and x inside [x_min, x_max], the ball
# intersected with that box (for x outside it, the box, widened to hold x). Interval bounds
# (IBP) are exact per hidden unit; CROWN-style bounds relax each sigmoid between two lines
# valid over its pre-activation interval and minimise the resulting linear function of x
# exactly over the region. Everything runs in float64; each bound is loosened by
# BOUND_ROUNDING times the magnitude of the terms it sums, which covers float64 rounding
# (error below n * 2**-53 of that magnitude for sums of n < 10**5 terms).

BOUND_ROUNDING = 2.0**-32


@njit(cache=True, error_model="numpy")
def sigmoid_slope(z):
    """sigmoid'(z) = sigmoid(z) (1 - sigmoid(z)), accurate for any finite z."""
    t = exp(-abs(z))
    r = 1.0 / (1.0 + t)
    return t * r * r


@njit(cache=True, error_model="numpy")
def sigmoid_upper_line(l, u, steps):
    """Slope a and intercept b with a z + b >= sigmoid(z) for every z in [l, u].

    sigmoid is convex on z <= 0 and concave on z >= 0. u <= 0: the chord. l >= 0: the
    tangent at the midpoint. l < 0 < u: the tangent at t in [0, u] is above sigmoid on
    [0, u] (concavity) and, its difference with sigmoid being concave on [l, 0], on [l, 0]
    exactly when it is above sigmoid(l); that holds for t >= t* and the tangent through
    (l, sigmoid(l)) touches at t*, found by ``steps`` bisection steps that keep a t known
    to pass. If even t = u fails, the chord is valid instead (its slope is then below
    sigmoid' on [0, u]). The intercept is raised by BOUND_ROUNDING (1 + |l| + |u|).
    """
    slack = BOUND_ROUNDING * (1.0 + abs(l) + abs(u))
    s_l = sigmoid(l)
    s_u = sigmoid(u)
    if not u > l:
        return 0.0, s_u + slack  # a point: sigmoid is increasing
    if l >= 0.0:
        t = 0.5 * (l + u)
        a = sigmoid_slope(t)
        return a, sigmoid(t) - a * t + slack
    if u > 0.0:
        a = sigmoid_slope(u)
        if s_u + a * (l - u) >= s_l:
            low = 0.0
            high = u
            for _ in range(steps):
                t = 0.5 * (low + high)
                a = sigmoid_slope(t)
                if sigmoid(t) + a * (l - t) >= s_l:
                    high = t
                else:
                    low = t
            a = sigmoid_slope(high)
            return a, sigmoid(high) - a * high + slack
    a = (s_u - s_l) / (u - l)  # the chord
    return a, s_u - a * u + slack


@njit(cache=True, error_model="numpy")
def sigmoid_lower_line(l, u, steps):
    """Slope a and intercept b with a z + b <= sigmoid(z) for every z in [l, u].

    By symmetry, sigmoid(z) = 1 - sigmoid(-z): the upper line of [-u, -l], reflected.
    """
    a, b = sigmoid_upper_line(-u, -l, steps)
    return a, 1.0 - b


@njit(cache=True, error_model="numpy")
def bound_constants(W1):
    """Per-network constants of ``margin_bound_block``.

    Returns (|W1| (d, H), column L1 norms (H,), column L2 norms (H,)).
    """
    d, H = W1.shape
    W1_abs = np.abs(W1)
    col1 = np.zeros(H)
    col2 = np.zeros(H)
    for i in range(d):
        for j in range(H):
            col1[j] += W1_abs[i, j]
            col2[j] += W1[i, j] * W1[i, j]
    for j in range(H):
        col2[j] = math.sqrt(col2[j])
    return W1_abs, col1, col2


@njit(cache=True, error_model="numpy")
def bound_workspace(n_rows, W1, W2):
    """Scratch arrays of ``margin_bound_block`` for blocks of ``n_rows`` rows (float64)."""
    d, H = W1.shape
    C = W2.shape[1]
    return (
        np.empty((n_rows, d)),  # centre of the input box
        np.empty((n_rows, d)),  # half-widths of the input box
        np.empty((n_rows, H)),  # L2: pre-activations of the rows
        np.empty((n_rows, H)),  # centre pre-activations, then sigmoid of the lower bounds
        np.empty((n_rows, H)),  # pre-activation half-widths, then sigmoid of the upper ones
        np.empty((n_rows, H)),  # lower pre-activation bounds l
        np.empty((n_rows, H)),  # upper pre-activation bounds u
        np.empty((n_rows * C, H)),  # CROWN: coefficients of the pre-activations, per class
        np.empty((n_rows * C, d)),  # CROWN: coefficients of the input, per class
        np.empty(n_rows * C),  # constant terms, per row and class
        np.empty(n_rows * C),  # magnitude of the terms (rounding allowance)
        np.empty(n_rows * C),  # interval bounds, per row and class
        np.empty(n_rows),  # 1.0 when the row lies inside the clip box
        np.empty((n_rows, H)),  # CROWN: slopes of the lower lines
        np.empty((n_rows, H)),  # CROWN: intercepts of the lower lines
        np.empty((n_rows, H)),  # CROWN: slopes of the upper lines
        np.empty((n_rows, H)),  # CROWN: intercepts of the upper lines
    )


@njit(cache=True, error_model="numpy")
def margin_bound_block(
    X, labels, eps, p, x_min, x_max, W1, b1, W2, b2, constants, crown, steps, work, worst
):
    """Lower bound of min over k != y of z_y - z_k over each row's region, serial.

    Parameters
    ----------
    X : (B, d) float64, labels : (B,) int64, eps : (B,) float64 radius per row
    p : float, np.inf or 2.0
    x_min, x_max : float, the clip box (may be infinite)
    W1, b1, W2, b2 : the network in float64
    constants : ``bound_constants(W1)``
    crown : bool, also use the CROWN bound (the larger of the two lower bounds is kept)
    steps : int, bisection steps of the sigmoid tangent lines
    work : ``bound_workspace(B, W1, W2)``
    worst : (B,) float64, output; > 0 certifies the row at its eps
    """
    W1_abs, col1, col2 = constants
    Cen, Rad, Z0, Z, ZR, ZL, ZU, LamT, GT, const, mag, ibp, inside, AL, BL, AU, BU = work
    B, d = X.shape
    H = W1.shape[1]
    C = W2.shape[1]
    for n in range(B):
        e = eps[n]
        inside[n] = 1.0
        for i in range(d):
            x = X[n, i]
            if not (x >= x_min and x <= x_max):
                inside[n] = 0.0
            lo = min(x, clip(x - e, x_min, x_max))
            hi = max(x, clip(x + e, x_min, x_max))
            Cen[n, i] = 0.5 * (lo + hi)
            Rad[n, i] = 0.5 * (hi - lo) + BOUND_ROUNDING * (abs(lo) + abs(hi))
    np.dot(Cen, W1, Z)
    np.dot(Rad, W1_abs, ZR)
    if p != np.inf:
        np.dot(X, W1, Z0)
    for n in range(B):
        scale = 0.0
        for i in range(d):
            scale = max(scale, abs(Cen[n, i]) + Rad[n, i])
        for j in range(H):
            r = ZR[n, j]
            z = Z[n, j] + b1[j]
            slack = BOUND_ROUNDING * (scale * col1[j] + abs(b1[j]) + r)
            lo = z - r - slack
            hi = z + r + slack
            if p != np.inf and inside[n] > 0.0:  # the ball too
                r = eps[n] * col2[j]
                z = Z0[n, j] + b1[j]
                slack = BOUND_ROUNDING * (scale * col1[j] + abs(b1[j]) + r)
                lo = max(lo, z - r - slack)
                hi = min(hi, z + r + slack)
            ZL[n, j] = lo
            ZU[n, j] = hi
            Z[n, j] = sigmoid(lo)
            ZR[n, j] = sigmoid(hi)
    # interval bounds: each activation anywhere in [sigmoid(l), sigmoid(u)]
    for n in range(B):
        y = labels[n]
        for k in range(C):
            bias = b2[y] - b2[k]
            total = bias
            size = abs(bias)
            for j in range(H):
                c = W2[j, y] - W2[j, k]
                total += min(c * Z[n, j], c * ZR[n, j])
                size += abs(c)
            ibp[n * C + k] = total - BOUND_ROUNDING * size
    if crown:
        # c_j sigmoid(z_j) >= c_j (a_j z_j + b_j) with the lower line where c_j >= 0 and
        # the upper one where c_j < 0; then z = x W1 + b1 gives a bound linear in x
        for n in range(B):
            for j in range(H):
                a, b = sigmoid_lower_line(ZL[n, j], ZU[n, j], steps)
                AL[n, j] = a
                BL[n, j] = b
                a, b = sigmoid_upper_line(ZL[n, j], ZU[n, j], steps)
                AU[n, j] = a
                BU[n, j] = b
        for n in range(B):
            y = labels[n]
            scale = 0.0
            for i in range(d):
                scale = max(scale, abs(Cen[n, i]) + Rad[n, i] + eps[n])
            for k in range(C):
                row = n * C + k
                bias = b2[y] - b2[k]
                total = bias
                size = abs(bias)
                for j in range(H):
                    c = W2[j, y] - W2[j, k]
                    a = AL[n, j] if c >= 0.0 else AU[n, j]
                    b = BL[n, j] if c >= 0.0 else BU[n, j]
                    lam = c * a
                    LamT[row, j] = lam
                    total += c * b + lam * b1[j]
                    size += abs(c * b) + abs(lam * b1[j]) + scale * col1[j] * abs(lam)
                const[row] = total
                mag[row] = size
        np.dot(LamT, W1.T, GT)
    for n in range(B):
        y = labels[n]
        lowest = np.inf
        for k in range(C):
            if k == y:
                continue
            row = n * C + k
            bound = ibp[row]
            if crown:
                value = 0.0
                size = mag[row]
                for i in range(d):
                    g = GT[row, i]
                    value += g * Cen[n, i] - abs(g) * Rad[n, i]
                    size += abs(g) * (abs(Cen[n, i]) + Rad[n, i])
                if p != np.inf and inside[n] > 0.0:  # the ball: x g - eps ||g||_2
                    ball_value = 0.0
                    square = 0.0
                    for i in range(d):
                        g = GT[row, i]
                        ball_value += g * X[n, i]
                        square += g * g
                    length = math.sqrt(square)
                    value = max(value, ball_value - eps[n] * length)
                    size += eps[n] * length
                bound = max(bound, value + const[row] - BOUND_ROUNDING * size)
            lowest = min(lowest, bound)
        worst[n] = lowest


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def margin_bounds_into(X, labels, eps, p, x_min, x_max, W1, b1, W2, b2, crown, steps, worst):
    """Certified lower bound of the worst class margin of every row over its region.

    Parameters
    ----------
    X : (N, d) float64, the rows (centres of the regions)
    labels : (N,) int64, the class each row must keep
    eps : (N,) float64, the radius of each row's ball
    p : float, np.inf or 2.0
    x_min, x_max : float, the clip range (infinite values: none); the region is every
        clip(x + delta) with ||delta||_p <= eps, and x itself
    W1, b1, W2, b2 : the network in float64
    crown : bool, CROWN-style linear bounds (kept where larger than the interval bounds)
    steps : int, bisection steps of the sigmoid tangent lines (e.g. 20)
    worst : (N,) float64, output: lower bound of min over k != y of z_y - z_k over the
        region; > 0 proves that every point of the region is classified as labels[n]
    """
    N = X.shape[0]
    constants = bound_constants(W1)
    blocks = n_blocks(N)
    pinned = pin_blas(blocks)
    for block in prange(blocks):
        start, stop = block_rows(N, block)
        margin_bound_block(
            X[start:stop],
            labels[start:stop],
            eps[start:stop],
            p,
            x_min,
            x_max,
            W1,
            b1,
            W2,
            b2,
            constants,
            crown,
            steps,
            bound_workspace(stop - start, W1, W2),
            worst[start:stop],
        )
    unpin_blas(pinned)


@njit(cache=True, error_model="numpy")
def certified_radius_block(
    X,
    labels,
    eps_grid,
    p,
    x_min,
    x_max,
    W1,
    b1,
    W2,
    b2,
    constants,
    crown,
    steps,
    tolerance,
    radius,
    certified,
):
    """Certified radii of a block of rows, serial (see ``certified_radius_into``)."""
    B = X.shape[0]
    E = eps_grid.shape[0]
    work = bound_workspace(B, W1, W2)
    eps = np.zeros(B)
    worst = np.empty(B)
    passed = np.empty((B, E), dtype=np.bool_)
    low = np.zeros(B)
    high = np.full(B, np.inf)
    margin_bound_block(
        X, labels, eps, p, x_min, x_max, W1, b1, W2, b2, constants, crown, steps, work, worst
    )
    clean = worst > 0.0
    for g in range(E):
        eps[:] = eps_grid[g]
        margin_bound_block(
            X, labels, eps, p, x_min, x_max, W1, b1, W2, b2, constants, crown, steps, work, worst
        )
        for n in range(B):
            passed[n, g] = clean[n] and worst[n] > 0.0
            if passed[n, g]:
                low[n] = max(low[n], eps_grid[g])
    for n in range(B):
        for g in range(E):
            if eps_grid[g] > low[n] and not passed[n, g]:
                high[n] = min(high[n], eps_grid[g])
        if not clean[n] or high[n] == np.inf:
            high[n] = low[n]  # not certified even at 0, or certified on the whole grid
    for _ in range(200):
        active = False
        for n in range(B):
            open_interval = high[n] - low[n] > tolerance
            eps[n] = 0.5 * (low[n] + high[n]) if open_interval else low[n]
            active = active or open_interval
        if not active:
            break
        margin_bound_block(
            X, labels, eps, p, x_min, x_max, W1, b1, W2, b2, constants, crown, steps, work, worst
        )
        for n in range(B):
            if high[n] - low[n] > tolerance:
                if worst[n] > 0.0:
                    low[n] = eps[n]
                else:
                    high[n] = eps[n]
    for n in range(B):
        radius[n] = low[n]
        for g in range(E):
            certified[n, g] = clean[n] and low[n] >= eps_grid[g]


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def certified_radius_into(
    X, labels, eps_grid, p, x_min, x_max, W1, b1, W2, b2, crown, steps, tolerance, radius, certified
):
    """Certified radius of every row: bisection on eps over ``margin_bound_block``.

    The bound is evaluated at eps = 0 (a row whose bound fails there gets radius 0 and no
    certificate), at every eps of ``eps_grid``, then bisected between the largest
    certified grid value and the smallest larger failing one until they are within
    ``tolerance``. The radius is the largest eps whose bound was verified (the region of a
    larger eps contains the smaller ones, so every eps up to it is certified too).

    Parameters
    ----------
    X, labels, p, x_min, x_max, W1, b1, W2, b2, crown, steps : as in ``margin_bounds_into``
    eps_grid : (E,) float64, ascending, >= 0; its largest value bounds the search
    tolerance : float > 0
    radius : (N,) float64, output
    certified : (N, E) bool, output: the row is certified at eps_grid[g] (radius >= it
        and the clean bound holds)
    """
    N = X.shape[0]
    constants = bound_constants(W1)
    blocks = n_blocks(N)
    pinned = pin_blas(blocks)
    for block in prange(blocks):
        start, stop = block_rows(N, block)
        certified_radius_block(
            X[start:stop],
            labels[start:stop],
            eps_grid,
            p,
            x_min,
            x_max,
            W1,
            b1,
            W2,
            b2,
            constants,
            crown,
            steps,
            tolerance,
            radius[start:stop],
            certified[start:stop],
        )
    unpin_blas(pinned)
