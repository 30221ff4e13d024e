"""The projection, iterative-attack and DeepFool kernels, and the attack functions over them,
against the NumPy float64 references of ``tests/reference.py``.

Shapes cover one row, one partial block, and several blocks of ``cpu.ROWS_PER_BLOCK`` rows
with a partial last one. float64 results must agree to rounding; float32 kernels are
compared with the float64 reference run on the same float32 inputs, within a tolerance
argued at each test.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference
from conftest import one_hot, random_network
from hypothesis import given, settings
from hypothesis import strategies as st

import advgrad
from advgrad import attacks
from advgrad.kernels import cpu

ROW_COUNTS = (1, 7, cpu.ROWS_PER_BLOCK + 3, 2 * cpu.ROWS_PER_BLOCK + 45)
NORMS = (np.inf, 2.0, 1.0)
CLIPS = ((0.0, 1.0), (-np.inf, np.inf))
RADIUS_SCALE = {np.inf: 1.0, 2.0: 3.0, 1.0: 6.0}
"""Multiples of the L-inf radius for the L2 and L1 balls, so that in d = 12 each ball binds
on some rows and steps and not on others (an L-inf step of r has L2 length 3.5 r and L1
length 12 r)."""


def problem(n_rows, dtype=np.float64, *, seed=0, d=12, H=7, C=4, scale=2.0):
    """(rng, X (n_rows, d) in [0, 1], network, one-hot Y) in ``dtype``."""
    rng = np.random.default_rng(seed)
    network = random_network(rng, d, H, C, dtype=dtype, scale=scale)
    X = rng.random((n_rows, d)).astype(dtype)
    Y = one_hot(rng.integers(0, C, n_rows), C, dtype)
    return rng, X, network, Y


# --------------------------------------------------------------------------- projections


@st.composite
def projections(draw):
    """A centre x0, a point x (some coordinates far outside the ball, some inside, some
    equal), a radius, a norm and a clip range."""
    d = draw(st.integers(1, 20))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x0 = rng.uniform(-0.5, 1.5, d)
    delta = rng.normal(0.0, draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0])), d)
    delta[rng.random(d) < 0.2] = 0.0
    eps = draw(st.sampled_from([0.0, 1e-6, 0.05, 0.5, 3.0]))
    p = draw(st.sampled_from(NORMS))
    return x0 + delta, x0, eps, p, draw(st.sampled_from(CLIPS))


@settings(max_examples=300, deadline=None)
@given(projections())
def test_project_row_matches_the_reference(case):
    x, x0, eps, p, clip = case
    got = x.copy()
    cpu.project_row(got, x0, eps, p, *clip, np.empty_like(x))
    want = reference.project(x[None], x0[None], eps, p, *clip)[0]
    # the L1 threshold is a difference of sums of d <= 20 terms of size |x - x0| <= ~40
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * (1 + np.abs(x - x0).sum()))


@settings(max_examples=200, deadline=None)
@given(projections(), st.integers(0, 2**32 - 1))
def test_projection_is_the_nearest_point_of_the_ball(case, seed):
    """Without a clip, the kernel's result q is the Euclidean projection of x: q lies in the
    ball and (x - q) . (b - q) <= 0 for every point b of the ball (a convex set), checked at
    random points, vertices and faces of it."""
    x, x0, eps, p, _ = case
    q = x.copy()
    cpu.project_row(q, x0, eps, p, -np.inf, np.inf, np.empty_like(x))
    size = np.abs(x - x0).sum() + 1.0
    assert np.linalg.norm(q - x0, ord=p) <= eps * (1 + 1e-12) + 1e-14 * size
    rng = np.random.default_rng(seed)
    d = len(x)
    directions = np.concatenate([rng.normal(size=(200, d)), np.eye(d), -np.eye(d)])
    directions = np.concatenate([directions, np.sign(directions)])
    unit = directions / np.linalg.norm(directions, ord=p, axis=1, keepdims=True)
    ball = x0 + eps * rng.random((len(unit), 1)) ** 0.1 * unit
    assert ((ball - q) @ (x - q) <= 1e-12 * size * (1 + eps)).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n_rows", ROW_COUNTS)
def test_batch_projection_matches_the_reference(n_rows, dtype):
    """``iterate_start_into`` projects every row of a start into its own ball and clip."""
    rng, X, _, _ = problem(n_rows, dtype)
    for p in NORMS:
        eps = rng.uniform(0.0, 0.3, n_rows) * RADIUS_SCALE[p]
        start = (X + rng.uniform(-2.0, 2.0, X.shape) * eps[:, None]).astype(dtype)
        for clip in CLIPS:
            got = np.empty_like(X)
            cpu.iterate_start_into(X, start, eps, p, 0.0, *clip, got, X[:0])
            want = reference.project(start, X, eps, p, *clip)
            # float32: each coordinate and its perturbation are rounded to float32, a few
            # units in the last place of values below 2 (2**-23 each)
            atol = 1e-13 if dtype == np.float64 else 5e-7
            np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"p={p} {clip}")


# --------------------------------------------------------------------------- iterative attacks

ITERATIVE = {  # method: (start is given, momentum decay, step size / eps per step)
    "bim": (False, 0.0, 1.0),
    "pgd": (True, 0.0, 2.5),
    "mifgsm": (False, 0.9, 1.0),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("method", list(ITERATIVE))
def test_iterate_matches_the_reference(method, p, dtype):
    """BIM, PGD from a given start (some of it outside the ball) and MI-FGSM, 5 steps, with
    per-row radii and step signs (a third of the rows targeted: they descend)."""
    given_start, decay, ratio = ITERATIVE[method]
    steps = 5
    for n_rows in ROW_COUNTS:
        rng, X, network, Y = problem(n_rows, dtype, seed=n_rows)
        eps = rng.uniform(0.05, 0.3, n_rows) * RADIUS_SCALE[p]
        alpha = ratio * eps / steps * np.where(rng.random(n_rows) < 0.3, -1.0, 1.0)
        start = X
        if given_start:
            start = (X + rng.uniform(-2.0, 2.0, X.shape) * eps[:, None]).astype(dtype)
        for clip in CLIPS:
            got = np.empty_like(X)
            cpu.iterate_into(X, *network, Y, start, eps, alpha, steps, p, decay, *clip, got)
            want = reference.iterate(X, *network, Y, start, eps, alpha, steps, p, decay, *clip)
            # float32: every step rounds the iterate to float32 (2**-24 relative, values
            # below 2) and moves it by alpha <= 0.5 along a float32 direction good to about
            # 1e-6 relative: at most 5 x (1.2e-7 + 5e-7) after 5 steps. (sign(G) could flip
            # where a coordinate of G is within float32 error of 0; none does on these seeds.)
            atol = 1e-12 if dtype == np.float64 else 3e-6
            assert got.dtype == dtype
            np.testing.assert_allclose(
                got, want, rtol=0, atol=atol, err_msg=f"{n_rows} rows, clip {clip}"
            )


@pytest.mark.parametrize("p", NORMS)
def test_each_float32_step_and_momentum_match_the_reference(p):
    """MI-FGSM in float32, one step at a time: from the kernel's own iterate and momentum,
    ``iterate_steps_into`` with 1 step against ``reference.iterate_step``, so that float32
    rounding cannot build up over the steps."""
    n_rows = 2 * cpu.ROWS_PER_BLOCK + 45
    rng, X, network, Y = problem(n_rows, np.float32, seed=11)
    eps = rng.uniform(0.05, 0.3, n_rows) * RADIUS_SCALE[p]
    alpha = 2.5 * eps / 10
    X_adv = np.empty_like(X)
    momentum = np.empty_like(X)
    cpu.iterate_start_into(X, X, eps, p, 1.0, 0.0, 1.0, X_adv, momentum)
    assert not momentum.any()
    for _ in range(10):
        before, momentum_before = X_adv.copy(), momentum.copy()
        cpu.iterate_steps_into(X, *network, Y, eps, alpha, 1, p, 1.0, 0.0, 1.0, X_adv, momentum)
        want, want_momentum = reference.iterate_step(
            X, before, momentum_before, *network, Y, eps, alpha, p, 1.0, 0.0, 1.0
        )
        # one rounding of the iterate (values in [0, 1]: 6e-8) and alpha <= 0.45 times the
        # float32 direction's error (about 1e-6 relative): 1e-6
        np.testing.assert_allclose(X_adv, want, rtol=0, atol=1e-6)
        # the momentum adds G / ||G||_1, each entry of G good to about 1e-6 of the largest
        scale = np.abs(want_momentum).max(axis=1, keepdims=True)
        assert (np.abs(momentum - want_momentum) <= 1e-5 * scale).all()
        assert not np.array_equal(X_adv, before)


@pytest.mark.parametrize("clip", [(0.0, 1.0), None])
@pytest.mark.parametrize("norm", ["inf", "2", "1"])
def test_attack_functions_follow_the_step_and_start_conventions(norm, clip):
    """``advgrad.bim``, ``mi_fgsm`` and ``pgd`` (one restart) on a float64 model are the
    reference iteration with step eps / steps (bim, mifgsm) or 2.5 eps / steps (pgd), from X
    or from the seeded start X + eps u, u = ``random_in_ball(seed, 0, rows, d, p)``; a
    targeted attack descends toward the target's one-hot label."""
    n_rows = cpu.ROWS_PER_BLOCK + 3
    rng, X, network, _ = problem(n_rows, seed=5)
    model = advgrad.Model(*network)
    y = rng.integers(0, 4, n_rows)
    Y = one_hot(y, 4)
    p = attacks.norm_order(norm)
    eps, steps = 0.2 * RADIUS_SCALE[p], 6
    box = (-np.inf, np.inf) if clip is None else clip
    options = {"eps": eps, "norm": norm, "steps": steps, "clip": clip}
    target = np.full(n_rows, 2)
    T = one_hot(target, 4)
    pgd_start = X + eps * attacks.random_in_ball(4, 0, np.arange(n_rows), X.shape[1], p)
    cases = [
        (attacks.bim(model, X, y, **options), X, eps / steps, 0.0, Y),
        (attacks.mi_fgsm(model, X, y, decay=0.7, **options), X, eps / steps, 0.7, Y),
        (attacks.pgd(model, X, y, seed=4, **options), pgd_start, 2.5 * eps / steps, 0.0, Y),
        (attacks.bim(model, X, target, target=2, **options), X, -eps / steps, 0.0, T),
    ]
    for got, start, alpha, decay, labels in cases:
        want = reference.iterate(X, *network, labels, start, eps, alpha, steps, p, decay, *box)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- DeepFool

