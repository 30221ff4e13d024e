"""The CPU kernels against finite differences, the NumPy reference and their own properties."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import reference
from conftest import one_hot, random_network
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit, prange
from scipy.special import expit

from advgrad.kernels import cpu


def finite_differences(X, W1, b1, W2, b2, Y, h=1e-6):
    """Central differences of the reference float64 loss, one coordinate at a time."""
    G = np.empty_like(X)
    for i in range(X.shape[1]):
        up, down = X.copy(), X.copy()
        up[:, i] += h
        down[:, i] -= h
        G[:, i] = (
            reference.loss(up, W1, b1, W2, b2, Y) - reference.loss(down, W1, b1, W2, b2, Y)
        ) / (2 * h)
    return G


@st.composite
def problems(draw):
    """A random network, inputs, and one-hot or soft labels (float64)."""
    N = draw(st.integers(1, 40))
    d = draw(st.integers(1, 12))
    H = draw(st.integers(1, 8))
    C = draw(st.integers(2, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    W1, b1, W2, b2 = random_network(rng, d, H, C)
    X = rng.uniform(-1.0, 2.0, size=(N, d))
    if draw(st.booleans()):
        Y = one_hot(rng.integers(0, C, N), C)
    else:
        Y = rng.dirichlet(np.ones(C), size=N)
    return X, W1, b1, W2, b2, Y


@settings(max_examples=60, deadline=None)
@given(problems())
def test_gradient_matches_central_differences(problem):
    X, W1, b1, W2, b2, Y = problem
    G = cpu.input_gradient(X, W1, b1, W2, b2, Y)
    F = finite_differences(X, W1, b1, W2, b2, Y)
    # central differences carry ~1e-10 of rounding noise per entry at h = 1e-6
    np.testing.assert_allclose(G, F, rtol=1e-6, atol=1e-8)
    if np.linalg.norm(F) > 1e-3:
        assert np.linalg.norm(G - F) / np.linalg.norm(F) < 1e-6


@settings(max_examples=40, deadline=None)
@given(problems())
def test_kernels_match_reference_float64(problem):
    X, W1, b1, W2, b2, Y = problem
    np.testing.assert_allclose(
        cpu.input_gradient(X, W1, b1, W2, b2, Y),
        reference.input_gradient(X, W1, b1, W2, b2, Y),
        rtol=1e-12,
        atol=1e-14,
    )
    np.testing.assert_allclose(
        cpu.loss(X, W1, b1, W2, b2, Y), reference.loss(X, W1, b1, W2, b2, Y), rtol=1e-12
    )
    A, P, predicted = cpu.forward(X, W1, b1, W2, b2)
    ref_A, ref_Z2, ref_P = reference.forward(X, W1, b1, W2, b2)
    np.testing.assert_allclose(A, ref_A, rtol=1e-12)
    np.testing.assert_allclose(P, ref_P, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(predicted, ref_Z2.argmax(axis=1))


def test_gradient_sign_is_p_minus_y():
    """G must point uphill: a small step along G raises the loss (the seed's (y - p) fails)."""
    rng = np.random.default_rng(1)
    W1, b1, W2, b2 = random_network(rng, 6, 5, 3)
    X = rng.uniform(size=(50, 6))
    Y = one_hot(rng.integers(0, 3, 50), 3)
    G = cpu.input_gradient(X, W1, b1, W2, b2, Y)
    before = reference.loss(X, W1, b1, W2, b2, Y)
    after = reference.loss(X + 1e-4 * G, W1, b1, W2, b2, Y)
    assert (after > before).all()
    D2 = reference.forward(X, W1, b1, W2, b2)[2] - Y
    A = reference.forward(X, W1, b1, W2, b2)[0]
    np.testing.assert_allclose(G, ((D2 @ W2.T) * A * (1 - A)) @ W1.T, rtol=1e-12)


@pytest.mark.parametrize("n_rows", [1, 7, 300, 1100])
@pytest.mark.parametrize("p", [np.inf, 2.0, 1.0])
def test_fgm_step_matches_reference(n_rows, p):
    rng = np.random.default_rng(n_rows)
    W1, b1, W2, b2 = random_network(rng, 20, 9, 4)
    X = rng.uniform(size=(n_rows, 20))
    Y = one_hot(rng.integers(0, 4, n_rows), 4)
    X_adv = cpu.fgm_step(X, W1, b1, W2, b2, Y, 0.05, p, 0.0, 1.0)
    np.testing.assert_allclose(
        X_adv, reference.fgm_step(X, W1, b1, W2, b2, Y, 0.05, p, 0.0, 1.0), rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_fgm_step_length_is_eps_without_clipping(p):
    rng = np.random.default_rng(3)
    W1, b1, W2, b2 = random_network(rng, 10, 6, 3)
    X = rng.normal(size=(30, 10))
    Y = one_hot(rng.integers(0, 3, 30), 3)
    X_adv = cpu.fgm_step(X, W1, b1, W2, b2, Y, 0.3, p, -np.inf, np.inf)
    np.testing.assert_allclose(np.linalg.norm(X_adv - X, ord=p, axis=1), 0.3, rtol=1e-12)


@pytest.mark.parametrize("q", [1, 2, 5, 20, 21, 1000])
def test_sparse_l1_step_matches_reference_and_gains_the_mean_of_the_top_q(q):
    """The L1 step moves eps / q along sign(G) on the q coordinates of largest |G| (first
    index on ties; q above d counts as d), so to first order it gains G . delta = eps
    times the mean of the q largest |G_i|: eps max |G| for q = 1."""
    rng = np.random.default_rng(q)
    W1, b1, W2, b2 = random_network(rng, 20, 9, 4)
    X = rng.normal(size=(300, 20))
    Y = one_hot(rng.integers(0, 4, 300), 4)
    X_adv = cpu.fgm_step(X, W1, b1, W2, b2, Y, 0.3, 1.0, -np.inf, np.inf, q)
    np.testing.assert_allclose(
        X_adv, reference.fgm_step(X, W1, b1, W2, b2, Y, 0.3, 1.0, -np.inf, np.inf, q), rtol=1e-15
    )
    G = reference.input_gradient(X, W1, b1, W2, b2, Y)
    top = -np.sort(-np.abs(G), axis=1)[:, : min(q, 20)]
    gain = ((X_adv - X) * G).sum(axis=1)
    np.testing.assert_allclose(gain, 0.3 * top.mean(axis=1), rtol=1e-12)
    assert np.count_nonzero(X_adv - X, axis=1).max() == min(q, 20)


def test_steepest_l1_step_gains_more_than_the_dense_one():
    """q = 1 gains eps max |G|, at least the dense eps ||G||_2^2 / ||G||_1 (about twice it
    on a random network)."""
    rng = np.random.default_rng(8)
    W1, b1, W2, b2 = random_network(rng, 200, 32, 10)
    X = rng.uniform(size=(200, 200))
    Y = one_hot(rng.integers(0, 10, 200), 10)
    G = reference.input_gradient(X, W1, b1, W2, b2, Y)
    X_adv = cpu.fgm_step(X, W1, b1, W2, b2, Y, 1.0, 1.0, -np.inf, np.inf)
    steepest = ((X_adv - X) * G).sum(axis=1)
    dense = (G * G).sum(axis=1) / np.abs(G).sum(axis=1)
    np.testing.assert_allclose(steepest, np.abs(G).max(axis=1), rtol=1e-12)
    assert np.all(steepest >= dense) and np.median(steepest / dense) > 1.5


def test_sparse_l1_step_takes_the_first_index_on_ties():
    G = np.array([[0.0, 1.0, -1.0, 1.0, 0.5, -1.0], [0.0] * 6, [-2.0] * 6])
    X = np.zeros_like(G)
    for q, first_row in ((1, [0, 1, 0, 0, 0, 0]), (3, [0, 1, -1, 1, 0, 0])):
        X_adv = np.empty_like(G)
        cpu.fgm_from_gradient_into(X, G, float(q), 1.0, -9.0, 9.0, X_adv, q)
        np.testing.assert_array_equal(X_adv[0], first_row)
        np.testing.assert_array_equal(X_adv[1], 0.0)
        np.testing.assert_array_equal(X_adv[2], [-1.0] * q + [0.0] * (6 - q))


@pytest.mark.parametrize("p", [np.inf, 2.0, 1.0])
def test_zero_gradient_rows_stay_put(p):
    rng = np.random.default_rng(4)
    _, b1, W2, b2 = random_network(rng, 5, 4, 3)
    W1 = np.zeros((5, 4))  # the loss does not depend on X: G == 0 exactly
    X = rng.uniform(size=(12, 5))
    Y = one_hot(rng.integers(0, 3, 12), 3)
    X_adv = cpu.fgm_step(X, W1, b1, W2, b2, Y, 0.5, p, 0.0, 1.0)
    assert not np.isnan(X_adv).any()
    np.testing.assert_array_equal(X_adv, X)


def test_negative_eps_descends_the_loss():
    rng = np.random.default_rng(5)
    W1, b1, W2, b2 = random_network(rng, 8, 6, 4)
    X = rng.uniform(0.2, 0.8, size=(40, 8))
    Y = one_hot(rng.integers(0, 4, 40), 4)
    before = reference.loss(X, W1, b1, W2, b2, Y)
    down = cpu.fgsm_step(X, W1, b1, W2, b2, Y, -0.01, 0.0, 1.0)
    up = cpu.fgsm_step(X, W1, b1, W2, b2, Y, 0.01, 0.0, 1.0)
    assert (reference.loss(down, W1, b1, W2, b2, Y) < before).all()
    assert (reference.loss(up, W1, b1, W2, b2, Y) > before).all()


def test_predictions_as_labels_equal_explicit_one_hot():
    rng = np.random.default_rng(6)
    W1, b1, W2, b2 = random_network(rng, 7, 5, 4)
    X = rng.uniform(size=(600, 7))
    predicted = reference.forward(X, W1, b1, W2, b2)[1].argmax(axis=1)
    Y = one_hot(predicted, 4)
    G = np.empty_like(X)
    got_predicted = np.empty(600, dtype=np.int64)
    cpu.input_gradient_into(X, W1, b1, W2, b2, Y[:0], G, got_predicted)
    np.testing.assert_array_equal(got_predicted, predicted)
    np.testing.assert_allclose(G, cpu.input_gradient(X, W1, b1, W2, b2, Y), rtol=1e-13)
    losses = np.empty(600)
    cpu.forward_into(
        X, W1, b1, W2, b2, Y[:0], np.empty((600, 5)), np.empty((600, 4)), losses, got_predicted
    )
    np.testing.assert_allclose(losses, reference.loss(X, W1, b1, W2, b2, Y), rtol=1e-12)


def test_float32_agrees_with_float64():
    rng = np.random.default_rng(7)
    arrays64 = (rng.uniform(size=(700, 30)), *random_network(rng, 30, 16, 10))
    Y = one_hot(rng.integers(0, 10, 700), 10)
    arrays32 = [a.astype(np.float32) for a in arrays64]
    G32 = cpu.input_gradient(*arrays32, Y.astype(np.float32))
    G64 = reference.input_gradient(*arrays32, Y)  # same float32 inputs, float64 arithmetic
    assert G32.dtype == np.float32
    assert np.linalg.norm(G32 - G64) / np.linalg.norm(G64) < 1e-5
    J32 = cpu.loss(*arrays32, Y.astype(np.float32))
    np.testing.assert_allclose(J32, reference.loss(*arrays32, Y), rtol=1e-5, atol=1e-6)


@njit(parallel=True)
def _thread_ids(n_items):
    """The numba thread that ran each of ``n_items`` prange iterations."""
    ids = np.empty(n_items, dtype=np.int64)
    for i in prange(n_items):
        ids[i] = numba.get_thread_id()
    return ids


def batch_kernel_outputs() -> dict[str, np.ndarray]:
    """Every public batch kernel on 3 blocks of ``cpu.ROWS_PER_BLOCK`` rows and a partial
    one: the gradient and FGM steps, the forward pass, a targeted DLR loss gradient, the
    logits, the iterative attacks (L1, momentum,
    some rows targeted), DeepFool, the training gradients (their block sums fused with
    FGSM), the margin bounds (CROWN) and certified radii. float32, the bounds in float64."""
    rng = np.random.default_rng(8)
    n_rows, d, C = 3 * cpu.ROWS_PER_BLOCK + 45, 40, 5
    network = random_network(rng, d, 20, C, dtype=np.float32, scale=3.0)
    X = rng.uniform(size=(n_rows, d)).astype(np.float32)
    Y = one_hot(rng.integers(0, C, n_rows), C, np.float32)
    out = {"G": np.empty_like(X), "X_fgm": np.empty_like(X), "P": np.empty((n_rows, C), "f4")}
    predicted = np.empty(n_rows, dtype=np.int64)
    cpu.input_gradient_into(X, *network, Y, out["G"], predicted)
    cpu.fgm_step_into(X, *network, Y, 0.1, 2.0, 0.0, 1.0, out["X_fgm"], predicted)
    out["losses"] = np.empty(n_rows, dtype=np.float32)
    A = np.empty((n_rows, 20), dtype=np.float32)
    cpu.forward_into(X, *network, Y, A, out["P"], out["losses"], predicted)
    labels, targets = np.argmax(Y, axis=1), (np.argmax(Y, axis=1) + 1) % C
    out["G_dlr"], out["dlr"] = np.empty_like(X), np.empty(n_rows, dtype=np.float32)
    targeted = (labels, targets, cpu.LOSS_DLR_TARGETED, 0.0, out["G_dlr"], out["dlr"])
    cpu.loss_gradient_into(X, *network, *targeted, predicted)
    out["Z"] = np.empty((n_rows, C), dtype=np.float32)
    cpu.logits_into(X, *network, out["Z"])
    out["X_iterate"] = np.empty_like(X)
    eps = np.full(n_rows, 2.0)
    alpha = np.where(np.arange(n_rows) % 3, 0.3, -0.3)
    cpu.iterate_into(X, *network, Y, X, eps, alpha, 4, 1.0, 0.9, 0.0, 1.0, out["X_iterate"])
    out["X_deepfool"] = np.empty_like(X)
    out["iterations"] = np.empty(n_rows, dtype=np.int64)
    cpu.deepfool_into(X, *network, 2.0, 0.02, 10, 0.0, 1.0, out["X_deepfool"], out["iterations"])
    gradients = [np.zeros_like(a) for a in network]
    cpu.parameter_gradient_into(X, *network, Y, 0.5, 0.5, 0.1, 0.0, 1.0, *gradients)
    out |= dict(zip(("dW1", "db1", "dW2", "db2"), gradients, strict=True))
    X64 = X.astype(np.float64)
    bounds = (0.0, 1.0, *(a.astype(np.float64) for a in network), True, 20)  # clip .. steps
    out["worst"] = np.empty(n_rows)
    cpu.margin_bounds_into(X64, labels, eps / 50, np.inf, *bounds, out["worst"])
    out["radius"] = np.empty(n_rows)
    out["certified"] = np.empty((n_rows, 2), dtype=np.bool_)
    grid = np.array([0.01, 0.1])
    cpu.certified_radius_into(
        X64, labels, grid, 2.0, *bounds, 1e-4, out["radius"], out["certified"]
    )
    return out


def save_outputs_at_one_and_two_threads(folder: str) -> None:
    """Run in a process started with NUMBA_NUM_THREADS=2: ``batch_kernel_outputs`` at 1
    and at 2 threads, saved as threads-1.npz and threads-2.npz with the thread ids that a
    prange loop saw (so that the caller knows two threads really ran)."""
    for threads in (1, 2):
        numba.set_num_threads(threads)
        np.savez(
            Path(folder) / f"threads-{threads}.npz",
            thread_ids=_thread_ids(64),
            **batch_kernel_outputs(),
        )


def test_results_do_not_depend_on_thread_count(tmp_path):
    """Bitwise the same results at 1 and 2 threads, in a fresh process that has 2 (this one
    may have 1: numba's thread count is fixed when it starts)."""
    tests = Path(__file__).parent
    script = (
        "import test_kernels_cpu\n"
        f"test_kernels_cpu.save_outputs_at_one_and_two_threads({str(tmp_path)!r})"
    )
    environment = os.environ | {"NUMBA_NUM_THREADS": "2"}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(tests), environment.get("PYTHONPATH")])
    )
    subprocess.run([sys.executable, "-c", script], env=environment, check=True, timeout=300)
    one, two = np.load(tmp_path / "threads-1.npz"), np.load(tmp_path / "threads-2.npz")
    assert set(one["thread_ids"]) == {0}
    assert set(two["thread_ids"]) == {0, 1}
    assert len(one.files) > 10
    for name in one.files:
        if name != "thread_ids":
            assert one[name].tobytes() == two[name].tobytes(), name
    assert len(set(one["iterations"])) > 2  # DeepFool rows stop at different iterations
    assert one["radius"].mean() > 0.0  # and some rows are certified


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_stay_finite(dtype):
    rng = np.random.default_rng(9)
    W1, b1, _, _ = random_network(rng, 6, 4, 3, dtype=dtype)
    W2 = np.array([[1e4, -1e4, 0.0]] * 4, dtype=dtype) / 4
    b2 = np.array([0.0, 0.0, -1e4], dtype=dtype)
    X = rng.uniform(size=(10, 6)).astype(dtype)
    for label in range(3):
        Y = one_hot(np.full(10, label), 3, dtype)
        J = cpu.loss(X, W1, b1, W2, b2, Y)
        G = cpu.input_gradient(X, W1, b1, W2, b2, Y)
        assert np.isfinite(J).all()
        assert np.isfinite(G).all()
        np.testing.assert_allclose(J, reference.loss(X, W1, b1, W2, b2, Y), rtol=1e-5)


