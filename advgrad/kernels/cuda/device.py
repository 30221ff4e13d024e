"""CUDA device functions: scalar and block helpers that the kernels call.

``advgrad.kernels.cuda.products`` and ``.steps`` build the kernels from these; like the
scalar helpers of ``advgrad.kernels.cpu``, they can be called from a user's own CUDA kernels.
The ``block_*`` helpers and the reductions must be called by every thread of a block.
"""

import math

from advgrad.kernels import cpu
from advgrad.kernels.cpu import DLR_OFFSET, LOSS_CW, LOSS_DLR_TARGETED, LOSS_LOGIT_DIFFERENCE
from advgrad.kernels.cuda.internals import cuda

__all__ = [
    "UNROLL",
    "block_hidden",
    "block_logits",
    "block_margin_loss",
    "block_softmax",
    "clip",
    "hidden_delta",
    "l1_threshold",
    "largest_four",
    "largest_magnitudes",
    "margin_loss_row",
    "row_reduce",
    "segment_reduce",
    "sigmoid",
    "sign_step",
    "softmax_row",
    "top_coordinates",
]

UNROLL = 4  # independent partial sums per thread in the row kernel's dot products


@cuda.jit(device=True)
def sigmoid(z):
    """Logistic function 1 / (1 + exp(-z)), without overflow for any finite z."""
    t = math.exp(-abs(z))  # exp of a non-positive number cannot overflow
    r = 1.0 / (1.0 + t)
    return r if z >= 0.0 else t * r


@cuda.jit(device=True)
def clip(v, lo, hi):
    """v limited to [lo, hi] (NaN passes through)."""
    v = lo if v < lo else v
    return hi if v > hi else v


@cuda.jit(device=True)
def sign_step(x, g, eps, x_min, x_max):
    """One L-inf step of one element: clip(x + eps * sign(g), x_min, x_max)."""
    step = eps if g > 0.0 else (-eps if g < 0.0 else 0.0)
    return clip(x + step, x_min, x_max)


@cuda.jit(device=True)
def segment_reduce(red, t, width, use_max):
    """Reduce each aligned segment of ``width`` (a power of two) entries of shared ``red``.

    Every thread of the block must call it; thread ``t`` owns ``red[t]``. Afterwards the first
    entry of each segment holds the segment's sum (or maximum if ``use_max``).
    """
    part = t % width
    stride = width // 2
    while stride > 0:
        if part < stride:
            other = red[t + stride]
            red[t] = max(red[t], other) if use_max else red[t] + other
        cuda.syncthreads()
        stride //= 2


@cuda.jit(device=True)
def row_reduce(red, t, width, value, use_max):
    """Sum (or maximum if ``use_max``) of ``value`` over each aligned segment of ``width``
    threads, returned to every thread of the segment.

    Every thread of the block must call it; ``red`` is a shared float64 array with an entry
    per thread, free again when it returns.
    """
    red[t] = value
    cuda.syncthreads()
    segment_reduce(red, t, width, use_max)
    result = red[t - t % width]
    cuda.syncthreads()
    return result


largest_magnitudes = cuda.jit(device=True)(cpu.largest_magnitudes.py_func)
"""``cpu.largest_magnitudes`` compiled for the device (one thread, one row): the (threshold,
last) that pick the q coordinates of largest |g|, by quickselect on a scratch row."""


@cuda.jit(device=True)
def top_coordinates(G, n, live, q, scratch, red, t, width):
    """(threshold, last) of ``largest_magnitudes`` on row n of G, for every thread of the
    row's segment of ``width`` threads: its first thread selects on ``scratch[n]`` (a row of
    G's dtype) and the reductions pass the result on. Every thread of the block must call it;
    it first waits for the block's writes to G (the momentum of MI-FGSM).
    """
    cuda.syncthreads()
    threshold = 0.0
    last = 0.0
    if live and t % width == 0:
        found, index = largest_magnitudes(G[n], q, scratch[n])
        threshold = float(found)
        last = float(index)
    threshold = row_reduce(red, t, width, threshold, True)
    last = row_reduce(red, t, width, last, False)
    return threshold, int(last)


@cuda.jit(device=True)
def l1_threshold(X_adv, X, n, live, radius, total, red, t, width):
    """Soft threshold of the Euclidean projection of ``X_adv[n] - X[n]`` onto the L1 ball.

    ``width`` threads share row n (``live``: n is a row) and ``total`` is the L1 norm of its
    perturbation. Returns theta >= 0 with sum_i max(|X_adv[n, i] - X[n, i]| - theta, 0) =
    radius, or 0 where ``total <= radius``. Michelot's algorithm (1986): theta = (sum of the
    kept |v_i| - radius) / their count, keeping only the |v_i| > theta, repeated until the
    kept set stops shrinking; theta only grows, so it ends in at most d rounds, at the
    threshold the sort of Duchi et al. (2008) finds. Sums are float64. Every thread of the
    block must call it.
    """
    d = X.shape[1]
    lane = t % width
    outside = live and total > radius
    busy = outside
    theta = (total - radius) / d
    count = float(d)
    while cuda.syncthreads_or(1 if busy else 0):
        kept = 0.0
        size = 0.0
        if busy:
            for i in range(lane, d, width):
                a = float(abs(X_adv[n, i] - X[n, i]))
                if a > theta:
                    kept += a
                    size += 1.0
        kept = row_reduce(red, t, width, kept, False)
        size = row_reduce(red, t, width, size, False)
        if busy:
            busy = 0.0 < size < count
            if size > 0.0:  # none kept: every |v_i| equals theta (radius 0), the answer
                theta = (kept - radius) / size
            count = size
    return theta if outside else 0.0