DEEPFOOL_CASES = [  # (overshoot, max_iter): the stop rule, a cut-off run, a single iteration
    (0.02, 50),
    (0.5, 3),
    (0.02, 1),
]


def run_deepfool(X, network, p, overshoot, max_iter, clip):
    X_adv = np.empty_like(X)
    iterations = np.empty(len(X), dtype=np.int64)
    cpu.deepfool_into(X, *network, p, overshoot, max_iter, *clip, X_adv, iterations)
    return X_adv, iterations


@pytest.mark.parametrize("p", [2.0, np.inf])
@pytest.mark.parametrize(("overshoot", "max_iter"), DEEPFOOL_CASES)
def test_deepfool_matches_the_reference(p, overshoot, max_iter):
    """float64, clipped to [0, 1] with a network whose boundaries are often out of reach
    (rows stop on crossing, on max_iter, or stuck at the clip), and unclipped with a milder
    one. Without a clip, saturated hidden units let steps grow without bound (to 1e147 with
    the first network), where every step amplifies rounding; the milder network keeps them
    below 4."""
    seen = set()
    for n_rows in ROW_COUNTS:
        for clip, scale in (((0.0, 1.0), 3.0), ((-np.inf, np.inf), 1.0)):
            _, X, network, _ = problem(n_rows, seed=n_rows, scale=scale)
            X_adv, iterations = run_deepfool(X, network, p, overshoot, max_iter, clip)
            want, want_iterations = reference.deepfool(X, *network, p, overshoot, max_iter, *clip)
            np.testing.assert_array_equal(iterations, want_iterations)
            np.testing.assert_allclose(X_adv, want, rtol=0, atol=1e-12)
            seen |= set(iterations)
    assert {1, max_iter} <= seen  # rows that crossed at once, rows cut off by max_iter
    assert len(seen) >= min(max_iter, 20)  # and many in between


