"""Numba CUDA kernels for the two-layer sigmoid network, the GPU twin of ``kernels/cpu.py``.

Same names, argument order and conventions as ``advgrad.kernels.cpu``, over device arrays:
anything with ``__cuda_array_interface__`` is used in place, without a copy. Shapes
(row-vector convention): ``X (N, d)``, ``W1 (d, H)``, ``b1 (H,)``, ``W2 (H, C)``, ``b2 (C,)``,
``Y (N, C)`` one-hot or soft, or with 0 rows to use the model's predictions as labels. All
float arrays of one call share one dtype, float32 or float64. Nothing is checked here.

A CUDA kernel runs over a grid, so the ``*_into`` functions are host-side launchers: each
queues a few kernels on ``stream`` and returns at once. One gradient is three launches:

1. ``gemm_kernel(tile, False)``: partial sums of ``Z1 = X @ W1``, a tiled shared-memory
   product with a register micro-tile per thread; small batches split the d-long sum over
   several blocks (split-K) so that the whole GPU works.
2. ``rows_kernel``: a few rows per block; sums the split partials, adds b1, applies the
   sigmoid (A), then logits ``A @ W2 + b2`` (C is small: threads share each dot product),
   a max-subtracted softmax, ``P - Y``, and ``D1 = (P - Y) @ W2^T * A * (1 - A)`` in place.
3. ``gemm_kernel(tile, True)``: ``G = D1 @ W1^T``, whose epilogue either stores G or, for an
   L-inf step, writes ``clip(X + eps * sign(G), x_min, x_max)`` directly. L2 and L1 steps
   need the norm of each whole row first: ``norm_step_kernel`` (one block per row) reduces it
   and rescales G into the step, in place.

Batches of at most ``SKINNY_ROWS`` rows use ``SKINNY_TILE``, larger ones ``WIDE_TILE``.
``THREADS_PER_BLOCK`` sizes the row kernels. Tests may lower these module constants at any
time: kernels are built (and cached) per configuration, see ``kernels()``.

Scratch buffers come from a ``Workspace``; pass the same one to repeated calls on one stream
to avoid a device allocation per call.
"""

import functools
import math
from typing import NamedTuple

import numpy as np

if not hasattr(np, "row_stack"):  # numba-cuda 0.30 overloads np.row_stack, gone in numpy 2.5
    np.row_stack = np.vstack

from numba import cuda  # noqa: E402  (after the alias above)


