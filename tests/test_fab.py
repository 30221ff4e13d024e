"""advgrad.fab: FAB (untargeted) and FAB-T equal a float64 per-row reference, the kernel's
projections (selection, no sort) equal the sort-based reference and are the smallest
feasible perturbations (against linear programs and the L2 optimality conditions), results
stay within eps and the box and are misclassified where changed, do not depend on the
batch, the blocks or the thread count, and bad settings are refused."""

from __future__ import annotations

import re

import numba
import numpy as np
import pytest
import reference_fab
from conftest import random_network
from scipy.optimize import brentq, linprog

import advgrad
from advgrad.attacks import ranked_targets
from advgrad.backend import get_backend
from advgrad.fab import fab, fab_targeted
from advgrad.kernels import fab as kernels
from advgrad.kernels import fab_projection

P = {"inf": np.inf, "2": 2.0, "1": 1.0}
RADIUS = {"inf": 0.05, "2": 0.3, "1": 0.6}
"""Radii at which ``random_case`` has rows both broken and not."""
PER_ROW = "labels must be one integer class per row, shape (64,)"


def random_case(seed=3, dtype=np.float64, n_rows=64, d=20, H=16, C=10):
    """A random network of scale 3, rows in [0, 1] and their predicted classes as labels."""
    rng = np.random.default_rng(seed)
    model = advgrad.Model(*random_network(rng, d, H, C, dtype=dtype, scale=3.0))
    X = rng.uniform(0.0, 1.0, (n_rows, d)).astype(dtype)
    return model, X, advgrad.predict(model, X)


def network(model):
    return (model.W1, model.b1, model.W2, model.b2)


def distances(X_adv, X, p):
    return np.linalg.norm((X_adv - X).astype(np.float64), ord=p, axis=1)


def projection(p, X, W, gap, box):
    """The kernel's projection (``hyperplane_projection``) of every row, (N, d) float64."""
    D = np.empty(X.shape)
    scratch, index = np.empty((2, X.shape[1])), np.empty(X.shape[1], dtype=np.int64)
    for x, w, g, out in zip(X, W, gap, D, strict=True):
        fab_projection.hyperplane_projection(p, x, w, g, *box, out, scratch, index)
    return D


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
@pytest.mark.parametrize("box", [(0.0, 1.0), (-np.inf, np.inf)])
def test_fab_equals_the_reference(norm, box):
    """Two targets with two restarts each (random starts), rows of absolute index 7 on,
    with a box and without: the same points as the per-row float64 reference."""
    model, X, labels = random_case()
    settings = {"eps": RADIUS[norm], "steps": 10, "restarts": 2, "target_classes": 2, "seed": 5}
    settings |= {"x_min": box[0], "x_max": box[1]}
    X_adv = fab_targeted(model, X, labels, norm=norm, first_row=7, **settings)
    expected = reference_fab.fab_targeted(
        X, network(model), labels, p=P[norm], first_row=7, **settings
    )
    np.testing.assert_allclose(X_adv, expected, rtol=0, atol=1e-12)
    changed = (X_adv != X).any(axis=1)
    assert 0 < changed.sum() < len(X)


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
@pytest.mark.parametrize("box", [(0.0, 1.0), (-np.inf, np.inf)])
def test_untargeted_fab_equals_the_reference(norm, box):
    """Three runs (two from random starts), rows of absolute index 7 on, each step toward
    the nearest linearised boundary: the same points as the per-row float64 reference."""
    model, X, labels = random_case(seed=8)
    settings = {"eps": RADIUS[norm], "steps": 10, "restarts": 3, "seed": 5}
    settings |= {"x_min": box[0], "x_max": box[1]}
    X_adv = fab(model, X, labels, norm=norm, first_row=7, **settings)
    expected = reference_fab.fab(X, network(model), labels, p=P[norm], first_row=7, **settings)
    np.testing.assert_allclose(X_adv, expected, rtol=0, atol=1e-12)
    changed = (X_adv != X).any(axis=1)
    assert 0 < changed.sum() < len(X)