def test_sigmoid_is_finite_and_exact_at_extremes():
    for z in (-1e4, -745.0, -700.0, -50.0, -1.0, 0.0, 1.0, 50.0, 1e4):
        assert cpu.sigmoid(z) == pytest.approx(expit(z), rel=1e-15, abs=1e-320)
    assert cpu.sigmoid(np.float32(-1e4)) == 0.0
    assert cpu.sigmoid(np.float32(1e4)) == 1.0


@njit
def _exp_float32_over(x, out):
    for i in range(x.shape[0]):
        out[i] = cpu.exp_float32(x[i])


def test_exp_float32_within_one_ulp():
    x = np.linspace(-103.0, 88.7, 2_000_001, dtype=np.float32)
    got = np.empty_like(x)
    _exp_float32_over(x, got)
    exact = np.exp(x.astype(np.float64))
    normal = exact >= np.finfo(np.float32).tiny
    ulps = np.abs(got[normal] - exact[normal]) / np.spacing(exact[normal].astype(np.float32))
    assert ulps.max() <= 1.0
    assert np.abs(got[~normal] - exact[~normal]).max() <= np.finfo(np.float32).smallest_subnormal
    special = np.array([-np.inf, -200.0, 0.0, 89.0, np.inf], dtype=np.float32)
    _exp_float32_over(special, got[:5])
    np.testing.assert_array_equal(got[:5], [0.0, 0.0, 1.0, np.inf, np.inf])


