"""CUDA kernels of the forward pass and the input gradient, built per configuration.

``gemm_kernel`` (the tiled matrix product, whose epilogue can take the L-inf step),
``rows_kernel`` (activations, softmax, losses and D1 per row), ``small_batch_kernel`` (a
small batch's whole gradient in one launch), ``logit_rows_kernel`` (the logits, or the
margin losses of the loss switch and their D1, per row) and ``one_hot_rows``. Each factory
builds, and caches, one kernel per configuration; ``advgrad.kernels.cuda.launchers`` picks
the configuration and launches it.
"""

import functools
from typing import NamedTuple

import numpy as np

from advgrad.kernels.cuda.device import (
    block_hidden,
    block_logits,
    block_margin_loss,
    block_softmax,
    hidden_delta,
    sigmoid,
    sign_step,
)
from advgrad.kernels.cuda.internals import SIMULATOR, cuda

__all__ = [
    "Tile",
    "gemm_kernel",
    "logit_rows_kernel",
    "one_hot_rows",
    "rows_kernel",
    "small_batch_kernel",
]

_u = np.uint64  # indexing with unsigned integers skips numba's negative-index wraparound


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


@functools.cache
def gemm_kernel(tile: Tile, b_transposed: bool, max_registers: int | None = None):
    """The tiled matrix-product kernel for one tile shape and layout of B.

    ``gemm[grid, tile.threads, stream](A, B, n_rows, split_depth, X, eps, x_min, x_max,
    sign, out)`` computes ``S = A[:n_rows] @ B`` (``A[:n_rows] @ B.T`` if ``b_transposed``),
    A (>= n_rows, K), B (K, M) or (M, K), over ``grid = (ceil(M / tile.cols),
    ceil(n_rows / tile.rows), splits)``. Block z sums only ``k`` in
    ``[z * split_depth, (z + 1) * split_depth)`` and stores its partial sum at
    ``out[z * n_rows + n, m]``. With ``sign`` (one split only) it stores
    ``sign_step(X[n, m], S[n, m], eps, x_min, x_max)`` at ``out[n, m]`` instead.
    ``max_registers`` caps the registers per thread (more blocks fit on a multiprocessor).
    """
    BM, BN, BK, TM, TN = tile
    TY, TX = BM // TM, BN // TN
    THREADS = TY * TX
    # NVVM keeps a BK-trip loop over 64-FMA bodies rolled, but unrolls a two-trip inner loop:
    # depth steps go in pairs, with half the loop overhead.
    PAIR = 2
    # Per k-step each thread loads a run of A_RUN (B_RUN) consecutive elements of one row of
    # the A (B) tile as stored, a row of B's being a depth step unless b_transposed: one
    # address per tile, the rest immediate offsets.
    A_RUN, B_RUN = BM * BK // THREADS, BN * BK // THREADS
    B_WIDTH = BK if b_transposed else BN  # elements in a stored row of B's tile
    if (
        BM % TM
        or BN % TN
        or TM % 2
        or TN % 2
        or BK % PAIR
        or A_RUN * THREADS != BM * BK
        or B_RUN * THREADS != BN * BK
        or BK % A_RUN
        or B_WIDTH % B_RUN
    ):
        raise ValueError(f"tile {tile} does not divide among its {THREADS} threads")
    A_RUNS, B_RUNS = BK // A_RUN, B_WIDTH // B_RUN  # runs per stored row
    # A thread's micro-tile is two runs of TM / 2 rows (TN / 2 columns), half a tile apart:
    # each run is one vector load from shared memory, and a quarter warp's loads are contiguous.
    QM, QN, HALF_M, HALF_N = TM // 2, TN // 2, BM // 2, BN // 2
    PAD = max(4, 32 // BK)  # transposed stores hit distinct banks; rows stay 16-byte aligned
    A_STRIDE, B_STRIDE = BM + PAD, BN + PAD  # shared tiles are (BK, stride), flattened
    A_SIZE, B_SIZE = BK * A_STRIDE, BK * B_STRIDE
    ALIGN = None if SIMULATOR else 16  # lets vector loads through; the simulator rejects it
    options = {} if SIMULATOR or max_registers is None else {"max_registers": max_registers}

    @cuda.jit(**options)
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
        As = cuda.shared.array(A_SIZE, A.dtype, ALIGN)
        Bs = cuda.shared.array(B_SIZE, A.dtype, ALIGN)
        next_a = cuda.local.array(A_RUN, A.dtype)
        next_b = cuda.local.array(B_RUN, A.dtype)
        acc = cuda.local.array((TM, TN), A.dtype)
        a = cuda.local.array(TM, A.dtype)
        b = cuda.local.array(TN, A.dtype)
        zero = A.dtype.type(0)  # an int 0 would make the loads below float64, then convert
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = zero
        a_row, a_col = divmod(t, A_RUNS)
        b_row, b_col = divmod(t, B_RUNS)
        a_col *= A_RUN
        b_col *= B_RUN
        a_store = _u(a_col * A_STRIDE + a_row)
        # Rows of A past n_rows, and columns of S past n_cols, load the last real one instead:
        # their products are never stored. Depth steps past k_stop load zeros on both sides,
        # so a non-finite element there cannot make 0 * inf.
        a_row = _u(min(row0 + a_row, n_rows - 1))
        if b_transposed:  # stored rows are columns of S, stored columns the depth
            b_store, b_store_step = _u(b_col * B_STRIDE + b_row), _u(B_STRIDE)
            b_row = _u(min(col0 + b_row, n_cols - 1))
        else:  # stored rows are the depth
            b_store, b_store_step = _u(b_row * B_STRIDE + b_col), _u(1)
            b_col += col0
        # Iteration k0 fetches tile k0 into registers, multiplies the shared tile k0 - BK
        # meanwhile, then stores the fetched tile to shared memory.
        for k0 in range(k_start, k_stop + BK, BK):
            if k0 < k_stop:
                for j in range(A_RUN):
                    k = k0 + a_col + j
                    next_a[j] = A[a_row, _u(k)] if k < k_stop else zero
                for j in range(B_RUN):
                    if b_transposed:
                        k = k0 + b_col + j
                        next_b[j] = B[b_row, _u(k)] if k < k_stop else zero
                    else:
                        k = k0 + b_row
                        n = min(b_col + j, n_cols - 1)
                        next_b[j] = B[_u(k), _u(n)] if k < k_stop else zero
            if k0 > k_start:
                a_at = _u(ty * QM)
                b_at = _u(tx * QN)
                for _ in range(BK // PAIR):
                    for kk in range(PAIR):
                        a_k = a_at + _u(kk * A_STRIDE)
                        b_k = b_at + _u(kk * B_STRIDE)
                        for i in range(QM):
                            a[i] = As[a_k + _u(i)]
                            a[QM + i] = As[a_k + _u(HALF_M + i)]
                        for j in range(QN):
                            b[j] = Bs[b_k + _u(j)]
                            b[QN + j] = Bs[b_k + _u(HALF_N + j)]
                        for i in range(TM):
                            for j in range(TN):
                                acc[i, j] += a[i] * b[j]
                    a_at += _u(PAIR * A_STRIDE)
                    b_at += _u(PAIR * B_STRIDE)
            cuda.syncthreads()
            if k0 < k_stop:
                for j in range(A_RUN):
                    As[a_store + _u(j * A_STRIDE)] = next_a[j]
                for j in range(B_RUN):
                    Bs[b_store + _u(j) * b_store_step] = next_b[j]
            cuda.syncthreads()
        # The micro-tile's second run of rows (columns) starts half a tile down (right). No
        # division or remainder of the loop counters: NVVM then unrolls the loops and keeps
        # acc in registers.
        n_first = row0 + ty * QM
        m_first = col0 + tx * QN
        for i in range(TM):
            n = n_first + (i - QM + HALF_M if i >= QM else i)
            for j in range(TN):
                m = m_first + (j - QN + HALF_N if j >= QN else j)
                if n < n_rows and m < n_cols:
                    if sign:
                        out[_u(n), _u(m)] = sign_step(X[_u(n), _u(m)], acc[i, j], eps, x_min, x_max)
                    else:
                        out[_u(split * n_rows + n), _u(m)] = acc[i, j]

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
    N is the length of ``predicted``; A may have more rows.
    Each block takes ``rows_per_block`` rows; ``pair_threads`` (a power of two) threads share
    each (row, class) logit (``block_logits``). The block's P - Y rows are kept in shared
    memory for D1 when they fit.
    """

    @cuda.jit
    def rows(Z1, b1, W2, b2, Y, rows_per_block, pair_threads, delta, A, Z2, losses, predicted):
        N = predicted.shape[0]  # A may be Z1 itself, with splits * N rows
        t = cuda.threadIdx.x
        first = cuda.blockIdx.x * rows_per_block
        count = min(rows_per_block, N - first)
        red = cuda.shared.array(threads, A.dtype)
        block_z2 = cuda.shared.array(threads, A.dtype)  # Z2 of the block's rows, if they fit
        block_hidden(Z1, b1, A, N, first, count, t, threads)
        cuda.syncthreads()
        block_logits(A, first, W2, b2, count, pair_threads, red, t, Z2, first)
        cached = block_softmax(
            Z2, first, Y, first, count, delta, True, losses, predicted, block_z2, t
        )
        if delta:
            cuda.syncthreads()
            hidden_delta(A, first, Z2, first, W2, count, block_z2, cached, t, threads)

    return rows


@functools.cache
def logit_rows_kernel(threads: int):
    """The per-row kernel of the logits and of the margin losses (``cpu.margin_loss_row``).

    ``rows[ceil(N / rows_per_block), threads, stream](Z1, b1, W2, b2, labels, targets, loss,
    kappa, gradient, rows_per_block, pair_threads, A, Z2, values, predicted)``. As
    ``rows_kernel``: ``Z1 (splits * N, H)`` holds the split partial sums of ``X @ W1``, ``A
    (N, H)`` (it may be the first N rows of Z1) receives the activations, ``Z2 (N, C)`` the
    logits. With ``gradient``, Z2 receives dL/dz of the margin loss ``loss`` (``LOSS_DLR``,
    ``LOSS_DLR_TARGETED``, ``LOSS_CW`` with ``kappa``, or ``LOSS_LOGIT_DIFFERENCE``) of each
    row's classes (labels and targets (N,) int64, targets with 0 rows for none), ``values
    (N,)`` the losses, ``predicted (N,)`` int64 the argmax of the logits, and A is
    overwritten with ``D1 = dL/dz W2^T * A * (1 - A)``; without it they are not touched.
    """

    @cuda.jit
    def rows(
        Z1,
        b1,
        W2,
        b2,
        labels,
        targets,
        loss,
        kappa,
        gradient,
        rows_per_block,
        pair_threads,
        A,
        Z2,
        values,
        predicted,
    ):
        N = Z2.shape[0]
        t = cuda.threadIdx.x
        first = cuda.blockIdx.x * rows_per_block
        count = min(rows_per_block, N - first)
        red = cuda.shared.array(threads, A.dtype)
        block_z2 = cuda.shared.array(threads, A.dtype)  # dL/dz of the block's rows, if they fit
        block_hidden(Z1, b1, A, N, first, count, t, threads)
        cuda.syncthreads()
        block_logits(A, first, W2, b2, count, pair_threads, red, t, Z2, first)
        if gradient:
            cached = block_margin_loss(
                Z2,
                first,
                labels,
                targets,
                first,
                count,
                loss,
                kappa,
                values,
                predicted,
                block_z2,
                t,
            )
            cuda.syncthreads()
            hidden_delta(A, first, Z2, first, W2, count, block_z2, cached, t, threads)

    return rows


@cuda.jit
def one_hot_rows(labels, Y):
    """``Y (N, C)`` = the one-hot rows of ``labels (N,)`` int64, in Y's dtype (grid-stride
    over the elements of Y)."""
    N, C = Y.shape
    for e in range(cuda.grid(1), N * C, cuda.gridsize(1)):
        n = e // C
        Y[n, e - n * C] = 1.0 if labels[n] == e - n * C else 0.0


@functools.cache
def small_batch_kernel(threads: int, group_rows: int, columns: int):
    """A small batch's whole gradient in one launch: forward, softmax and back-product.

    ``small[(slices, ceil(N / group_rows)), threads, stream](X, W1, b1, W2, b2, Y,
    pair_threads, eps, x_min, x_max, sign, A, Z2, losses, predicted, out)``. Block (s, g)
    takes rows ``g * group_rows ..`` of X. It computes their hidden activations itself (every
    slice does: a small batch is bound by launches, not arithmetic, and no block ever waits
    for another), their softmax and D1 as ``rows_kernel`` does (``pair_threads`` threads per
    logit), then columns ``s * ceil(d / slices) ..`` of ``G = D1 @ W1^T``. out receives G or,
    with ``sign``, the L-inf step ``sign_step(X, G, eps, x_min, x_max)``; it must not overlap
    X, which other blocks may still be reading. ``A (slices * N, H)`` and ``Z2 (slices * N,
    C)`` are scratch, a copy per slice; slice 0 stores ``losses`` and ``predicted`` as
    ``rows_kernel`` does.

    In the product ``X @ W1`` each thread keeps ``group_rows x columns`` sums in registers:
    ``T = min(threads, ceil(H / columns))`` threads share the hidden units (thread c takes
    units c, c + T, ...) and the ``threads // T`` groups of them each sum one range of the
    inputs. In the back-product each column's sum over the hidden units is split likewise,
    among ``threads // slice width`` threads. Ranges are added in a fixed order, so a row's
    result does not depend on the batch it came in. Row and unit indices are unsigned and
    worked out before the loops: with signed indices numba's negative-index checks doubled
    the instructions of the loop over the inputs (``scripts/kernel_resources.py`` compiles
    the kernels for a GPU; their SASS shows it).
    """
    R, TN = group_rows, columns
    SUMS = R * TN
    PARTIALS = threads * R

    @cuda.jit
    def small(
        X,
        W1,
        b1,
        W2,
        b2,
        Y,
        pair_threads,
        eps,
        x_min,
        x_max,
        sign,
        A,
        Z2,
        losses,
        predicted,
        out,
    ):
        N, d = X.shape
        H = W1.shape[1]
        t = cuda.threadIdx.x
        s = cuda.blockIdx.x
        first = cuda.blockIdx.y * R
        count = min(R, N - first)
        at = s * N + first  # the block's rows of A and Z2
        red = cuda.shared.array(threads, X.dtype)
        block_z2 = cuda.shared.array(threads, X.dtype)
        sums = cuda.local.array(SUMS, X.dtype)
        w = cuda.local.array(TN, X.dtype)
        unit_threads = min(threads, (H + TN - 1) // TN)
        ranges = threads // unit_threads
        c = t % unit_threads
        g = t // unit_threads  # threads with g >= ranges get an empty range
        span = (d + ranges - 1) // ranges
        k_start = min(d, g * span)
        k_stop = min(d, k_start + span)
        zero = X.dtype.type(0)  # an int 0 would make the loads below float64, then convert
        rows = cuda.local.array(R, np.uint64)
        for r in range(R):
            rows[r] = first + min(r, count - 1)  # rows past the batch repeat its last
        units = cuda.local.array(TN, np.uint64)
        for base in range(0, H, unit_threads * TN):
            for v in range(TN):
                units[v] = min(base + c + v * unit_threads, H - 1)
            for e in range(SUMS):
                sums[e] = zero
            for i in range(k_start, k_stop):
                for v in range(TN):
                    w[v] = W1[_u(i), units[v]]  # units past H repeat its last, never stored
                for r in range(R):
                    x = X[rows[r], _u(i)]
                    for v in range(TN):
                        sums[r * TN + v] += x * w[v]
            for part in range(ranges):
                if g == part:
                    for r in range(R):
                        for v in range(TN):
                            j = base + c + v * unit_threads
                            if r < count and j < H:
                                z = sums[r * TN + v]
                                A[at + r, j] = z if part == 0 else A[at + r, j] + z
                cuda.syncthreads()
        for e in range(t, count * H, threads):
            r = e // H
            j = e - r * H
            A[at + r, j] = sigmoid(A[at + r, j] + b1[j])
        cuda.syncthreads()
        block_logits(A, at, W2, b2, count, pair_threads, red, t, Z2, at)
        cached = block_softmax(
            Z2, at, Y, first, count, True, s == 0, losses, predicted, block_z2, t
        )
        cuda.syncthreads()
        hidden_delta(A, at, Z2, at, W2, count, block_z2, cached, t, threads)
        cuda.syncthreads()
        # G's columns: ``cols`` at a time, each summed over the hidden units by ``parts``
        # threads (one range each), the ranges added in a fixed order
        width = (d + cuda.gridDim.x - 1) // cuda.gridDim.x
        i_start = s * width
        i_stop = min(d, i_start + width)
        cols = max(1, min(width, threads))
        parts = threads // cols
        col = t % cols
        part = t // cols  # threads with part >= parts get an empty range
        j_span = (H + parts - 1) // parts
        j_start = min(H, part * j_span)
        j_stop = min(H, j_start + j_span)
        partial = cuda.shared.array(PARTIALS, X.dtype)
        grads = cuda.local.array(R, X.dtype)
        a_rows = cuda.local.array(R, np.uint64)
        for r in range(R):
            a_rows[r] = at + min(r, count - 1)
        for i0 in range(i_start, i_stop, cols):
            i = min(i0 + col, i_stop - 1)  # columns past the slice repeat its last, never stored
            for r in range(R):
                grads[r] = zero
            for j in range(j_start, j_stop):
                w_ij = W1[_u(i), _u(j)]
                for r in range(R):
                    grads[r] += A[a_rows[r], _u(j)] * w_ij
            for r in range(R):
                partial[r * threads + t] = grads[r]
            cuda.syncthreads()
            if part == 0 and i0 + col < i_stop:
                for r in range(R):
                    dot = partial[r * threads + col]
                    for other in range(1, parts):
                        dot += partial[r * threads + other * cols + col]
                    if r < count:
                        n = first + r
                        out[n, i] = sign_step(X[n, i], dot, eps, x_min, x_max) if sign else dot
            cuda.syncthreads()

    return small