@pytest.mark.parametrize("p", [np.inf, 2.0, 1.0])
def test_untargeted_steps_take_the_nearest_linearised_boundary(p):
    """``nearest_boundary_block`` picks the reference's class (|f_k| / ||g_k||_q smallest,
    q the dual norm) with its f_k and g_k; for L-inf and L1, on these rows, not always the
    highest other logit."""
    model, X, labels = random_case(seed=8)
    Z = get_backend().logits(model, X)
    A = 1.0 / (1.0 + np.exp(-(X @ model.W1 + model.b1)))
    G, f = np.empty_like(X), np.empty(len(X))
    kernels.nearest_boundary_block(A, Z.T.copy(), labels, model.W1, model.W2, p, G, f)
    picked = []
    for n, x in enumerate(X):
        f_k, g_k, _ = reference_fab.nearest_boundary(x, network(model), labels[n], p)
        np.testing.assert_allclose(G[n], g_k, rtol=1e-12, atol=1e-14)
        assert f[n] == pytest.approx(f_k, rel=1e-12, abs=1e-14)
        picked.append(
            f[n] != Z[n, ranked_targets(Z[n : n + 1], labels[n : n + 1], 1)[0, 0]] - Z[n, labels[n]]
        )
    assert any(picked) or p == 2.0


def grid_instances(seed, n_rows, d, box):
    """Projection instances full of ties: points on a grid of a few values (on the bounds
    among them), normals of a few magnitudes with zeros, gaps from 0 to past what the box
    reaches (a fraction of the largest reachable change, or of ||w||_1 without a box; 1: the
    box reaches the hyperplane exactly)."""
    rng = np.random.default_rng(seed)
    X = rng.choice([0.0, 0.25, 0.5, 1.0], size=(n_rows, d))
    W = rng.choice([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], size=(n_rows, d))
    W[0] = 0.0  # a zero gradient
    toward = np.where(W > 0.0, np.minimum(box[1], 2.0) - X, X - np.maximum(box[0], -1.0))
    reach = (np.abs(W) * toward).sum(axis=1)
    gap = reach * rng.choice([0.0, 0.01, 0.2, 0.6, 0.97, 1.0, 1.2], size=n_rows)
    gap *= rng.choice([-1.0, 1.0], size=n_rows)
    return X, W, gap


def random_instances(seed, n_rows, d, box):
    """Projection instances without ties, of every size of gap up to past the box."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0.0, 1.0, (n_rows, d))
    W = rng.normal(size=(n_rows, d)) * rng.choice([0.01, 1.0], size=(n_rows, d))
    toward = np.where(W > 0.0, np.minimum(box[1], 2.0) - X, X - np.maximum(box[0], -1.0))
    reach = (np.abs(W) * toward).sum(axis=1)
    gap = reach * rng.uniform(0.0, 1.1, n_rows) * rng.choice([-1.0, 1.0], size=n_rows)
    return X, W, gap


@pytest.mark.parametrize("box", [(0.0, 1.0), (-np.inf, np.inf)])
@pytest.mark.parametrize("instances", [grid_instances, random_instances])
def test_l2_projection_of_a_tiny_normal_is_the_normal_one(box, instances):
    """A normal below 1.5e-162 squares to subnormals or 0 in float64: the L2 projection
    scales it by a power of two first, so 2^-600 times a normal (and its gap) projects
    bitwise as the normal itself, finite without a box too."""
    X, W, gap = instances(3, 40, 50, box)
    expected = projection(2.0, X, W, gap, box)
    tiny = projection(2.0, X, W * 2.0**-600, gap * 2.0**-600, box)
    assert np.isfinite(tiny).all()
    assert tiny.tobytes() == expected.tobytes()


@pytest.mark.parametrize("p", [np.inf, 2.0, 1.0])
@pytest.mark.parametrize("box", [(0.0, 1.0), (-np.inf, np.inf), (0.0, np.inf), (-0.5, 0.75)])
@pytest.mark.parametrize("instances", [grid_instances, random_instances])
def test_projections_equal_the_sorted_reference(p, box, instances):
    """The selection-based projection equals the sort-based one (ties: L1 takes equal |w|
    by index, as a stable sort does) and the per-row reference, up to float64 rounding:
    zero gradients, zero gaps, infeasible hyperplanes, rows of 5 to 300 coordinates."""
    for seed, d in enumerate((5, 40, 300)):
        X, W, gap = instances(seed, 30, d, box)
        D = projection(p, X, W, gap, box)
        expected = reference_fab.sorted_projection(p, X, W, gap, box)
        scale = max(1.0, np.abs(expected).max())
        np.testing.assert_allclose(D, expected, rtol=0, atol=1e-12 * scale)
        for n in range(0, 30, 7):
            row = reference_fab.project_row(p, X[n], W[n], gap[n], *box)
            np.testing.assert_allclose(D[n], row, rtol=0, atol=1e-12 * max(1.0, abs(row).max()))
        assert (D[W == 0.0] == 0.0).all()


def test_level_selection_equals_the_sorted_level():
    """``_level`` (filtering passes, then quickselect) against the sorted breakpoints: keys
    0, 1, 2, ... of equal slope with the level near the top (each filtering pass saturates
    only half the keys left, so the quickselect finds it), random keys with ties, zero
    slopes and infinite keys (coordinates that never saturate), gaps past F's reach."""
    rng = np.random.default_rng(6)
    key, slope = rng.choice(rng.uniform(0.0, 3.0, 50), 200), rng.exponential(size=200)
    slope[:20] = 0.0
    key[20:25] = np.inf
    instances = [(np.arange(300.0), np.ones(300)), (key, slope), (key[25:], slope[25:])]
    for key, slope in instances:
        finite = np.isfinite(key)
        total = key[finite] @ slope[finite]
        for fraction in (0.0, 1e-9, 0.3, 0.9, 0.999, 0.9999999, 1.0, 1.5):
            gap = fraction * total
            gain = np.zeros_like(key)
            gain[finite] = key[finite] * slope[finite]
            expected = reference_fab.sorted_level(
                key[None], gain[None], slope[None], np.array([gap])
            )
            level = fab_projection._level(key.copy(), slope.copy(), len(key), gap)
            assert level == pytest.approx(expected[0], rel=1e-12, abs=1e-15)


