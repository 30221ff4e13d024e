"""Numba CPU kernels of the Square attack (Andriushchenko et al. 2020), L-inf, L2 and L1.

``advgrad.square`` states the algorithm; these kernels run it, every query of a row in one
fused loop. A search on a row is a sequence of steps: step 0 takes the clean row's margin
and, unless it is classified wrong already, the random starting point; step i >= 1 is
update i - 1, one proposal with windows of side ``sides[i - 1]`` that is kept where it
lowers the margin. A row whose margin is below 0 is broken and takes no more steps. The
state of the search lives in arrays the caller keeps between calls, so that a search can
run in slices of steps: the best point ``X_best``, its margin, the queries used, the
size of its perturbation (squared L2 norm, or L1 norm) and ``hidden`` (N, 2, H) float64,
per row the hidden pre-activations x W1 + b1 of the clean row and Z1 of the best point.

The forward pass of a proposal is incremental. An L-inf proposal changes one window of
the best point: its Z1 is the best point's plus the change of each pixel that moved
times its row of W1 (a proposal that moves no pixel is the best point itself: it counts
as a query, and its margin, no lower, is not computed). An L2 proposal rescales the
whole perturbation delta by k = eps / ||delta'|| (k < 1 but by about 1e-12 / eps) after
changing two windows: its Z1 is x W1 + b1 plus k times the best point's delta W1, the
two windows' pixels then corrected to their exact values (clipped to the box, rounded to
X's dtype); a proposal whose k exceeds 1, where other pixels may meet the box, takes a
full forward pass. The sigmoid, the logits and the margin follow from Z1 (cost s * s * c
* H + H * C a query for a window of side s, not d * H + H * C). An L1 proposal is
projected onto the ball and the box as a whole (``apgd.project_l1_box``, expected
O(d log d) without a sort, and O(d) where the box alone keeps it in the ball), which may
move any pixel: it is built and projected in full (a few passes over d), and its Z1 is
the best point's plus the change of each pixel that differs from the best point once
rounded to X's dtype, times its row of W1 (in float32 the projection's shrinking of every
pixel by a tiny lam mostly rounds away, leaving the windows' pixels; in float64 every
nonzero pixel of the perturbation moves, about a forward pass).

Rounding. Z1, the sigmoid, the logits and the margins are float64, whatever X's dtype
(a float32 network is evaluated exactly on its float32 points, up to float64 rounding).
An incremental Z1 differs from a direct one (each pixel in turn, ``exact_hidden``) by
float64 rounding (L-inf), or by the rounding of the pixels outside the windows to X's
dtype (L2: in float32 about 1e-7 relative, in float64 1e-16; L1 as L-inf); so that this
cannot build up, Z1 is recomputed directly every ``REFRESH_UPDATES`` updates (a rule of the update
index, so that a row's result does not depend on how the steps are sliced), and the
margin of a kept proposal that breaks the row is recomputed directly before the row
stops. Points are computed in X's dtype as ``advgrad.square`` states: an L-inf window is
clip(x +- eps) in X's dtype, bitwise; an L2 perturbation is computed in float64 and each
pixel rounded to X's dtype once, then clipped; an L1 point is projected in float64 and
rounded to X's dtype to the nearest, or toward x where that would leave the ball of
radius eps (``l1_rounded_into``), so that it stays in the ball and the box.

Randomness: update i of a row draws from stream ``stream + 1 + i`` and the start from
``stream`` (``advgrad.kernels.random.uniform``, keyed by the row's absolute index in
``rows``); the columns are those the ``advgrad.square`` docstring lists.

The GPU runs ``square_row_steps`` and what it calls as they are (``advgrad.kernels.cuda.
square``), so they stay within what numba-cuda compiles: no allocation, no array
expressions, no slice assigned from an array, scalar math only (``next_toward``, not
np.nextafter); ``tests/test_square_cuda.py`` compiles them for a GPU.
"""

import math

import numpy as np
from numba import njit, prange

from advgrad.kernels.apgd import project_l1_box
from advgrad.kernels.cpu import clip, exp_nonpositive, next_toward
from advgrad.kernels.random import uniform