class Tile(NamedTuple):
    """Work of one matrix-product thread block.

    The block computes a ``rows x cols`` tile of the output, stepping through the shared
    dimension ``depth`` elements at a time; each thread keeps a ``thread_rows x thread_cols``
    micro-tile in registers, so a block has ``threads`` threads.
    """

    rows: int
    cols: int
    depth: int
    thread_rows: int
    thread_cols: int

    @property
    def threads(self) -> int:
        """Threads per block."""
        return (self.rows // self.thread_rows) * (self.cols // self.thread_cols)


THREADS_PER_BLOCK = 256  # row kernels; a power of two
WIDE_TILE = Tile(128, 128, 8, 8, 8)  # 256 threads, batches of more than SKINNY_ROWS rows
SKINNY_TILE = Tile(16, 64, 16, 2, 2)  # 256 threads, batches of at most SKINNY_ROWS rows
SKINNY_ROWS = 32
BLOCKS_PER_MULTIPROCESSOR = 2  # split-K aims at this many product blocks per SM
MIN_SPLIT_STEPS = 2  # depth steps per split, at least


# ---------------------------------------------------------------------------------------------
# Scalar and block helpers


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


# ---------------------------------------------------------------------------------------------
# Kernels, built per configuration


@functools.cache
def gemm_kernel(tile: Tile, b_transposed: bool):
    """The tiled matrix-product kernel for one tile shape and layout of B.

    ``gemm[grid, tile.threads, stream](A, B, n_rows, split_depth, X, eps, x_min, x_max,
    sign, out)`` computes ``S = A[:n_rows] @ B`` (``A[:n_rows] @ B.T`` if ``b_transposed``),
    A (>= n_rows, K), B (K, M) or (M, K), over ``grid = (ceil(M / tile.cols),
    ceil(n_rows / tile.rows), splits)``. Block z sums only ``k`` in
    ``[z * split_depth, (z + 1) * split_depth)`` and stores its partial sum at
    ``out[z * n_rows + n, m]``. With ``sign`` (one split only) it stores
    ``sign_step(X[n, m], S[n, m], eps, x_min, x_max)`` at ``out[n, m]`` instead.
    """
    BM, BN, BK, TM, TN = tile
    TY, TX = BM // TM, BN // TN
    THREADS = TY * TX
    if BM % TM or BN % TN or (BM * BK) % THREADS or (BN * BK) % THREADS:
        raise ValueError(f"tile {tile} does not divide among its {THREADS} threads")
    A_LOADS, B_LOADS = BM * BK // THREADS, BN * BK // THREADS
    PAD = max(1, 32 // BK)  # transposed tile stores hit distinct banks

    @cuda.jit
    def gemm(A, B, n_rows, split_depth, X, eps, x_min, x_max, sign, out):
        t = cuda.threadIdx.x
        tx = t % TX
        ty = t // TX
        row0 = cuda.blockIdx.y * BM
        col0 = cuda.blockIdx.x * BN
        split = cuda.blockIdx.z
        n_cols = B.shape[0] if b_transposed else B.shape[1]
        k_start = split * split_depth
        k_stop = min(A.shape[1], k_start + split_depth)
        As = cuda.shared.array((BK, BM + PAD), A.dtype)
        Bs = cuda.shared.array((BK, BN + PAD), A.dtype)
        acc = cuda.local.array((TM, TN), A.dtype)
        a = cuda.local.array(TM, A.dtype)
        b = cuda.local.array(TN, A.dtype)
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = 0
        for k0 in range(k_start, k_stop, BK):
            for load in range(A_LOADS):
                e = t + load * THREADS
                r = e // BK
                c = e % BK
                if row0 + r < n_rows and k0 + c < k_stop:
                    As[c, r] = A[row0 + r, k0 + c]
                else:
                    As[c, r] = 0
            for load in range(B_LOADS):
                e = t + load * THREADS
                if b_transposed:
                    n = e // BK
                    c = e % BK
                    if col0 + n < n_cols and k0 + c < k_stop:
                        Bs[c, n] = B[col0 + n, k0 + c]
                    else:
                        Bs[c, n] = 0
                else:
                    c = e // BN
                    n = e % BN
                    if col0 + n < n_cols and k0 + c < k_stop:
                        Bs[c, n] = B[k0 + c, col0 + n]
                    else:
                        Bs[c, n] = 0
            cuda.syncthreads()
            for kk in range(BK):
                for i in range(TM):
                    a[i] = As[kk, ty + i * TY]
                for j in range(TN):
                    b[j] = Bs[kk, tx + j * TX]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += a[i] * b[j]
            cuda.syncthreads()
        for i in range(TM):
            n = row0 + ty + i * TY
            if n < n_rows:
                for j in range(TN):
                    m = col0 + tx + j * TX
                    if m < n_cols:
                        if sign:
                            out[n, m] = sign_step(X[n, m], acc[i, j], eps, x_min, x_max)
                        else:
                            out[split * n_rows + n, m] = acc[i, j]

    return gemm


@functools.cache
def rows_kernel(threads: int):
    """The per-row kernel: hidden activations, softmax, loss and (optionally) D1.

    ``rows[ceil(N / rows_per_block), threads, stream](Z1, b1, W2, b2, Y, rows_per_block,
    pair_threads, delta, A, Z2, losses, predicted)``. ``Z1 (splits * N, H)`` holds the split
    partial sums of ``X @ W1``; ``A (N, H)`` receives ``sigmoid(Z1 + b1)`` (it may be the first
    N rows of Z1). ``Z2 (N, C)`` receives the probabilities P, ``losses (N,)`` the
    cross-entropy against Y, ``predicted (N,)`` int64 the argmax of the logits. With ``delta``,
    Z2 receives ``P - Y`` instead and A is overwritten with ``D1 = (P - Y) W2^T * A * (1 - A)``.
    Each block takes ``rows_per_block`` rows; ``pair_threads`` (a power of two) threads share
    each (row, class) logit.
    """

    @cuda.jit
    def rows(Z1, b1, W2, b2, Y, rows_per_block, pair_threads, delta, A, Z2, losses, predicted):
        N, H = A.shape
        C = Z2.shape[1]
        splits = Z1.shape[0] // N
        t = cuda.threadIdx.x
        first = cuda.blockIdx.x * rows_per_block
        count = min(rows_per_block, N - first)
        red = cuda.shared.array(threads, A.dtype)
        zero = A.dtype.type(0)
        for e in range(t, count * H, threads):
            n = first + e // H
            j = e % H
            z = Z1[n, j]
            for split in range(1, splits):
                z += Z1[split * N + n, j]
            A[n, j] = sigmoid(z + b1[j])
        cuda.syncthreads()
        groups = threads // pair_threads
        part = t % pair_threads
        for base in range(0, count * C, groups):
            pair = base + t // pair_threads
            n = first + pair // C
            k = pair % C
            s = zero
            if pair < count * C:
                for j in range(part, H, pair_threads):
                    s += A[n, j] * W2[j, k]
            red[t] = s
            cuda.syncthreads()
            segment_reduce(red, t, pair_threads, False)
            if part == 0 and pair < count * C:
                Z2[n, k] = red[t] + b2[k]
            cuda.syncthreads()
        if t < count:
            n = first + t
            best = Z2[n, 0]
            label_logit = zero
            argmax = 0
            for k in range(C):
                z = Z2[n, k]
                if Y.shape[0] != 0:
                    label_logit += Y[n, k] * z
                if z > best:
                    best = z
                    argmax = k
            total = zero
            for k in range(C):
                e = math.exp(Z2[n, k] - best)
                Z2[n, k] = e
                total += e
            lse = best + math.log(total)
            losses[n] = lse - (best if Y.shape[0] == 0 else label_logit)
            predicted[n] = argmax
            for k in range(C):
                p = Z2[n, k] / total
                if delta:
                    p -= (1.0 if k == argmax else 0.0) if Y.shape[0] == 0 else Y[n, k]
                Z2[n, k] = p
        if delta:
            cuda.syncthreads()
            for e in range(t, count * H, threads):
                n = first + e // H
                j = e % H
                s = zero
                for k in range(C):
                    s += Z2[n, k] * W2[j, k]
                a = A[n, j]
                A[n, j] = s * (a * (1.0 - a))

    return rows


@functools.cache
def norm_step_kernel(threads: int):
    """The L2 / L1 step kernel: one block per row (grid-stride), in place.

    ``norm_step[blocks, threads, stream](X, eps, p, x_min, x_max, X_adv)``: on entry X_adv
    holds G; each row becomes ``clip(X + eps * G / ||G||_p, x_min, x_max)`` (p = 2, else 1),
    a zero row ``clip(X)``. The norm is taken in float64 after scaling by max |G|.
    """

    @cuda.jit
    def norm_step(X, eps, p, x_min, x_max, X_adv):
        N, d = X.shape
        t = cuda.threadIdx.x
        red = cuda.shared.array(threads, np.float64)
        for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
            scale = 0.0
            for i in range(t, d, threads):
                scale = max(scale, abs(X_adv[n, i]))
            red[t] = scale
            cuda.syncthreads()
            segment_reduce(red, t, threads, True)
            scale = red[0]
            cuda.syncthreads()
            total = 0.0
            if scale > 0.0:
                for i in range(t, d, threads):
                    g = X_adv[n, i] / scale
                    total += g * g if p == 2.0 else abs(g)
            red[t] = total
            cuda.syncthreads()
            segment_reduce(red, t, threads, False)
            total = math.sqrt(red[0]) if p == 2.0 else red[0]
            cuda.syncthreads()
            factor = eps / (scale * total) if scale > 0.0 else 0.0
            for i in range(t, d, threads):
                X_adv[n, i] = clip(X[n, i] + factor * X_adv[n, i], x_min, x_max)

    return norm_step
