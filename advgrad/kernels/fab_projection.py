"""Numba CPU kernels of FAB's projections: the smallest perturbation, in norm p (inf, 2 or
1), that moves a point onto a hyperplane within a box, and the norms FAB measures with.

``hyperplane_projection`` finds the smallest perturbation onto a hyperplane within a box
in expected linear time, never a sort: the level of a piecewise linear function by
filtering passes, then quickselect-style partitioning of its breakpoints (``_level``;
L-inf and L2), or the split of the coordinates ranked by |w| by buckets of |w|, then
quickselect in the split's bucket (``_l1_bucket_split``; L1). A step's two projections
(``step_projections``) share what depends on the normal only (slopes, |w|), and their level
searches run their filtering passes in one loop; loops without a sum are shaped to
vectorise, and every sum keeps its order, so the results are bit for bit those of one
plain loop per pass.
"""

import math

import numpy as np
from numba import njit

FILTER_PASSES = 8
"""The most filtering passes a projection's level search makes before its quickselect."""
L1_BUCKETS = 64
"""L1 projections sum the gains in this many buckets of |w| to find the bucket the split
falls in (``_l1_bucket_split``)."""
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
def _filter_one(key, slope, floor, level, sums):
    """One key in a filtering pass of ``_search_levels``: skipped where an earlier pass
    found it below the level (key <= floor), its gain taken where this one does (key <=
    level), else its slope; sums (saturated, top, candidates, kept), updated."""
    saturated, top, candidates, kept = sums
    if not key <= floor:
        if key <= level:
            saturated += key * slope
            top = max(top, key)
        else:
            candidates += slope
            kept += 1
    return saturated, top, candidates, kept


@njit(cache=True, error_model="numpy")
def _saturates_any(key, n, floor, level):
    """Whether a filtering pass at level saturates any of the keys key[:n] left above
    floor (counted, not branched on, so that the loop vectorises)."""
    count = 0
    for i in range(n):
        count += (not key[i] <= floor) & (key[i] <= level)
    return count > 0


@njit(cache=True, error_model="numpy")
def _select_level(key, slope, hi, gap, saturated, top):
    """``_level``'s quickselect over the breakpoints key[:hi] left by its filtering passes
    (reordered with slope[:hi]), the gains of the others summing to saturated, top the
    largest of their keys."""
    rising = 0.0  # sum of the slopes of the keys known to lie at or above the level
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
def _search(candidates, n, active):
    """A level search over n keys whose slopes sum to candidates, before its filtering
    passes: (found, level, floor, hi, saturated, top, candidates), found where the level
    is known (an inactive search counts as found), floor the largest level of the passes so
    far, hi the keys above it, saturated the sum of the gains of the others and top the
    largest of them."""
    return not active, 0.0, -math.inf, n, 0.0, 0.0, candidates


@njit(cache=True, error_model="numpy")
def _next_pass(search, key, n, gap):
    """The next filtering pass of a search over key[:n], up to its sums: (whether the pass
    must sum, the search). No pass where the level is found or no key with a slope is left
    (the quickselect takes over); a pass that saturates no key finds the level by a scan."""
    found, _, floor, hi, saturated, top, candidates = search
    if found or hi == 0 or candidates <= 0.0:
        return False, search
    level = (gap - saturated) / candidates
    saturates = _saturates_any(key, n, floor, level)
    return saturates, (not saturates, level, floor, hi, saturated, top, candidates)


@njit(cache=True, error_model="numpy")
def _after_pass(search, sums):
    """The search after a filtering pass that ended with sums (``_filter_one``)."""
    _, level, floor, _, _, _, _ = search
    saturated, top, candidates, kept = sums
    return False, level, max(floor, level), kept, saturated, top, candidates


@njit(cache=True, error_model="numpy")
def _settled_level(search, key, slope, n, gap, slope_out):
    """The level of a search after its filtering passes: the last pass's where found, else
    ``_select_level``'s over the keys above its floor (moved to key[:hi], their slopes to
    slope_out[:hi], in order; slope_out may be slope)."""
    found, level, floor, hi, saturated, top, _ = search
    if found:
        return max(level, 0.0)
    kept = 0
    for i in range(n):
        if not key[i] <= floor:
            key[kept], slope_out[kept] = key[i], slope[i]
            kept += 1
    return _select_level(key, slope_out, hi, gap, saturated, top)