@cuda.jit(device=True)
def block_hidden(Z1, b1, A, N, first, count, t, threads):
    """``A[n, j] = sigmoid(Z1[n, j] + ... + b1[j])`` for the ``count`` rows from ``first``:
    Z1 ``(splits * N, H)`` holds the split partial sums of ``X @ W1``, added in split order.
    Threads stride over the hidden units of each row; A may be the first N rows of Z1."""
    H = A.shape[1]
    splits = Z1.shape[0] // N
    for n in range(first, first + count):
        for j in range(t, H, threads):
            z = Z1[n, j]
            for split in range(1, splits):
                z += Z1[split * N + n, j]
            A[n, j] = sigmoid(z + b1[j])


@cuda.jit(device=True)
def block_logits(A, a_first, W2, b2, count, pair_threads, red, t, Z, z_first):
    """Logits of ``count`` rows: ``Z[z_first + r, k] = A[a_first + r] @ W2[:, k] + b2[k]``.

    ``pair_threads`` (a power of two) threads share each (row, class) dot product, each with
    ``UNROLL`` independent partial sums (the loads are latency-bound, not bandwidth-bound);
    ``red`` is a shared array of A's dtype with an entry per thread. Every thread of the block
    must call it; Z is written when it returns (its caller synchronises before reading it).
    """
    H = A.shape[1]
    C = Z.shape[1]
    groups = red.shape[0] // pair_threads
    part = t % pair_threads
    partial = cuda.local.array(UNROLL, A.dtype)
    for base in range(0, count * C, groups):
        pair = base + t // pair_threads
        r = pair // C
        k = pair % C
        for u in range(UNROLL):
            partial[u] = 0
        if pair < count * C:
            for j0 in range(part, H, UNROLL * pair_threads):
                for u in range(UNROLL):
                    j = j0 + u * pair_threads
                    if j < H:
                        partial[u] += A[a_first + r, j] * W2[j, k]
        s = A.dtype.type(0)
        for u in range(UNROLL):
            s += partial[u]
        red[t] = s
        cuda.syncthreads()
        segment_reduce(red, t, pair_threads, False)
        if part == 0 and pair < count * C:
            Z[z_first + r, k] = red[t] + b2[k]
        cuda.syncthreads()


@cuda.jit(device=True)
def softmax_row(Z, z, Y, n, delta, store, losses, predicted):
    """Row z of Z: logits in, probabilities out (``P - Y`` with ``delta``), max-subtracted.

    Y's row n holds the labels (Y with 0 rows: the one-hot predictions). With ``store``, it
    also writes row n's cross-entropy to ``losses[n]`` and the argmax of its logits to
    ``predicted[n]``.
    """
    C = Z.shape[1]
    zero = Z.dtype.type(0)
    best = Z[z, 0]
    label_logit = zero
    argmax = 0
    for k in range(C):
        logit = Z[z, k]
        if Y.shape[0] != 0:
            label_logit += Y[n, k] * logit
        if logit > best:
            best = logit
            argmax = k
    # rest = sum over the other classes of exp(z - max): P_top = 1 / (1 + rest) and
    # 1 - P_top = rest * P_top keep full precision when one class dominates
    rest = zero
    for k in range(C):
        e = math.exp(Z[z, k] - best)
        Z[z, k] = e
        if k != argmax:
            rest += e
    if store:
        # logsumexp(Z) - Y.Z = (max - Y.Z) + log1p(rest): no cancellation near 0
        losses[n] = (best - (best if Y.shape[0] == 0 else label_logit)) + math.log1p(rest)
        predicted[n] = argmax
    for k in range(C):
        p = Z[z, k] / (1.0 + rest)
        if delta:
            label = (1.0 if k == argmax else 0.0) if Y.shape[0] == 0 else Y[n, k]
            p = (1.0 - label) - rest * p if k == argmax else p - label
        Z[z, k] = p


@cuda.jit(device=True)
def block_softmax(Z, z_first, Y, n_first, count, delta, store, losses, predicted, cache, t):
    """``softmax_row`` on the block's ``count`` rows, one thread each: row ``z_first + r`` of Z
    with the labels of row ``n_first + r``. Returns whether the rows also went to the shared
    ``cache`` (row r at ``r * C``), which they do when they fit, for ``hidden_delta``.
    """
    C = Z.shape[1]
    cached = count * C <= cache.shape[0]
    if t < count:
        softmax_row(Z, z_first + t, Y, n_first + t, delta, store, losses, predicted)
        if cached:
            for k in range(C):
                cache[t * C + k] = Z[z_first + t, k]
    return cached


