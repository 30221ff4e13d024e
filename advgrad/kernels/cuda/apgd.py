"""CUDA kernels of APGD, the twins of ``advgrad.kernels.apgd`` (CPU): the start projection
(``apgd_start_rows``) and the update of the iterates after their evaluation
(``apgd_update_rows``), one thread per row, grid-stride over the rows.
``advgrad.kernels.cuda.apgd_launchers`` launches them.

The arithmetic is the CPU's, operation by operation: where a float64 value (a constant, a
float64 sum) enters X's dtype, it is rounded by a store into ``slot`` (N,) of X's dtype,
the row's own element; the sums of the L2 and L1 norms run in float64 (``float(v)``, so
that the simulator sums as the GPU does). The L1 step's threshold comes from a heap sort
of the row's own float64 ``scratch`` (N, 2 d), the projection's lam from a selection
over its breakpoints there: both are defined whatever finds them (the threshold's value;
lam from the norms summed in index order), so given the same gradients the iterates are
bitwise the CPU's.
"""

import math

from advgrad.kernels.apgd import (
    INITIAL_STEP,
    L1_FIRST_TOPK,
    L1_INITIAL_STEP,
    L1_OFFSET,
    L1_SMALLEST_STEP,
    L1_SPARSER,
    L1_STEP_DECREASE,
    L1_TOPK_SHRINK,
    MOMENTUM,
    RHO,
    STATE_BEST,
    STATE_BEST_AT_CHECK,
    STATE_BROKEN,
    STATE_ETA,
    STATE_HALVED,
    STATE_INCREASES,
    STATE_LAST,
    STATE_SPARSITY,
    STATE_TOPK,
)
from advgrad.kernels.cuda.device import clip
from advgrad.kernels.cuda.internals import cuda

__all__ = ["apgd_start_rows", "apgd_update_rows"]


@cuda.jit(device=True)
def rounded(slot, n, v):
    """v rounded to slot's dtype (through the row's element slot[n])."""
    slot[n] = v
    return slot[n]


@cuda.jit(device=True)
def sift_down(a, n, first, root, end):
    """Heap order below ``root`` of a[n, first:first + end] (a max-heap)."""
    while 2 * root + 1 < end:
        child = 2 * root + 1
        if child + 1 < end and a[n, first + child] < a[n, first + child + 1]:
            child += 1
        if not a[n, first + root] < a[n, first + child]:
            return
        a[n, first + root], a[n, first + child] = a[n, first + child], a[n, first + root]
        root = child