@njit(cache=True, error_model="numpy")
def _search_levels(key, key0, slope, n, gap, gap0, candidates, active, active0, slope_out):
    """``_level`` of the keys key[:n] and of key0[:n] (each where active, else 0.0), both
    with the slopes slope[:n] of sum candidates (in order), slope left as it is: the
    quickselect's slopes go to slope_out (which may be slope where one search is active).

    A key found below the level in pass k lies at or below the largest level of passes
    1..k (the floor), so each pass sees the keys left in their order, as the compacted ones
    of ``_level``'s description, and sums them in that order. A pass that saturates no key
    (the last, mostly the second) is a scan for one, without the sums; the sums of the
    two searches' passes run in one loop, so that they overlap.
    """
    search = _search(candidates, n, active)
    search0 = _search(candidates, n, active0)
    for _ in range(FILTER_PASSES):
        summing, search = _next_pass(search, key, n, gap)
        summing0, search0 = _next_pass(search0, key0, n, gap0)
        if not (summing or summing0):
            break
        sums, sums0 = (search[4], search[5], 0.0, 0), (search0[4], search0[5], 0.0, 0)
        for i in range(n):
            if summing:
                sums = _filter_one(key[i], slope[i], search[2], search[1], sums)
            if summing0:
                sums0 = _filter_one(key0[i], slope[i], search0[2], search0[1], sums0)
        search = _after_pass(search, sums) if summing else search
        search0 = _after_pass(search0, sums0) if summing0 else search0
    level = _settled_level(search, key, slope, n, gap, slope_out)
    return level, _settled_level(search0, key0, slope, n, gap0, slope_out)


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
    candidates = 0.0
    for i in range(n):
        candidates += slope[i]
    return _search_levels(key, key, slope, n, gap, gap, candidates, True, False, slope)[0]


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
    coordinates are selected among (all of them where rounding puts it past that bucket).

    The buckets go to index first (-1 for w_i = 0), in a loop of their own that vectorises.
    """
    d = w.shape[0]
    for i in range(d):
        index[i] = _l1_bucket(weight[i], largest) if w[i] != 0.0 else -1
    buckets = np.zeros(L1_BUCKETS)
    for i in range(d):
        if index[i] >= 0:
            buckets[index[i]] += gain[i]
    before = 0.0
    split = -1
    for bucket in range(L1_BUCKETS - 1, -1, -1):
        if before + buckets[bucket] >= gap:
            split = bucket
            break
        before += buckets[bucket]
    if split >= 0:
        n = 0
        for i in range(d):
            if index[i] == split:
                index[n] = i
                n += 1
        m, before_m = _l1_split(weight, gain, index, n, before, gap)
        if m >= 0:
            return m, before_m
    n = 0
    for i in range(d):
        if w[i] != 0.0:
            index[n] = i
            n += 1
    return _l1_split(weight, gain, index, n, 0.0, gap)


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
def _magnitude(a, b, i, difference):
    """|a_i - b_i| where difference, else |a_i|, in float64."""
    return abs(np.float64(a[i]) - np.float64(b[i])) if difference else abs(np.float64(a[i]))


@njit(cache=True, error_model="numpy")
def _norm_of(a, b, p, difference):
    """The norm p of a - b (where difference) or of a (both (d,)), in float64. L-inf runs
    in four interleaved maxima: the same maximum (of magnitudes >= 0, a NaN one skipped
    either way), and no chain of dependent comparisons; the sums run in order."""
    d = a.shape[0]
    if p != np.inf:
        total = 0.0
        for i in range(d):
            magnitude = _magnitude(a, b, i, difference)
            if magnitude != 0.0:  # adding 0 changes no sum (never -0): L1 moves few
                total = norm_term(total, magnitude, p)
        return norm_total(total, p)
    top0 = top1 = top2 = top3 = 0.0
    for i in range(0, d - 3, 4):
        top0 = max(top0, _magnitude(a, b, i, difference))
        top1 = max(top1, _magnitude(a, b, i + 1, difference))
        top2 = max(top2, _magnitude(a, b, i + 2, difference))
        top3 = max(top3, _magnitude(a, b, i + 3, difference))
    for i in range(d - d % 4, d):
        top0 = max(top0, _magnitude(a, b, i, difference))
    return max(max(top0, top1), max(top2, top3))


@njit(cache=True, error_model="numpy")
def norm(D, p):
    """The norm p (np.inf, 2.0 or 1.0) of D (d,), summed in float64."""
    return _norm_of(D, D, p, False)


@njit(cache=True, error_model="numpy")
def distance_to(current, x0, p):
    """The norm p of current - x0 (both (d,)), the difference taken in float64."""
    return _norm_of(current, x0, p, True)


@njit(cache=True, error_model="numpy")
def _room(x_i, w_i, up_sign, x_min, x_max):
    """(room_i, up): the way >= 0 of coordinate x_i to the box's bound on the side of
    sign(w_i gap) (up where that is +1; up_sign: gap >= 0), 0 where w_i = 0; float64."""
    w_i = np.float64(w_i)
    up = (w_i > 0.0) == up_sign
    room = max(x_max - np.float64(x_i) if up else np.float64(x_i) - x_min, 0.0)
    return (room if abs(w_i) > 0.0 else 0.0), up


@njit(cache=True, error_model="numpy")
def _slopes_into(p, w, x, x0, slope):
    """Writes the level's slopes |w_i| (L-inf) or w_i^2 (L2) to slope (d,); returns their
    sum (in order) and <w, x0 - x>, in one pass."""
    candidates = shift = 0.0
    for i in range(w.shape[0]):
        w_i = np.float64(w[i])
        slope[i] = abs(w_i) if p == np.inf else w_i * w_i
        candidates += slope[i]
        shift += w_i * (np.float64(x0[i]) - np.float64(x[i]))
    return candidates, shift


@njit(cache=True, error_model="numpy")
def _unit(p, w):
    """L2: the power of two w is scaled by in the level's keys and slopes, 1.0 but where
    the largest |w_i| lies in (0, ``SQUARES_UNDERFLOW_BELOW``) (found by counts, which
    vectorise, before the largest itself is)."""
    if p != 2.0:
        return 1.0
    large = positive = 0
    for i in range(w.shape[0]):
        weight = abs(np.float64(w[i]))
        large += weight >= SQUARES_UNDERFLOW_BELOW
        positive += weight > 0.0
    if large > 0 or positive == 0:
        return 1.0
    largest = 0.0
    for i in range(w.shape[0]):
        largest = max(largest, abs(np.float64(w[i])))
    return math.ldexp(1.0, min(-math.frexp(largest)[1], 1000))


@njit(cache=True, error_model="numpy")
def _rescaled_slopes_into(w, unit, slope):
    """L2 where |w| would underflow squared: slope = (|w| unit)^2; returns its sum."""
    candidates = 0.0
    for i in range(w.shape[0]):
        weight = abs(np.float64(w[i])) * unit
        slope[i] = weight * weight
        candidates += slope[i]
    return candidates


@njit(cache=True, error_model="numpy")
def _keys_into(p, x, w, gap, x_min, x_max, unit, key, gain):
    """The breakpoints of a projection's level, L-inf room_i, L2 room_i / (|w_i| unit), to
    key (d,), and the gains |w_i| room_i to gain (d,); returns the most the box lets
    <w, D> reach, the gains summed in four interleaved sums."""
    d = x.shape[0]
    up_sign = not gap < 0.0
    for i in range(d):
        room, _ = _room(x[i], w[i], up_sign, x_min, x_max)
        weight = abs(np.float64(w[i]))
        scaled = weight * unit
        if p == np.inf:
            key[i] = room
        else:
            key[i] = (room if unit == 1.0 else abs(room)) / scaled if scaled > 0.0 else 0.0
        gain[i] = weight * abs(room)
    total0 = total1 = total2 = total3 = 0.0
    for i in range(0, d - 3, 4):
        total0 += gain[i]
        total1 += gain[i + 1]
        total2 += gain[i + 2]
        total3 += gain[i + 3]
    for i in range(d - d % 4, d):
        total0 += gain[i]
    return (total0 + total1) + (total2 + total3)


@njit(cache=True, error_model="numpy")
def _clamped(p, x_i, w_i, up_sign, x_min, x_max, unit, reaches, level):
    """D_i of a projection: sign(w_i gap) min(room_i, reach_i), reach_i = level (L-inf) or
    level |w_i| unit (L2); the whole room where the box does not reach the hyperplane."""
    room, up = _room(x_i, w_i, up_sign, x_min, x_max)
    if reaches and w_i != 0.0:
        reach = level if p == np.inf else level * (abs(np.float64(w_i)) * unit)
        inside = abs(room) <= reach
        # the sign of (room if up else -room) where it is cut: + where that is > 0
        up = up if inside else up and room > 0.0
        room = room if inside else reach
    return room if up else -room


@njit(cache=True, error_model="numpy")
def _level_projections(p, x, x0, w, gap, x_min, x_max, D, D0, scratch, pair):
    """``step_projections`` for p = inf or 2: the slopes, shared, go to scratch[0], the keys
    to D and D0 (the gains to scratch[1] on the way), then the levels set the moves."""
    d = x.shape[0]
    candidates, shift = _slopes_into(p, w, x, x0, scratch[0])
    unit = _unit(p, w)
    if unit != 1.0:
        candidates = _rescaled_slopes_into(w, unit, scratch[0])
    gap0 = gap - shift
    need, need0 = abs(gap), abs(gap0)
    reaches = not _keys_into(p, x, w, gap, x_min, x_max, unit, D, scratch[1]) < need
    reaches0 = pair and not _keys_into(p, x0, w, gap0, x_min, x_max, unit, D0, scratch[1]) < need0
    level, level0 = _search_levels(
        D, D0, scratch[0], d, need * unit, need0 * unit, candidates, reaches, reaches0, scratch[1]
    )
    for i in range(d):
        D[i] = _clamped(p, x[i], w[i], not gap < 0.0, x_min, x_max, unit, reaches, level)
    if not pair:
        return 0.0, 0.0
    for i in range(d):
        D0[i] = _clamped(p, x0[i], w[i], not gap0 < 0.0, x_min, x_max, unit, reaches0, level0)
    return _norms(D, D0, p)


@njit(cache=True, error_model="numpy")
def _norms(D, D0, p):
    """``norm`` of D and of D0 (both (d,)), L2's sums in one pass."""
    if p != 2.0:
        return norm(D, p), norm(D0, p)
    length = length0 = 0.0
    for i in range(D.shape[0]):
        length = norm_term(length, abs(np.float64(D[i])), p)
        length0 = norm_term(length0, abs(np.float64(D0[i])), p)
    return norm_total(length, p), norm_total(length0, p)