def box_instances(seed, n_rows=40, d=7):
    """Points in [0, 1] (some coordinates on a bound), normals with a zero coordinate here
    and there, and gaps of both signs, a few beyond what the box can reach."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0.0, 1.0, (n_rows, d))
    X[rng.random((n_rows, d)) < 0.15] = 0.0
    X[rng.random((n_rows, d)) < 0.15] = 1.0
    W = rng.normal(size=(n_rows, d))
    W[rng.random((n_rows, d)) < 0.15] = 0.0
    gap = rng.normal(size=n_rows) * rng.choice([0.3, 1.0, 4.0], size=n_rows)
    return X, W, gap


def linear_program(p, x, w, gap):
    """min ||d||_p (p = inf or 1) over w.d = gap, 0 <= x + d <= 1, by scipy's linprog:
    the objective value, or None where the constraints are infeasible."""
    d = len(x)
    if p == np.inf:  # variables d, s: min s, -s <= d_i <= s
        cost = np.r_[np.zeros(d), 1.0]
        upper = np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]])
        bounds = [(-xi, 1.0 - xi) for xi in x] + [(0, None)]
        result = linprog(
            cost, A_ub=upper, b_ub=np.zeros(2 * d), A_eq=np.r_[w, 0.0][None], b_eq=[gap],
            bounds=bounds, method="highs",
        )  # fmt: skip
    else:  # d = u - v, u, v >= 0: min sum(u + v)
        cost = np.ones(2 * d)
        bounds = [(0.0, 1.0 - xi) for xi in x] + [(0.0, xi) for xi in x]
        result = linprog(cost, A_eq=np.r_[w, -w][None], b_eq=[gap], bounds=bounds, method="highs")
    return result.fun if result.status == 0 else None


@pytest.mark.parametrize("p", [np.inf, 1.0])
def test_linf_and_l1_projections_solve_the_linear_program(p):
    X, W, gap = box_instances(seed=int(p == 1.0))
    D = projection(p, X, W, gap, (0.0, 1.0))
    infeasible = 0
    for x, w, g, d in zip(X, W, gap, D, strict=True):
        assert (x + d >= -1e-15).all() and (x + d <= 1.0 + 1e-15).all()
        best = linear_program(p, x, w, g)
        if best is None:  # every coordinate of nonzero w at the bound toward the hyperplane
            infeasible += 1
            toward = np.sign(w) * np.sign(g)
            expected = np.where(toward > 0, 1.0 - x, np.where(toward < 0, -x, 0.0))
            np.testing.assert_array_equal(d, expected)
            assert abs(w @ d) < abs(g)
        else:
            assert w @ d == pytest.approx(g, abs=1e-12)
            assert np.linalg.norm(d, ord=p) == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert 0 < infeasible < len(X) // 2


def test_l2_projection_meets_the_optimality_conditions():
    """The L2 projection onto {w.d = gap} within the box is d = clip(l w, -x, 1 - x) for
    the l at which w.d = gap (found here by Brent's method); unique, so compared point by
    point."""
    X, W, gap = box_instances(seed=2)
    D = projection(2.0, X, W, gap, (0.0, 1.0))
    feasible = 0
    for x, w, g, d in zip(X, W, gap, D, strict=True):

        def reached(level, x=x, w=w, g=g):
            return w @ np.clip(level * w, -x, 1.0 - x) - g

        top = 1e6 * np.sign(g)
        if np.sign(reached(top)) == np.sign(reached(0.0)):  # the box stops short
            continue
        feasible += 1
        level = brentq(reached, min(0.0, top), max(0.0, top), xtol=1e-15, rtol=1e-15)
        np.testing.assert_allclose(d, np.clip(level * w, -x, 1.0 - x), rtol=0, atol=1e-9)
    assert feasible > len(X) // 2


@pytest.mark.parametrize("p", [np.inf, 2.0, 1.0])
def test_projections_without_a_box_are_the_closed_forms(p):
    """No box: gap w / ||w||_2^2 (2), gap sign(w) / ||w||_1 (inf), gap / w_i on the largest
    |w_i| alone (1); a zero gap moves nothing, and a zero normal neither."""
    X, W, gap = box_instances(seed=4)
    gap[:3] = 0.0
    W[3] = 0.0
    D = projection(p, X, W, gap, (-np.inf, np.inf))
    if p == 2.0:
        expected = gap[:, None] * W / np.maximum((W * W).sum(axis=1), 1e-300)[:, None]
    elif p == np.inf:
        total = np.maximum(np.abs(W).sum(axis=1), 1e-300)
        expected = gap[:, None] * np.sign(W) / total[:, None]
    else:
        expected = np.zeros_like(W)
        largest = np.argmax(np.abs(W), axis=1)
        rows = np.arange(len(W))
        expected[rows, largest] = gap / np.where(W[rows, largest] != 0.0, W[rows, largest], 1.0)
    expected[3] = 0.0
    np.testing.assert_allclose(D, expected, rtol=1e-13, atol=1e-15)
    assert (D[:4] == 0.0).all()


@pytest.mark.parametrize("p", [np.inf, 2.0, 1.0])
def test_projections_move_no_coordinate_further_out_of_the_box(p):
    """Points partly outside [0, 1]: a coordinate outside moves only back toward the box
    (at most to its far bound), one inside stays inside, and where the box and the
    hyperplane meet the hyperplane is reached."""
    X, W, gap = box_instances(seed=5)
    X = 3.0 * X - 1.0
    D = projection(p, X, W, gap, (0.0, 1.0))
    assert (D[X > 1.0] <= 0.0).all() and (D[X < 0.0] >= 0.0).all()
    moved = X + D
    assert (np.minimum(X, 0.0) <= moved).all() and (moved <= np.maximum(X, 1.0)).all()
    toward = np.sign(W) * np.sign(gap)[:, None]
    room = np.maximum(np.where(toward > 0, 1.0 - X, -X) * toward, 0.0)
    reachable = (np.abs(W) * room).sum(axis=1) >= np.abs(gap)
    assert 0 < reachable.sum() < len(X)
    np.testing.assert_allclose((W * D).sum(axis=1)[reachable], gap[reachable], rtol=1e-12)


ATTACKS = {
    "fab-t": lambda *arguments, **settings: fab_targeted(*arguments, target_classes=20, **settings),
    "fab": lambda *arguments, **settings: fab(*arguments, restarts=2, **settings),
}
"""FAB-T with targets as many as there are, and untargeted FAB with a random restart."""


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
@pytest.mark.parametrize("attack", ATTACKS)
def test_results_stay_within_eps_and_the_box_and_changed_rows_are_misclassified(norm, attack):
    """float32, the digits-like box [0, 1]: every changed row is misclassified, within eps
    of its row, in the box; more rows break at a larger eps."""
    attack = ATTACKS[attack]
    model, X, labels = random_case(seed=11, dtype=np.float32)
    labels[:4] = (labels[:4] + 1) % 10  # rows the model misclassifies already: unchanged
    settings = {"norm": norm, "steps": 20, "x_min": 0.0, "x_max": 1.0}
    X_adv = attack(model, X, labels, eps=RADIUS[norm], **settings)
    assert X_adv.dtype == np.float32 and X_adv.shape == X.shape
    changed = (X_adv != X).any(axis=1)
    assert not changed[:4].any()
    assert (advgrad.predict(model, X_adv[changed]) != labels[changed]).all()
    assert (distances(X_adv, X, P[norm]) <= RADIUS[norm] * (1 + 1e-6)).all()
    assert X_adv.min() >= 0.0 and X_adv.max() <= 1.0
    wider = attack(model, X, labels, eps=2 * RADIUS[norm], **settings)
    broken_wider = (advgrad.predict(model, wider) != labels)[4:]
    assert changed.sum() < broken_wider.sum()
    assert broken_wider[changed[4:]].all()


def test_targets_are_the_highest_other_logits():
    Z = np.array([[0.0, 3.0, 1.0, 3.0], [5.0, -1.0, 2.0, 0.5]], dtype=np.float32)
    np.testing.assert_array_equal(ranked_targets(Z, np.array([1, 0]), 2), [[3, 2], [2, 3]])
    np.testing.assert_array_equal(ranked_targets(Z, np.array([2, 0]), 3), [[1, 3, 0], [2, 3, 1]])


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
@pytest.mark.parametrize("attack", [fab_targeted, fab])
def test_results_do_not_depend_on_the_batch(norm, attack):
    """64 rows at once equal 4 slices of 16 given their first_row (an int or each row's
    index), bitwise."""
    model, X, labels = random_case(seed=17, dtype=np.float32)
    settings = {"eps": RADIUS[norm], "norm": norm, "steps": 10, "restarts": 2, "seed": 9}
    settings |= {"x_min": 0.0, "x_max": 1.0}
    if attack is fab_targeted:
        settings["target_classes"] = 2
    whole = attack(model, X, labels, **settings)
    parts = [
        attack(model, X[i : i + 16], labels[i : i + 16], first_row=i, **settings)
        for i in range(0, 64, 16)
    ]
    assert np.array_equal(whole, np.concatenate(parts))
    rows = np.arange(5, 64, 3)
    picked = attack(model, X[rows], labels[rows], first_row=rows, **settings)
    assert np.array_equal(picked, whole[rows])


@pytest.mark.parametrize("untargeted", [False, True])
def test_the_kernel_does_not_depend_on_blocks_threads_or_slices(untargeted):
    """``fab_steps_into`` on 200 rows (several blocks), with one thread and with all, in
    one call or in slices of iterations, equals ``fab_steps_block`` on all the rows at once
    (one block), bitwise."""
    model, X, labels = random_case(seed=19, dtype=np.float32, n_rows=200)
    targets = np.empty(0, np.int64)
    if not untargeted:
        targets = ranked_targets(get_backend().logits(model, X), labels, 1)[:, 0]
    network = (model.W1, model.b1, model.W2, model.b2)
    run = (X, *network, labels.astype(np.int64), targets, np.inf, 0.0, 1.0, 8)
    assert len(X) > 3 * kernels.ROWS_PER_BLOCK

    def state():
        hidden = np.empty((len(X), model.n_hidden), dtype=X.dtype)
        return X.copy(), X.copy(), np.full(len(X), np.inf), hidden

    expected = state()
    kernels.fab_steps_block(*run, 0, 9, *expected)
    assert np.isfinite(expected[2]).sum() > 10
    threads = numba.get_num_threads()
    try:
        for n_threads, slices in ((1, ((0, 9),)), (threads, ((0, 4), (4, 1), (5, 4)))):
            numba.set_num_threads(n_threads)
            result = state()
            for first, count in slices:
                kernels.fab_steps_into(*run, first, count, *result)
            for a, b in zip(result, expected, strict=True):
                assert np.array_equal(a, b)
    finally:
        numba.set_num_threads(threads)


def test_the_seed_and_the_row_index_pick_the_random_starts():
    """One step a run, where the random restarts break rows the first run does not: the
    rows they break are the reference's, and depend on the seed and on the rows' absolute
    index."""
    model, X, labels = random_case(seed=17)
    settings = {"eps": 1.0, "steps": 1, "target_classes": 2, "x_min": 0.0, "x_max": 1.0}
    first_runs = fab_targeted(model, X, labels, norm="1", restarts=1, **settings)
    restarted = fab_targeted(model, X, labels, norm="1", restarts=3, seed=9, **settings)
    assert (first_runs != X).any(axis=1).sum() < (restarted != X).any(axis=1).sum()
    expected = reference_fab.fab_targeted(
        X, network(model), labels, p=1.0, restarts=3, seed=9, **settings
    )
    np.testing.assert_allclose(restarted, expected, rtol=0, atol=1e-12)
    settings["norm"] = "1"
    assert np.array_equal(restarted, fab_targeted(model, X, labels, restarts=3, seed=9, **settings))
    for other in ({"seed": 10}, {"seed": 9, "first_row": 16}):
        assert not np.array_equal(
            restarted, fab_targeted(model, X, labels, restarts=3, **settings, **other)
        )


@pytest.mark.parametrize("attack", [fab_targeted, fab])
def test_inputs_stay_unchanged_and_labels_default_to_the_predictions(attack):
    model, X, labels = random_case(dtype=np.float32)
    kept = X.copy()
    settings = {"eps": 0.05, "steps": 5, "x_min": 0.0, "x_max": 1.0}
    first = attack(model, X, labels, **settings)
    assert np.array_equal(X, kept)
    assert np.array_equal(attack(model, X, **settings), first)
    images = X.reshape(64, 4, 5)
    assert np.array_equal(attack(model, images, labels, **settings), first.reshape(64, 4, 5))
    assert attack(model, X[:0], labels[:0], **settings).shape == (0, 20)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eps": 0.0}, "eps must be > 0"),
        ({"eps": np.nan}, "eps must be >= 0 and finite (at most 1.798e+308 in float64), got nan"),
        ({"norm": "3"}, "norm must be one of inf, 2, 1, got '3'"),
        ({"steps": 0}, "steps must be at least 1 and at most 2147483647, got 0"),
        ({"restarts": 0}, "restarts must be at least 1 and at most 2147483647, got 0"),
        ({"target_classes": 0}, "target_classes must be at least 1 and at most 2147483647, got 0"),
        ({"seed": -1}, "seed must be in [0, 2**63), got -1"),
        ({"x_min": 1.0, "x_max": 0.0}, "clip range (1.0, 0.0) is empty"),
        ({"labels": np.full(64, 10)}, "labels must be classes in [0, 10), got 10 at row 0"),
        ({"labels": np.zeros(63, np.int64)}, f"{PER_ROW}, got shape (63,) of int64"),
        ({"first_row": -1}, "first_row must be at least 0 and at most 2147483647, got -1"),
        (
            {"first_row": np.arange(63)},
            "first_row must be an integer or one integer per row, shape (64,), "
            "got shape (63,) of int64",
        ),
        (
            {"first_row": np.full(64, -1)},
            "first_row at row 0 must be at least 0 and at most 2147483647, got -1",
        ),
    ],
)
def test_fab_refuses_bad_settings(options, message):
    model, X, labels = random_case()
    arguments = {"labels": labels, "eps": 0.1} | options
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fab_targeted(model, X, **arguments)
    if "target_classes" not in options:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            fab(model, X, **arguments)


@pytest.mark.parametrize("p", [np.inf, 2.0, 1.0])
def test_a_hyperplane_the_box_reaches_exactly_takes_the_whole_room(p):
    """Where the gap is what the box allows, every coordinate moves to its bound."""
    X, W = np.array([[0.5, 0.5], [0.5, 0.25]]), np.array([[1.0, 1.0], [1.0, 2.0]])
    gap = np.array([1.0, 2.0])  # (1 - 0.5) + (1 - 0.5); (1 - 0.5) + 2 (1 - 0.25)
    D = projection(p, X, W, gap, (0.0, 1.0))
    np.testing.assert_allclose(D, [[0.5, 0.5], [0.5, 0.75]], rtol=0, atol=1e-15)


def test_l1_buckets_stay_in_range_for_subnormal_gradients():
    """The L1 projection of a gradient whose largest |w| is subnormal (its bucket scale
    would overflow): the reference's answer."""
    X = np.full((1, 4), 0.5)
    W = np.array([[1e-310, -3e-311, 2e-310, 0.0]])
    gap = np.array([1e-310])
    D = projection(1.0, X, W, gap, (0.0, 1.0))
    expected = reference_fab.sorted_projection(1.0, X, W, gap, (0.0, 1.0))
    np.testing.assert_array_equal(D, expected)
