"""The Square attack (Andriushchenko et al., ECCV 2020), L-inf and L2: a score-based
black-box attack that only queries the network's logits.

Written from the definition of AutoAttack's reference (``autoattack/square.py``) and with
its semantics: the margin loss z_y - max_{k != y} z_k (a row is broken once its margin is
below 0), the paper's schedule of p (the fraction of the image a square window covers,
halved at fixed points of a 10,000-query scale rescaled to ``queries``), the L-inf start
of vertical stripes and the L2 start of "meta pseudo-Gaussian" windows, and updates that
each set one window to x +- eps (L-inf) or move the mass of one window into another (L2)
and are kept where the margin falls. One query is one forward pass over the rows not yet
broken.

Where it differs from the reference, on purpose: each row draws its own windows, signs
and transpositions (the reference draws one window position, one set of channel signs and
one transposition per query for the whole batch), so that a row's result does not depend
on its batch; a row counts as broken at a margin below 0, where its prediction differs
from y whatever the tie rule (the reference stops at 0); an L-inf update sets its window
to clip(x +- eps) directly (``linf_update``); the L2 start grid has floor(L / s) windows
along an axis of length L, centred, which is the reference's 5 x 5 grid wherever that
fits the image.

Queries. The clean rows take one forward pass, not counted; rows already classified wrong
there are returned as they are, with 0 queries used. The others take the random starting
point (query 1), then up to ``queries`` updates (update i is query i + 2), so a row that is
never broken uses ``queries + 1``, as the reference counts them.

Images. The windows are squares on an (h, w) image of c channels (``image_layout``): from
``image_shape`` (h, w), (c, h, w) or (h, w, c) (a dataset's ``input_shape``; of a 3-D
shape, the shorter of the first and last axes holds the channels, the first on a tie);
for flat data, the most nearly square h x w = d (h the largest divisor of d not above
sqrt(d): 784 is 28 x 28, and a prime d is 1 x d, where every window is one pixel).

Randomness. Every random choice comes from ``seed`` and the absolute row index through
``advgrad.attacks.row_uniforms`` (the project's per-row convention), so a row gets the same
numbers whatever the batch it is processed in and whichever rows are still being updated:
the start draws from stream ``SQUARE_STREAM``, update i from ``SQUARE_STREAM + 1 + i``.
Each row's uniform numbers u, by column (c channels, h x w image, windows of side s):

- L-inf start: c * w stripe signs, channel-major (u[ch * w + column]);
- L-inf update: window top, window left, c signs;
- L2 start: one transposition per window of the start grid (row-major over the grid),
  then c signs per window (u[n_windows + window * c + ch]);
- L2 update: top and left of the window that receives, top and left of the window that
  is emptied, the transposition, c signs.

A sign is -1 where u < 0.5 and +1 elsewhere; a window is transposed where u > 0.5; a
position along an axis of length L is floor((L - s) u), as the reference draws it (which
never places a window at L - s itself unless s = L).
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from advgrad.attacks import (
    as_rows,
    check_count,
    check_radius,
    check_seed,
    label_matrix,
    norm_order,
    row_indices,
    row_uniforms,
)
from advgrad.backend import get_backend
from advgrad.model import Model

SQUARE_STREAM = 2**32
"""Random stream of Square's starting points; update i draws from ``SQUARE_STREAM + 1 + i``
(apart from PGD's restart streams 0, 1, ... and the random targets' 2**31)."""
SCHEDULE_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
"""The paper's p schedule on a 10,000-query scale: p_init halves past each bound."""
SCHEDULE_SCALE = 10000
L2_START_GRID = 5
"""The L2 start tiles the image, centred, with windows of side min(h, w) // 5 (at least 1)."""
DIVISION_GUARD = 1e-12
"""Added to every norm the updates divide by, as in the reference."""


@dataclass(frozen=True)
class ImageLayout:
    """How the d features of a row form an image of ``channels`` x ``height`` x ``width``;
    ``channels_last``: the row is stored (h, w, c), else (c, h, w)."""

    channels: int
    height: int
    width: int
    channels_last: bool = False

    def image(self, rows: np.ndarray) -> np.ndarray:
        """A (n, c, h, w) view of C-contiguous rows (n, d): writing it writes the rows."""
        c, h, w = self.channels, self.height, self.width
        if self.channels_last:
            return rows.reshape(len(rows), h, w, c).transpose(0, 3, 1, 2)
        return rows.reshape(len(rows), c, h, w)


