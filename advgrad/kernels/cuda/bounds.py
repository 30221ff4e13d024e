"""CUDA kernels of the certified bounds, the GPU twin of ``cpu.py``'s "certified bounds".

The same bounds as ``advgrad.kernels.cpu.margin_bounds_into`` and ``certified_radius_into``
(interval bounds, and CROWN-style linear bounds through ``sigmoid_lower_line`` and
``sigmoid_upper_line``), in float64, each loosened by ``BOUND_ROUNDING`` times the magnitude
of the terms it sums as the CPU's are: that allowance holds for a sum in any order, with or
without fused multiply-adds, so these bounds are as sound as the CPU's and equal to them
within float64 rounding.

One thread block works on one row at a time (``block_margin_bound``), its threads striding
over the inputs and the hidden units, with block reductions for the sums; each block has a
row of scratch in ``work``. ``certified_radius_kernel`` runs a row's whole search (eps = 0,
the grid, the bisection) in its block. ``advgrad.kernels.cuda.bound_launchers`` launches them.
"""

import functools
import math

import numpy as np

from advgrad.kernels.cpu import BOUND_ROUNDING
from advgrad.kernels.cuda.device import clip, row_reduce, sigmoid
from advgrad.kernels.cuda.internals import cuda

__all__ = [
    "block_margin_bound",
    "bound_constants",
    "certified_radius_kernel",
    "margin_bounds_kernel",
    "sigmoid_lower_line",
    "sigmoid_slope",
    "sigmoid_upper_line",
]


@cuda.jit(device=True)
def sigmoid_slope(z):
    """sigmoid'(z) = sigmoid(z) (1 - sigmoid(z)), accurate for any finite z."""
    t = math.exp(-abs(z))
    r = 1.0 / (1.0 + t)
    return t * r * r


@cuda.jit(device=True)
def sigmoid_upper_line(l, u, steps):
    """Slope a and intercept b with a z + b >= sigmoid(z) for every z in [l, u]: the chord,
    a tangent, or the tangent found by ``steps`` bisection steps, as
    ``cpu.sigmoid_upper_line`` (whose docstring says why each is valid)."""
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


@cuda.jit(device=True)
def sigmoid_lower_line(l, u, steps):
    """Slope a and intercept b with a z + b <= sigmoid(z) for every z in [l, u]: the upper
    line of [-u, -l], reflected (sigmoid(z) = 1 - sigmoid(-z))."""
    a, b = sigmoid_upper_line(-u, -l, steps)
    return a, 1.0 - b


@cuda.jit
def bound_constants(W1, W1T, col1, col2):
    """Per-network constants, a thread per hidden unit j (grid-stride): ``W1T`` (H, d) = W1^T
    (float64), ``col1[j]`` = sum_i |W1[i, j]|, ``col2[j]`` = sqrt(sum_i W1[i, j]^2)."""
    d, H = W1.shape
    for j in range(cuda.grid(1), H, cuda.gridsize(1)):
        total = 0.0
        square = 0.0
        for i in range(d):
            w = W1[i, j]
            W1T[j, i] = w
            total += abs(w)
            square += w * w
        col1[j] = total
        col2[j] = math.sqrt(square)


