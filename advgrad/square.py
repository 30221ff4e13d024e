"""The Square attack (Andriushchenko et al., ECCV 2020), L-inf, L2 and L1: a score-based
black-box attack that only queries the network's logits.

Written from the definition of AutoAttack's reference (``autoattack/square.py``) and with
its semantics: the margin loss z_y - max_{k != y} z_k (a row is broken once its margin is
below 0), the paper's schedule of p (the fraction of the image a square window covers,
halved at fixed points of a 10,000-query scale rescaled to ``queries``; L1 takes L2's
window sides), the L-inf start of vertical stripes and the L2 and L1 starts of "meta
pseudo-Gaussian" windows, and updates that each set one window to x +- eps (L-inf) or
move the mass of one window into another (L2, L1) and are kept where the margin falls.
One query is one forward pass of a row not yet broken.

L1, as the reference has it: the windows' pattern weighs its nested rectangles 1 / (k +
1)^4 (L2: 1 / (k + 1)^2) and has unit L1 norm; the start puts one such window, of unit L1
norm in each channel, on each cell of the start grid and projects x + delta onto the L1
ball of radius eps (1 - 1e-6) intersected with the box (``apgd.project_l1_box``, the
reference's ``L1_projection``); an update refills the receiving window of each channel with
the L1 mass (free / c + union) * c, free = max(eps - ||delta||_1, 0) and union the mass
of the best point's perturbation in both windows of that channel (the reference's factor
c included), empties the other window and projects the whole point the same way. The
projected point, float64, is rounded to the model's dtype to the nearest, or toward x
where that would take it out of the ball of radius eps: an L1 point is always in the
ball and the box (the clean row assumed in the box).

Where it differs from the reference, on purpose: each row draws its own windows, signs
and transpositions (the reference draws one window position, one set of channel signs and
one transposition per query for the whole batch), so that a row's result does not depend
on its batch; a row counts as broken at a margin below 0, where its prediction differs
from y whatever the tie rule (the reference stops at 0); an L-inf update sets its window
to clip(x +- eps) directly (the reference moves it by +-2 eps and projects it back into
the ball: the same point in exact arithmetic, but fl(fl(x - eps) + 2 eps) may stop an ulp
short of x + eps); the L2 and L1 start grid has floor(L / s) windows along an axis of length L,
centred, which is the reference's 5 x 5 grid wherever that fits the image; the margins
are float64 whatever the model's dtype, from an incremental forward pass (see Speed).
Not on purpose, and only for images of several channels: an L2 or L1 update budgets each
channel with the mass of its own channel in the two windows (``union`` above), where the
reference takes one norm over all the channels of the row; single-channel images (the
bundled digits, MNIST) are the reference's exactly.

Queries. The clean rows take one forward pass, not counted; rows already classified wrong
there are returned as they are, with 0 queries used. The others take the random starting
point (query 1), then up to ``queries`` updates (update i is query i + 2), so a row that is
never broken uses ``queries + 1``, as the reference counts them.

Images. The windows are squares on an (h, w) image of c channels (``image_layout``): from
``image_shape`` (h, w), (c, h, w) or (h, w, c) (a dataset's ``input_shape``; of a 3-D
shape, the shorter of the first and last axes holds the channels, the first on a tie);
for flat data, the most nearly square h x w = d (h the largest divisor of d not above
sqrt(d): 784 is 28 x 28, and a prime d is 1 x d, where every window is one pixel).

Randomness. Every random choice is a uniform number of the counter-based generator
``advgrad.kernels.random.uniform`` (Philox4x32-10), keyed by ``seed``, a stream, the
absolute row index and a column, so a row gets the same numbers whatever the batch it is
processed in, whichever rows are still being updated and on whichever thread: the start
draws from stream ``SQUARE_STREAM``, update i from ``SQUARE_STREAM + 1 + i``. Each row's
uniform numbers u, by column (c channels, h x w image, windows of side s):

- L-inf start: c * w stripe signs, channel-major (u[ch * w + column]);
- L-inf update: window top, window left, c signs;
- L2 start: one transposition per window of the start grid (row-major over the grid),
  then c signs per window (u[n_windows + window * c + ch]);
- L2 and L1 update: top and left of the window that receives, top and left of the window
  that is emptied, the transposition, c signs;
- L1 start: those of the L2 start.

A sign is -1 where u < 0.5 and +1 elsewhere; a window is transposed where u > 0.5; a
position along an axis of length L is floor((L - s) u), as the reference draws it (which
never places a window at L - s itself unless s = L). Square first drew these numbers from
``advgrad.attacks.row_uniforms`` (numpy Generators per group of rows; the same columns,
other numbers): its results changed with the fused kernel, which draws them itself.

Speed. The whole search runs in one fused kernel (``advgrad.kernels.square``, through the
backend's ``square_run``) that keeps each row's hidden pre-activations and updates them
by the pixels a proposal moves, so a query costs s * s * c * H + H * C multiply-adds
(twice the windows for L2), not a full forward pass (L1: the projection of the k nonzero
pixels of the perturbation, O(k log k), and H per pixel that moves, the windows' and
those that the projection's shrinking moves by an ulp or more); the margins are float64
(that module states their rounding: a margin below 0 is always that of a direct forward
pass of the point), and the search runs in slices of updates that the backend sizes
(``square_slice_queries``: about 0.1 s of a core on the CPU), between which control comes
back to Python. The caller decides what
is broken on its own forward pass of the result (the AutoAttack ensemble does).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from advgrad.attacks import (
    as_rows,
    check_count,
    check_radius,
    check_seed,
    label_matrix,
    norm_order,
    row_indices,
)
from advgrad.backend import get_backend
from advgrad.model import Model

SQUARE_STREAM = 2**32
"""Random stream of Square's starting points; update i draws from ``SQUARE_STREAM + 1 + i``
(apart from PGD's restart streams 0, 1, ... and the random targets' 2**31)."""
NORM_NAMES = {np.inf: "inf", 2.0: "2", 1.0: "1"}
"""The name of each norm's p."""
SCHEDULE_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
"""The paper's p schedule on a 10,000-query scale: p_init halves past each bound."""
SCHEDULE_SCALE = 10000
SIGMOID_MULTIPLY_ADDS = 16
"""What one sigmoid costs, in multiply-adds, for the sizes of the slices."""
L1_PROJECTION_MULTIPLY_ADDS = 128
"""What building and projecting an L1 proposal costs, per feature, in multiply-adds (at
d = 784 about 12 us of a core a query, half of it ``project_l1_box``)."""