def image_layout(d: int, image_shape=None) -> ImageLayout:
    """The image the windows move on (see the module docstring).

    Parameters
    ----------
    d : int, the features of a row
    image_shape : None, (d,), (h, w), (c, h, w) or (h, w, c) whose product is d

    Raises ValueError for a shape of another length, or whose product is not d.
    """
    try:
        shape = (d,) if image_shape is None else tuple(operator.index(s) for s in image_shape)
    except TypeError:
        raise ValueError(
            f"image_shape must be a tuple of integers, got {image_shape!r:.40}"
        ) from None
    if not 1 <= len(shape) <= 3 or min(shape) < 1 or math.prod(shape) != d:
        raise ValueError(
            f"image_shape must be (h, w), (c, h, w) or (h, w, c) with d = {d} elements, got {shape}"
        )
    if len(shape) == 1:
        height = next(h for h in range(math.isqrt(d), 0, -1) if d % h == 0)
        return ImageLayout(1, height, d // height)
    if len(shape) == 2:
        return ImageLayout(1, *shape)
    if shape[0] <= shape[2]:
        return ImageLayout(*shape)
    return ImageLayout(shape[2], shape[0], shape[1], channels_last=True)


def window_fraction(update: int, queries: int, p_init: float) -> float:
    """p at update ``update`` (0-based) of ``queries``: the paper's schedule, rescaled."""
    scaled = int(update / queries * SCHEDULE_SCALE)
    return p_init / 2 ** sum(scaled > bound for bound in SCHEDULE_BOUNDS)


def window_side(p: float, layout: ImageLayout, norm: str) -> int:
    """Side of the square windows covering about a fraction p of the image: at least 1
    (L-inf), or odd and at least 3 (L2); at most the image's shorter side."""
    c, h, w = layout.channels, layout.height, layout.width
    side = round(math.sqrt(p * (c * h * w) / c))
    if norm == "inf":
        side = max(side, 1)
    else:
        side = max(side, 3)
        side += side % 2 == 0
    return min(side, h, w)


@functools.cache
def pseudo_gaussian(side: int) -> np.ndarray:
    """The L2 update's window (side, side) float64 of unit L2 norm, untransposed: its top
    side // 2 rows and its other rows (negated) each hold nested centred rectangles
    weighted 1 / (k + 1)^2 at distance k from their centre, each half of unit norm."""

    def rectangles(height: int, width: int) -> np.ndarray:
        mass = np.zeros((height, width))
        for k in range(max(height, width) // 2 + 1):
            top, left = height // 2 - k, width // 2 - k
            mass[max(top, 0) : top + 2 * k + 1, max(left, 0) : left + 2 * k + 1] += (
                1.0 / (k + 1) ** 2
            )
        return mass / np.sqrt((mass**2).sum()) if mass.size else mass

    half = side // 2
    window = np.concatenate([rectangles(half, side), -rectangles(side - half, side)])
    window /= np.sqrt((window**2).sum())
    window.flags.writeable = False
    return window


def pseudo_gaussian_windows(side: int, transposed: np.ndarray, dtype) -> np.ndarray:
    """``pseudo_gaussian(side)`` per row (n, side, side) in ``dtype``, transposed where
    ``transposed`` (n,) bool is true."""
    window = pseudo_gaussian(side).astype(dtype)
    return np.where(transposed[:, None, None], window.T, window)


def signs(u: np.ndarray, dtype) -> np.ndarray:
    """-1 where u < 0.5, else +1, in ``dtype``."""
    return np.where(u < 0.5, -1.0, 1.0).astype(dtype)


def positions(u: np.ndarray, length: int, side: int) -> np.ndarray:
    """Window starts (n,) int64 along an axis of ``length``: floor((length - side) u)."""
    return (u * (length - side)).astype(np.int64)


def windows(images: np.ndarray, side: int) -> np.ndarray:
    """Every side x side window of images (n, c, h, w), as a writeable view
    (n, c, h - side + 1, w - side + 1, side, side): ``windows(images, side)[rows, :, top,
    left]`` is the window at (top, left) of each of the ``rows``, (len(rows), c, side, side).
    """
    return sliding_window_view(images, (side, side), axis=(2, 3), writeable=True)


def start_grid(length: int, side: int) -> np.ndarray:
    """Starts of the L2 start's windows along an axis: length // side windows, centred."""
    count = length // side
    return (length - side * count) // 2 + side * np.arange(count)


def l2_start_side(layout: ImageLayout) -> int:
    """Side of the L2 start's windows: max(min(h, w) // L2_START_GRID, 1)."""
    return max(min(layout.height, layout.width) // L2_START_GRID, 1)


def start_draws(norm: str, layout: ImageLayout) -> int:
    """How many uniform numbers a row draws for its starting point."""
    c, h, w = layout.channels, layout.height, layout.width
    if norm == "inf":
        return c * w
    side = l2_start_side(layout)
    return (h // side) * (w // side) * (1 + c)


def linf_start(X, u, eps, layout, x_min, x_max) -> np.ndarray:
    """Rows X (n, d) moved by +-eps in vertical stripes (a sign per channel and column),
    clipped to [x_min, x_max]."""
    c, w = layout.channels, layout.width
    stripes = signs(u[:, : c * w], X.dtype).reshape(len(X), c, 1, w)
    start = np.empty_like(X)
    layout.image(start)[...] = np.clip(layout.image(X) + eps * stripes, x_min, x_max)
    return start


def l2_start(X, u, eps, layout, x_min, x_max) -> np.ndarray:
    """Rows X (n, d) moved by eps in L2 along a grid of pseudo-Gaussian windows of random
    orientation and sign per channel, clipped to [x_min, x_max]."""
    n, c = len(X), layout.channels
    side = l2_start_side(layout)
    corners = list(
        itertools.product(start_grid(layout.height, side), start_grid(layout.width, side))
    )
    transposed = u[:, : len(corners)] > 0.5
    window_signs = signs(u[:, len(corners) : len(corners) * (1 + c)], X.dtype).reshape(n, -1, c)
    delta = np.zeros_like(X)
    image = layout.image(delta)
    for k, (top, left) in enumerate(corners):
        window = pseudo_gaussian_windows(side, transposed[:, k], X.dtype)
        image[:, :, top : top + side, left : left + side] = (
            window[:, None] * window_signs[:, k, :, None, None]
        )
    return np.clip(X + scaled_to(delta, eps), x_min, x_max)


def scaled_to(delta: np.ndarray, eps: float) -> np.ndarray:
    """Rows delta (n, d) rescaled to L2 norm eps (the reference's guarded division)."""
    norms = np.sqrt((delta**2).sum(axis=1, keepdims=True))
    return delta / (norms + DIVISION_GUARD) * eps


def linf_update(X, X_best, active, u, eps, side, layout, x_min, x_max) -> np.ndarray:
    """The proposals (n, d) of the ``active`` rows (n,): their best point with one window
    set to X +- eps (a sign per channel), clipped to [x_min, x_max].

    The reference moves the window by +-2 eps and projects it back into the eps-ball: the
    same point in exact arithmetic (every pixel of a best point is at X +- eps or at the
    box), but in floating point fl(fl(x - eps) + 2 eps) may stop an ulp short of x + eps,
    and proposals then move pixels by an ulp, whose margins differ by rounding only. Set
    directly, as the paper's own code does, a pixel is always at clip(x +- eps)."""
    c = layout.channels
    top = positions(u[:, 0], layout.height, side)
    left = positions(u[:, 1], layout.width, side)
    X_new = X_best[active]
    clean = windows(layout.image(X), side)[active, :, top, left]
    moved = clean + eps * signs(u[:, 2 : 2 + c], X.dtype)[:, :, None, None]
    windows(layout.image(X_new), side)[np.arange(len(active)), :, top, left] = np.clip(
        moved, x_min, x_max
    )
    return X_new


def l2_update(X, X_best, active, u, eps, side, layout, x_min, x_max) -> np.ndarray:
    """The proposals (n, d) of the ``active`` rows (n,): in their perturbation, a second
    window is emptied and the first takes a fresh pseudo-Gaussian window plus its own
    direction, with the mass of both windows and the unused budget eps^2 - ||delta||^2
    (per channel); the result is rescaled to L2 norm eps and clipped to [x_min, x_max]."""
    n, c, h, w = len(active), layout.channels, layout.height, layout.width
    own = np.arange(n)
    X_rows = X[active]
    delta_rows = X_best[active] - X_rows
    delta = layout.image(delta_rows)
    top, left = positions(u[:, 0], h, side), positions(u[:, 1], w, side)
    top_emptied, left_emptied = positions(u[:, 2], h, side), positions(u[:, 3], w, side)
    first, second = (own, slice(None), top, left), (own, slice(None), top_emptied, left_emptied)
    union = np.zeros((n, 1, h, w), dtype=X.dtype)
    windows(union, side)[first] = 1.0
    windows(union, side)[second] = 1.0

    old = windows(delta, side)[first]
    old_norm = np.sqrt((old**2).sum(axis=(2, 3), keepdims=True))
    image_norm = np.sqrt((delta_rows**2).sum(axis=1))[:, None, None, None]
    union_norm = np.sqrt(((delta * union) ** 2).sum(axis=(2, 3), keepdims=True))
    fresh = (
        pseudo_gaussian_windows(side, u[:, 4] > 0.5, X.dtype)[:, None]
        * signs(u[:, 5 : 5 + c], X.dtype)[:, :, None, None]
    )
    fresh += old / (DIVISION_GUARD + old_norm)
    fresh_norm = np.sqrt((fresh**2).sum(axis=(2, 3), keepdims=True))
    budget = np.sqrt(np.maximum(eps**2 - image_norm**2, 0.0) / c + union_norm**2)
    windows(delta, side)[second] = 0.0
    windows(delta, side)[first] = fresh / (DIVISION_GUARD + fresh_norm) * budget
    return np.clip(X_rows + scaled_to(delta_rows, eps), x_min, x_max)


STARTS = {"inf": linf_start, "2": l2_start}
UPDATES = {"inf": linf_update, "2": l2_update}
UPDATE_DRAWS = {"inf": 2, "2": 5}
"""Uniform numbers of an update besides its c signs."""


def margins(Z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """z_y - max_{k != y} z_k per row of logits Z (n, C) for labels y (n,)."""
    rows = np.arange(len(Z))
    others = Z.copy()
    others[rows, labels] = -np.inf
    return Z[rows, labels] - others.max(axis=1)


@dataclass
class SquareState:
    """Where a Square search stands; ``square_steps`` updates one in place.

    Attributes
    ----------
    X_adv : (N, d) the model's dtype, each row's best point so far
    margins : (N,) the model's dtype, its margin z_y - max_{k != y} z_k (< 0: broken)
    queries_used : (N,) int64, the forward passes each row took (the clean one not counted)
    update : int, the updates done (0: the starting point)
    """

    X_adv: np.ndarray
    margins: np.ndarray
    queries_used: np.ndarray
    update: int = 0


def square(
    model: Model,
    X,
    labels,
    *,
    eps: float,
    norm="inf",
    queries: int = 5000,
    p_init: float = 0.8,
    seed: int = 0,
    x_min: float,
    x_max: float,
    backend=None,
    first_row: int | np.ndarray = 0,
    image_shape=None,
) -> tuple[np.ndarray, np.ndarray]:
    """The Square attack, untargeted, from forward passes only (see the module docstring).

    Parameters
    ----------
    model : Model
    X : (N, ...) array, trailing dimensions flatten to d
    labels : (N,) int classes, (N, C) soft labels (their argmax is the class), or None for
        the model's predictions
    eps : float > 0, the radius of the ball in ``norm``
    norm : "inf" or "2"
    queries : int >= 1, the updates after the starting point (the reference's n_queries)
    p_init : float in (0, 1], the fraction of the image the first windows cover
    seed : int in [0, 2**63), seeds every random choice
    x_min, x_max : float, the box every row stays in (infinite: none)
    backend : a backend (``advgrad.backend.get_backend``); None: the CPU
    first_row : int, the absolute index of the first row, or (N,) int that of every row:
        the random choices are a function of it
    image_shape : None (flat: the most nearly square image), (h, w), (c, h, w) or (h, w, c)

    Returns
    -------
    X_adv : array shaped like X, in the model's dtype
    queries_used : (N,) int64, the forward passes each row took: 0 for a row classified
        wrong already, the query that broke a broken row, else queries + 1

    Raises ValueError for a bad argument (an L1 norm included).
    """
    *_, state = square_steps(
        model,
        X,
        labels,
        eps=eps,
        norm=norm,
        queries=queries,
        p_init=p_init,
        seed=seed,
        x_min=x_min,
        x_max=x_max,
        backend=backend,
        first_row=first_row,
        image_shape=image_shape,
    )
    return state.X_adv.reshape(np.shape(X)), state.queries_used


def square_steps(
    model: Model,
    X,
    labels,
    *,
    eps: float,
    norm="inf",
    queries: int = 5000,
    p_init: float = 0.8,
    seed: int = 0,
    x_min: float,
    x_max: float,
    backend=None,
    first_row: int | np.ndarray = 0,
    image_shape=None,
) -> Iterator[SquareState]:
    """The Square attack query by query: validates its arguments (those of ``square``) at
    once, then gives an iterator that yields one ``SquareState``, updated in place, after
    the starting point and after each update, until every row is broken or ``queries``
    updates are done."""
    rows = as_rows(model, X)
    n_rows = len(rows)
    truth = None if labels is None else np.argmax(label_matrix(model, labels, n_rows), axis=1)
    eps = check_radius("eps", eps, model.dtype)
    if eps == 0.0:
        raise ValueError("eps must be > 0")
    if norm_order(norm) == 1.0:
        raise ValueError(
            f"square supports the norms inf and 2 (L1 is not implemented), got {norm!r}"
        )
    norm = "inf" if norm_order(norm) == np.inf else "2"
    queries = check_count("queries", queries)
    p_init = float(p_init)
    if not 0.0 < p_init <= 1.0:
        raise ValueError(f"p_init must be in (0, 1], got {p_init:g}")
    seed = check_seed(seed)
    x_min, x_max = float(x_min), float(x_max)
    if not x_min <= x_max:
        raise ValueError(f"the box [{x_min:g}, {x_max:g}] is empty")
    index = row_indices(first_row, n_rows)
    layout = image_layout(model.n_inputs, image_shape)
    return _search(
        *(model, rows, truth, eps, norm, queries, p_init, seed),
        *(x_min, x_max, backend or get_backend(), index, layout),
    )


def _search(
    model, rows, truth, eps, norm, queries, p_init, seed, x_min, x_max, backend, index, layout
) -> Iterator[SquareState]:
    """``square_steps`` on validated arguments; ``index`` (N,): each row's absolute index."""
    Z = backend.logits(model, rows)
    truth = np.argmax(Z, axis=1) if truth is None else truth
    state = SquareState(rows.copy(), margins(Z, truth), np.zeros(len(rows), dtype=np.int64))
    active = np.flatnonzero(state.margins >= 0.0)
    if active.size:
        u = row_uniforms(seed, SQUARE_STREAM, index[active], start_draws(norm, layout))
        state.X_adv[active] = STARTS[norm](rows[active], u, eps, layout, x_min, x_max)
        state.margins[active] = margins(backend.logits(model, state.X_adv[active]), truth[active])
        state.queries_used[active] = 1
    yield state
    width = UPDATE_DRAWS[norm] + layout.channels
    for update in range(queries):
        active = active[state.margins[active] >= 0.0]
        if not active.size:
            return
        side = window_side(window_fraction(update, queries, p_init), layout, norm)
        u = row_uniforms(seed, SQUARE_STREAM + 1 + update, index[active], width)
        X_new = UPDATES[norm](rows, state.X_adv, active, u, eps, side, layout, x_min, x_max)
        new_margins = margins(backend.logits(model, X_new), truth[active])
        better = new_margins < state.margins[active]
        state.X_adv[active[better]] = X_new[better]
        state.margins[active[better]] = new_margins[better]
        state.queries_used[active] += 1
        state.update = update + 1
        yield state