@njit
def _users_own_attack(X, W1, b1, W2, b2, Y, eps):
    """A user's jitted code calling the public kernels."""
    G = cpu.input_gradient(X, W1, b1, W2, b2, Y)
    X_adv = cpu.fgsm_step(X, W1, b1, W2, b2, Y, eps, 0.0, 1.0)
    return G, X_adv, cpu.loss(X_adv, W1, b1, W2, b2, Y)


def test_kernels_compose_inside_user_njit_code():
    rng = np.random.default_rng(10)
    W1, b1, W2, b2 = random_network(rng, 9, 5, 3)
    X = rng.uniform(size=(25, 9))
    Y = one_hot(rng.integers(0, 3, 25), 3)
    G, X_adv, J = _users_own_attack(X, W1, b1, W2, b2, Y, 0.1)
    np.testing.assert_allclose(G, reference.input_gradient(X, W1, b1, W2, b2, Y), rtol=1e-12)
    np.testing.assert_allclose(
        X_adv, reference.fgm_step(X, W1, b1, W2, b2, Y, 0.1, np.inf, 0.0, 1.0), rtol=1e-12
    )
    np.testing.assert_allclose(J, reference.loss(X_adv, W1, b1, W2, b2, Y), rtol=1e-12)


def test_confident_rows_keep_their_gradient_to_full_precision(digits_model, digits_test):
    """P - Y on the label class is 1 - P_y formed without cancellation: compare with an
    extended-precision evaluation of the same formula, exact where P_y rounds to 1."""
    model = digits_model.astype(np.float64)
    X, y = digits_test
    X = X.reshape(len(X), -1).astype(np.float64)
    L = np.longdouble
    W1, b1, W2, b2 = (np.asarray(a, dtype=L) for a in (model.W1, model.b1, model.W2, model.b2))
    A = 1 / (1 + np.exp(-(X.astype(L) @ W1 + b1)))
    Z2 = A @ W2 + b2
    E = np.exp(Z2 - Z2.max(axis=1, keepdims=True))
    D2 = E / E.sum(axis=1, keepdims=True)
    rows = np.arange(len(X))
    others = np.where(np.eye(10, dtype=bool)[y], 0, E).sum(axis=1)
    D2[rows, y] = -others / E.sum(axis=1)
    expected = (((D2 @ W2.T) * A * (1 - A)) @ W1.T).astype(np.float64)
    G = cpu.input_gradient(X, model.W1, model.b1, model.W2, model.b2, one_hot(y, 10))
    scale = np.abs(expected).max(axis=1, keepdims=True)
    assert (np.abs(G - expected) <= 1e-12 * scale).all()
    assert (others / E.sum(axis=1) < 1e-8).sum() > 50  # it covers confident rows (84 here)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_perturbation_norms_match_numpy(dtype):
    rng = np.random.default_rng(5)
    X = rng.random((700, 33)).astype(dtype)
    X_adv = (X + rng.normal(0.0, 0.2, X.shape)).astype(dtype)
    X_adv[3] = X[3]
    X_adv[9, 4] = np.nan
    linf, l2 = np.empty(len(X)), np.empty(len(X))
    cpu.perturbation_norms_into(X_adv, X, linf, l2)
    delta = X_adv.astype(np.float64) - X.astype(np.float64)
    np.testing.assert_allclose(linf, np.abs(delta).max(axis=1), rtol=0, atol=0)
    np.testing.assert_allclose(l2, np.linalg.norm(delta, axis=1), rtol=1e-14)
    assert (linf[3], l2[3]) == (0.0, 0.0)
    assert np.isnan(linf[9]) and np.isnan(l2[9])