@cuda.jit(device=True)
def block_margin_bound(
    X, n, y, e, p, x_min, x_max, W1, W1T, b1, W2, b2, col1, col2, crown, steps, S, red, t, threads
):
    """Lower bound of min over k != y of z_y - z_k over row n's region of radius e, as
    ``cpu.margin_bound_block`` computes it for one row; returned to every thread.

    Every thread of the block must call it (``threads`` of them, a power of two; ``t`` is
    this one). ``S`` is the block's float64 scratch of ``2 d + 9 H`` entries, ``red`` a
    shared float64 array with an entry per thread; ``W1T``, ``col1``, ``col2`` are
    ``bound_constants``. The sums are block reductions, in another order than the CPU's.
    """
    d, H = W1.shape
    C = W2.shape[1]
    CEN, RAD = 0, d  # the input box: centre and half-widths
    SL, SU = 2 * d, 2 * d + H  # sigmoid of the lower and upper pre-activation bounds
    AL, BL = 2 * d + 2 * H, 2 * d + 3 * H  # CROWN: the lower lines
    AU, BU = 2 * d + 4 * H, 2 * d + 5 * H  # CROWN: the upper lines
    ZL, ZU = 2 * d + 6 * H, 2 * d + 7 * H  # the pre-activation bounds l and u
    LAM = 2 * d + 8 * H  # CROWN: coefficients of the pre-activations for one class
    outside = 0.0
    scale = 0.0
    for i in range(t, d, threads):
        x = X[n, i]
        if not (x >= x_min and x <= x_max):
            outside = 1.0
        lo = min(x, clip(x - e, x_min, x_max))
        hi = max(x, clip(x + e, x_min, x_max))
        S[CEN + i] = 0.5 * (lo + hi)
        S[RAD + i] = 0.5 * (hi - lo) + BOUND_ROUNDING * (abs(lo) + abs(hi))
        scale = max(scale, abs(S[CEN + i]) + S[RAD + i])
    ball = p != math.inf and row_reduce(red, t, threads, outside, True) == 0.0
    scale = row_reduce(red, t, threads, scale, True)
    for j in range(t, H, threads):
        z = 0.0
        r = 0.0
        z0 = 0.0
        for i in range(d):
            w = W1[i, j]
            z += S[CEN + i] * w
            r += S[RAD + i] * abs(w)
            if ball:
                z0 += X[n, i] * w
        z += b1[j]
        slack = BOUND_ROUNDING * (scale * col1[j] + abs(b1[j]) + r)
        lo = z - r - slack
        hi = z + r + slack
        if ball:  # the ball too
            r = e * col2[j]
            z = z0 + b1[j]
            slack = BOUND_ROUNDING * (scale * col1[j] + abs(b1[j]) + r)
            lo = max(lo, z - r - slack)
            hi = min(hi, z + r + slack)
        S[ZL + j] = lo
        S[ZU + j] = hi
        S[SL + j] = sigmoid(lo)
        S[SU + j] = sigmoid(hi)
        if crown:
            S[AL + j], S[BL + j] = sigmoid_lower_line(lo, hi, steps)
            S[AU + j], S[BU + j] = sigmoid_upper_line(lo, hi, steps)
    cuda.syncthreads()
    crown_scale = scale + e  # max_i |centre_i| + half-width_i + e, as the CPU rounds it
    lowest = math.inf
    for k in range(C):
        if k == y:
            continue
        bias = b2[y] - b2[k]
        # interval bounds: each activation anywhere in [sigmoid(l), sigmoid(u)]
        total = 0.0
        size = 0.0
        for j in range(t, H, threads):
            c = W2[j, y] - W2[j, k]
            total += min(c * S[SL + j], c * S[SU + j])
            size += abs(c)
        total = row_reduce(red, t, threads, total, False)
        size = row_reduce(red, t, threads, size, False)
        bound = (bias + total) - BOUND_ROUNDING * (abs(bias) + size)
        if crown:
            # c_j sigmoid(z_j) >= c_j (a_j z_j + b_j): the lower line where c_j >= 0, the
            # upper one where c_j < 0; z = x W1 + b1 makes it linear in x
            const = 0.0
            size = 0.0
            for j in range(t, H, threads):
                c = W2[j, y] - W2[j, k]
                upper = c < 0.0
                lam = c * (S[AU + j] if upper else S[AL + j])
                intercept = c * (S[BU + j] if upper else S[BL + j])
                S[LAM + j] = lam
                const += intercept + lam * b1[j]
                size += abs(intercept) + abs(lam * b1[j]) + crown_scale * col1[j] * abs(lam)
            const = bias + row_reduce(red, t, threads, const, False)
            size = abs(bias) + row_reduce(red, t, threads, size, False)
            value = 0.0
            terms = 0.0
            ball_value = 0.0
            square = 0.0
            for i in range(t, d, threads):
                g = 0.0
                for j in range(H):
                    g += S[LAM + j] * W1T[j, i]
                value += g * S[CEN + i] - abs(g) * S[RAD + i]
                terms += abs(g) * (abs(S[CEN + i]) + S[RAD + i])
                if ball:
                    ball_value += g * X[n, i]
                    square += g * g
            value = row_reduce(red, t, threads, value, False)
            size += row_reduce(red, t, threads, terms, False)
            if ball:  # the ball: x g - e ||g||_2
                ball_value = row_reduce(red, t, threads, ball_value, False)
                length = math.sqrt(row_reduce(red, t, threads, square, False))
                value = max(value, ball_value - e * length)
                size += e * length
            bound = max(bound, value + const - BOUND_ROUNDING * size)
        lowest = min(lowest, bound)
    return lowest