@pytest.mark.parametrize("p", [2.0, np.inf])
def test_float32_deepfool_matches_the_reference(p):
    """float32, clipped, 3 iterations with overshoot 0.5. Each iteration's decisions (the
    nearest boundary, whether the class changed) are discrete: on these seeds none is
    within float32 error of a tie, so they are the reference's; each step is then good to
    about 1e-6 relative (the float32 Jacobian and logits) on perturbations below 1, plus
    the rounding of X_adv: 2e-6."""
    n_rows = 2 * cpu.ROWS_PER_BLOCK + 45
    _, X, network, _ = problem(n_rows, np.float32, seed=3, scale=3.0)
    X_adv, iterations = run_deepfool(X, network, p, 0.5, 3, (0.0, 1.0))
    want, want_iterations = reference.deepfool(X, *network, p, 0.5, 3, 0.0, 1.0)
    assert X_adv.dtype == np.float32
    np.testing.assert_array_equal(iterations, want_iterations)
    np.testing.assert_allclose(X_adv, want, rtol=0, atol=2e-6)


def test_deepfool_rows_without_a_direction_stay_put():
    """W1 = 0: every logit difference is flat, so no row moves and no iteration counts."""
    _, X, (W1, b1, W2, b2), _ = problem(20)
    network = (np.zeros_like(W1), b1, W2, b2)
    for p in (2.0, np.inf):
        X_adv, iterations = run_deepfool(X, network, p, 0.02, 50, (0.0, 1.0))
        want, want_iterations = reference.deepfool(X, *network, p, 0.02, 50, 0.0, 1.0)
        np.testing.assert_array_equal(X_adv, want)
        np.testing.assert_array_equal(X_adv, X)
        np.testing.assert_array_equal(iterations, want_iterations)
        assert not iterations.any()


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_deepfool_function_matches_the_reference(norm):
    """``advgrad.deepfool`` (which runs the kernel in slices of iterations) on a float64
    model."""
    n_rows = cpu.ROWS_PER_BLOCK + 3
    _, X, network, _ = problem(n_rows, seed=8, scale=3.0)
    model = advgrad.Model(*network)
    got = attacks.deepfool(model, X, norm=norm, clip=(0.0, 1.0), overshoot=0.1, max_iter=20)
    p = attacks.norm_order(norm)
    want, _ = reference.deepfool(X, *network, p, 0.1, 20, 0.0, 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