@pytest.mark.parametrize("p", [np.inf, 2.0, 1.0])
def test_projection_onto_a_zero_radius_ball_returns_the_centre(p):
    rng = np.random.default_rng(2)
    x0 = rng.random(9)
    x = x0 + rng.normal(0.0, 0.3, 9)
    cpu.project_row(x, x0, 0.0, p, -10.0, 10.0, np.empty(9))
    np.testing.assert_array_equal(x, x0)


def test_iterative_kernels_in_slices_are_bitwise_one_call():
    """The state-carrying pieces, called from Python as users may: ``iterate_start_into``
    then ``iterate_steps_into`` with 2 + 3 steps (in place, MI-FGSM's momentum carried) and
    ``deepfool_start_into`` then ``deepfool_steps_into`` with 1 + 4 iterations give bitwise
    ``iterate_into`` with 5 steps and ``deepfool_into`` with max_iter 5."""
    rng = np.random.default_rng(9)
    net = random_network(rng, 10, 6, 4, scale=3.0)
    X = rng.random((30, 10))
    Y = one_hot(rng.integers(0, 4, 30), 4)
    eps = np.full(30, 0.2)
    alpha = 0.05 * np.where(np.arange(30) % 2, 1.0, -1.0)
    one_call = np.empty_like(X)
    cpu.iterate_into(X, *net, Y, X, eps, alpha, 5, 2.0, 0.9, 0.0, 1.0, one_call)
    sliced = X.copy()
    momentum = np.full_like(X, np.nan)
    cpu.iterate_start_into(X, sliced, eps, 2.0, 0.9, 0.0, 1.0, sliced, momentum)
    for steps in (2, 3):
        cpu.iterate_steps_into(X, *net, Y, eps, alpha, steps, 2.0, 0.9, 0.0, 1.0, sliced, momentum)
    assert not np.array_equal(one_call, X)
    assert sliced.tobytes() == one_call.tobytes()

    iterations = np.empty(30, dtype=np.int64)
    cpu.deepfool_into(X, *net, np.inf, 0.02, 5, 0.0, 1.0, one_call, iterations)
    X_adv, total = np.empty_like(X), np.empty(X.shape)
    original, sliced_iterations = np.empty(30, dtype=np.int64), np.empty(30, dtype=np.int64)
    active = np.empty(30, dtype=np.bool_)
    cpu.deepfool_start_into(X, X_adv, total, original, active, sliced_iterations)
    for steps in (1, 4):
        cpu.deepfool_steps_into(
            X,
            *net,
            np.inf,
            0.02,
            steps,
            0.0,
            1.0,
            X_adv,
            total,
            original,
            active,
            sliced_iterations,
        )
    assert len(set(iterations)) > 2
    assert X_adv.tobytes() == one_call.tobytes()
    assert sliced_iterations.tobytes() == iterations.tobytes()
    assert not active[iterations < 5].any()  # rows that crossed, or had nowhere to go


