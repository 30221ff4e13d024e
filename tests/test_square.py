"""The Square attack (advgrad.square): equal to the row-by-row NumPy reference, inside the
ball and the box, monotone in its margins, invariant to the batch, and its refusals."""

from __future__ import annotations

import re

import numpy as np
import pytest
import reference_square
from conftest import random_network

import advgrad
from advgrad import square as square_module
from advgrad.backend import CpuBackend
from advgrad.square import ImageLayout, image_layout, square, square_steps, window_fraction

EPS = {"inf": 0.05, "2": 0.5}
"""Radii at which about half of the rows below break within 100 queries (6 and 5 at the
starting point, 39 and 35 after 100 queries, measured)."""
BOX = {"x_min": 0.0, "x_max": 1.0}


class RowByRowBackend(CpuBackend):
    """The CPU backend with the logits of each row computed on their own: bitwise the same
    whatever rows a call holds (a BLAS product may round a row differently in batches of
    other shapes), so the batch tests see Square's own invariance."""

    def logits(self, model, X):
        Z = np.empty((len(X), model.n_classes), dtype=X.dtype)
        for n in range(len(X)):
            Z[n] = super().logits(model, X[n : n + 1])[0]
        return Z


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
    return square_module.margins(CpuBackend().logits(model, X), labels)


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


def test_channels_last_rows_are_viewed_as_channels_first_images():
    rows = np.arange(2 * 24.0).reshape(2, 24)
    image = ImageLayout(2, 3, 4, channels_last=True).image(rows)
    np.testing.assert_array_equal(image, rows.reshape(2, 3, 4, 2).transpose(0, 3, 1, 2))
    image[1, 1, 2, 3] = -1.0
    assert rows[1, (2 * 4 + 3) * 2 + 1] == -1.0


def test_window_fraction_halves_at_the_papers_query_counts():
    fractions = [window_fraction(i, 10000, 0.8) for i in (0, 10, 11, 50, 51, 200, 201)]
    assert fractions == [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1]
    assert window_fraction(8000, 10000, 0.8) == 0.8 / 256
    assert window_fraction(8001, 10000, 0.8) == 0.8 / 512
    # rescaled to the budget: update 1 of 100 stands at 100 of 10,000
    assert window_fraction(1, 100, 0.8) == 0.2


@pytest.mark.parametrize("norm", ["inf", "2"])
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
    else:  # the norms sum in another order
        np.testing.assert_allclose(X_adv, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", ["inf", "2"])
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
    size = np.abs(delta).max(axis=1) if norm == "inf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= EPS[norm] + 1e-6  # float32 rounds x + eps by up to 6e-8
    assert X_adv.min() >= 0.0 and X_adv.max() <= x_max
    broken = margins_of(model, X_adv.reshape(64, -1), labels) < 0.0
    assert broken[queries_used <= 100].all() and not broken[queries_used == 101].any()


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_margins_never_increase_and_a_broken_row_keeps_the_query_that_broke_it(norm):
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


@pytest.mark.parametrize(
    ("dtype", "backend_type"),
    [(np.float32, RowByRowBackend), (np.float64, RowByRowBackend), (np.float64, CpuBackend)],
)
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_square_is_the_same_whatever_the_batch(dtype, backend_type, norm):
    model, X, labels = network(dtype)
    options = {"eps": EPS[norm], "norm": norm, "queries": 50, "seed": 3, **BOX}
    options["backend"] = backend_type()
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


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_more_queries_never_lower_the_broken_rows(norm):
    model, X, labels = network()
    counts = []
    for queries in (1, 10, 30, 100, 300):
        X_adv, _ = square(model, X, labels, eps=EPS[norm], norm=norm, queries=queries, **BOX)
        counts.append(int((advgrad.predict(model, X_adv) != labels).sum()))
    assert counts == sorted(counts) and counts[0] < counts[-1]


@pytest.mark.parametrize("norm", ["inf", "2"])
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
        ({"norm": "1"}, "square supports the norms inf and 2 (L1 is not implemented), got '1'"),
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
