"""The Square attack (advgrad.square) and its kernels (advgrad.kernels.square): equal to
the row-by-row NumPy reference, inside the ball and the box, monotone in its margins, its
incremental margins those of a direct forward pass, invariant to the batch and the thread
count, and its refusals."""

from __future__ import annotations

import math
import re

import numba
import numpy as np
import pytest
import reference_square
from conftest import random_network
from reference import worst_margin
from reference_square import window_fraction

import advgrad
from advgrad import backend as backend_module
from advgrad.kernels.cpu import exp_nonpositive, next_toward
from advgrad.kernels.square import REFRESH_UPDATES, l1_rounded_into
from advgrad.square import (
    ImageLayout,
    image_layout,
    square,
    square_steps,
    window_side,
    window_sides,
)

EPS = {"inf": 0.05, "2": 0.5, "1": 1.0}
"""Radii at which about half of the rows below break within 100 queries (8, 9 and 2 at the
starting point, 30, 37 and 29 within 100 queries, measured)."""
NORMS = list(EPS)
BOX = {"x_min": 0.0, "x_max": 1.0}


def network(dtype=np.float64):
    """A (48, 16, 5) random network, 64 rows in [0, 1) and their labels: the predictions,
    but wrong for every eighth row (rows the attack must leave alone)."""
    rng = np.random.default_rng(17)
    model = advgrad.Model(*random_network(rng, 48, 16, 5, dtype=dtype, scale=3.0))
    X = rng.random((64, 48)).astype(dtype)
    labels = advgrad.predict(model, X)
    labels[::8] = (labels[::8] + 1) % 5
    return model, X, labels


def margins_of(model, X, labels):
    """Each row's margin z_y - max_{k != y} z_k, float64, of a direct forward pass."""
    return worst_margin(X.astype(np.float64), labels, model.W1, model.b1, model.W2, model.b2)


@pytest.mark.parametrize(
    ("d", "image_shape", "expected"),
    [
        (784, None, ImageLayout(1, 28, 28)),
        (48, None, ImageLayout(1, 6, 8)),
        (37, None, ImageLayout(1, 1, 37)),
        (37, (37,), ImageLayout(1, 1, 37)),
        (48, (4, 12), ImageLayout(1, 4, 12)),
        (3072, (3, 32, 32), ImageLayout(3, 32, 32)),
        (3072, (32, 32, 3), ImageLayout(3, 32, 32, channels_last=True)),
        (45, (3, 5, 3), ImageLayout(3, 5, 3)),  # a tie: channels first
    ],
)
def test_image_layout(d, image_shape, expected):
    assert image_layout(d, image_shape) == expected


@pytest.mark.parametrize("image_shape", [(4, 4), (2, 2, 2, 6), (0, 48), (6, -8)])
def test_image_layout_refuses_a_shape_without_d_elements(image_shape):
    with pytest.raises(ValueError, match=r"image_shape must be .* with d = 48 elements"):
        image_layout(48, image_shape)


def test_window_fraction_halves_at_the_papers_query_counts():
    fractions = [window_fraction(i, 10000, 0.8) for i in (0, 10, 11, 50, 51, 200, 201)]
    assert fractions == [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1]
    assert window_fraction(8000, 10000, 0.8) == 0.8 / 256
    assert window_fraction(8001, 10000, 0.8) == 0.8 / 512
    # rescaled to the budget: update 1 of 100 stands at 100 of 10,000
    assert window_fraction(1, 100, 0.8) == 0.2


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("queries", [1, 7, 100, 5000, 12345])
def test_window_sides_are_the_side_at_each_update(norm, queries):
    layout = image_layout(784)
    expected = [window_side(window_fraction(i, queries, 0.8), layout, norm) for i in range(queries)]
    np.testing.assert_array_equal(window_sides(queries, 0.8, layout, norm), expected)


def test_l1_windows_are_those_of_l2():
    layout = image_layout(3072, (3, 32, 32))
    for queries in (10, 5000):
        expected = window_sides(queries, 0.8, layout, "2")
        np.testing.assert_array_equal(window_sides(queries, 0.8, layout, "1"), expected)