def test_l1_projection_matches_an_independent_one():
    """Project onto the L1 ball by bisection on the soft threshold, in numpy."""
    rng = np.random.default_rng(41)
    scratch = np.empty(20)
    for _ in range(50):
        x0 = rng.normal(size=20)
        x = x0 + rng.normal(size=20) * rng.uniform(0.01, 2.0)
        eps = rng.uniform(0.1, 3.0)
        got = x.copy()
        cpu.project_row(got, x0, eps, 1.0, -np.inf, np.inf, scratch)
        delta = x - x0
        if np.abs(delta).sum() <= eps:
            np.testing.assert_array_equal(got, x)
            continue
        lo, hi = 0.0, np.abs(delta).max()
        for _ in range(200):
            theta = 0.5 * (lo + hi)
            if np.maximum(np.abs(delta) - theta, 0.0).sum() > eps:
                lo = theta
            else:
                hi = theta
        expected = x0 + np.sign(delta) * np.maximum(np.abs(delta) - hi, 0.0)
        np.testing.assert_allclose(got, expected, atol=1e-12)
        assert np.abs(got - x0).sum() == pytest.approx(eps, rel=1e-12)


def test_logit_jacobian_matches_finite_differences():
    rng = np.random.default_rng(42)
    W1, b1, W2, b2 = random_network(rng, 7, 5, 4)
    x = rng.uniform(size=7)
    a, M, z, J = np.empty(5), np.empty((5, 4)), np.empty(4), np.empty((7, 4))
    cpu.logits_and_jacobian_row(x, W1, b1, W2, b2, a, M, z, J)
    np.testing.assert_allclose(z, reference.forward(x[None], W1, b1, W2, b2)[1][0], rtol=1e-13)
    h = 1e-6
    for i in range(7):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        numeric = (
            reference.forward(up[None], W1, b1, W2, b2)[1][0]
            - reference.forward(down[None], W1, b1, W2, b2)[1][0]
        ) / (2 * h)
        np.testing.assert_allclose(J[i], numeric, rtol=1e-7, atol=1e-9)