@cuda.jit(device=True)
def largest_four(Z, z):
    """Indices of the four largest entries of row z of Z, descending, -1 past C; of equal
    entries the first index comes first (``cpu.largest_four``)."""
    i1 = i2 = i3 = i4 = -1
    for k in range(Z.shape[1]):
        v = Z[z, k]
        if i1 < 0 or v > Z[z, i1]:
            i1, i2, i3, i4 = k, i1, i2, i3
        elif i2 < 0 or v > Z[z, i2]:
            i2, i3, i4 = k, i2, i3
        elif i3 < 0 or v > Z[z, i3]:
            i3, i4 = k, i3
        elif i4 < 0 or v > Z[z, i4]:
            i4 = k
    return i1, i2, i3, i4


@cuda.jit(device=True)
def margin_loss_row(Z, z, label, target, loss, kappa):
    """Row z of Z: logits (bias included) in, the margin loss's gradient dL/dz out; returns
    (the loss, float64; the argmax of the logits). ``cpu.margin_loss_row``, in float64: the
    DLR losses (``LOSS_DLR``, ``LOSS_DLR_TARGETED``), the C&W margin (``LOSS_CW``), whose
    gradient is 0 where it is clipped at kappa, and the logit difference z_t - z_y
    (``LOSS_LOGIT_DIFFERENCE``); target -1 for none."""
    C = Z.shape[1]
    i1, i2, i3, i4 = largest_four(Z, z)
    if loss == LOSS_LOGIT_DIFFERENCE:
        difference = float(Z[z, target]) - float(Z[z, label])
        for k in range(C):
            Z[z, k] = 0.0
        Z[z, target] += 1.0
        Z[z, label] -= 1.0
        return difference, i1
    if loss == LOSS_CW:
        up = i2 if i1 == label else i1  # untargeted: the best other class against y
        down = label
        if target >= 0:  # targeted: t against the best other class
            up = target
            down = i2 if i1 == target else i1
        margin = float(Z[z, up]) - float(Z[z, down])
        slope = 1.0 if margin < kappa else 0.0
        for k in range(C):
            Z[z, k] = 0.0
        Z[z, up] += slope
        Z[z, down] -= slope
        return min(margin, kappa), i1
    rival = target if loss == LOSS_DLR_TARGETED else (i2 if i1 == label else i1)
    low = i4 if loss == LOSS_DLR_TARGETED else i3
    gap = float(Z[z, label]) - float(Z[z, rival])
    spread = float(Z[z, i1]) - 0.5 * (float(Z[z, i3]) + float(Z[z, low])) + DLR_OFFSET
    inverse = 1.0 / spread
    ratio = gap * inverse * inverse
    for k in range(C):
        Z[z, k] = 0.0
    Z[z, label] -= inverse
    Z[z, rival] += inverse
    Z[z, i1] += ratio
    Z[z, i3] -= 0.5 * ratio
    Z[z, low] -= 0.5 * ratio
    return -gap * inverse, i1


@cuda.jit(device=True)
def block_margin_loss(
    Z, z_first, labels, targets, n_first, count, loss, kappa, values, predicted, cache, t
):
    """``margin_loss_row`` on the block's ``count`` rows, one thread each: row ``z_first + r``
    of Z with the classes of row ``n_first + r`` (targets with 0 rows: none), its loss to
    ``values`` and its argmax to ``predicted``. Returns whether the rows also went to the
    shared ``cache`` (row r at ``r * C``), which they do when they fit, for ``hidden_delta``.
    """
    C = Z.shape[1]
    cached = count * C <= cache.shape[0]
    if t < count:
        n = n_first + t
        target = targets[n] if targets.shape[0] != 0 else -1
        value, top = margin_loss_row(Z, z_first + t, labels[n], target, loss, kappa)
        values[n] = value
        predicted[n] = top
        if cached:
            for k in range(C):
                cache[t * C + k] = Z[z_first + t, k]
    return cached


@cuda.jit(device=True)
def hidden_delta(A, a_first, Z, z_first, W2, count, cache, cached, t, threads):
    """``A[a_first + r, j]`` becomes ``D1 = (Z[z_first + r] @ W2[j]) * a * (1 - a)``.

    Z holds ``P - Y``; with ``cached``, the block's Z rows are read from the shared ``cache``
    (row r at ``r * C``) instead. Threads stride over the hidden units of each row.
    """
    H = A.shape[1]
    C = Z.shape[1]
    for r in range(count):
        for j in range(t, H, threads):
            s = A.dtype.type(0)
            for k in range(C):
                d2 = cache[r * C + k] if cached else Z[z_first + r, k]
                s += d2 * W2[j, k]
            a = A[a_first + r, j]
            A[a_first + r, j] = s * (a * (1.0 - a))
