"""Slow NumPy float64 Square attack, one row and one query at a time, written from the
definition of AutoAttack's reference (``autoattack/square.py``) and the random draws that
``advgrad.square`` documents (not from its code): each row in turn, each update a plain
loop over the channels, the whole image clipped as the reference clips it (L1: projected
onto the ball and the box by ``reference_apgd.project_l1_box``).
"""

from __future__ import annotations

import math

import numpy as np
import reference_random
from reference import worst_margin
from reference_apgd import project_l1_box

from advgrad.square import SCHEDULE_BOUNDS, SCHEDULE_SCALE

START_STREAM = 2**32  # update i draws from START_STREAM + 1 + i
SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
L1_SHRINK = 1.0 - 1e-6  # L1 points are projected onto the ball of radius eps * L1_SHRINK


def uniforms(seed, stream, row, width):
    """The ``width`` uniform numbers of absolute row ``row`` in ``stream``: Philox4x32-10
    keyed by (seed, stream, row, column) (``reference_random``)."""
    return reference_random.uniforms(seed, stream, [row], width)[0]


def sign(u):
    return -1.0 if u < 0.5 else 1.0


def position(u, length, side):
    return math.floor((length - side) * u)


def p_at(update, queries, p_init):
    scaled = int(update / queries * 10000)
    for halvings, bound in enumerate(SCHEDULE):
        if scaled <= bound:
            return p_init / 2**halvings
    return p_init / 2 ** len(SCHEDULE)


def size(delta, norm):
    """The L2 norm (norm "2") or the L1 norm (norm "1") of an array."""
    return math.sqrt((delta**2).sum()) if norm == "2" else np.abs(delta).sum()