@cuda.jit(device=True)
def heap_sort(a, n, first, count):
    """Sort a[n, first:first + count] ascending, in place."""
    for root in range(count // 2 - 1, -1, -1):
        sift_down(a, n, first, root, count)
    for end in range(count - 1, 0, -1):
        a[n, first], a[n, first + end] = a[n, first + end], a[n, first]
        sift_down(a, n, first, 0, end)


@cuda.jit(device=True)
def room(x, y, lo, hi):
    """The room to the box [lo, hi] from x along the sign of y, at least 0."""
    return max(hi - float(x) if y > 0.0 else float(x) - lo, 0.0)


@cuda.jit(device=True)
def l1_box_norm(V, X, n, lam, lo, hi):
    """``cpu apgd.l1_box_norm`` of row n of V around row n of X."""
    total = 0.0
    for i in range(V.shape[1]):
        y = float(V[n, i]) - float(X[n, i])
        total += min(max(abs(y) - lam, 0.0), room(X[n, i], y, lo, hi))
    return total


@cuda.jit(device=True)
def project_l1_box(V, X, n, eps, lo, hi, scratch):
    """``cpu apgd.project_l1_box`` on row n of V around row n of X: the same selection
    of the breakpoints in the row's own ``scratch`` (N, 2 d)."""
    d = V.shape[1]
    total = 0.0
    count = 0
    for i in range(d):
        y = float(V[n, i]) - float(X[n, i])
        cap = room(X[n, i], y, lo, hi)
        total += min(abs(y), cap)
        if y != 0.0:
            scratch[n, count] = abs(y)
            count += 1
        if cap < abs(y):
            scratch[n, count] = abs(y) - cap
            count += 1
    if total <= eps:
        for i in range(d):
            V[n, i] = clip(V[n, i], lo, hi)
        return
    below, above, norm_above = 0.0, math.inf, 0.0
    while count > 0:
        first, middle, last = scratch[n, 0], scratch[n, count // 2], scratch[n, count - 1]
        pivot = max(min(first, middle), min(max(first, middle), last))
        norm = l1_box_norm(V, X, n, pivot, lo, hi)
        if norm < eps:
            above, norm_above = pivot, norm
        else:
            below = pivot
        kept = 0
        for j in range(count):
            value = scratch[n, j]
            if (value < pivot) if norm < eps else (value > pivot):
                scratch[n, kept] = value
                kept += 1
        count = kept
    moving = 0
    for i in range(d):
        y = float(V[n, i]) - float(X[n, i])
        cap = room(X[n, i], y, lo, hi)
        if abs(y) >= above and (cap >= abs(y) or abs(y) - cap <= below):
            moving += 1
    lam = min(max(above - (eps - norm_above) / max(moving, 1), below), above)
    for i in range(d):
        y = float(V[n, i]) - float(X[n, i])
        magnitude = min(max(abs(y) - lam, 0.0), room(X[n, i], y, lo, hi))
        V[n, i] = clip(float(X[n, i]) + (magnitude if y > 0.0 else -magnitude), lo, hi)


@cuda.jit(device=True)
def project_row(V, X, n, eps, p, lo, hi, scratch, slot):
    """``cpu apgd.project_row`` on row n of V around row n of X (lo, hi: of X's dtype)."""
    d = V.shape[1]
    if p == 1.0:
        project_l1_box(V, X, n, eps, lo, hi, scratch)
        return
    radius = rounded(slot, n, eps)
    if p == math.inf:
        for i in range(d):
            lower = clip(X[n, i] - radius, lo, hi)
            upper = clip(X[n, i] + radius, lo, hi)
            V[n, i] = clip(V[n, i], lower, upper)
        return
    total = 0.0
    for i in range(d):
        delta = float(V[n, i] - X[n, i])
        total += delta * delta
    length = rounded(slot, n, math.sqrt(total))
    if length > radius:
        factor = radius / length
        for i in range(d):
            V[n, i] = X[n, i] + (V[n, i] - X[n, i]) * factor
    for i in range(d):
        V[n, i] = clip(V[n, i], lo, hi)


@cuda.jit(device=True)
def step_from(current, g, n, eta, p, topk, Z, scratch, slot):
    """``cpu apgd.step_from`` into row n of Z, from row n of current along row n of g."""
    d = current.shape[1]
    if p == math.inf:
        for i in range(d):
            move = eta if g[n, i] > 0.0 else (-eta if g[n, i] < 0.0 else 0.0)
            Z[n, i] = move + current[n, i]
        return
    if p == 2.0:
        total = 0.0
        for i in range(d):
            total += float(g[n, i]) * float(g[n, i])
        length = rounded(slot, n, math.sqrt(total))
        if not length > 0.0:
            length = rounded(slot, n, 1.0)
        for i in range(d):
            Z[n, i] = (g[n, i] / length) * eta + current[n, i]
        return
    for i in range(d):
        scratch[n, i] = abs(float(g[n, i]))
    heap_sort(scratch, n, 0, d)
    k = min(max(int((1.0 - topk) * d), 0), d - 1)
    threshold = scratch[n, k]
    moved = 0
    for i in range(d):
        if abs(float(g[n, i])) >= threshold and g[n, i] != 0.0:
            moved += 1
    unit = rounded(slot, n, eta / (moved + L1_OFFSET))
    for i in range(d):
        if abs(float(g[n, i])) >= threshold and g[n, i] != 0.0:
            Z[n, i] = current[n, i] + (unit if g[n, i] > 0.0 else -unit)
        else:
            Z[n, i] = current[n, i] + 0.0  # as the CPU's: -0.0 becomes 0.0


@cuda.jit(device=True)
def moved_coordinates(point, X, n):
    """``cpu apgd.moved_coordinates`` of row n of point and of X."""
    moved = 0
    for i in range(X.shape[1]):
        if point[n, i] != X[n, i]:
            moved += 1
    return moved


@cuda.jit(device=True)
def checkpoint_row(X, n, eps, p, window, best, state, slot):
    """``cpu apgd.checkpoint_row`` on row n: True when the run goes back to its best."""
    if p != 1.0:
        halve = state[n, STATE_INCREASES] <= RHO * window or (
            state[n, STATE_HALVED] == 0.0 and state[n, STATE_BEST_AT_CHECK] >= state[n, STATE_BEST]
        )
        state[n, STATE_HALVED] = 1.0 if halve else 0.0
        state[n, STATE_BEST_AT_CHECK] = state[n, STATE_BEST]
        state[n, STATE_INCREASES] = 0.0
        if halve:
            state[n, STATE_ETA] = rounded(slot, n, state[n, STATE_ETA] / 2.0)
        return halve
    d = X.shape[1]
    moved = moved_coordinates(best, X, n)
    sparser = moved < L1_SPARSER * state[n, STATE_SPARSITY]
    state[n, STATE_TOPK] = moved / d / L1_TOPK_SHRINK
    largest = L1_INITIAL_STEP * eps
    eta = largest if sparser else state[n, STATE_ETA] / L1_STEP_DECREASE
    state[n, STATE_ETA] = rounded(slot, n, min(max(eta, largest / L1_SMALLEST_STEP), largest))
    state[n, STATE_SPARSITY] = moved
    return sparser


@cuda.jit
def apgd_update_rows(
    X,
    eps,
    p,
    lo,
    hi,
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
    Z,
    scratch,
    slot,
    topk_from_start,
):
    """``cpu apgd.apgd_update_into``; Z (N, d) of X's dtype, scratch (N, 2 d) float64 and
    slot (N,) of X's dtype are the rows' scratch; lo, hi the box, rounded to X's dtype."""
    N, d = X.shape
    last = step == windows.shape[0] - 1
    window = windows[step]
    for n in range(cuda.grid(1), N, cuda.gridsize(1)):
        value = values[n]
        if step == 0:
            first_eta = L1_INITIAL_STEP * eps[n] if p == 1.0 else INITIAL_STEP * eps[n]
            state[n, STATE_ETA] = rounded(slot, n, first_eta)
            state[n, STATE_LAST] = value
            state[n, STATE_BEST] = value
            state[n, STATE_BEST_AT_CHECK] = value
            state[n, STATE_INCREASES] = 0.0
            state[n, STATE_HALVED] = 1.0
            if topk_from_start:
                sparsity = moved_coordinates(current, X, n)
                state[n, STATE_TOPK] = sparsity / d / L1_TOPK_SHRINK
                state[n, STATE_SPARSITY] = sparsity
            else:
                state[n, STATE_TOPK] = L1_FIRST_TOPK
                state[n, STATE_SPARSITY] = d
            state[n, STATE_BROKEN] = 1.0 if predicted[n] != labels[n] else 0.0
            for i in range(d):
                best[n, i] = current[n, i]
                best_G[n, i] = G[n, i]
                adversarial[n, i] = current[n, i]
        else:
            if predicted[n] != labels[n]:
                for i in range(d):
                    adversarial[n, i] = current[n, i]
                state[n, STATE_BROKEN] = 1.0
            if value > state[n, STATE_LAST]:
                state[n, STATE_INCREASES] += 1.0
            state[n, STATE_LAST] = value
            if value > state[n, STATE_BEST]:
                for i in range(d):
                    best[n, i] = current[n, i]
                    best_G[n, i] = G[n, i]
                state[n, STATE_BEST] = value
        back = False
        if window > 0:
            back = checkpoint_row(X, n, eps[n], p, window, best, state, slot)
        if back:
            for i in range(d):
                current[n, i] = best[n, i]
        if not last:
            eta = rounded(slot, n, state[n, STATE_ETA])
            topk = state[n, STATE_TOPK]
            if back:
                step_from(current, best_G, n, eta, p, topk, Z, scratch, slot)
            else:
                step_from(current, G, n, eta, p, topk, Z, scratch, slot)
            project_row(Z, X, n, eps[n], p, lo, hi, scratch, slot)
            if step > 0 and p != 1.0:
                for i in range(d):
                    towards = rounded(slot, n, (Z[n, i] - current[n, i]) * MOMENTUM)
                    towards = towards + current[n, i]
                    previous[n, i] = (current[n, i] - previous[n, i]) * (1.0 - MOMENTUM)
                    Z[n, i] = towards + previous[n, i]
                project_row(Z, X, n, eps[n], p, lo, hi, scratch, slot)
            for i in range(d):
                previous[n, i] = current[n, i]
                current[n, i] = Z[n, i]


@cuda.jit
def apgd_start_rows(X, start, eps, p, lo, hi, current, scratch, slot):
    """``cpu apgd.apgd_start_into``: start projected into current (scratch, slot as in
    ``apgd_update_rows``)."""
    N, d = X.shape
    for n in range(cuda.grid(1), N, cuda.gridsize(1)):
        for i in range(d):
            current[n, i] = start[n, i]
        project_row(current, X, n, eps[n], p, lo, hi, scratch, slot)