LOSS_CODES = {
    "ce": cpu.LOSS_CE,
    "dlr": cpu.LOSS_DLR,
    "dlr-targeted": cpu.LOSS_DLR_TARGETED,
    "cw": cpu.LOSS_CW,
    "logit-difference": cpu.LOSS_LOGIT_DIFFERENCE,
}
LOSS_CASES = [
    ("ce", False),
    ("dlr", False),
    ("dlr-targeted", True),
    ("cw", False),
    ("cw", True),
    ("logit-difference", True),
]
KAPPA = 0.3


def loss_problem(n_rows, dtype=np.float64, seed=11, d=10, C=6):
    """A network, rows, true labels and target classes (each other than its label)."""
    rng = np.random.default_rng(seed)
    network = random_network(rng, d, 8, C, dtype, scale=3.0)
    X = rng.uniform(size=(n_rows, d)).astype(dtype)
    labels = rng.integers(0, C, n_rows)
    targets = (labels + rng.integers(1, C, n_rows)) % C
    return X, network, labels, targets


def loss_gradient_of(loss, X, network, labels, targets, kappa=KAPPA):
    """``cpu.loss_gradient`` by loss name; targets None for none."""
    chosen = labels[:0] if targets is None else targets
    return cpu.loss_gradient(X, *network, labels, chosen, LOSS_CODES[loss], kappa)