def rectangles(height, width, norm):
    """Nested rectangles around the centre, weighted 1 / (k + 1)^2 (L2) or 1 / (k + 1)^4
    (L1), of unit norm."""
    mass = np.zeros((height, width))
    row, column = height // 2, width // 2
    for k in range(max(height // 2 + 1, width // 2 + 1)):
        mass[
            max(row, 0) : min(row + 2 * k + 1, height),
            max(column, 0) : min(column + 2 * k + 1, width),
        ] += 1.0 / (k + 1) ** (2 if norm == "2" else 4)
        row -= 1
        column -= 1
    if mass.size:
        mass /= size(mass, norm)
    return mass


def eta(side, transposed, norm):
    window = np.zeros((side, side))
    window[: side // 2] = rectangles(side // 2, side, norm)
    window[side // 2 :] = -rectangles(side - side // 2, side, norm)
    window /= size(window, norm)
    return window.T if transposed else window


def clip(v, lo, hi):
    return np.minimum(np.maximum(v, lo), hi)


def start(x, u, eps, norm, x_min, x_max, project):
    """The starting point of one row x (c, h, w) from its start draws u; ``project(v)``:
    the nearest point to v of the L1 ball around x and the box."""
    c, h, w = x.shape
    if norm == "inf":
        delta = np.zeros((c, h, w))
        for ch in range(c):
            for column in range(w):
                delta[ch, :, column] = eps * sign(u[ch * w + column])
        return clip(x + delta, x_min, x_max)
    side = max(min(h, w) // 5, 1)
    tops = [(h - side * (h // side)) // 2 + side * k for k in range(h // side)]
    lefts = [(w - side * (w // side)) // 2 + side * k for k in range(w // side)]
    n_windows = len(tops) * len(lefts)
    delta = np.zeros((c, h, w))
    window = 0
    for top in tops:
        for left in lefts:
            pattern = eta(side, u[window] > 0.5, norm)
            for ch in range(c):
                delta[ch, top : top + side, left : left + side] += pattern * sign(
                    u[n_windows + window * c + ch]
                )
            window += 1
    if norm == "1":
        return project(x + delta)
    return clip(x + delta / (math.sqrt((delta**2).sum()) + 1e-12) * eps, x_min, x_max)


def update(x, x_best, u, eps, norm, side, x_min, x_max, project):
    """One row's proposal: x, x_best (c, h, w), the update's draws u, window side;
    ``project`` as ``start`` takes it."""
    c, h, w = x.shape
    top, left = position(u[0], h, side), position(u[1], w, side)
    window = (slice(top, top + side), slice(left, left + side))
    if norm == "inf":
        x_new = x_best.copy()
        for ch in range(c):
            x_new[ch][window] = x[ch][window] + eps * sign(u[2 + ch])
        return clip(x_new, x_min, x_max)
    emptied = (
        slice(position(u[2], h, side), position(u[2], h, side) + side),
        slice(position(u[3], w, side), position(u[3], w, side) + side),
    )
    delta = x_best - x
    union = np.zeros((h, w))
    union[window] = 1.0
    union[emptied] = 1.0
    if norm == "2":
        budget = max(eps**2 - (delta**2).sum(), 0.0) / c
    else:
        budget = max(eps - np.abs(delta).sum(), 0.0) / c
    fresh = np.zeros((c, side, side))
    for ch in range(c):
        old = delta[ch][window]
        moved = eta(side, u[4] > 0.5, norm) * sign(u[5 + ch]) + old / (1e-12 + size(old, norm))
        if norm == "2":
            mass = math.sqrt(budget + ((delta[ch] * union) ** 2).sum())
        else:  # the reference's L1 mass: c times that of one channel
            mass = (budget + np.abs(delta[ch] * union).sum()) * c
        fresh[ch] = moved / (1e-12 + size(moved, norm)) * mass
    for ch in range(c):
        delta[ch][emptied] = 0.0
        delta[ch][window] = fresh[ch]
    if norm == "1":
        return project(x + delta)
    return clip(x + delta / (math.sqrt((delta**2).sum()) + 1e-12) * eps, x_min, x_max)


def square(
    X, labels, W1, b1, W2, b2, *, eps, norm, queries, p_init, seed, x_min, x_max, first_row, layout
):
    """X_adv (N, d) float64 and queries_used (N,) of the Square attack, row by row.

    ``layout``: (c, h, w, channels_last), how a row of d features forms the image.
    """
    c, h, w, channels_last = layout

    def image(row):
        return (
            row.reshape(h, w, c).transpose(2, 0, 1).copy()
            if channels_last
            else row.reshape(c, h, w).copy()
        )

    def flat(img):
        return img.transpose(1, 2, 0).ravel() if channels_last else img.ravel()

    def margin(img, label):
        return worst_margin(flat(img)[None], [label], W1, b1, W2, b2)[0]

    def projector(x):
        def project(v):  # in the order of the row's features
            return image(project_l1_box(flat(v), flat(x), eps * L1_SHRINK, x_min, x_max))

        return project

    X = np.asarray(X, dtype=np.float64)
    X_adv = X.copy()
    queries_used = np.zeros(len(X), dtype=np.int64)
    for n, (row, label) in enumerate(zip(X, labels, strict=True)):
        x = image(row)
        if margin(x, label) < 0.0:
            continue
        start_width = c * w
        if norm != "inf":
            side = max(min(h, w) // 5, 1)
            start_width = (h // side) * (w // side) * (1 + c)
        u = uniforms(seed, START_STREAM, first_row + n, start_width)
        x_best = start(x, u, eps, norm, x_min, x_max, projector(x))
        best = margin(x_best, label)
        used = 1
        for i in range(queries):
            if best < 0.0:
                break
            side = round(math.sqrt(p_at(i, queries, p_init) * (c * h * w) / c))
            if norm == "inf":
                side = max(side, 1)
            else:
                side = max(side, 3)
                side += 1 if side % 2 == 0 else 0
            side = min(side, h, w)
            u = uniforms(seed, START_STREAM + 1 + i, first_row + n, (2 if norm == "inf" else 5) + c)
            x_new = update(x, x_best, u, eps, norm, side, x_min, x_max, projector(x))
            proposal = margin(x_new, label)
            used += 1
            if proposal < best:
                x_best, best = x_new, proposal
        X_adv[n] = flat(x_best)
        queries_used[n] = used
    return X_adv, queries_used


def window_fraction(update: int, queries: int, p_init: float) -> float:
    """p at update ``update`` (0-based) of ``queries``: the paper's schedule (halved after
    the update counts ``SCHEDULE_BOUNDS`` of ``SCHEDULE_SCALE``), rescaled to ``queries``."""
    scaled = int(update / queries * SCHEDULE_SCALE)
    return p_init / 2 ** sum(scaled > bound for bound in SCHEDULE_BOUNDS)
