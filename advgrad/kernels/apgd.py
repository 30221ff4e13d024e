"""Numba CPU kernels of APGD (Croce & Hein 2020; L1: Croce & Hein 2021, "Mind the box").

``advgrad.apgd`` states the algorithm; these kernels run it. An APGD run on a row is a
sequence of iterations 0, 1, ..., steps: iteration i evaluates the iterate (the loss, its
gradient G and the prediction), keeps the books (the last misclassified iterate, the best
point and its gradient, the count of steps that raised the loss), decides at a checkpoint
whether to shrink the step and go back to the best point, and, but for the last
iteration, moves to the next iterate. Every row runs every iteration, and a row's
iteration reads and writes only that row, so the work is per row and per block of rows:

- ``apgd_steps_into`` runs iterations on every block of rows with the gradient fused in
  (``cpu.loss_gradient_block`` on the block, then the update of its rows): G lives in the
  block's scratch and never reaches memory, a pass over the rows per iteration saved;
- ``apgd_update_into`` is the update alone, given G, the losses and the predictions of
  the iterates (for gradients computed elsewhere); ``apgd_steps_into`` gives bitwise what
  ``cpu.loss_gradient_into`` and ``apgd_update_into`` give in turn;
- ``apgd_start_into`` projects the starting points.

The state of a run is held in arrays the caller passes in and keeps between calls (so a
run can go in slices of iterations): the iterate ``current`` and the one before it
``previous``, the best point ``best`` and its gradient ``best_G``, the last misclassified
iterate ``adversarial`` (all (N, d), X's dtype) and ``state`` (N, ``STATE_FIELDS``)
float64, per row its step size, losses, counters and flags (the ``STATE_*`` columns; the
losses and step sizes, of X's dtype, are held exactly).

Arithmetic runs in X's dtype, each operation rounded to it, in the order of the numpy
version this replaced (``sign(G) * eta + x``, then ``x + a (z - x) + (1 - a) (x - x_prev)``),
so that for the norm inf the iterates are bitwise those of that version; the norms of
the L2 and L1 steps are summed in float64.

The checkpoints come as ``windows`` (steps + 1,) int64: ``windows[i]`` > 0 is the length of
the window that ends after iteration i (steps done). L-inf and L2 halve the step on the
two conditions of the paper; L1 follows the sparsity schedule of l1-APGD.
"""

import math

import numpy as np
from numba import njit, prange

from advgrad.kernels.blas import pin_blas, unpin_blas
from advgrad.kernels.cpu import (
    block_rows,
    clip,
    largest_magnitudes,
    loss_gradient_block,
    n_blocks,
)

MOMENTUM = 0.75
"""a of the momentum step x + a (z - x) + (1 - a) (x - x_prev) (L-inf and L2)."""
RHO = 0.75
"""Condition (1): a window in which at most this fraction of the steps raised the loss."""
INITIAL_STEP = 2.0
"""eta starts at INITIAL_STEP * eps (L-inf and L2)."""
L1_INITIAL_STEP = 1.0
"""L1: eta starts at L1_INITIAL_STEP * eps, the largest it gets."""
L1_FIRST_TOPK = 0.2
"""L1: the fraction of the coordinates the first steps move (the largest |G|)."""
L1_STEP_DECREASE = 1.5
"""L1: at a checkpoint where the best point did not get sparser, eta /= this."""
L1_SMALLEST_STEP = 10.0
"""L1: eta stays at least L1_INITIAL_STEP * eps / this."""
L1_SPARSER = 0.95
"""L1: the best point got sparser when its count of moved coordinates fell below this
fraction of the count at the checkpoint before; the step is then reset and the run goes
back to the best point."""
L1_TOPK_SHRINK = 1.5
"""L1: after a checkpoint the steps move (moved coordinates of the best point) / this."""
L1_OFFSET = 1e-10
"""L1: added to the count of moved coordinates that divides eta (the reference's 1e-10)."""