@dataclass(frozen=True)
class ImageLayout:
    """How the d features of a row form an image of ``channels`` x ``height`` x ``width``;
    ``channels_last``: the row is stored (h, w, c), else (c, h, w)."""

    channels: int
    height: int
    width: int
    channels_last: bool = False


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


def window_sides(queries: int, p_init: float, layout: ImageLayout, norm: str) -> np.ndarray:
    """The window side of every update, (queries,) int64: ``window_side`` of the paper's
    p, halved after the update counts ``SCHEDULE_BOUNDS`` of a ``SCHEDULE_SCALE``-query
    scale rescaled to ``queries``, computed once per halving."""
    scaled = (np.arange(queries) / queries * SCHEDULE_SCALE).astype(np.int64)
    halvings = np.searchsorted(SCHEDULE_BOUNDS, scaled, side="left")  # bounds below scaled
    sides = [window_side(p_init / 2**k, layout, norm) for k in range(len(SCHEDULE_BOUNDS) + 1)]
    return np.array(sides, dtype=np.int64)[halvings]


def window_side(p: float, layout: ImageLayout, norm: str) -> int:
    """Side of the square windows covering about a fraction p of the image: at least 1
    (L-inf), or odd and at least 3 (L2, L1); at most the image's shorter side."""
    h, w = layout.height, layout.width
    side = round(math.sqrt(p * h * w))
    if norm == "inf":
        side = max(side, 1)
    else:
        side = max(side, 3)
        side += side % 2 == 0
    return min(side, h, w)


@dataclass
class SquareState:
    """Where a Square search stands; ``square_steps`` updates one in place.

    Attributes
    ----------
    X_adv : (N, d) the model's dtype, each row's best point so far
    margins : (N,) float64, its margin z_y - max_{k != y} z_k (< 0: broken)
    queries_used : (N,) int64, the forward passes each row took (the clean one not counted)
    workspace : the kernel's own per-row state, (N, 2, H) and (N,) float64 arrays (see
        ``advgrad.kernels.square.square_steps_into``)
    update : int, the updates done (0: the starting point)
    """

    X_adv: np.ndarray
    margins: np.ndarray
    queries_used: np.ndarray
    workspace: tuple[np.ndarray, np.ndarray]
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
    norm : "inf", "2" or "1"
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

    Raises ValueError for a bad argument.
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
    the starting point and after each slice of updates (``query_work``), until every row is
    broken or ``queries`` updates are done."""
    rows = as_rows(model, X)
    n_rows = len(rows)
    truth = None if labels is None else np.argmax(label_matrix(model, labels, n_rows), axis=1)
    eps = check_radius("eps", eps, model.dtype)
    if eps == 0.0:
        raise ValueError("eps must be > 0")
    norm = NORM_NAMES[norm_order(norm)]
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


def query_work(model: Model, side: int, layout: ImageLayout, norm: str) -> int:
    """Multiply-adds of one row's query with windows of ``side``: the moved pixels' rows of
    W1 (one window, L-inf; two, L2 and L1), the sigmoids and the second layer, and L1's
    projection."""
    windows = 1 if norm == "inf" else 2
    pixels = windows * side * side * layout.channels
    projection = L1_PROJECTION_MULTIPLY_ADDS * model.n_inputs if norm == "1" else 0
    return (pixels + SIGMOID_MULTIPLY_ADDS + model.n_classes) * model.n_hidden + projection


def _search(
    model, rows, truth, eps, norm, queries, p_init, seed, x_min, x_max, backend, index, layout
) -> Iterator[SquareState]:
    """``square_steps`` on validated arguments; ``index`` (N,): each row's absolute index."""
    n_rows = len(rows)
    if truth is None:
        truth = np.argmax(backend.logits(model, rows), axis=1)
    labels = np.ascontiguousarray(truth, dtype=np.int64)
    sides = window_sides(queries, p_init, layout, norm)
    state = SquareState(
        np.empty_like(rows),
        np.empty(n_rows),
        np.empty(n_rows, dtype=np.int64),
        (np.empty((n_rows, 2, model.n_hidden)), np.empty(n_rows)),
    )
    image = (layout.channels, layout.height, layout.width, int(layout.channels_last))
    search = (seed, SQUARE_STREAM, norm_order(norm), eps, x_min, x_max, image)
    arrays = (state.X_adv, state.margins, state.queries_used, *state.workspace)
    backend.square_run(model, rows, labels, index, search, sides, 0, 1, arrays)
    yield state
    while state.update < queries:
        active = np.count_nonzero(state.margins >= 0.0)
        if not active:
            return
        work = query_work(model, int(sides[state.update]), layout, norm)
        count = min(queries - state.update, backend.square_slice_queries(active, work))
        backend.square_run(
            model, rows, labels, index, search, sides, state.update + 1, count, arrays
        )
        state.update += count
        yield state