def rows_off_kinks(X, network, labels, targets, loss, kappa=KAPPA, gap=1e-3):
    """Rows where the loss is smooth within ``gap`` of the logits: no two logits closer than
    that, and a C&W margin that far from kappa."""
    Z = reference.logits(X, *network)
    s = -np.sort(-Z, axis=1)
    smooth = (s[:, :-1] - s[:, 1:]).min(axis=1) > gap
    if loss == "cw":
        margin = reference.loss_value(X, *network, labels, "cw", targets, np.inf)
        smooth &= np.abs(margin - kappa) > gap
    return smooth


def central_differences(value, X, h=1e-6):
    """Central differences of ``value(X) -> (N,)``, one coordinate at a time."""
    F = np.empty_like(X)
    for i in range(X.shape[1]):
        up, down = X.copy(), X.copy()
        up[:, i] += h
        down[:, i] -= h
        F[:, i] = (value(up) - value(down)) / (2 * h)
    return F


@pytest.mark.parametrize("n_rows", [1, 80, 255, 257, 513])
@pytest.mark.parametrize(("loss", "targeted"), LOSS_CASES)
def test_loss_gradient_matches_central_differences(n_rows, loss, targeted):
    """Every loss's gradient against float64 central differences of the reference loss, at
    rows away from ties (and, for C&W, from the clip at kappa); values and predictions
    against the reference; at one row, within one block of rows, and a few past blocks."""
    X, network, labels, targets = loss_problem(n_rows, seed=n_rows)
    targets = targets if targeted else None
    G, values, predicted = loss_gradient_of(loss, X, network, labels, targets)
    assert (G.shape, values.shape, predicted.shape) == (X.shape, (n_rows,), (n_rows,))
    assert (G.dtype, values.dtype, predicted.dtype) == (X.dtype, X.dtype, np.int64)

    def value(X_moved):
        return reference.loss_value(X_moved, *network, labels, loss, targets, KAPPA)

    F = central_differences(value, X)
    smooth = rows_off_kinks(X, network, labels, targets, loss)
    assert smooth.mean() > 0.75
    np.testing.assert_allclose(G[smooth], F[smooth], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(values, value(X), rtol=1e-12, atol=1e-14)
    Z = reference.logits(X, *network)
    np.testing.assert_array_equal(predicted, Z.argmax(axis=1))
    np.testing.assert_allclose(cpu.logits(X, *network), Z, rtol=1e-13, atol=1e-14)
    clipped = values == KAPPA if loss == "cw" else np.zeros(n_rows, dtype=bool)
    assert (G[clipped] == 0.0).all()
    if n_rows > 1:
        # DLR is constant (1) where y is the third largest logit: its gradient cancels there
        assert (np.abs(G[~clipped]).max(axis=1) > 1e-3).mean() > 0.6
        assert loss != "cw" or 0.1 < clipped.mean() < 0.9  # both sides of the clip covered


@pytest.mark.parametrize(("loss", "targeted"), LOSS_CASES)
def test_loss_gradient_of_no_rows(loss, targeted):
    X, network, labels, targets = loss_problem(0)
    G, values, predicted = loss_gradient_of(loss, X, network, labels, targets if targeted else None)
    assert (G.shape, values.shape, predicted.shape) == ((0, 10), (0,), (0,))
    assert cpu.logits(X, *network).shape == (0, 6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ce_loss_gradient_is_the_cross_entropy_gradient_bitwise(dtype):
    X, network, labels, _ = loss_problem(3 * cpu.ROWS_PER_BLOCK + 5, dtype)
    G, values, predicted = loss_gradient_of("ce", X, network, labels, None)
    Y = one_hot(labels, 6, dtype)
    expected_predicted = np.empty(len(X), dtype=np.int64)
    expected = np.empty_like(X)
    cpu.input_gradient_into(X, *network, Y, expected, expected_predicted)
    assert G.tobytes() == expected.tobytes()
    assert predicted.tobytes() == expected_predicted.tobytes()
    np.testing.assert_allclose(
        values, cpu.loss(X, *network, Y), rtol=1e-6 if dtype == np.float32 else 1e-15
    )


@pytest.mark.parametrize(("loss", "targeted"), LOSS_CASES)
def test_loss_gradient_float32_agrees_with_float64(loss, targeted):
    X, network, labels, targets = loss_problem(600, np.float32)
    targets = targets if targeted else None
    G32, values32, predicted32 = loss_gradient_of(loss, X, network, labels, targets)
    wide = [a.astype(np.float64) for a in (X, *network)]
    G64, values64, predicted64 = loss_gradient_of(loss, wide[0], wide[1:], labels, targets)
    assert (G32.dtype, values32.dtype) == (np.float32, np.float32)
    same = predicted32 == predicted64
    if loss == "cw":
        margin = reference.loss_value(*wide, labels, loss, targets, np.inf)
        same &= np.abs(margin - KAPPA) > 1e-4  # away from the clip
    assert same.mean() > 0.95
    assert np.linalg.norm(G32[same] - G64[same]) / np.linalg.norm(G64[same]) < 1e-5
    np.testing.assert_allclose(values32, values64, rtol=1e-4, atol=1e-5)


def test_margin_losses_differentiate_ties_through_the_first_index():
    """Logits with ties: the maximum (and the sorted order) takes the first index, and the
    C&W margin's gradient is 0 where clipped at kappa, 1 and -1 below it."""
    z = np.array([3.0, 1.0, 3.0, 1.0, 0.0])
    spread = 3.0 - 1.0 + cpu.DLR_OFFSET  # s_1 = z_0, s_3 = z_1
    gap = 0.0 - 3.0  # label 4 against the first of the two largest, class 0

    def row(loss, label, target, kappa=0.0):
        dz = np.empty(5)
        value, predicted = cpu.margin_loss_row(z, label, target, loss, kappa, dz)
        assert predicted == 0
        return value, dz

    value, dz = row(cpu.LOSS_DLR, 4, -1)
    assert value == -gap / spread
    ratio = gap / spread**2
    np.testing.assert_array_equal(dz, [1 / spread + ratio, -ratio, 0.0, 0.0, -1 / spread])
    value, dz = row(cpu.LOSS_DLR, 0, -1)  # the rival of class 0 is class 2
    assert value == 0.0
    np.testing.assert_array_equal(dz, [-1 / spread, 0.0, 1 / spread, 0.0, 0.0])
    spread = 3.0 - (1.0 + 1.0) / 2 + cpu.DLR_OFFSET  # s_3 = z_1, s_4 = z_3
    value, dz = row(cpu.LOSS_DLR_TARGETED, 4, 3)
    gap = 0.0 - 1.0
    ratio = gap / spread**2
    assert value == -gap / spread
    np.testing.assert_array_equal(dz, [ratio, -ratio / 2, 0.0, 1 / spread - ratio / 2, -1 / spread])
    value, dz = row(cpu.LOSS_CW, 4, -1, kappa=5.0)  # the best class other than 4: class 0
    assert value == 3.0
    np.testing.assert_array_equal(dz, [1.0, 0.0, 0.0, 0.0, -1.0])
    value, dz = row(cpu.LOSS_CW, 1, 3, kappa=5.0)  # target 3 against class 0
    assert value == -2.0
    np.testing.assert_array_equal(dz, [-1.0, 0.0, 0.0, 1.0, 0.0])
    value, dz = row(cpu.LOSS_CW, 4, -1, kappa=2.0)
    assert value == 2.0
    np.testing.assert_array_equal(dz, np.zeros(5))


def test_logit_difference_is_the_target_logit_less_the_true_one():
    """z_t - z_y and e_t - e_y, whatever the order of the logits; 0 where t = y."""
    z = np.array([3.0, 1.0, 3.0, -1.5, 0.0])
    for label, target, expected in [(4, 2, 3.0), (0, 3, -4.5), (1, 1, 0.0)]:
        dz = np.empty(5)
        value, predicted = cpu.margin_loss_row(z, label, target, cpu.LOSS_LOGIT_DIFFERENCE, 0.0, dz)
        assert (value, predicted) == (expected, 0)
        np.testing.assert_array_equal(dz, np.eye(5)[target] - np.eye(5)[label])