@njit(cache=True, error_model="numpy")
def _l1_weights_into(w, x, x0, weight):
    """weight = |w| (d,) float64; returns the largest |w_i|, the count of nonzero w_i and
    <w, x0 - x>, in one pass."""
    largest = shift = 0.0
    moving = 0
    for i in range(w.shape[0]):
        w_i = np.float64(w[i])
        weight[i] = abs(w_i)
        largest = max(largest, weight[i])
        moving += weight[i] != 0.0
        shift += w_i * (np.float64(x0[i]) - np.float64(x[i]))
    return largest, moving, shift


@njit(cache=True, error_model="numpy")
def _l1_projection(x, w, gap, x_min, x_max, largest, moving, D, scratch, index):
    """``hyperplane_projection`` for p = 1, given scratch[0] = |w|, its largest and the
    count of nonzero w_i (``_l1_weights_into``); the gains go to scratch[1]."""
    d = x.shape[0]
    sign = -1.0 if gap < 0.0 else 1.0
    need = abs(gap)
    weight, gain = scratch[0], scratch[1]
    for i in range(d):
        side = sign if w[i] > 0.0 else -sign
        room = max(x_max - np.float64(x[i]) if side > 0.0 else np.float64(x[i]) - x_min, 0.0)
        still = weight[i] == 0.0
        D[i] = 0.0 if still else side * room
        gain[i] = 0.0 if still else weight[i] * room
    total = 0.0  # summed apart, so that the loop above vectorises
    for i in range(d):
        total += gain[i]
    if total < need or moving == 0:  # moving = 0: w = 0 (and gap 0)
        return
    m, before = _l1_bucket_split(w, weight, gain, index, largest, need)
    if m < 0:  # the gains fell short by rounding
        return
    weight_m = weight[m]
    for i in range(d):
        after = D[i] != 0.0 and not _ranks_before(weight[i], i, weight_m, m)
        D[i] = 0.0 if after else D[i]
    D[m] = (sign if w[m] > 0.0 else -sign) * ((need - before) / weight_m)


@njit(cache=True, error_model="numpy")
def step_projections(p, x, x0, w, gap, x_min, x_max, D, D0, scratch, index, pair):
    """The projection D (``hyperplane_projection``) of x onto <w, v - x> = gap and, where
    pair, D0 of x0 onto the same hyperplane (its gap gap - <w, x0 - x>); returns the norms
    p of D and D0 where pair, else (0.0, 0.0)."""
    if p != 1.0:
        return _level_projections(p, x, x0, w, gap, x_min, x_max, D, D0, scratch, pair)
    largest, moving, shift = _l1_weights_into(w, x, x0, scratch[0])
    _l1_projection(x, w, gap, x_min, x_max, largest, moving, D, scratch, index)
    if not pair:
        return 0.0, 0.0
    _l1_projection(x0, w, gap - shift, x_min, x_max, largest, moving, D0, scratch, index)
    return _norms(D, D0, p)


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
    step_projections(p, x, x, w, gap, x_min, x_max, D, D, scratch, index, False)