NORM_INF = 0
NORM_2 = 1
NORM_1 = 2
"""The norms of the search (the kernels' ``norm``)."""
NORM_CODES = {np.inf: NORM_INF, 2.0: NORM_2, 1.0: NORM_1}
"""The kernels' ``norm`` of each order p."""
ROWS_PER_BLOCK = 4
"""Rows a thread takes at a time: rows take very different numbers of queries (a broken row
stops), so the blocks are small (``numba.parallel_chunksize(1)`` around a call hands them
out one at a time)."""
REFRESH_UPDATES = 1000
"""Before updates 1000, 2000, ... each row's Z1 and margin are recomputed directly."""
START_GRID = 5
"""The L2 and L1 starts tile the image, centred, with windows of side min(h, w) // 5 (at
least 1)."""
REASSOCIATE = {"contract", "reassoc"}
"""The fastmath flags of the logits' dot products: reordered and fused, so that they
vectorise (in an order that depends on the compiled code only, not on the batch)."""
DIVISION_GUARD = 1e-12
"""Added to every norm the L2 and L1 steps divide by, as in the reference."""
L1_RADIUS = 1.0 - 1e-6
"""L1 points are projected onto the ball of radius eps * L1_RADIUS (the reference's), so
that rounding them to X's dtype rarely leaves the ball of radius eps."""


@njit(cache=True, error_model="numpy")
def sigmoid(z):
    """1 / (1 + exp(-z)) in float64 for any finite z (``exp_nonpositive`` of -|z|)."""
    t = exp_nonpositive(-abs(z))
    r = 1.0 / (1.0 + t)
    return r if z >= 0.0 else t * r


@njit(cache=True, error_model="numpy")
def exact_hidden(x, W1, b1, out):
    """out (H,) float64 = x W1 + b1 for one row x (d,), summed in float64 pixel by pixel in
    order (a zero pixel adds nothing and is skipped), b1 last."""
    out[:] = 0.0
    for p in range(x.shape[0]):
        value = np.float64(x[p])
        if value != 0.0:
            for j in range(out.shape[0]):
                out[j] += value * W1[p, j]
    for j in range(out.shape[0]):
        out[j] += b1[j]


@njit(cache=True, error_model="numpy", fastmath=REASSOCIATE)
def dot(u, v):
    """The dot product of u and v (n,) float64, summed in any order (``REASSOCIATE``)."""
    total = 0.0
    for j in range(u.shape[0]):
        total += u[j] * v[j]
    return total


@njit(cache=True, error_model="numpy")
def margin_from_hidden(z1, W2T, b2, label, a):
    """z_y - max_{k != y} z_k (float64) of the logits of hidden pre-activations z1 (H,)
    float64: a = sigmoid(z1) into a (H,) float64, z_k = a W2T[k] + b2[k] with W2T (C, H)
    float64."""
    for j in range(z1.shape[0]):
        a[j] = sigmoid(z1[j])
    own, other = 0.0, -np.inf
    for k in range(W2T.shape[0]):
        z = dot(a, W2T[k]) + b2[k]
        if k == label:
            own = z
        else:
            other = max(other, z)
    return own - other


@njit(cache=True, error_model="numpy")
def pixel(channel, row, column, channels, height, width, channels_last):
    """Index in a flat row of the pixel (channel, row, column) of its (c, h, w) image."""
    if channels_last:
        return (row * width + column) * channels + channel
    return (channel * height + row) * width + column


@njit(cache=True, error_model="numpy")
def window_position(u, length, side):
    """A window's start along an axis of ``length``: floor((length - side) u)."""
    return int((length - side) * u)


@njit(cache=True, error_model="numpy")
def magnitude(value, norm):
    """A pixel's share of the mass of its window (float64): value^2 (``NORM_2``), |value|
    (``NORM_1``)."""
    return abs(value) if norm == NORM_1 else value * value


@njit(cache=True, error_model="numpy")
def mass_norm(mass, norm):
    """The norm of a window of ``mass`` (``magnitude`` summed): sqrt(mass) (``NORM_2``),
    mass (``NORM_1``)."""
    return mass if norm == NORM_1 else math.sqrt(mass)


