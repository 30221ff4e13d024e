"""Numba CPU kernels of FAB, the fast adaptive boundary attack (Croce & Hein, ICML 2020).

``advgrad.fab`` states the algorithm; these kernels run it. A FAB run on a row is a sequence
of iterations 0, 1, ..., steps: iteration i evaluates the iterate (its logits, hence its
predicted class); from iteration 1 on, an iterate the model misclassifies is kept when it
is the closest to the clean row so far and the run backs up to x0 + ``BACKWARD`` (x - x0);
then, but for the last iteration, the boundary is linearised at the iterate (the hyperplane
f + <g, v - x> = 0) and the iterate moves (``fab_step_row``): both it and the clean row are
projected onto the hyperplane within the box (``hyperplane_projection``) and the next
iterate mixes the two projections. The boundary is that of a target class t (f = z_t - z_y,
FAB-T), or, untargeted, that of the class k != y whose linearised boundary is nearest in
the norm's dual (f_k / ||g_k||_q smallest, ``nearest_boundary_block``).

- ``fab_steps_into`` runs iterations on every block of rows, the forward pass, the
  gradients and the updates fused: one product with W1 a row and iteration tells the
  iterate's class and, where the iterate is not backed up, is the one its gradient goes
  on from; the hidden layer of a point backed up to is formed by linearity, x_b W1 =
  x0 W1 + ``BACKWARD`` (x W1 - x0 W1) (x0 W1 kept from iteration 0, all in X's dtype),
  not by a second product (equal up to rounding: the iterate x_b itself is stored rounded
  to X's dtype, as always). Nearly every FAB step crosses the boundary, so this saves
  one product of three a step;
- ``hyperplane_projection`` finds the smallest perturbation onto a hyperplane within a box
  in expected linear time, never a sort: the level of a piecewise linear function by
  filtering passes, then quickselect-style partitioning of its breakpoints (``_level``;
  L-inf and L2), or the split of the coordinates ranked by |w| by buckets of |w|, then
  quickselect in the split's bucket (``_l1_bucket_split``; L1).

The state of a run lives in arrays the caller keeps between calls, so a run goes in slices
of iterations: the iterate ``current`` and the closest misclassified iterate ``closest``
(N, d) X's dtype, its distance to the clean row ``distance`` (N,) float64 (inf: none yet),
and ``clean_hidden`` (N, H), X W1. The projections and steps run in float64 and each
iterate is rounded to X's dtype.
"""

import math

import numpy as np
from numba import njit, prange

from advgrad.kernels.blas import pin_blas, unpin_blas
from advgrad.kernels.cpu import backpropagate_block, sigmoid

ALPHA_MAX = 0.1
"""The largest weight of the clean row's projection in a step (the reference's alpha_max)."""
OVERSHOOT = 1.05
"""Each projection is stretched by this factor (the reference's eta)."""
BACKWARD = 0.9
"""After an adversarial point the run goes on from x0 + BACKWARD (x - x0) (beta)."""
NORM_FLOOR = 1e-8
"""The norms of the projections weighed in a step are at least this."""
DISTANCE_OFFSET = 1e-12
"""Untargeted: the distance to boundary k is |f_k| / (DISTANCE_OFFSET + ||g_k||_q), as the
reference computes it."""
ROWS_PER_BLOCK = 64
"""Rows of a block of ``fab_steps_into``: a FAB iteration of a row costs a gradient and two
projections, so blocks smaller than ``cpu.ROWS_PER_BLOCK`` keep the threads balanced on a
few hundred rows (32 rows made the products about 10 % slower on a (784, 256, 10) net)."""
L1_BUCKETS = 64
"""L1 projections sum the gains in this many buckets of |w| to find the bucket the split
falls in (``_l1_bucket_split``)."""
FILTER_PASSES = 8
"""The most filtering passes a projection's level search makes before its quickselect."""
JACOBIAN_ENTRIES = 2**18
"""Untargeted: the boundary gradients of a block are formed for as many rows at a time as
keep them within this many entries (at least one row)."""
SQUARES_UNDERFLOW_BELOW = 2.0**-480
"""L2 projection: where the largest |w| is smaller, w is scaled by a power of two (exact)
before it is squared, which would otherwise lose it to underflow."""