@functools.cache
def margin_bounds_kernel(threads: int):
    """The margin-bound kernel for blocks of ``threads`` threads (a power of two).

    ``margin_bounds[blocks, threads, stream](X, labels, eps, p, x_min, x_max, W1, W1T, b1,
    W2, b2, col1, col2, crown, steps, work, worst)``: block w takes rows w, w + blocks, ...
    (``block_margin_bound``, its scratch ``work[w]``) and writes ``worst[n]``.
    """

    @cuda.jit
    def margin_bounds(
        X, labels, eps, p, x_min, x_max, W1, W1T, b1, W2, b2, col1, col2, crown, steps, work, worst
    ):
        t = cuda.threadIdx.x
        w = cuda.blockIdx.x
        red = cuda.shared.array(threads, np.float64)
        network = (W1, W1T, b1, W2, b2, col1, col2, crown, steps)
        for n in range(w, X.shape[0], cuda.gridDim.x):
            bound = block_margin_bound(
                X, n, labels[n], eps[n], p, x_min, x_max, *network, work[w], red, t, threads
            )
            if t == 0:
                worst[n] = bound

    return margin_bounds


@functools.cache
def certified_radius_kernel(threads: int):
    """The certified-radius kernel for blocks of ``threads`` threads (a power of two).

    ``certified_radius[blocks, threads, stream](X, labels, eps_grid, p, x_min, x_max, W1,
    W1T, b1, W2, b2, col1, col2, crown, steps, tolerance, work, radius, certified)``: block
    w takes rows w, w + blocks, ... and runs each one's search as
    ``cpu.certified_radius_block`` does: the bound at eps = 0 (a row failing there gets
    radius 0 and no certificate), at every eps of the grid, then the bisection between the
    largest certified grid value and the smallest larger failing one, at most 200 steps,
    until they are within ``tolerance``. Writes ``radius[n]`` and ``certified[n, :]``.
    """

    @cuda.jit
    def certified_radius(
        X,
        labels,
        eps_grid,
        p,
        x_min,
        x_max,
        W1,
        W1T,
        b1,
        W2,
        b2,
        col1,
        col2,
        crown,
        steps,
        tolerance,
        work,
        radius,
        certified,
    ):
        t = cuda.threadIdx.x
        w = cuda.blockIdx.x
        E = eps_grid.shape[0]
        red = cuda.shared.array(threads, np.float64)
        network = (W1, W1T, b1, W2, b2, col1, col2, crown, steps)
        for n in range(w, X.shape[0], cuda.gridDim.x):
            y = labels[n]
            region = (X, n, y)
            clip_range = (p, x_min, x_max)
            S = work[w]
            clean = block_margin_bound(*region, 0.0, *clip_range, *network, S, red, t, threads)
            clean = clean > 0.0
            low = 0.0
            for g in range(E):
                passed = clean
                if clean:
                    bound = block_margin_bound(
                        *region, eps_grid[g], *clip_range, *network, S, red, t, threads
                    )
                    passed = bound > 0.0
                if t == 0:
                    certified[n, g] = passed  # for now: the grid's verdicts
                if passed:
                    low = max(low, eps_grid[g])
            cuda.syncthreads()
            high = math.inf
            for g in range(E):
                if eps_grid[g] > low and not certified[n, g]:
                    high = min(high, eps_grid[g])
            if not clean or high == math.inf:
                high = low  # not certified even at 0, or certified on the whole grid
            for _ in range(200):
                if not high - low > tolerance:
                    break
                middle = 0.5 * (low + high)
                bound = block_margin_bound(
                    *region, middle, *clip_range, *network, S, red, t, threads
                )
                if bound > 0.0:
                    low = middle
                else:
                    high = middle
            cuda.syncthreads()  # every thread has read the grid's verdicts
            if t == 0:
                radius[n] = low
                for g in range(E):
                    certified[n, g] = clean and low >= eps_grid[g]

    return certified_radius