STATE_ETA = 0
"""The step size eta (X's dtype)."""
STATE_LAST = 1
"""The loss of the last iterate."""
STATE_BEST = 2
"""The best loss so far (of ``best``)."""
STATE_BEST_AT_CHECK = 3
"""The best loss at the last checkpoint."""
STATE_INCREASES = 4
"""Steps of the current window that raised the loss over the step before."""
STATE_HALVED = 5
"""1 when the last checkpoint halved eta (1 at the start)."""
STATE_TOPK = 6
"""L1: the fraction of the coordinates a step moves."""
STATE_SPARSITY = 7
"""L1: the moved coordinates of the best point at the last checkpoint (d at the start)."""
STATE_BROKEN = 8
"""1 once an iterate was misclassified (``adversarial`` holds the last such)."""
STATE_FIELDS = 9


@njit(cache=True, error_model="numpy")
def room(x, y, lo, hi):
    """The room to the box [lo, hi] from x along the sign of y (float64), at least 0."""
    return max(hi - np.float64(x) if y > 0.0 else np.float64(x) - lo, 0.0)


@njit(cache=True, error_model="numpy")
def l1_box_norm(v, x, lam, lo, hi):
    """The L1 norm of the perturbation of ``project_l1_box`` at lam: the sum over i, in
    index order and float64, of min(max(|y_i| - lam, 0), cap_i) for y = v - x (d,) and
    cap_i the room to the box [lo, hi] along y_i; non-increasing in lam."""
    total = 0.0
    for i in range(v.shape[0]):
        y = np.float64(v[i]) - np.float64(x[i])
        total += min(max(abs(y) - lam, 0.0), room(x[i], y, lo, hi))
    return total