@njit(cache=True, error_model="numpy")
def _partition3(key, slope, lo, hi, pivot):
    """Reorder key and slope [lo, hi) (together) into key < pivot, key == pivot, key >
    pivot; returns the bounds (a, b) of the middle part."""
    a, i, b = lo, lo, hi
    while i < b:
        if key[i] < pivot:
            key[a], key[i] = key[i], key[a]
            slope[a], slope[i] = slope[i], slope[a]
            a += 1
            i += 1
        elif key[i] > pivot:
            b -= 1
            key[b], key[i] = key[i], key[b]
            slope[b], slope[i] = slope[i], slope[b]
        else:
            i += 1
    return a, b


@njit(cache=True, error_model="numpy")
def _median_of_three(a, b, c):
    return max(min(a, b), min(max(a, b), c))


@njit(cache=True, error_model="numpy")
def _level(key, slope, n, gap):
    """The level l >= 0 at which F(l) = sum_i (key_i slope_i where key_i < l, else
    l slope_i) reaches gap >= 0, over the n breakpoints key[:n] >= 0 (inf: never reached)
    with slopes slope[:n] >= 0 (both reordered); inf where F never reaches gap.

    First filtering passes: with the keys found below the level saturated, l = (gap -
    their gains) / (the slopes of the others) is a lower bound of the level (F lies below
    the line through those gains with the others' slopes), so every key at or below l
    saturates too; where none does, l is the level. Up to ``FILTER_PASSES`` passes (a
    handful when the level saturates few keys), then quickselect on the rest: a pivot key k
    with F(k) >= gap puts the level at or below k (the keys from k up add their slopes),
    else above k (the keys up to k add their gains). Expected linear time; the sums run in
    the order of the passes.
    """
    saturated = 0.0  # sum of the gains of the keys known to lie below the level
    top = 0.0  # the largest of those keys
    rising = 0.0  # sum of the slopes of the keys known to lie at or above it
    hi = n
    candidates = rising  # the slopes of the keys not yet found below the level
    for i in range(n):
        candidates += slope[i]
    for _ in range(FILTER_PASSES):
        if hi == 0 or candidates <= 0.0:
            break
        level = (gap - saturated) / candidates
        kept = 0
        candidates = rising
        for i in range(hi):
            if key[i] <= level:
                saturated += key[i] * slope[i]
                top = max(top, key[i])
            else:
                key[kept], slope[kept] = key[i], slope[i]
                candidates += slope[i]
                kept += 1
        if kept == hi:  # l is the level
            return max(level, 0.0)
        hi = kept
    lo = 0
    while lo < hi:
        pivot = _median_of_three(key[lo], key[(lo + hi) // 2], key[hi - 1])
        a, b = _partition3(key, slope, lo, hi, pivot)
        below = saturated
        for i in range(lo, a):
            below += key[i] * slope[i]
        at = 0.0
        for i in range(a, b):
            at += slope[i]
        above = 0.0
        for i in range(b, hi):
            above += slope[i]
        if below + pivot * (rising + at + above) >= gap:
            rising += at + above
            hi = a
        else:
            saturated = below + pivot * at
            top = max(top, pivot)
            lo = b
    if rising > 0.0:
        return max((gap - saturated) / rising, 0.0)
    # every key lies below the level: the gains reach the gap (within rounding) at the
    # largest key, or never
    return top if saturated >= gap else math.inf


@njit(cache=True, error_model="numpy")
def _ranks_before(weight_i, i, weight_j, j):
    """Whether coordinate i (|w| weight_i) comes before j in the L1 order: larger |w|
    first, equal ones by index."""
    return weight_i > weight_j or (weight_i == weight_j and i < j)


@njit(cache=True, error_model="numpy")
def _l1_split(weight, gain, index, n, before, gap):
    """The L1 projection's split: among the n coordinates index[:n] (reordered) with |w|
    weight and gain weight room (both (d,), by coordinate), after coordinates of gains
    ``before`` in all, the coordinate m, in the order of ``_ranks_before``, at which the
    gains summed in that order first reach gap, and the sum of the gains before it; (-1,
    0.0) where they never do. Quickselect on the order."""
    lo, hi = 0, n
    while lo < hi:
        pivot = index[(lo + hi) // 2]
        pivot_weight = weight[pivot]
        a = lo  # coordinates before the pivot go to [lo, a), the rest to [a, hi)
        sum_before = before
        for i in range(lo, hi):
            c = index[i]
            if _ranks_before(weight[c], c, pivot_weight, pivot):
                index[a], index[i] = c, index[a]
                sum_before += gain[c]
                a += 1
        if a > lo and sum_before >= gap:
            hi = a
        elif sum_before + gain[pivot] >= gap:
            return pivot, sum_before
        else:
            before = sum_before + gain[pivot]
            j = a  # the rest after the pivot: [a + 1, hi) once the pivot is at a
            while index[j] != pivot:
                j += 1
            index[a], index[j] = index[j], index[a]
            lo = a + 1
    return -1, 0.0


@njit(cache=True, error_model="numpy")
def _l1_bucket(weight_i, largest):
    """The bucket of |w| = weight_i, in [0, L1_BUCKETS), largest the largest |w| (> 0):
    no lower for a larger |w|, and in range for any largest, subnormal ones included."""
    return min(int(weight_i / largest * (L1_BUCKETS - 1)), L1_BUCKETS - 1)


@njit(cache=True, error_model="numpy")
def _l1_bucket_split(w, weight, gain, index, largest, gap):
    """``_l1_split`` over the coordinates of nonzero w (d,), faster: the gains summed in
    ``L1_BUCKETS`` buckets of |w| (``_l1_bucket``: the same for equal |w|, no lower for a
    larger |w|; ``largest`` the largest |w|) tell the bucket the split falls in, and only its
    coordinates are selected among (all of them where rounding puts it past that bucket)."""
    buckets = np.zeros(L1_BUCKETS)
    for i in range(w.shape[0]):
        if w[i] != 0.0:
            buckets[_l1_bucket(weight[i], largest)] += gain[i]
    before = 0.0
    split = -1
    for bucket in range(L1_BUCKETS - 1, -1, -1):
        if before + buckets[bucket] >= gap:
            split = bucket
            break
        before += buckets[bucket]
    if split >= 0:
        n = 0
        for i in range(w.shape[0]):
            if w[i] != 0.0 and _l1_bucket(weight[i], largest) == split:
                index[n] = i
                n += 1
        m, before_m = _l1_split(weight, gain, index, n, before, gap)
        if m >= 0:
            return m, before_m
    n = 0
    for i in range(w.shape[0]):
        if w[i] != 0.0:
            index[n] = i
            n += 1
    return _l1_split(weight, gain, index, n, 0.0, gap)


@njit(cache=True, error_model="numpy")
def hyperplane_projection(p, x, w, gap, x_min, x_max, D, scratch, index):
    """The perturbation D (d,) float64 of smallest norm p with <w, D> = gap and x + D in
    [x_min, x_max], for one point.

    Parameters
    ----------
    p : float, np.inf, 2.0 or 1.0
    x : (d,) float32 or float64, the point
    w : (d,) float32 or float64, the hyperplane's normal
    gap : float, the change of <w, v> that reaches the hyperplane from x
    x_min, x_max : float, the box (infinite: no bound on that side)
    D : (d,) float64, output
    scratch : (2, d) float64, index : (d,) int64, scratch

    With s_i = sign(w_i gap) and room_i >= 0 the way to the bound on that side (0 for a
    coordinate outside the box on that side): L-inf D_i = s_i min(l, room_i), L2 D_i = s_i
    min(l |w_i|, room_i) with the level l found by ``_level``; L1 moves the coordinates of
    largest |w| to their bound (equal ones by index) until the gap is reached, the last
    partly (the split found by ``_l1_bucket_split``). Where the
    box does not reach the hyperplane every coordinate of nonzero w moves to its bound;
    coordinates of zero w never move. The same D as a sort-based projection up to float64
    rounding (L1 with equal |w|: the sort must keep them in index order).
    """
    d = x.shape[0]
    sign = -1.0 if gap < 0.0 else 1.0
    need = abs(gap)
    total = 0.0
    n = 0  # L1: coordinates that move
    largest = 0.0
    unit = 1.0  # L2: the scale of w in the level's keys and slopes (a power of two)
    if p != 1.0:  # every coordinate a breakpoint: 0 of slope 0 where w_i = 0
        up_sign = sign > 0.0
        for i in range(d):
            wi = np.float64(w[i])
            xi = np.float64(x[i])
            weight = abs(wi)
            up = (wi > 0.0) == up_sign
            room = max(x_max - xi if up else xi - x_min, 0.0)
            room = room if weight > 0.0 else 0.0
            D[i] = room if up else -room
            scratch[0, i] = room if p == np.inf else (room / weight if weight > 0.0 else 0.0)
            scratch[1, i] = weight if p == np.inf else weight * weight
            largest = max(largest, weight)
        if p == 2.0 and 0.0 < largest < SQUARES_UNDERFLOW_BELOW:
            unit = math.ldexp(1.0, min(-math.frexp(largest)[1], 1000))
            for i in range(d):
                weight = abs(np.float64(w[i])) * unit
                scratch[0, i] = abs(D[i]) / weight if weight > 0.0 else 0.0
                scratch[1, i] = weight * weight
        # the most the box lets <w, D> reach, in four interleaved sums
        total0 = total1 = total2 = total3 = 0.0
        for i in range(0, d - 3, 4):
            total0 += abs(np.float64(w[i])) * abs(D[i])
            total1 += abs(np.float64(w[i + 1])) * abs(D[i + 1])
            total2 += abs(np.float64(w[i + 2])) * abs(D[i + 2])
            total3 += abs(np.float64(w[i + 3])) * abs(D[i + 3])
        for i in range(d - d % 4, d):
            total0 += abs(np.float64(w[i])) * abs(D[i])
        total = (total0 + total1) + (total2 + total3)
        n = d
    else:
        for i in range(d):
            weight = abs(np.float64(w[i]))
            D[i] = 0.0
            if weight == 0.0:
                continue
            side = sign if w[i] > 0.0 else -sign
            room = max(x_max - np.float64(x[i]) if side > 0.0 else np.float64(x[i]) - x_min, 0.0)
            D[i] = side * room
            total += weight * room
            scratch[0, i] = weight
            scratch[1, i] = weight * room
            largest = max(largest, weight)
            n += 1
    if total < need:
        return
    if p == 1.0:
        if n == 0:  # w = 0 (and gap 0)
            return
        m, before = _l1_bucket_split(w, scratch[0], scratch[1], index, largest, need)
        if m < 0:  # the gains fell short by rounding
            return
        weight_m = scratch[0, m]
        for i in range(d):
            if D[i] != 0.0 and not _ranks_before(scratch[0, i], i, weight_m, m):
                D[i] = 0.0
        D[m] = (sign if w[m] > 0.0 else -sign) * ((need - before) / weight_m)
        return
    level = _level(scratch[0], scratch[1], n, need * unit)
    for i in range(d):
        if w[i] != 0.0:
            reach = level if p == np.inf else level * (abs(np.float64(w[i])) * unit)
            D[i] = D[i] if abs(D[i]) <= reach else (reach if D[i] > 0.0 else -reach)


@njit(cache=True, error_model="numpy")
def norm_term(total, magnitude, p):
    """A running norm p (np.inf, 2.0 or 1.0) of float64 magnitudes, one more taken in:
    their maximum, sum of squares or sum (``norm_total`` finishes it)."""
    if p == np.inf:
        return max(total, magnitude)
    return total + magnitude * magnitude if p == 2.0 else total + magnitude


@njit(cache=True, error_model="numpy")
def norm_total(total, p):
    """The norm p from the running total of ``norm_term``."""
    return math.sqrt(total) if p == 2.0 else total


@njit(cache=True, error_model="numpy")
def norm(D, p):
    """The norm p (np.inf, 2.0 or 1.0) of D (d,), summed in float64."""
    total = 0.0
    for i in range(D.shape[0]):
        total = norm_term(total, abs(np.float64(D[i])), p)
    return norm_total(total, p)


@njit(cache=True, error_model="numpy")
def distance_to(current, x0, p):
    """The norm p of current - x0 (both (d,)), the difference taken in float64."""
    total = 0.0
    for i in range(x0.shape[0]):
        total = norm_term(total, abs(np.float64(current[i]) - np.float64(x0[i])), p)
    return norm_total(total, p)


@njit(cache=True, error_model="numpy")
def fab_step_row(x0, current, g, f, p, x_min, x_max, to_current, to_clean, scratch, index):
    """One FAB step of one row, in place on ``current`` (d,).

    The hyperplane f + <g, v - current> = 0 (f float, g (d,)); d1, d2 the projections of
    ``current`` and of the clean row x0 onto it within [x_min, x_max], a1, a2 their norms
    (at least ``NORM_FLOOR``), alpha = min(a1 / (a1 + a2), ``ALPHA_MAX``): current becomes
    ((current + eta d1) (1 - alpha) + (x0 + eta d2) alpha) clipped to the box, eta =
    ``OVERSHOOT``, computed in float64 and rounded to current's dtype. ``to_current``,
    ``to_clean`` (d,) float64, ``scratch`` (2, d) float64 and ``index`` (d,) int64 are
    scratch.
    """
    cast = current.dtype.type
    gap = -np.float64(f)
    hyperplane_projection(p, current, g, gap, x_min, x_max, to_current, scratch, index)
    shift = 0.0  # <g, x0 - current>
    for i in range(x0.shape[0]):
        shift += np.float64(g[i]) * (np.float64(x0[i]) - np.float64(current[i]))
    hyperplane_projection(p, x0, g, gap - shift, x_min, x_max, to_clean, scratch, index)
    current_length = max(norm(to_current, p), NORM_FLOOR)
    clean_length = max(norm(to_clean, p), NORM_FLOOR)
    alpha = min(current_length / (current_length + clean_length), ALPHA_MAX)
    for i in range(x0.shape[0]):
        moved = (np.float64(current[i]) + OVERSHOOT * to_current[i]) * (1.0 - alpha)
        moved += (np.float64(x0[i]) + OVERSHOOT * to_clean[i]) * alpha
        current[i] = cast(min(max(moved, x_min), x_max))


@njit(cache=True, error_model="numpy")
def keep_closest_row(x0, current, p, closest, distance):
    """After a misclassified iterate ``current`` (d,): it goes to ``closest`` (d,) when its
    distance to x0 is below ``distance[0]`` ((1,) float64, updated), and the run backs up
    to x0 + ``BACKWARD`` (current - x0), in float64 rounded to current's dtype."""
    length = distance_to(current, x0, p)
    if length < distance[0]:
        closest[:] = current
        distance[0] = length
    cast = current.dtype.type
    for i in range(x0.shape[0]):
        offset = np.float64(current[i]) - np.float64(x0[i])
        current[i] = cast(np.float64(x0[i]) + BACKWARD * offset)


@njit(cache=True, error_model="numpy")
def _logits_from_hidden(A, W2, b2, ZT):
    """The logits ZT (C, B), bias included, of hidden activations A (B, H), as
    ``cpu.logits_block_into`` and the bias after it form them."""
    np.dot(W2.T, A.T, ZT)
    for k in range(ZT.shape[0]):
        for n in range(ZT.shape[1]):
            ZT[k, n] += b2[k]


@njit(cache=True, error_model="numpy")
def _predicted(ZT, n):
    """argmax of column n of ZT (the first on ties)."""
    best = 0
    for k in range(1, ZT.shape[0]):
        if ZT[k, n] > ZT[best, n]:
            best = k
    return best


@njit(cache=True, error_model="numpy")
def nearest_boundary_block(A, ZT, labels, W1, W2, p, G, f):
    """Untargeted FAB's hyperplane of each row of a block, serial: of the classes k != y,
    the one whose linearised boundary is nearest, |f_k| / (``DISTANCE_OFFSET`` +
    ||g_k||_q) smallest (the first on ties), q the dual of p (1 for inf, 2 for 2, inf for
    1), f_k = z_k - z_y and g_k = W1 diag(A (1 - A)) (W2[:, k] - W2[:, y]) its input
    gradient. Writes g into G (B, d) (ZT's dtype, rounded as ``cpu.backpropagate_block``
    rounds) and f into f (B,) float64.

    A : (B, H), the hidden activations; ZT : (C, B), the logits, bias included.
    """
    B, H = A.shape
    C = W2.shape[1]
    d = W1.shape[0]
    q = 1.0 if p == np.inf else (2.0 if p == 2.0 else np.inf)
    rows = max(1, min(B, JACOBIAN_ENTRIES // max(1, (C - 1) * d)))
    D1 = np.empty((rows * (C - 1), H), dtype=A.dtype)
    GK = np.empty((rows * (C - 1), d), dtype=A.dtype)
    for start in range(0, B, rows):
        stop = min(start + rows, B)
        for n in range(start, stop):
            y = labels[n]
            r = (n - start) * (C - 1)
            for k in range(C):
                if k == y:
                    continue
                for j in range(H):
                    a = A[n, j]
                    D1[r, j] = (W2[j, k] - W2[j, y]) * (a * (1.0 - a))
                r += 1
        used = (stop - start) * (C - 1)
        np.dot(D1[:used], W1.T, GK[:used])
        for n in range(start, stop):
            y = labels[n]
            r = (n - start) * (C - 1)
            chosen, nearest, chosen_f = -1, math.inf, 0.0
            for k in range(C):
                if k == y:
                    continue
                difference = np.float64(ZT[k, n]) - np.float64(ZT[y, n])
                distance = abs(difference) / (DISTANCE_OFFSET + norm(GK[r], q))
                if chosen < 0 or distance < nearest:
                    chosen, nearest, chosen_f = r, distance, difference
                r += 1
            G[n] = GK[chosen]
            f[n] = chosen_f


@njit(cache=True, error_model="numpy")
def fab_steps_block(
    X, W1, b1, W2, b2, labels, targets, p, x_min, x_max, steps, first_step, count, current,
    closest, distance, clean_hidden,
):  # fmt: skip
    """``fab_steps_into`` on a block of rows, serial."""
    B, d = X.shape
    H, C = W2.shape
    cast = X.dtype.type
    P = np.empty((B, H), dtype=X.dtype)  # the iterates' X W1
    A = np.empty((B, H), dtype=X.dtype)
    ZT = np.empty((C, B), dtype=X.dtype)
    D1 = np.empty((B, H), dtype=X.dtype)
    G = np.empty((B, d), dtype=X.dtype)
    f = np.empty(B)
    to_current, to_clean = np.empty(d), np.empty(d)
    scratch = np.empty((2, d))
    index = np.empty(d, dtype=np.int64)
    if first_step == 0:
        np.dot(X, W1, clean_hidden)
    for step in range(first_step, first_step + count):
        np.dot(current, W1, P)
        for n in range(B):
            for j in range(H):
                A[n, j] = sigmoid(P[n, j] + b1[j])
        _logits_from_hidden(A, W2, b2, ZT)
        if step > 0:
            backed = False
            for n in range(B):
                if _predicted(ZT, n) == labels[n]:
                    continue
                keep_closest_row(X[n], current[n], p, closest[n], distance[n : n + 1])
                backed = True
                for j in range(H):  # X W1 of the point backed up to, by linearity
                    P[n, j] = cast(
                        clean_hidden[n, j] + cast(BACKWARD * cast(P[n, j] - clean_hidden[n, j]))
                    )
                    A[n, j] = sigmoid(P[n, j] + b1[j])
            if backed:
                _logits_from_hidden(A, W2, b2, ZT)
        if step == steps:
            break
        if targets.shape[0] == 0:
            nearest_boundary_block(A, ZT, labels, W1, W2, p, G, f)
        else:
            for n in range(B):
                f[n] = np.float64(ZT[targets[n], n]) - np.float64(ZT[labels[n], n])
            for k in range(C):  # the logit gradient of z_t - z_y
                for n in range(B):
                    ZT[k, n] = (1.0 if k == targets[n] else 0.0) - (1.0 if k == labels[n] else 0.0)
            backpropagate_block(A, ZT, W1, W2, D1, G)
        for n in range(B):
            fab_step_row(
                X[n], current[n], G[n], f[n], p, x_min, x_max, to_current, to_clean, scratch,
                index,
            )  # fmt: skip


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")
def fab_steps_into(
    X, W1, b1, W2, b2, labels, targets, p, x_min, x_max, steps, first_step, count, current,
    closest, distance, clean_hidden,
):  # fmt: skip
    """Iterations first_step, ..., first_step + count - 1 of a FAB run on every row (module
    docstring), fused per block of ``ROWS_PER_BLOCK`` rows.

    Parameters
    ----------
    X : (N, d) float32 or float64, the clean rows
    W1, b1, W2, b2 : the network, X's dtype
    labels : (N,) int64, the true classes
    targets : (N,) int64, the target class of each row (FAB-T), or 0 rows: untargeted
    p : float, np.inf, 2.0 or 1.0
    x_min, x_max : float, the box (infinite: none)
    steps : int, the steps of the run (iterations 0, ..., steps)
    first_step, count : int, the iterations of this call (first_step + count <= steps + 1)
    current : (N, d) X's dtype, the iterates, updated (before iteration 0: the starts)
    closest : (N, d) X's dtype, the closest misclassified iterates, updated where found
    distance : (N,) float64, their distances in norm p to X (inf before the first), updated
    clean_hidden : (N, H) X's dtype, X W1, filled by iteration 0

    A row's result depends only on its own inputs, whatever the blocks and thread count.
    """
    N = X.shape[0]
    blocks = (N + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
    pinned = pin_blas(blocks)
    for block in prange(blocks):
        a = block * ROWS_PER_BLOCK
        b = min(a + ROWS_PER_BLOCK, N)
        fab_steps_block(
            X[a:b], W1, b1, W2, b2, labels[a:b], targets if targets.shape[0] == 0 else
            targets[a:b], p, x_min, x_max, steps, first_step, count, current[a:b],
            closest[a:b], distance[a:b], clean_hidden[a:b],
        )  # fmt: skip
    unpin_blas(pinned)