@njit(cache=True, error_model="numpy")
def pseudo_gaussian_into(side, norm, out):
    """The window out[:side, :side] float64 of unit norm (``NORM_2`` or ``NORM_1``),
    untransposed: its top side // 2 rows and its other rows (negated) each hold nested
    centred rectangles weighted 1 / (k + 1)^2 (L2) or 1 / (k + 1)^4 (L1) at distance k
    from their centre, each half of unit norm."""
    power = 4 if norm == NORM_1 else 2
    out[:side, :side] = 0.0
    half = side // 2
    for first, height, sign in ((0, half, 1.0), (half, side - half, -1.0)):
        for k in range(max(height, side) // 2 + 1):
            top, left = height // 2 - k, side // 2 - k
            for i in range(max(top, 0), min(top + 2 * k + 1, height)):
                for j in range(max(left, 0), min(left + 2 * k + 1, side)):
                    out[first + i, j] += sign / (k + 1) ** power
        mass = 0.0
        for i in range(first, first + height):
            for j in range(side):
                mass += magnitude(out[i, j], norm)
        if height:
            divide_window(out, first, height, side, mass_norm(mass, norm))
    mass = 0.0
    for i in range(side):
        for j in range(side):
            mass += magnitude(out[i, j], norm)
    divide_window(out, 0, side, side, mass_norm(mass, norm))


@njit(cache=True, error_model="numpy")
def divide_window(out, first, height, side, by):
    """out[first:first + height, :side] (float64) /= by."""
    for i in range(first, first + height):
        for j in range(side):
            out[i, j] /= by


@njit(cache=True, error_model="numpy")
def linf_start_row(x, row, seed, stream, eps, x_min, x_max, image, x_best):
    """x_best (d,) = x moved by +-eps in vertical stripes, clipped: the sign of channel ch
    and column j is that of the uniform number of column ch * w + j (-1 below 0.5)."""
    channels, height, width, channels_last = image
    for ch in range(channels):
        for column in range(width):
            step = -eps if uniform(seed, stream, row, ch * width + column) < 0.5 else eps
            for r in range(height):
                p = pixel(ch, r, column, channels, height, width, channels_last)
                x_best[p] = clip(x[p] + step, x_min, x_max)


@njit(cache=True, error_model="numpy")
def grid_start_row(x, row, seed, stream, eps, x_min, x_max, image, norm, work, x_best):
    """x_best (d,) = x moved along a centred grid of pseudo-Gaussian windows of ``norm``
    (``START_GRID``; ``NORM_2`` or ``NORM_1``), each transposed where its uniform number
    (column: the window, row-major over the grid) exceeds 0.5, with a sign per channel
    (column n_windows + window * c + ch): L2, that perturbation scaled to norm eps and
    clipped (``scaled_into``); L1, projected onto the L1 ball of radius eps * L1_RADIUS
    and the box (each window of each channel has L1 norm 1 before) and rounded
    (``l1_projected_into``). Returns the size of x_best - x: its squared L2 norm
    (``squared_distance``) or its L1 norm. ``work``: pattern (S, S) and delta (d,)
    float64, and the scratch of ``l1_projected_into``."""
    pattern, delta, projection = work
    channels, height, width, channels_last = image
    side = max(min(height, width) // START_GRID, 1)
    down, across = height // side, width // side
    n_windows = down * across
    pseudo_gaussian_into(side, norm, pattern)
    delta[:] = 0.0
    for window in range(n_windows):
        top = (height - side * down) // 2 + side * (window // across)
        left = (width - side * across) // 2 + side * (window % across)
        transposed = uniform(seed, stream, row, window) > 0.5
        for ch in range(channels):
            column = n_windows + window * channels + ch
            sign = -1.0 if uniform(seed, stream, row, column) < 0.5 else 1.0
            for i in range(side):
                for j in range(side):
                    p = pixel(ch, top + i, left + j, channels, height, width, channels_last)
                    delta[p] = sign * (pattern[j, i] if transposed else pattern[i, j])
    if norm == NORM_1:
        support, values = projection[0], projection[3]
        count, size = l1_projected_into(x, delta, eps, x_min, x_max, projection)
        copy_into(x, x_best)
        for t in range(count):
            x_best[support[t]] = values[t]
        return size
    scaled_into(x, delta, eps, math.sqrt(sum_of_squares(delta)), x_min, x_max, x_best)
    return squared_distance(x, x_best)


@njit(cache=True, error_model="numpy")
def scaled_pixel_into(x, moved, p, eps, norm, x_min, x_max, out):
    """out[p] = clip(x[p] + moved / (norm + DIVISION_GUARD) * eps), rounded to out's dtype
    before it is clipped: pixel p of an L2 point whose perturbation (float64) before its
    rescaling is ``moved`` there and has norm ``norm``."""
    out[p] = np.float64(x[p]) + moved / (norm + DIVISION_GUARD) * eps
    out[p] = clip(out[p], x_min, x_max)


@njit(cache=True, error_model="numpy")
def scaled_into(x, delta, eps, norm, x_min, x_max, out):
    """out (d,) = ``scaled_pixel_into`` of every pixel of delta (d,) float64."""
    for p in range(x.shape[0]):
        scaled_pixel_into(x, delta[p], p, eps, norm, x_min, x_max, out)


@njit(cache=True, error_model="numpy")
def linf_update_row(
    x, row, seed, stream, eps, x_min, x_max, image, side, W1, x_best, z1, moved, moved_to
):
    """An L-inf proposal: the window at the drawn (top, left) (columns 0, 1) set to
    clip(x +- eps), a sign per channel (columns 2, ...). Writes the proposal's Z1 into z1
    (H,) float64 (given the best point's), the moved pixels and their new values into
    ``moved`` (s * s * c,) int64 and ``moved_to`` (s * s * c,) x's dtype; returns how many
    pixels moved (0: the proposal is the best point, z1 untouched)."""
    channels, height, width, channels_last = image
    top = window_position(uniform(seed, stream, row, 0), height, side)
    left = window_position(uniform(seed, stream, row, 1), width, side)
    count = 0
    for ch in range(channels):
        step = -eps if uniform(seed, stream, row, 2 + ch) < 0.5 else eps
        for i in range(side):
            for j in range(side):
                p = pixel(ch, top + i, left + j, channels, height, width, channels_last)
                value = clip(x[p] + step, x_min, x_max)
                if value != x_best[p]:
                    moved[count] = p
                    moved_to[count] = value
                    count += 1
    for t in range(count):
        shift_hidden(z1, W1, moved[t], np.float64(moved_to[t]) - np.float64(x_best[moved[t]]))
    return count


@njit(cache=True, error_model="numpy")
def shift_hidden(z1, W1, p, change):
    """z1 (H,) float64 += change * W1[p]: Z1 after pixel p moved by change (float64)."""
    for h in range(z1.shape[0]):
        z1[h] += change * W1[p, h]


@njit(cache=True, error_model="numpy")
def in_window(r, c, top, left, side):
    """Whether pixel (r, c) lies in the side x side window at (top, left)."""
    return top <= r < top + side and left <= c < left + side


@njit(cache=True, error_model="numpy")
def copy_into(source, out):
    """out (n,) = source (n,), element by element (converted to out's dtype)."""
    for i in range(out.shape[0]):
        out[i] = source[i]


@njit(cache=True, error_model="numpy")
def sum_of_squares(v):
    """The sum of v[p]^2 (float64) over v (d,) float64, in order."""
    total = 0.0
    for p in range(v.shape[0]):
        total += v[p] * v[p]
    return total


@njit(cache=True, error_model="numpy")
def squared_distance(x, x_best):
    """||x_best - x||^2 (float64) of the float64 differences, summed in order."""
    total = 0.0
    for p in range(x.shape[0]):
        total += (np.float64(x_best[p]) - np.float64(x[p])) ** 2
    return total


@njit(cache=True, error_model="numpy")
def proposal_delta_into(x, x_best, image, side, windows, fresh, delta):
    """delta (d,) float64 = the perturbation x_best - x of an L2 or L1 proposal before its
    rescaling (L2) or projection (L1): the emptied window at windows[2:] zero, the
    receiving one at windows[:2] set to fresh (c, S, S)."""
    top, left, top_emptied, left_emptied = windows
    for p in range(x.shape[0]):
        delta[p] = np.float64(x_best[p]) - np.float64(x[p])
    for ch in range(image[0]):
        for i in range(side):
            for j in range(side):
                delta[pixel(ch, top_emptied + i, left_emptied + j, *image)] = 0.0
        for i in range(side):
            for j in range(side):
                delta[pixel(ch, top + i, left + j, *image)] = fresh[ch, i, j]


@njit(cache=True, error_model="numpy")
def two_windows(seed, stream, row, image, side):
    """The windows (top, left, top_emptied, left_emptied) of side ``side`` of an L2 or L1
    update, the one that receives and the one that is emptied (columns 0 to 3), and
    whether its pattern is transposed (column 4)."""
    height, width = image[1], image[2]
    top = window_position(uniform(seed, stream, row, 0), height, side)
    left = window_position(uniform(seed, stream, row, 1), width, side)
    top_emptied = window_position(uniform(seed, stream, row, 2), height, side)
    left_emptied = window_position(uniform(seed, stream, row, 3), width, side)
    transposed = uniform(seed, stream, row, 4) > 0.5
    return (top, left, top_emptied, left_emptied), transposed


@njit(cache=True, error_model="numpy")
def l1_rounded_into(x, v, eps, out):
    """out (d,) = v (d,) float64 rounded to out's dtype: to the nearest, or, where the L1
    norm of out - x (float64, summed in index order) would then exceed eps, each pixel
    toward x (so that out stays in the ball of radius eps whenever v is). Returns that
    norm."""
    total = 0.0
    for p in range(v.shape[0]):
        out[p] = v[p]
        total += abs(np.float64(out[p]) - np.float64(x[p]))
    if total <= eps:
        return total
    total = 0.0
    for p in range(v.shape[0]):
        if abs(np.float64(out[p]) - np.float64(x[p])) > abs(v[p] - np.float64(x[p])):
            out[p] = next_toward(out[p], x[p])
        total += abs(np.float64(out[p]) - np.float64(x[p]))
    return total


@njit(cache=True, error_model="numpy")
def l1_projected_into(x, delta, eps, x_min, x_max, work):
    """The nearest point to x + delta (x (d,) in the box [x_min, x_max], delta (d,)
    float64) of the L1 ball of radius eps * L1_RADIUS around x intersected with the box
    (``apgd.project_l1_box``, in float64), rounded by ``l1_rounded_into`` at eps, on the
    support of delta: the pixels where delta is 0 stay at x, and the projection of the
    others alone is that of the whole row (a zero adds nothing to its sums and is no
    breakpoint), in O(k log k) for k of them after one pass over d.

    ``work``: support (d,) int64, points (d,) float64, centres and values (d,) x's dtype,
    scratch (2 d,) float64. Returns k and the L1 norm of the point's perturbation; the
    point's pixel support[t] is values[t] for t < k, and x elsewhere.
    """
    support, points, centres, values, scratch = work
    k = 0
    for p in range(x.shape[0]):  # branch-free: keep the pixels where delta is not 0
        support[k] = p
        points[k] = np.float64(x[p]) + delta[p]
        centres[k] = x[p]
        k += 1 if delta[p] != 0.0 else 0
    project_l1_box(points[:k], centres[:k], eps * L1_RADIUS, x_min, x_max, scratch)
    return k, l1_rounded_into(centres[:k], points[:k], eps, values[:k])


@njit(cache=True, error_model="numpy")
def back_to_x(x, x_best, delta, p, moved, proposal, count):
    """Pixel p and its value x[p] appended to the first ``count`` moved pixels and their
    values (``moved``, ``proposal``) where the perturbation delta (d,) float64 of a
    proposal is 0 there and that of x_best is not. Returns the new count."""
    if delta[p] != 0.0 or x_best[p] == x[p]:
        return count
    moved[count] = p
    proposal[count] = x[p]
    return count + 1


@njit(cache=True, error_model="numpy")
def l1_update_row(x, row, seed, stream, eps, x_min, x_max, image, side, W1, x_best, size, work):
    """An L1 proposal (``advgrad.square``'s L1 update; the columns of the L2 update): the
    receiving window refilled (``fresh_window_into``), the emptied one zeroed, then the
    whole point projected onto the ball and the box (``l1_projected_into``).

    ``size``: ||x_best - x||_1; ``work``: a tuple of pattern (S, S), the window of
    ``side`` (``pseudo_gaussian_into``), and scratch: fresh (c, S, S), z1 (H,), delta (d,)
    float64, moved (d,) int64, proposal (d,) x's dtype and ``l1_projected_into``'s.
    Writes the pixels in which the proposal differs from x_best into moved, their new
    values into proposal (as ``linf_update_row``) and its Z1 into z1 (given the best
    point's): the projection may move any pixel of the perturbation's support, but only
    those that changed once rounded are added, their changes times their rows of W1.
    Returns how many pixels moved (0: the proposal is the best point) and the L1 norm of
    the proposal's perturbation."""
    pattern, fresh, z1, delta, moved, proposal, projection = work
    support, values = projection[0], projection[3]
    windows, transposed = two_windows(seed, stream, row, image, side)
    top, left, top_emptied, left_emptied = windows
    free = max(eps - size, 0.0) / image[0]
    for ch in range(image[0]):
        sign = -1.0 if uniform(seed, stream, row, 5 + ch) < 0.5 else 1.0
        shape = (side, windows, pattern, transposed, sign)
        fresh_window_into(x, x_best, image, shape, ch, NORM_1, free, fresh)
    proposal_delta_into(x, x_best, image, side, windows, fresh, delta)
    k, new_size = l1_projected_into(x, delta, eps, x_min, x_max, projection)
    count = 0
    for t in range(k):
        if values[t] != x_best[support[t]]:
            moved[count] = support[t]
            proposal[count] = values[t]
            count += 1
    for ch in range(image[0]):  # the windows' pixels that left the support go back to x
        for i in range(side):
            for j in range(side):
                r, c = top_emptied + i, left_emptied + j
                if not in_window(r, c, top, left, side):  # else the receiving one has it
                    count = back_to_x(
                        x, x_best, delta, pixel(ch, r, c, *image), moved, proposal, count
                    )
                p = pixel(ch, top + i, left + j, *image)
                count = back_to_x(x, x_best, delta, p, moved, proposal, count)
    for t in range(count):
        shift_hidden(z1, W1, moved[t], np.float64(proposal[t]) - np.float64(x_best[moved[t]]))
    return count, new_size


@njit(cache=True, error_model="numpy")
def fresh_window_into(x, x_best, image, shape, ch, norm, free, fresh):
    """Channel ch of the receiving window of an L2 or L1 proposal (``norm``), into
    fresh[ch] (S, S) float64, as the reference computes it: the window ``pattern``
    (transposed or not) times ``sign``, plus the best point's perturbation there divided
    by its norm, scaled to the norm sqrt(free + union) (L2) or to (free + union) * c (L1),
    with ``union`` the mass (``magnitude`` summed) of the best point's perturbation over
    both windows and ``free`` the unused mass of the ball per channel. ``shape``: (side,
    windows (top, left, top_emptied, left_emptied), pattern, transposed, sign). Returns
    union."""
    side, windows, pattern, transposed, sign = shape
    top, left, top_emptied, left_emptied = windows
    old, union, mass = 0.0, 0.0, 0.0
    for i in range(side):
        for j in range(side):
            p = pixel(ch, top_emptied + i, left_emptied + j, *image)
            union += magnitude(np.float64(x_best[p]) - np.float64(x[p]), norm)
            p = pixel(ch, top + i, left + j, *image)
            moved = magnitude(np.float64(x_best[p]) - np.float64(x[p]), norm)
            old += moved
            if not in_window(top + i, left + j, top_emptied, left_emptied, side):
                union += moved
    for i in range(side):
        for j in range(side):
            p = pixel(ch, top + i, left + j, *image)
            weight = pattern[j, i] if transposed else pattern[i, j]
            moved = np.float64(x_best[p]) - np.float64(x[p])
            fresh[ch, i, j] = weight * sign + moved / (DIVISION_GUARD + mass_norm(old, norm))
            mass += magnitude(fresh[ch, i, j], norm)
    budget = (free + union) * image[0] if norm == NORM_1 else math.sqrt(free + union)
    for i in range(side):
        for j in range(side):
            fresh[ch, i, j] = fresh[ch, i, j] / (DIVISION_GUARD + mass_norm(mass, norm)) * budget
    return union


@njit(cache=True, error_model="numpy")
def l2_update_row(
    x, row, seed, stream, eps, x_min, x_max, image, side, W1, b1, x_best, squares, hidden, work
):
    """An L2 proposal (``advgrad.square``'s L2 update; columns: top and left of the window
    that receives, of the window that is emptied, the transposition, a sign per channel).

    ``squares``: ||x_best - x||^2; ``hidden`` (2, H) float64: x W1 + b1 and Z1 of x_best;
    ``work``: a tuple of pattern (S, S), the window of ``side`` (``pseudo_gaussian_into``),
    and scratch: fresh (c, S, S), z1 (H,), delta (d,) float64 and proposal (d,) x's dtype.
    Writes the receiving window's new
    perturbation into fresh, the proposal's Z1 into z1 and its pixels in the two windows
    into proposal. Returns the norm of the proposal's perturbation before its rescaling
    and the windows (top, left, top_emptied, left_emptied): ``proposal_delta_into`` and
    ``scaled_into`` of them give the proposal.
    """
    pattern, fresh, z1, delta, proposal = work
    channels, height, width, channels_last = image
    windows, transposed = two_windows(seed, stream, row, image, side)
    top, left, top_emptied, left_emptied = windows
    free = max(eps * eps - squares, 0.0) / channels
    new_squares = squares
    for ch in range(channels):
        sign = -1.0 if uniform(seed, stream, row, 5 + ch) < 0.5 else 1.0
        shape = (side, windows, pattern, transposed, sign)
        new_squares -= fresh_window_into(x, x_best, image, shape, ch, NORM_2, free, fresh)
        for i in range(side):
            for j in range(side):
                new_squares += fresh[ch, i, j] ** 2
    norm = math.sqrt(max(new_squares, 0.0))
    scale = eps / (norm + DIVISION_GUARD)
    if scale > 1.0:  # pixels outside the windows may meet the box: a direct pass
        proposal_delta_into(x, x_best, image, side, windows, fresh, delta)
        scaled_into(x, delta, eps, norm, x_min, x_max, proposal)
        exact_hidden(proposal, W1, b1, z1)
        return norm, windows
    for h in range(z1.shape[0]):
        z1[h] = hidden[0, h] + scale * (hidden[1, h] - hidden[0, h])
    box = (x_min, x_max)
    for ch in range(channels):  # the pixels of both windows, each once, to their exact values
        for i in range(side):
            for j in range(side):
                r, c = top_emptied + i, left_emptied + j
                if not in_window(r, c, top, left, side):
                    p = pixel(ch, r, c, channels, height, width, channels_last)
                    _correct(x, x_best[p], p, 0.0, eps, norm, scale, *box, W1, z1, proposal)
                p = pixel(ch, top + i, left + j, channels, height, width, channels_last)
                moved = fresh[ch, i, j]
                _correct(x, x_best[p], p, moved, eps, norm, scale, *box, W1, z1, proposal)
    return norm, windows


@njit(cache=True, error_model="numpy")
def _correct(x, best_p, p, moved, eps, norm, scale, x_min, x_max, W1, z1, proposal):
    """Z1 of an L2 proposal, whose pixel p is taken as x[p] + scale (best_p - x[p]), set
    right for pixel p: its exact value (``scaled_pixel_into`` of ``moved``, written to
    proposal[p]) times its row of W1."""
    scaled_pixel_into(x, moved, p, eps, norm, x_min, x_max, proposal)
    x_p = np.float64(x[p])
    shift_hidden(z1, W1, p, (np.float64(proposal[p]) - x_p) - scale * (np.float64(best_p) - x_p))


@njit(cache=True, error_model="numpy")
def row_workspace(X, W1, image):
    """Scratch of one row's steps: pattern (S, S), fresh (c, S, S), z1 and a (H,), delta
    (d,) float64, proposal (d,) X's dtype, moved (d,) int64 and the scratch of
    ``l1_projected_into``, for S = min(h, w)."""
    S = min(image[1], image[2])
    H, d = W1.shape[1], X.shape[1]
    return (
        np.empty((S, S)),
        np.empty((image[0], S, S)),
        np.empty(H),
        np.empty(H),
        np.empty(d),
        np.empty(d, dtype=X.dtype),
        np.empty(d, dtype=np.int64),
        (
            np.empty(d, dtype=np.int64),
            np.empty(d),
            np.empty(d, dtype=X.dtype),
            np.empty(d, dtype=X.dtype),
            np.empty(2 * d),
        ),
    )


@njit(cache=True, error_model="numpy")
def keep(n, z1, margin, x_best, W1, b1, W2T, b2, label, hidden, margins, a):
    """Take a proposal (already in x_best[n]) of Z1 z1 and margin ``margin`` as row n's best
    point; a margin below 0 is recomputed directly from x_best[n] first."""
    copy_into(z1, hidden[n, 1])
    margins[n] = margin
    if margin < 0.0:
        exact_hidden(x_best[n], W1, b1, hidden[n, 1])
        margins[n] = margin_from_hidden(hidden[n, 1], W2T, b2, label, a)


@njit(cache=True, error_model="numpy")
def square_row_steps(
    n, X, W1, b1, W2T, b2, labels, rows, seed, stream, norm, eps, x_min, x_max, image, sides,
    first, count, X_best, margins, queries_used, hidden, sizes, work,
):  # fmt: skip
    """Steps first, ..., first + count - 1 of row n's search (``square_steps_into``)."""
    pattern, fresh, z1, a, delta, proposal, moved, projection = work
    x, label, row = X[n], labels[n], rows[n]
    network = (W1, b1, W2T, b2, label)
    eps2 = np.float64(eps)
    pattern_side = 0  # the side of the window in pattern (L2 and L1 updates)
    for step in range(first, first + count):
        if step == 0:
            exact_hidden(x, W1, b1, hidden[n, 0])
            copy_into(hidden[n, 0], hidden[n, 1])
            copy_into(x, X_best[n])
            margins[n] = margin_from_hidden(hidden[n, 0], W2T, b2, label, a)
            queries_used[n] = 0
            sizes[n] = 0.0
            if margins[n] < 0.0:
                return
            if norm == NORM_INF:
                linf_start_row(x, row, seed, stream, eps, x_min, x_max, image, X_best[n])
            else:
                sizes[n] = grid_start_row(
                    *(x, row, seed, stream, eps2, x_min, x_max, image, norm),
                    *((pattern, delta, projection), X_best[n]),
                )
            exact_hidden(X_best[n], W1, b1, hidden[n, 1])
            margins[n] = margin_from_hidden(hidden[n, 1], W2T, b2, label, a)
            queries_used[n] = 1
            continue
        if not margins[n] >= 0.0:
            return
        update = step - 1
        if update > 0 and update % REFRESH_UPDATES == 0:
            exact_hidden(X_best[n], W1, b1, hidden[n, 1])
            margins[n] = margin_from_hidden(hidden[n, 1], W2T, b2, label, a)
            if margins[n] < 0.0:
                return
        side, draws = sides[update], stream + 1 + update
        queries_used[n] += 1
        copy_into(hidden[n, 1], z1)
        if norm != NORM_INF and side != pattern_side:
            pseudo_gaussian_into(side, norm, pattern)
            pattern_side = side
        if norm == NORM_2:
            scale_norm, windows = l2_update_row(
                *(x, row, seed, draws, eps2, x_min, x_max, image, side, W1, b1, X_best[n]),
                *(sizes[n], hidden[n], (pattern, fresh, z1, delta, proposal)),
            )
            margin = margin_from_hidden(z1, W2T, b2, label, a)
            if margin < margins[n]:
                proposal_delta_into(x, X_best[n], image, side, windows, fresh, delta)
                scaled_into(x, delta, eps2, scale_norm, x_min, x_max, X_best[n])
                sizes[n] = squared_distance(x, X_best[n])
                keep(n, z1, margin, X_best, *network, hidden, margins, a)
            continue
        if norm == NORM_INF:
            size = 0.0
            changed = linf_update_row(
                *(x, row, seed, draws, eps, x_min, x_max, image, side, W1, X_best[n]),
                *(z1, moved, proposal),
            )
        else:
            changed, size = l1_update_row(
                *(x, row, seed, draws, eps2, x_min, x_max, image, side, W1, X_best[n]),
                *(sizes[n], (pattern, fresh, z1, delta, moved, proposal, projection)),
            )
        if changed == 0:  # the proposal is the best point: its margin is no lower
            continue
        margin = margin_from_hidden(z1, W2T, b2, label, a)
        if margin < margins[n]:
            for t in range(changed):
                X_best[n, moved[t]] = proposal[t]
            sizes[n] = size
            keep(n, z1, margin, X_best, *network, hidden, margins, a)


@njit(cache=True, error_model="numpy")
def square_steps_block(
    X, W1, b1, W2, b2, labels, rows, seed, stream, norm, eps, x_min, x_max, image, sides,
    first, count, X_best, margins, queries_used, hidden, sizes,
):  # fmt: skip
    """``square_steps_into`` on its rows in turn, serial."""
    W1_64, W2T = W1.astype(np.float64), np.ascontiguousarray(W2.T).astype(np.float64)
    work = row_workspace(X, W1, image)
    for n in range(X.shape[0]):
        square_row_steps(
            *(n, X, W1_64, b1, W2T, b2, labels, rows, seed, stream, norm, eps, x_min, x_max),
            *(image, sides, first, count, X_best, margins, queries_used, hidden, sizes),
            work,
        )


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def square_steps_into(
    X, W1, b1, W2, b2, labels, rows, seed, stream, norm, eps, x_min, x_max, image, sides,
    first, count, X_best, margins, queries_used, hidden, sizes,
):  # fmt: skip
    """Steps first, ..., first + count - 1 of the Square search of every row.

    Parameters
    ----------
    X : (N, d) float32 or float64, the clean rows
    W1, b1, W2, b2 : the network, X's dtype (W1 and W2 are taken in float64: a float32
        network's subnormal weights, each product with which costs a microcode assist,
        become normal numbers, and every product is the same)
    labels : (N,) int64, the true classes
    rows : (N,) int64, each row's absolute index (its random numbers depend on it)
    seed : int in [0, 2**63); stream : int, the start's stream (update i: stream + 1 + i)
    norm : ``NORM_INF``, ``NORM_2`` or ``NORM_1``
    eps, x_min, x_max : X's dtype scalars, the radius and the box
    image : (c, h, w, channels_last) ints, how a row of d = c h w features is an image
    sides : (queries,) int64, the window side of each update (at most min(h, w))
    first, count : ints, the steps to run (step 0 the start; step i update i - 1)
    X_best : (N, d) X's dtype, the best points (written by step 0)
    margins : (N,) float64, their margins z_y - max_{k != y} z_k (below 0: broken)
    queries_used : (N,) int64, the forward passes each row took, the clean one not counted
    hidden : (N, 2, H) float64, x W1 + b1 of the clean rows and Z1 of the best points
    sizes : (N,) float64, per row ||X_best - X||^2 (L2, ``squared_distance``) or
        ||X_best - X||_1 (L1, ``l1_rounded_into``); 0 for L-inf

    Each row's steps read and write only that row (and the scratch of the thread that
    runs it), so results do not depend on the thread count or the batch.
    """
    W1_64, W2T = W1.astype(np.float64), np.ascontiguousarray(W2.T).astype(np.float64)
    blocks = (X.shape[0] + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
    for block in prange(blocks):
        work = row_workspace(X, W1, image)
        for n in range(block * ROWS_PER_BLOCK, min((block + 1) * ROWS_PER_BLOCK, X.shape[0])):
            square_row_steps(
                *(n, X, W1_64, b1, W2T, b2, labels, rows, seed, stream, norm, eps, x_min, x_max),
                *(image, sides, first, count, X_best, margins, queries_used, hidden, sizes),
                work,
            )
