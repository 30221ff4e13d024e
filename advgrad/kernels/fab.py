"""Numba CPU kernels of FAB, the fast adaptive boundary attack (Croce & Hein, ICML 2020).

``advgrad.fab`` states the algorithm; these kernels run it. A FAB run on a row is a sequence
of iterations 0, 1, ..., steps: iteration i evaluates the iterate (its logits, hence its
predicted class); from iteration 1 on, an iterate the model misclassifies is kept when it
is the closest to the clean row so far and the run backs up to x0 + ``BACKWARD`` (x - x0);
then, but for the last iteration, the boundary is linearised at the iterate (the hyperplane
f + <g, v - x> = 0) and the iterate moves (``fab_step_row``): both it and the clean row are
projected onto the hyperplane within the box (``fab_projection``) and the next
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
- the projections (``fab_projection.step_projections``) find the smallest perturbation
  onto a hyperplane within a box in expected linear time, never a sort.

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
from advgrad.kernels.fab_projection import distance_to, norm, step_projections

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
JACOBIAN_ENTRIES = 2**18
"""Untargeted: the boundary gradients of a block are formed for as many rows at a time as
keep them within this many entries (at least one row)."""


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
    lengths = step_projections(
        p, current, x0, g, -np.float64(f), x_min, x_max, to_current, to_clean, scratch, index,
        True,
    )  # fmt: skip
    current_length = max(lengths[0], NORM_FLOOR)
    clean_length = max(lengths[1], NORM_FLOOR)
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