@njit(cache=True, error_model="numpy")
def project_l1_box(v, x, eps, lo, hi, scratch):
    """Move v (d,) in place to the nearest point (Euclidean) of the L1 ball of radius eps
    around x intersected with the box [lo, hi]^d, in float64 (the reference's
    ``L1_projection``, for any box that holds x).

    The perturbation y = v - x goes to sign(y) min(max(|y| - lam, 0), cap) with cap the
    room to the box in y's direction and lam >= 0 where its L1 norm (``l1_box_norm``, a
    piecewise linear function of lam) is eps. Its breakpoints are |y_i| (where y_i starts
    to move) and |y_i| - cap_i (where it reaches the box). With ``above`` the smallest
    breakpoint at which the norm is below eps and ``below`` the largest breakpoint under
    it (0 if none), the norm is linear in between, of slope minus the count of the
    coordinates moving there, so lam = above - (eps - norm(above)) / count, kept within
    [below, above]. These are defined by the norm summed in index order, whatever finds
    them: here a selection over the breakpoints (quickselect's halving, the norm at each
    pivot), expected O(d log d) for the norms and O(d) for the rest, no sort; where the norm
    at the smallest breakpoint is already below eps (a small shrink, as Square's), that
    breakpoint is ``above`` and the selection is skipped. ``scratch`` is a (2 d,) float64
    array.
    """
    d = v.shape[0]
    total = 0.0
    smallest = np.inf
    count = 0  # breakpoints, in scratch[:count]
    for i in range(d):
        y = np.float64(v[i]) - np.float64(x[i])
        cap = room(x[i], y, lo, hi)
        total += min(abs(y), cap)
        scratch[count] = abs(y)
        count += 1 if y != 0.0 else 0
        scratch[count] = abs(y) - cap
        count += 1 if cap < abs(y) else 0
        smallest = min(smallest, abs(y) - cap if cap < abs(y) else abs(y)) if y != 0.0 else smallest
    if total <= eps:
        for i in range(d):
            v[i] = clip(v[i], lo, hi)
        return
    below, above, norm_above = 0.0, np.inf, 0.0
    norm = l1_box_norm(v, x, smallest, lo, hi)
    if norm < eps:  # no breakpoint lies below the crossing
        above, norm_above, count = smallest, norm, 0
    else:
        below = smallest
    while count > 0:  # the breakpoints strictly between below and above
        first, middle, last = scratch[0], scratch[count // 2], scratch[count - 1]
        pivot = max(min(first, middle), min(max(first, middle), last))  # median of three
        norm = l1_box_norm(v, x, pivot, lo, hi)
        if norm < eps:
            above, norm_above = pivot, norm
        else:
            below = pivot
        kept = 0
        for j in range(count):  # branch-free: keep those on the side of the crossing
            value = scratch[j]
            scratch[kept] = value
            kept += 1 if (value < pivot if norm < eps else value > pivot) else 0
        count = kept
    moving = 0
    for i in range(d):
        y = np.float64(v[i]) - np.float64(x[i])
        cap = room(x[i], y, lo, hi)
        moving += 1 if abs(y) >= above and (cap >= abs(y) or abs(y) - cap <= below) else 0
    lam = min(max(above - (eps - norm_above) / max(moving, 1), below), above)
    for i in range(d):
        y = np.float64(v[i]) - np.float64(x[i])
        magnitude = min(max(abs(y) - lam, 0.0), room(x[i], y, lo, hi))
        v[i] = clip(np.float64(x[i]) + (magnitude if y > 0.0 else -magnitude), lo, hi)


@njit(cache=True, error_model="numpy")
def project_row(v, x, eps, p, lo, hi, scratch):
    """Move v (d,) in place into the eps-ball of norm p around x (d,) and into [lo, hi].

    inf: each coordinate clipped to clip(x -+ eps, lo, hi); 2: a perturbation longer than
    eps scaled to length eps (its length summed in float64), then clipped to [lo, hi];
    1: ``project_l1_box``. Operations are rounded to v's dtype one by one; lo and hi are
    of v's dtype, ``scratch`` a (2 d,) float64 array (for p = 1).
    """
    cast = v.dtype.type
    radius = cast(eps)
    if p == np.inf:
        for i in range(v.shape[0]):
            lower = clip(cast(x[i] - radius), lo, hi)
            upper = clip(cast(x[i] + radius), lo, hi)
            v[i] = clip(v[i], lower, upper)
        return
    if p == 1.0:
        project_l1_box(v, x, eps, lo, hi, scratch)
        return
    total = 0.0
    for i in range(v.shape[0]):
        delta = np.float64(cast(v[i] - x[i]))
        total += delta * delta
    length = cast(math.sqrt(total))
    if length > radius:
        factor = cast(radius / length)
        for i in range(v.shape[0]):
            v[i] = clip(cast(x[i] + cast(cast(v[i] - x[i]) * factor)), lo, hi)
        return
    for i in range(v.shape[0]):
        v[i] = clip(v[i], lo, hi)


@njit(cache=True, error_model="numpy")
def step_from(current, g, eta, p, topk, z, scratch):
    """z (d,) = current + eta s(G): s = sign (inf), G / ||G||_2 (2; a zero G stays put), or
    (L1) the sign of the coordinates of the largest |G| (a fraction topk of them, ties
    all taken; selected by ``cpu.largest_magnitudes``, no sort) over their count; rounded
    to current's dtype operation by operation. ``scratch`` is a (d,) float64 array."""
    cast = current.dtype.type
    d = current.shape[0]
    if p == np.inf:
        for i in range(d):
            move = eta if g[i] > 0.0 else (-eta if g[i] < 0.0 else cast(0.0))
            z[i] = cast(move + current[i])
        return
    if p == 2.0:
        total = 0.0
        for i in range(d):
            total += np.float64(g[i]) * np.float64(g[i])
        length = cast(math.sqrt(total))
        length = length if length > 0.0 else cast(1.0)
        for i in range(d):
            z[i] = cast(cast(cast(g[i] / length) * eta) + current[i])
        return
    smaller = min(max(int((1.0 - topk) * d), 0), d - 1)  # |G| below the threshold
    threshold, _ = largest_magnitudes(g, d - smaller, scratch)
    moved = 0
    for i in range(d):
        moved += 1 if abs(g[i]) >= threshold and g[i] != 0.0 else 0
    unit = cast(eta / (moved + L1_OFFSET))
    for i in range(d):
        selected = abs(g[i]) >= threshold and g[i] != 0.0
        move = (unit if g[i] > 0.0 else -unit) if selected else cast(0.0)
        z[i] = cast(current[i] + move)


@njit(cache=True, error_model="numpy")
def moved_coordinates(point, x) -> int:
    """The count of the coordinates where point (d,) differs from x (d,)."""
    moved = 0
    for i in range(x.shape[0]):
        moved += 1 if point[i] != x[i] else 0
    return moved


@njit(cache=True, error_model="numpy")
def checkpoint_row(x, eps, p, window, best, state) -> bool:
    """The checkpoint that ends a window of ``window`` steps: updates the row's ``state``;
    returns True when the run goes back to its best point (and its gradient).

    inf and 2: eta halves when (1) at most RHO * window steps raised the loss, or (2) the
    last checkpoint did not halve and the best loss has not risen since. 1: with s the
    moved coordinates of the best point, topk = s / d / L1_TOPK_SHRINK; when s fell below
    L1_SPARSER times its count at the checkpoint before, eta goes back to its start and
    the run to its best point, else eta /= L1_STEP_DECREASE; eta stays within
    [start / L1_SMALLEST_STEP, start].
    """
    cast = x.dtype.type
    if p != 1.0:
        halve = state[STATE_INCREASES] <= RHO * window or (
            state[STATE_HALVED] == 0.0 and state[STATE_BEST_AT_CHECK] >= state[STATE_BEST]
        )
        state[STATE_HALVED] = 1.0 if halve else 0.0
        state[STATE_BEST_AT_CHECK] = state[STATE_BEST]
        state[STATE_INCREASES] = 0.0
        if halve:
            state[STATE_ETA] = cast(state[STATE_ETA] / 2.0)
        return halve
    moved = moved_coordinates(best, x)
    sparser = moved < L1_SPARSER * state[STATE_SPARSITY]
    state[STATE_TOPK] = moved / x.shape[0] / L1_TOPK_SHRINK
    largest = L1_INITIAL_STEP * eps
    eta = largest if sparser else state[STATE_ETA] / L1_STEP_DECREASE
    state[STATE_ETA] = cast(min(max(eta, largest / L1_SMALLEST_STEP), largest))
    state[STATE_SPARSITY] = moved
    return sparser


@njit(cache=True, error_model="numpy")
def copy_row(source, target):
    """target (d,) = source (d,), element by element (cheaper than a slice assignment)."""
    for i in range(source.shape[0]):
        target[i] = source[i]


@njit(cache=True, error_model="numpy")
def apgd_update_row(
    x,
    eps,
    p,
    lo,
    hi,
    window,
    step,
    last,
    label,
    g,
    value,
    predicted,
    current,
    previous,
    best,
    best_g,
    adversarial,
    state,
    z,
    scratch,
    topk_from_start=False,
):
    """One row's iteration ``step`` of an APGD run, after the evaluation of its iterate
    ``current``: (g, value, predicted) are its gradient, loss and predicted class. Keeps
    the books, runs the checkpoint (``window`` > 0), then, unless ``last``, moves
    ``current`` to the next iterate (``previous`` to the one before). Step 0 starts the
    books: L1's topk is L1_FIRST_TOPK and its sparsity count d, or, ``topk_from_start``,
    those a checkpoint would set at the start (its moved coordinates / d /
    L1_TOPK_SHRINK, and their count: a run that goes on from another's best point, as in
    the reference's large-radii schedule). ``z`` is a (d,) scratch row of x's dtype,
    ``scratch`` (2 d,) float64.
    """
    if step == 0:
        first_eta = L1_INITIAL_STEP * eps if p == 1.0 else INITIAL_STEP * eps
        state[STATE_ETA] = x.dtype.type(first_eta)
        state[STATE_LAST] = state[STATE_BEST] = state[STATE_BEST_AT_CHECK] = value
        state[STATE_INCREASES] = 0.0
        state[STATE_HALVED] = 1.0
        sparsity = moved_coordinates(current, x) if topk_from_start else x.shape[0]
        state[STATE_TOPK] = (
            sparsity / x.shape[0] / L1_TOPK_SHRINK if topk_from_start else L1_FIRST_TOPK
        )
        state[STATE_SPARSITY] = sparsity
        state[STATE_BROKEN] = 1.0 if predicted != label else 0.0
        copy_row(current, best)
        copy_row(g, best_g)
        copy_row(current, adversarial)
    else:
        if predicted != label:
            copy_row(current, adversarial)
            state[STATE_BROKEN] = 1.0
        state[STATE_INCREASES] += 1.0 if value > state[STATE_LAST] else 0.0
        state[STATE_LAST] = value
        if value > state[STATE_BEST]:
            copy_row(current, best)
            copy_row(g, best_g)
            state[STATE_BEST] = value
    direction = g
    if window > 0 and checkpoint_row(x, eps, p, window, best, state):
        copy_row(best, current)
        direction = best_g
    if last:
        return
    cast = x.dtype.type
    eta = cast(state[STATE_ETA])
    step_from(current, direction, eta, p, state[STATE_TOPK], z, scratch)
    project_row(z, x, eps, p, lo, hi, scratch)
    if step > 0 and p != 1.0:  # momentum: x + a (z - x) + (1 - a) (x - x_prev)
        for i in range(z.shape[0]):
            towards = cast(cast(cast(z[i] - current[i]) * MOMENTUM) + current[i])
            z[i] = cast(towards + cast(cast(current[i] - previous[i]) * (1.0 - MOMENTUM)))
        project_row(z, x, eps, p, lo, hi, scratch)
    for i in range(z.shape[0]):
        previous[i] = current[i]
        current[i] = z[i]


@njit(cache=True, error_model="numpy")
def apgd_update_block(
    X,
    eps,
    p,
    x_min,
    x_max,
    windows,
    step,
    labels,
    G,
    values,
    predicted,
    current,
    previous,
    best,
    best_G,
    adversarial,
    state,
    topk_from_start=False,
):
    """``apgd_update_into`` on a block of rows, serial."""
    cast = X.dtype.type
    lo, hi = cast(x_min), cast(x_max)
    last = step == windows.shape[0] - 1
    z = np.empty(X.shape[1], dtype=X.dtype)
    scratch = np.empty(2 * X.shape[1])
    for n in range(X.shape[0]):
        apgd_update_row(
            X[n],
            eps[n],
            p,
            lo,
            hi,
            windows[step],
            step,
            last,
            labels[n],
            G[n],
            values[n],
            predicted[n],
            current[n],
            previous[n],
            best[n],
            best_G[n],
            adversarial[n],
            state[n],
            z,
            scratch,
            topk_from_start,
        )


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def apgd_update_into(
    X,
    eps,
    p,
    x_min,
    x_max,
    windows,
    step,
    labels,
    G,
    values,
    predicted,
    current,
    previous,
    best,
    best_G,
    adversarial,
    state,
    topk_from_start=False,
):
    """Iteration ``step`` of an APGD run on every row, after the evaluation of the iterates.

    Parameters
    ----------
    X : (N, d) float32 or float64, the clean rows (the centres of the balls)
    eps : (N,) float64, the radius of each row's ball
    p : float, np.inf, 2.0 or 1.0
    x_min, x_max : float, the box (infinite: none)
    windows : (steps + 1,) int64, the checkpoint windows (module docstring)
    step : int in [0, steps], the iteration; the last one moves no iterate
    labels : (N,) int64, the true classes
    G : (N, d) X's dtype, the loss gradient at ``current``; rows may be overwritten
    values : (N,) X's dtype, the losses at ``current``
    predicted : (N,) int64, the predicted classes at ``current``
    current, previous, best, best_G, adversarial : (N, d) X's dtype, the run's iterates,
        updated (``current``: the projected start before step 0)
    state : (N, STATE_FIELDS) float64, updated (filled by step 0)
    topk_from_start : bool, L1: the first steps move a fraction (the start's moved
        coordinates) / d / L1_TOPK_SHRINK of the coordinates, not L1_FIRST_TOPK
    """
    for block in prange(n_blocks(X.shape[0])):
        a, b = block_rows(X.shape[0], block)
        apgd_update_block(
            X[a:b],
            eps[a:b],
            p,
            x_min,
            x_max,
            windows,
            step,
            labels[a:b],
            G[a:b],
            values[a:b],
            predicted[a:b],
            current[a:b],
            previous[a:b],
            best[a:b],
            best_G[a:b],
            adversarial[a:b],
            state[a:b],
            topk_from_start,
        )


@njit(cache=True, error_model="numpy")
def apgd_steps_block(
    X,
    W1,
    b1,
    W2,
    b2,
    labels,
    targets,
    loss,
    kappa,
    eps,
    p,
    x_min,
    x_max,
    windows,
    first_step,
    count,
    current,
    previous,
    best,
    best_G,
    adversarial,
    state,
    topk_from_start=False,
):
    """``apgd_steps_into`` on a block of rows, serial: the gradient of the block's
    iterates (``cpu.loss_gradient_block``) into the block's scratch, then their update."""
    G = np.empty_like(X)
    values = np.empty(X.shape[0], dtype=X.dtype)
    predicted = np.empty(X.shape[0], dtype=np.int64)
    for step in range(first_step, first_step + count):
        loss_gradient_block(
            current, W1, b1, W2, b2, labels, targets, loss, kappa, G, values, predicted
        )
        apgd_update_block(
            X,
            eps,
            p,
            x_min,
            x_max,
            windows,
            step,
            labels,
            G,
            values,
            predicted,
            current,
            previous,
            best,
            best_G,
            adversarial,
            state,
            topk_from_start,
        )


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def apgd_steps_into(
    X,
    W1,
    b1,
    W2,
    b2,
    labels,
    targets,
    loss,
    kappa,
    eps,
    p,
    x_min,
    x_max,
    windows,
    first_step,
    count,
    current,
    previous,
    best,
    best_G,
    adversarial,
    state,
    topk_from_start=False,
):
    """Iterations first_step, ..., first_step + count - 1 of an APGD run on every row, each
    an evaluation of the iterates (the loss of ``cpu.loss_gradient_into``) and their
    update (``apgd_update_into``), fused per block of rows.

    Parameters
    ----------
    X, eps, p, x_min, x_max, windows, labels : as in ``apgd_update_into``
    W1, b1, W2, b2 : the network, X's dtype
    targets, loss, kappa : as in ``cpu.loss_gradient_into``
    first_step, count : int, the iterations of this call (first_step + count <= steps + 1)
    current, previous, best, best_G, adversarial, state, topk_from_start : as in
        ``apgd_update_into``

    Bitwise the same as ``cpu.loss_gradient_into`` then ``apgd_update_into`` for each
    iteration, whatever the thread count.
    """
    N = X.shape[0]
    blocks = n_blocks(N)
    pinned = pin_blas(blocks)
    for block in prange(blocks):
        a, b = block_rows(N, block)
        apgd_steps_block(
            X[a:b],
            W1,
            b1,
            W2,
            b2,
            labels[a:b],
            targets if targets.shape[0] == 0 else targets[a:b],
            loss,
            kappa,
            eps[a:b],
            p,
            x_min,
            x_max,
            windows,
            first_step,
            count,
            current[a:b],
            previous[a:b],
            best[a:b],
            best_G[a:b],
            adversarial[a:b],
            state[a:b],
            topk_from_start,
        )
    unpin_blas(pinned)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def apgd_start_into(X, start, eps, p, x_min, x_max, current):
    """The first iterate of an APGD run: ``start`` (N, d) projected as ``project_row`` does
    into each row's eps-ball (eps (N,) float64) of norm p around X and into [x_min, x_max],
    written to ``current`` (N, d), X's dtype (it may be ``start`` itself)."""
    cast = X.dtype.type
    lo, hi = cast(x_min), cast(x_max)
    for block in prange(n_blocks(X.shape[0])):
        start_row, stop = block_rows(X.shape[0], block)
        scratch = np.empty(2 * X.shape[1])
        for n in range(start_row, stop):
            current[n] = start[n]
            project_row(current[n], X[n], eps[n], p, lo, hi, scratch)