def test_l1_points_rounded_to_the_nearest_unless_that_leaves_the_ball():
    rng = np.random.default_rng(3)
    x = rng.random(500).astype(np.float32)
    delta = rng.standard_normal(500)
    v = x + delta * (2.0 / np.abs(delta).sum())  # float64, at L1 distance 2 from x
    nearest = v.astype(np.float32)
    assert np.abs(nearest.astype(np.float64) - x).sum() > 2.0
    out = np.empty(500, dtype=np.float32)
    size = l1_rounded_into(x, v, 2.0, out)
    distance = np.abs(out.astype(np.float64) - x)
    assert math.isclose(size, distance.sum(), rel_tol=1e-14)
    assert size <= 2.0 and (distance <= np.abs(v - x)).all()
    toward_x = np.nextafter(nearest, x)
    assert ((out == nearest) | (out == toward_x)).all() and (out != nearest).any()
    size = l1_rounded_into(x, v, 2.001, out)  # inside the ball of radius 2.001: the nearest
    np.testing.assert_array_equal(out, nearest)
    assert math.isclose(size, np.abs(nearest.astype(np.float64) - x).sum(), rel_tol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_next_toward_is_numpys_nextafter(dtype):
    """``next_toward`` (bits moved, so that it compiles for CUDA) equals np.nextafter bit for
    bit: normal and subnormal values of both signs, zeros, the largest and the smallest
    numbers, toward a larger, a smaller and an equal target."""
    info = np.finfo(dtype)
    rng = np.random.default_rng(5)
    special = [0.0, -0.0, info.tiny, -info.tiny, info.smallest_subnormal, 1.0, -1.0]
    special += [-info.smallest_subnormal, info.max, -info.max]
    values = np.concatenate(
        [rng.standard_normal(300), rng.standard_normal(300) * info.tiny, special]
    ).astype(dtype)
    values = np.repeat(values, 3)
    targets = values.copy()
    targets[0::3] = np.float64(0.5) * rng.standard_normal(len(values) // 3).astype(dtype)
    targets[1::3] = 0.0
    got = np.array([next_toward(v, t) for v, t in zip(values, targets, strict=True)], dtype)
    np.testing.assert_array_equal(got.view(np.uint8), np.nextafter(values, targets).view(np.uint8))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("image_shape", [None, (3, 4, 4), (4, 4, 3)])
def test_square_equals_the_row_by_row_reference(norm, image_shape):
    model, X, labels = network()
    X_adv, queries_used = square(
        model,
        X,
        labels,
        eps=EPS[norm],
        norm=norm,
        queries=60,
        seed=5,
        first_row=7,
        image_shape=image_shape,
        **BOX,
    )
    layout = image_layout(48, image_shape)
    expected, expected_queries = reference_square.square(
        X,
        labels,
        model.W1,
        model.b1,
        model.W2,
        model.b2,
        eps=EPS[norm],
        norm=norm,
        queries=60,
        p_init=0.8,
        seed=5,
        first_row=7,
        layout=(layout.channels, layout.height, layout.width, layout.channels_last),
        **BOX,
    )
    np.testing.assert_array_equal(queries_used, expected_queries)
    assert (queries_used == 1).any() and ((queries_used > 1) & (queries_used < 61)).any()
    if norm == "inf":  # elementwise arithmetic only: bitwise
        np.testing.assert_array_equal(X_adv, expected)
    else:  # L1 as L2 (its unused budget eps - ||delta||_1 about 1e-6 eps)
        # The norms sum in another order, and the update's unused budget eps^2 - ||delta||^2
        # is a difference of nearly equal numbers (the rescaling's guard leaves it about
        # 1e-12 eps): a rounding difference of 1e-17 in a point moves the mass sqrt(budget)
        # of the next window by up to a relative 1e-5, 1e-11 of a pixel.
        np.testing.assert_allclose(X_adv, expected, rtol=0.0, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("x_max", [1.0, 0.6])
def test_square_stays_in_the_ball_and_the_box(dtype, norm, x_max):
    model, X, labels = network(dtype)
    X = np.minimum(X, dtype(x_max))
    before = X.tobytes()
    X_adv, queries_used = square(
        model,
        X.reshape(64, 3, 4, 4),
        labels,
        eps=EPS[norm],
        norm=norm,
        queries=100,
        x_min=0.0,
        x_max=x_max,
    )
    assert X.tobytes() == before
    assert X_adv.shape == (64, 3, 4, 4) and X_adv.dtype == dtype
    assert queries_used.shape == (64,) and queries_used.dtype == np.int64
    delta = X_adv.reshape(64, -1).astype(np.float64) - X
    size = np.linalg.norm(delta, ord={"inf": np.inf, "2": 2, "1": 1}[norm], axis=1)
    if norm == "1":  # rounded toward x where rounding to the nearest would leave the ball
        assert size.max() <= EPS[norm]
    else:
        assert size.max() <= EPS[norm] + 1e-6  # float32 rounds x + eps by up to 6e-8
    assert X_adv.min() >= 0.0 and X_adv.max() <= x_max
    broken = margins_of(model, X_adv.reshape(64, -1), labels) < 0.0
    assert broken[queries_used <= 100].all() and not broken[queries_used == 101].any()


@pytest.mark.parametrize("norm", NORMS)
def test_margins_never_increase_and_a_broken_row_keeps_the_query_that_broke_it(norm, monkeypatch):
    monkeypatch.setattr(backend_module, "SLICE_MULTIPLY_ADDS", 0)  # an update per slice
    model, X, labels = network()
    clean = margins_of(model, X, labels)
    history, queries = [], []
    for state in square_steps(model, X, labels, eps=EPS[norm], norm=norm, queries=40, **BOX):
        history.append(state.margins.copy())
        queries.append(state.queries_used.copy())
        np.testing.assert_allclose(
            state.margins, margins_of(model, state.X_adv, labels), rtol=1e-12, atol=1e-12
        )
    margins, queries = np.array(history), np.array(queries)
    wrong = clean < 0.0
    assert wrong.sum() == 8 and (queries[:, wrong] == 0).all()
    np.testing.assert_array_equal(state.X_adv[wrong], X[wrong])
    assert (np.diff(margins[:, ~wrong], axis=0) <= 0.0).all()
    broken_at = np.argmax(margins < 0.0, axis=0)  # the first state in which the row is broken
    broken = ~wrong & (margins[-1] < 0.0)
    assert 0 < broken.sum() < (~wrong).sum()
    np.testing.assert_array_equal(state.queries_used[broken], broken_at[broken] + 1)
    np.testing.assert_array_equal(state.queries_used[~wrong & ~broken], 41)
    # from the state it broke in on, a row's queries and margin stay put
    for row in np.flatnonzero(broken):
        assert (queries[broken_at[row] :, row] == queries[-1, row]).all()
        assert (margins[broken_at[row] :, row] == margins[-1, row]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", NORMS)
def test_square_is_the_same_whatever_the_batch(dtype, norm):
    model, X, labels = network(dtype)
    options = {"eps": EPS[norm], "norm": norm, "queries": 50, "seed": 3, **BOX}
    X_adv, queries_used = square(model, X, labels, first_row=100, **options)
    for start in range(0, 64, 16):
        part, part_queries = square(
            model,
            X[start : start + 16],
            labels[start : start + 16],
            first_row=100 + start,
            **options,
        )
        np.testing.assert_array_equal(part, X_adv[start : start + 16])
        np.testing.assert_array_equal(part_queries, queries_used[start : start + 16])
    rows = np.array([5, 9, 40, 41, 63])
    part, part_queries = square(model, X[rows], labels[rows], first_row=100 + rows, **options)
    np.testing.assert_array_equal(part, X_adv[rows])
    np.testing.assert_array_equal(part_queries, queries_used[rows])
    other_seed, _ = square(model, X, labels, first_row=100, **(options | {"seed": 4}))
    assert not np.array_equal(other_seed, X_adv)


@pytest.mark.parametrize("norm", NORMS)
def test_the_parallel_kernel_equals_the_serial_one_on_any_thread_count(norm, monkeypatch):
    model, X, labels = network(np.float32)
    options = {"eps": EPS[norm], "norm": norm, "queries": 50, "seed": 3, **BOX}
    serial = square(model, X, labels, **options)
    monkeypatch.setattr(backend_module, "SERIAL_MULTIPLY_ADDS", -1)  # the parallel kernel
    monkeypatch.setattr(backend_module, "SLICE_MULTIPLY_ADDS", 2**12)  # and many slices
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        with numba.parallel_chunksize(1):
            numba.set_num_threads(threads)
            try:
                parallel = square(model, X, labels, **options)
            finally:
                numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        np.testing.assert_array_equal(parallel[0], serial[0])
        np.testing.assert_array_equal(parallel[1], serial[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", NORMS)
def test_incremental_margins_stay_those_of_a_direct_forward_pass(dtype, norm, monkeypatch):
    """Over more than REFRESH_UPDATES updates of rows that stay unbroken (a radius too
    small), the kernel's margins stay within rounding of a float64 forward pass of the
    points: L-inf and L1 float64 rounding; L2 that of the points rounded to their dtype."""
    monkeypatch.setattr(backend_module, "SLICE_MULTIPLY_ADDS", 2**18)
    model, X, labels = network(dtype)
    eps = EPS[norm] / 20
    tolerance = 1e-12 if norm != "2" or dtype == np.float64 else 1e-5
    updates, unbroken = [], None
    queries = REFRESH_UPDATES + 500
    steps = square_steps(model, X, labels, eps=eps, norm=norm, queries=queries, **BOX)
    for state in steps:
        direct = margins_of(model, state.X_adv, labels)
        np.testing.assert_allclose(state.margins, direct, rtol=tolerance, atol=tolerance)
        updates.append(state.update)
        unbroken = state.margins >= 0.0
    assert updates[-1] == queries and len(updates) > 3 and unbroken.sum() > 40


def test_exp_nonpositive_is_within_an_ulp_of_exp():
    x = -np.concatenate([np.linspace(0.0, 746.0, 20001), np.geomspace(1e-300, 1.0, 1001)])
    got = np.array([exp_nonpositive(v) for v in x])
    expected = np.array([math.exp(v) for v in x])
    ulps = np.abs(got - expected) / np.spacing(np.maximum(expected, 5e-324))
    assert ulps.max() <= 1.0
    assert exp_nonpositive(-746.0) == 0.0 and exp_nonpositive(-0.0) == 1.0


@pytest.mark.parametrize("norm", NORMS)
def test_more_queries_never_lower_the_broken_rows(norm, monkeypatch):
    """Within one search (the window schedule depends on ``queries``, so runs of different
    budgets are not prefixes of each other), the rows broken after 1, 10, 30, 100 and 300
    updates never decrease, and more get broken."""
    monkeypatch.setattr(backend_module, "SLICE_MULTIPLY_ADDS", 0)  # an update per slice
    model, X, labels = network()
    counts = {}
    for state in square_steps(model, X, labels, eps=EPS[norm], norm=norm, queries=300, **BOX):
        if state.update in (1, 10, 30, 100, 300):
            counts[state.update] = int((advgrad.predict(model, state.X_adv) != labels).sum())
    counts = list(counts.values())
    assert len(counts) == 5 and counts == sorted(counts) and counts[0] < counts[-1]


@pytest.mark.parametrize("norm", NORMS)
def test_no_rows_give_no_rows(norm):
    model, X, labels = network()
    X_adv, queries_used = square(model, X[:0], labels[:0], eps=EPS[norm], norm=norm, **BOX)
    assert X_adv.shape == (0, 48) and queries_used.shape == (0,)


def test_no_labels_attack_the_predictions():
    model, X, _ = network()
    predicted = advgrad.predict(model, X)
    options = {"eps": 0.05, "queries": 20, **BOX}
    X_adv, queries_used = square(model, X, None, **options)
    expected, expected_queries = square(model, X, predicted, **options)
    np.testing.assert_array_equal(X_adv, expected)
    np.testing.assert_array_equal(queries_used, expected_queries)
    assert (queries_used > 0).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eps": 0.0}, "eps must be > 0"),
        ({"eps": -0.1}, "eps must be >= 0 and finite"),
        ({"eps": np.nan}, "eps must be >= 0 and finite"),
        ({"eps": np.inf}, "eps must be >= 0 and finite"),
        ({"norm": "3"}, "norm must be one of inf, 2, 1, got '3'"),
        ({"queries": 0}, "queries must be at least 1"),
        ({"queries": 2.5}, "queries must be an integer"),
        ({"p_init": 0.0}, "p_init must be in (0, 1], got 0"),
        ({"p_init": 1.5}, "p_init must be in (0, 1], got 1.5"),
        ({"seed": -1}, "seed must be in [0, 2**63), got -1"),
        ({"x_min": 1.0, "x_max": 0.0}, "the box [1, 0] is empty"),
        ({"first_row": -1}, "first_row must be at least 0"),
        (
            {"first_row": np.arange(3)},
            "first_row must be an integer or one integer per row, shape (4,), "
            "got shape (3,) of int64",
        ),
        ({"image_shape": (7, 7)}, "image_shape must be (h, w), (c, h, w) or (h, w, c)"),
        ({"image_shape": (3.0, 16)}, "image_shape must be a tuple of integers, got (3.0, 16)"),
    ],
)
def test_square_refusals(options, message):
    model, X, labels = network()
    arguments = {"eps": 0.1, **BOX} | options
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        square(model, X[:4], labels[:4], **arguments)


def test_square_refuses_labels_outside_the_classes():
    model, X, _ = network()
    with pytest.raises(ValueError, match=r"^label 5 at row 1 is outside \[0, 5\)"):
        square(model, X[:3], np.array([0, 5, 1]), eps=0.1, **BOX)
