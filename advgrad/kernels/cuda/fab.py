"""CUDA kernels of FAB, the twins of ``advgrad.kernels.fab`` (CPU): the row functions of a
FAB iteration as device functions, and row kernels over them, one thread per row,
grid-stride over the rows. ``advgrad.kernels.cuda.fab_launchers`` launches them, between
the gradient launches of ``advgrad.kernels.cuda.launchers``.

- ``fab_start_rows``: the state of a run (the iterate, the closest point, its distance);
- ``fab_keep_rows``: after the iterate's logits, a misclassified iterate updates the
  closest point and backs up (``keep_closest_row``);
- ``nearest_boundary_rows``: untargeted, one class k != y after another, the linearised
  boundary nearest so far (``other_class_rows`` lists the classes);
- ``fab_step_rows``: the step (``fab_step_row``: both projections within the box, alpha,
  overshoot, clip, rounding to X's dtype);
- ``hyperplane_projection_rows``: the projection alone, a row a thread.

The arithmetic is the CPU's, operation by operation, on the row's own views of the scratch
arrays (``to_current``, ``to_clean`` (N, d) float64, ``scratch`` (N, 2, d) float64,
``index`` (N, d) int64, ``buckets`` (N, ``L1_BUCKETS``) float64): the same filtering passes
and quickselect of the level, the same L1 buckets and split, the same sums in the same
order (``float(v)`` reads an element in float64, so that the simulator sums as the GPU
does), and a float64 value enters X's dtype by its store. Given the same gradients the
iterates are bitwise the CPU's on the simulator; a GPU may contract a multiply and an add
into one fused operation, which changes the last bit here and there.
"""

import math

from advgrad.kernels.cuda.internals import cuda
from advgrad.kernels.fab import ALPHA_MAX, BACKWARD, DISTANCE_OFFSET, NORM_FLOOR, OVERSHOOT
from advgrad.kernels.fab_projection import FILTER_PASSES, L1_BUCKETS, SQUARES_UNDERFLOW_BELOW

__all__ = [
    "distance_to",
    "fab_keep_rows",
    "fab_start_rows",
    "fab_step_row",
    "fab_step_rows",
    "hyperplane_projection",
    "hyperplane_projection_rows",
    "keep_closest_row",
    "nearest_boundary_rows",
    "norm",
    "other_class_rows",
]


@cuda.jit(device=True)
def _partition3(key, slope, lo, hi, pivot):
    """``fab_projection._partition3``: key and slope [lo, hi) into < pivot, == pivot, > pivot."""
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


@cuda.jit(device=True)
def _median_of_three(a, b, c):
    return max(min(a, b), min(max(a, b), c))


@cuda.jit(device=True)
def _level(key, slope, n, gap):
    """``fab_projection._level``: the level at which the gains of the n breakpoints key[:n]
    with slopes slope[:n] (both float64, reordered) reach gap; inf where they never do."""
    saturated = 0.0
    top = 0.0
    rising = 0.0
    hi = n
    candidates = rising
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
        if kept == hi:
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
    return top if saturated >= gap else math.inf


@cuda.jit(device=True)
def _ranks_before(weight_i, i, weight_j, j):
    """``fab_projection._ranks_before``: larger |w| first, equal ones by index."""
    return weight_i > weight_j or (weight_i == weight_j and i < j)


@cuda.jit(device=True)
def _l1_split(weight, gain, index, n, before, gap):
    """``fab_projection._l1_split``: the coordinate among index[:n] at which the gains,
    summed in the L1 order after ``before``, first reach gap, and the sum before it; (-1,
    0.0) if none."""
    lo, hi = 0, n
    while lo < hi:
        pivot = index[(lo + hi) // 2]
        pivot_weight = weight[pivot]
        a = lo
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
            j = a
            while index[j] != pivot:
                j += 1
            index[a], index[j] = index[j], index[a]
            lo = a + 1
    return -1, 0.0


@cuda.jit(device=True)
def _l1_bucket(weight_i, largest):
    """``fab_projection._l1_bucket``: the bucket of |w| = weight_i, in [0, L1_BUCKETS)."""
    return min(int(weight_i / largest * (L1_BUCKETS - 1)), L1_BUCKETS - 1)


@cuda.jit(device=True)
def _l1_bucket_split(w, weight, gain, index, buckets, largest, gap):
    """``fab_projection._l1_bucket_split``, its bucket sums in ``buckets`` (L1_BUCKETS,) float64."""
    for bucket in range(L1_BUCKETS):
        buckets[bucket] = 0.0
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


@cuda.jit(device=True)
def _box_rooms(p, x, w, sign, x_min, x_max, D, scratch):
    """L-inf and L2 (``hyperplane_projection``): each coordinate's way to its bound into D
    and the level's keys and slopes into scratch; returns the largest |w| and the most the
    box lets <w, D> reach (in ``fab_projection.hyperplane_projection``'s four interleaved sums)."""
    d = x.shape[0]
    largest = 0.0
    up_sign = sign > 0.0
    for i in range(d):
        wi = float(w[i])
        xi = float(x[i])
        weight = abs(wi)
        up = (wi > 0.0) == up_sign
        room = max(x_max - xi if up else xi - x_min, 0.0)
        room = room if weight > 0.0 else 0.0
        D[i] = room if up else -room
        scratch[0, i] = room if p == math.inf else (room / weight if weight > 0.0 else 0.0)
        scratch[1, i] = weight if p == math.inf else weight * weight
        largest = max(largest, weight)
    total0 = total1 = total2 = total3 = 0.0
    for i in range(0, d - 3, 4):
        total0 += abs(float(w[i])) * abs(D[i])
        total1 += abs(float(w[i + 1])) * abs(D[i + 1])
        total2 += abs(float(w[i + 2])) * abs(D[i + 2])
        total3 += abs(float(w[i + 3])) * abs(D[i + 3])
    for i in range(d - d % 4, d):
        total0 += abs(float(w[i])) * abs(D[i])
    return largest, (total0 + total1) + (total2 + total3)


@cuda.jit(device=True)
def _l1_rooms(x, w, sign, x_min, x_max, D, scratch):
    """L1 (``hyperplane_projection``): each moving coordinate at its bound in D, |w| and its
    gain into scratch; returns (the coordinates that move, the largest |w|, the most the
    box lets <w, D> reach)."""
    n = 0
    largest = 0.0
    total = 0.0
    for i in range(x.shape[0]):
        weight = abs(float(w[i]))
        D[i] = 0.0
        if weight == 0.0:
            continue
        side = sign if w[i] > 0.0 else -sign
        room = max(x_max - float(x[i]) if side > 0.0 else float(x[i]) - x_min, 0.0)
        D[i] = side * room
        total += weight * room
        scratch[0, i] = weight
        scratch[1, i] = weight * room
        largest = max(largest, weight)
        n += 1
    return n, largest, total


@cuda.jit(device=True)
def hyperplane_projection(p, x, w, gap, x_min, x_max, D, scratch, index, buckets):
    """``fab_projection.hyperplane_projection`` of one point: the perturbation D (d,) float64 of
    smallest norm p (math.inf, 2.0 or 1.0) with <w, D> = gap and x + D in [x_min, x_max];
    x, w (d,) of one float dtype; scratch (2, d) float64, index (d,) int64 and buckets
    (``L1_BUCKETS``,) float64 are the row's scratch."""
    d = x.shape[0]
    sign = -1.0 if gap < 0.0 else 1.0
    need = abs(gap)
    if p == 1.0:
        n, largest, total = _l1_rooms(x, w, sign, x_min, x_max, D, scratch)
        if total < need or n == 0:
            return
        weights, gains = scratch[0], scratch[1]
        m, before = _l1_bucket_split(w, weights, gains, index, buckets, largest, need)
        if m < 0:  # the gains fell short by rounding
            return
        weight_m = weights[m]
        for i in range(d):
            if D[i] != 0.0 and not _ranks_before(weights[i], i, weight_m, m):
                D[i] = 0.0
        D[m] = (sign if w[m] > 0.0 else -sign) * ((need - before) / weight_m)
        return
    largest, total = _box_rooms(p, x, w, sign, x_min, x_max, D, scratch)
    unit = 1.0
    if p == 2.0 and 0.0 < largest < SQUARES_UNDERFLOW_BELOW:
        unit = math.ldexp(1.0, min(-math.frexp(largest)[1], 1000))
        for i in range(d):
            weight = abs(float(w[i])) * unit
            scratch[0, i] = abs(D[i]) / weight if weight > 0.0 else 0.0
            scratch[1, i] = weight * weight
    if total < need:
        return
    level = _level(scratch[0], scratch[1], d, need * unit)
    for i in range(d):
        if w[i] != 0.0:
            reach = level if p == math.inf else level * (abs(float(w[i])) * unit)
            D[i] = D[i] if abs(D[i]) <= reach else (reach if D[i] > 0.0 else -reach)


@cuda.jit(device=True)
def _norm_term(total, magnitude, p):
    """``fab_projection.norm_term``."""
    if p == math.inf:
        return max(total, magnitude)
    return total + magnitude * magnitude if p == 2.0 else total + magnitude


@cuda.jit(device=True)
def _norm_total(total, p):
    """``fab_projection.norm_total``."""
    return math.sqrt(total) if p == 2.0 else total


@cuda.jit(device=True)
def norm(D, p):
    """``fab_projection.norm``: the norm p of D (d,), summed in float64."""
    total = 0.0
    for i in range(D.shape[0]):
        total = _norm_term(total, abs(float(D[i])), p)
    return _norm_total(total, p)


@cuda.jit(device=True)
def distance_to(current, x0, p):
    """``fab_projection.distance_to``: the norm p of current - x0 (both (d,)), in float64."""
    total = 0.0
    for i in range(x0.shape[0]):
        total = _norm_term(total, abs(float(current[i]) - float(x0[i])), p)
    return _norm_total(total, p)


@cuda.jit(device=True)
def fab_step_row(x0, current, g, f, p, x_min, x_max, to_current, to_clean, scratch, index, buckets):
    """``fab.fab_step_row``: one FAB step of one row in place on ``current`` (d,), toward
    the hyperplane f + <g, v - current> = 0; to_current, to_clean (d,) float64, scratch,
    index and buckets as in ``hyperplane_projection``."""
    gap = -f
    hyperplane_projection(p, current, g, gap, x_min, x_max, to_current, scratch, index, buckets)
    shift = 0.0
    for i in range(x0.shape[0]):
        shift += float(g[i]) * (float(x0[i]) - float(current[i]))
    hyperplane_projection(p, x0, g, gap - shift, x_min, x_max, to_clean, scratch, index, buckets)
    current_length = max(norm(to_current, p), NORM_FLOOR)
    clean_length = max(norm(to_clean, p), NORM_FLOOR)
    alpha = min(current_length / (current_length + clean_length), ALPHA_MAX)
    for i in range(x0.shape[0]):
        moved = (float(current[i]) + OVERSHOOT * to_current[i]) * (1.0 - alpha)
        moved += (float(x0[i]) + OVERSHOOT * to_clean[i]) * alpha
        current[i] = min(max(moved, x_min), x_max)


@cuda.jit(device=True)
def keep_closest_row(x0, current, p, closest, distance, n):
    """``fab.keep_closest_row``: a misclassified iterate ``current`` (d,) goes to
    ``closest`` (d,) when nearer to x0 than distance[n] (updated), and the run backs up to
    x0 + ``BACKWARD`` (current - x0), rounded to current's dtype by the store."""
    length = distance_to(current, x0, p)
    if length < distance[n]:
        for i in range(x0.shape[0]):
            closest[i] = current[i]
        distance[n] = length
    for i in range(x0.shape[0]):
        offset = float(current[i]) - float(x0[i])
        current[i] = float(x0[i]) + BACKWARD * offset


@cuda.jit
def fab_start_rows(X, start, current, closest, distance):
    """A run's state before iteration 0: current = start, closest = X (N, d), distance
    (N,) float64 = inf (no misclassified iterate yet)."""
    N, d = X.shape
    for n in range(cuda.grid(1), N, cuda.gridsize(1)):
        for i in range(d):
            current[n, i] = start[n, i]
            closest[n, i] = X[n, i]
        distance[n] = math.inf


@cuda.jit
def fab_keep_rows(X, labels, Z, p, current, closest, distance):
    """Iteration > 0 of ``fab.fab_steps_block`` after the logits Z (N, C) of the iterates
    current (N, d): where argmax Z (the first on ties) is not the label, ``keep_closest_row``
    on the row's closest (N, d) and distance (N,) float64."""
    N, C = Z.shape
    for n in range(cuda.grid(1), N, cuda.gridsize(1)):
        predicted = 0
        for k in range(1, C):
            if Z[n, k] > Z[n, predicted]:
                predicted = k
        if predicted != labels[n]:
            keep_closest_row(X[n], current[n], p, closest[n], distance, n)


@cuda.jit
def other_class_rows(labels, others):
    """others (C - 1, N) int64: row j holds, for each row n, the j-th class other than
    labels[n] (the classes k != y in increasing order)."""
    K, N = others.shape
    for n in range(cuda.grid(1), N, cuda.gridsize(1)):
        for j in range(K):
            others[j, n] = j + 1 if j >= labels[n] else j


@cuda.jit
def nearest_boundary_rows(first, q, G_k, f_k, G, f, nearest):
    """Untargeted FAB, after the gradient G_k (N, d) and the value f_k (N,) of z_k - z_y
    for the next class k != y of each row (``fab.nearest_boundary_block``): where its
    boundary's distance |f_k| / (``DISTANCE_OFFSET`` + ||g_k||_q) is below nearest (N,)
    float64, or for the first class (``first``), G_k and f_k go to G and f and the
    distance to nearest (so the first class wins ties, as the CPU's)."""
    N, d = G.shape
    for n in range(cuda.grid(1), N, cuda.gridsize(1)):
        distance = abs(float(f_k[n])) / (DISTANCE_OFFSET + norm(G_k[n], q))
        if first or distance < nearest[n]:
            nearest[n] = distance
            f[n] = f_k[n]
            for i in range(d):
                G[n, i] = G_k[n, i]


@cuda.jit
def fab_step_rows(X, G, f, p, x_min, x_max, current, to_current, to_clean, scratch, index, buckets):
    """``fab_step_row`` on every row: the hyperplane f[n] + <G[n], v - current[n]> = 0
    (X, G, current (N, d) of one float dtype, f (N,) of it); the rest the rows' scratch."""
    for n in range(cuda.grid(1), X.shape[0], cuda.gridsize(1)):
        fab_step_row(
            X[n], current[n], G[n], float(f[n]), p, x_min, x_max, to_current[n], to_clean[n],
            scratch[n], index[n], buckets[n],
        )  # fmt: skip


@cuda.jit
def hyperplane_projection_rows(p, X, W, gap, x_min, x_max, D, scratch, index, buckets):
    """``hyperplane_projection`` of every row: X, W (N, d) of one float dtype, gap (N,)
    float64, D (N, d) float64 output; scratch, index and buckets the rows' scratch."""
    for n in range(cuda.grid(1), X.shape[0], cuda.gridsize(1)):
        hyperplane_projection(
            p, X[n], W[n], gap[n], x_min, x_max, D[n], scratch[n], index[n], buckets[n]
        )
