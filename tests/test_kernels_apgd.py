"""advgrad.kernels.apgd: the L1-ball-and-box projection equals a bisection and is the nearest
point; the fused run equals the gradient and the update run in turn, bitwise, whatever the
thread count and the slices. The CUDA twins (``advgrad.kernels.cuda.apgd``) equal the CPU
kernels bitwise given the same gradients, and the CUDA backend's run the CPU's; without a
GPU they run on the simulator (``test_cuda_kernels_on_simulator``)."""

from __future__ import annotations

import importlib.util
import os

import numba
import numpy as np
import pytest
import reference_apgd
from children import assert_passes_on_simulator
from conftest import random_network
from test_cuda import small_blocks  # noqa: F401 (a fixture)

import advgrad
from advgrad import backend as backend_module
from advgrad.apgd import checkpoint_windows
from advgrad.backend import get_backend
from advgrad.kernels import apgd as kernels

P = {"inf": np.inf, "2": 2.0, "1": 1.0}
RADIUS = {"inf": 0.1, "2": 0.5, "1": 1.0}


def l1_case(seed, d, box):
    """A centre x in the box, a point v around it, a radius, and the box."""
    rng = np.random.default_rng(seed)
    x_min, x_max = box
    low, high = (0.0, 1.0) if np.isinf(x_min) else (x_min, x_max)
    x = rng.uniform(low, high, d)
    v = x + rng.normal(0.0, 0.5, d) * (rng.uniform(size=d) < 0.7)  # some coordinates stay
    return v, x, float(rng.uniform(0.05, 2.0)), x_min, x_max


@pytest.mark.parametrize("box", [(0.0, 1.0), (-np.inf, np.inf), (-0.5, 0.25)])
@pytest.mark.parametrize("seed", range(6))
def test_l1_box_projection_is_the_nearest_point(seed, box):
    """Equal to lam found by 200 bisections (to rounding); in the ball and the box; and
    no point of the set is nearer: (v - P) . (u - P) <= 0 for random u in the set."""
    v, x, eps, x_min, x_max = l1_case(seed, 12, box)
    x = np.clip(x, x_min, x_max)
    projected = v.copy()
    kernels.project_l1_box(projected, x, eps, x_min, x_max, np.empty(24))
    expected = reference_apgd.projection_by_bisection(v, x, eps, x_min, x_max)
    np.testing.assert_allclose(projected, expected, rtol=0, atol=1e-12)
    assert np.abs(projected - x).sum() <= eps * (1 + 1e-12)
    assert (projected >= x_min).all() and (projected <= x_max).all()
    rng = np.random.default_rng(seed + 100)
    for _ in range(200):
        direction = rng.laplace(size=12) * (rng.uniform(size=12) < 0.5)
        u = np.clip(
            x + direction * rng.uniform(0, eps) / max(np.abs(direction).sum(), 1e-300), x_min, x_max
        )
        assert np.dot(v - projected, u - projected) <= 1e-12
    np.testing.assert_array_equal(projected, reference_apgd.project_l1_box(v, x, eps, x_min, x_max))


@pytest.mark.parametrize("box", [(0.0, 1.0), (-np.inf, np.inf)])
def test_l1_box_projection_of_many_coordinates_with_ties(box):
    """d = 300, the perturbation on a grid of 0.05 (many equal breakpoints) and a third of
    it zero: the selection finds the lam the reference finds trying every breakpoint, and
    the bisection's."""
    rng = np.random.default_rng(11)
    x = np.clip(rng.uniform(0.0, 1.0, 300), *box)
    v = x + np.round(rng.normal(0.0, 0.3, 300) / 0.05) * 0.05 * (rng.uniform(size=300) < 0.66)
    for eps in (0.5, 5.0, 20.0):
        projected = v.copy()
        kernels.project_l1_box(projected, x, eps, *box, np.empty(600))
        expected = reference_apgd.project_l1_box(v, x, eps, *box)
        np.testing.assert_array_equal(projected, expected)
        bisected = reference_apgd.projection_by_bisection(v, x, eps, *box)
        np.testing.assert_allclose(projected, bisected, rtol=0, atol=1e-12)
        assert np.abs(projected - x).sum() == pytest.approx(eps, rel=1e-12)


def test_l1_box_projection_keeps_a_point_inside_and_clips_it():
    x = np.array([0.2, 0.5, 0.9])
    inside = np.array([0.3, 0.5, 0.95])  # L1 distance 0.15
    kernels.project_l1_box(inside, x, 0.2, 0.0, 1.0, np.empty(6))
    assert np.array_equal(inside, [0.3, 0.5, 0.95])
    beyond = np.array([0.2, 0.5, 1.05])  # 0.15 away, but outside the box
    kernels.project_l1_box(beyond, x, 0.2, 0.0, 1.0, np.empty(6))
    assert np.array_equal(beyond, [0.2, 0.5, 1.0])


def run_case(dtype, n_rows, norm, seed=3, steps=20):
    rng = np.random.default_rng(seed)
    model = advgrad.Model(*random_network(rng, 20, 16, 10, dtype=dtype, scale=3.0))
    X = rng.uniform(0.0, 1.0, (n_rows, 20)).astype(dtype)
    labels = advgrad.predict(model, X)
    start = np.clip(X + rng.uniform(-0.2, 0.2, X.shape), 0.0, 1.0).astype(dtype)
    windows = np.zeros(steps + 1, dtype=np.int64)
    for done, window in checkpoint_windows(steps, norm).items():
        windows[done] = window
    eps = RADIUS[norm] * rng.uniform(0.5, 1.5, n_rows)
    settings = {"targets": None, "eps": eps, "p": P[norm], "windows": windows}
    return model, X, labels, start, settings | {"x_min": 0.0, "x_max": 1.0}


def same_run(first, second):
    return all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_fused_run_equals_the_gradient_and_the_update_in_turn(norm, dtype):
    """600 rows: three blocks, the parallel kernels; some rows broken, some not."""
    model, X, labels, start, settings = run_case(dtype, 600, norm)
    backend = get_backend("cpu")
    fused = backend.apgd_run(model, X, labels, start, "dlr", **settings)
    unfused = reference_apgd.unfused_apgd_run(
        backend.loss_gradient, model, X, labels, start, "dlr", **settings
    )
    assert same_run(fused, unfused)
    best, values, adversarial, broken = fused
    assert 0 < broken.sum() < len(X)
    assert best.dtype == values.dtype == adversarial.dtype == dtype
    radius = np.linalg.norm((best - X).astype(np.float64), ord=P[norm], axis=1)
    assert (radius <= settings["eps"] * (1 + 1e-6)).all()


def test_a_run_with_topk_from_the_start_fused_and_not():
    """L1, float32, 600 rows: the fused run equals the unfused one with the setting too;
    the first steps move (the start's moved coordinates) / d / 1.5 of the coordinates."""
    model, X, labels, start, settings = run_case(np.float32, 600, "1", seed=4, steps=1)
    settings["windows"][1] = 0  # one step, no checkpoint: the state shows the first topk
    backend = get_backend("cpu")
    fused = backend.apgd_run(model, X, labels, start, "ce", topk_from_start=True, **settings)
    unfused = reference_apgd.unfused_apgd_run(
        backend.loss_gradient, model, X, labels, start, "ce", topk_from_start=True, **settings
    )
    assert same_run(fused, unfused)
    projected = np.empty_like(X)
    kernels.apgd_start_into(X, start, settings["eps"], 1.0, 0.0, 1.0, projected)
    moved = (projected != X).sum(axis=1)
    state = np.empty((len(X), kernels.STATE_FIELDS))
    G, values, predicted = backend.loss_gradient(model, projected, labels, "ce")
    kernels.apgd_update_into(
        *(X, settings["eps"], 1.0, 0.0, 1.0, settings["windows"], 0, labels, G, values),
        *(predicted, projected, *(np.empty_like(X) for _ in range(4)), state, True),
    )
    assert np.array_equal(state[:, kernels.STATE_TOPK], moved / X.shape[1] / 1.5)
    assert np.array_equal(state[:, kernels.STATE_SPARSITY], moved)
    assert moved.min() < X.shape[1]


@pytest.mark.parametrize("norm", ["inf", "1"])
def test_the_run_does_not_depend_on_threads_or_slices(norm, monkeypatch):
    model, X, labels, start, settings = run_case(np.float32, 600, norm, seed=5)
    backend = get_backend("cpu")
    whole = backend.apgd_run(model, X, labels, start, "ce", **settings)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        alone = backend.apgd_run(model, X, labels, start, "ce", **settings)
    finally:
        numba.set_num_threads(threads)
    assert same_run(whole, alone)
    monkeypatch.setattr(backend_module, "SLICE_MULTIPLY_ADDS", 1)  # one step a slice
    assert same_run(whole, backend.apgd_run(model, X, labels, start, "ce", **settings))


SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
ONLY_CUDA = ("-k", "cuda_update or cuda_backend")
HAS_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None


def cuda_usable() -> bool:
    if not HAS_NUMBA_CUDA:
        return False
    from advgrad.cuda_backend import cuda_available

    return cuda_available()[0]


needs_cuda = pytest.mark.skipif(
    not (SIMULATOR or cuda_usable()),
    reason="no usable GPU; test_cuda_kernels_on_simulator runs these on the simulator",
)
simulator_child = pytest.mark.skipif(
    SIMULATOR or not HAS_NUMBA_CUDA or cuda_usable(),
    reason="the CUDA tests run in this process (on the simulator or the GPU)",
)
"""A test that runs its file's CUDA tests in a child on the simulator: where there is no GPU."""


@pytest.mark.cuda
@simulator_child
def test_cuda_kernels_on_simulator():
    assert_passes_on_simulator(__file__, *ONLY_CUDA)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(
    ("norm", "dtype", "topk_from_start"),
    [
        ("inf", np.float32, False),
        ("2", np.float64, False),
        ("1", np.float32, False),
        ("1", np.float64, True),
    ],
)
def test_cuda_update_equals_the_cpu_update(norm, dtype, topk_from_start, monkeypatch):
    """The same gradients (the CPU's) into both updates, iteration by iteration: every
    state array bitwise the same; blocks of 4 threads, so 10 rows span 3 blocks."""
    from advgrad.kernels.cuda import apgd_launchers
    from advgrad.kernels.cuda.internals import cuda

    monkeypatch.setattr(apgd_launchers, "APGD_THREADS", 4)
    model, X, labels, start, settings = run_case(dtype, 10, norm, steps=10)
    eps, p, windows = settings["eps"], settings["p"], settings["windows"]
    box = (settings["x_min"], settings["x_max"])
    backend = get_backend("cpu")
    cpu_state = [np.empty_like(X) for _ in range(5)] + [np.empty((10, kernels.STATE_FIELDS))]
    kernels.apgd_start_into(X, start, eps, p, *box, cpu_state[0])
    X_d, start_d, eps_d, windows_d, labels_d = map(cuda.to_device, (X, start, eps, windows, labels))
    current_d = cuda.device_array_like(X)
    apgd_launchers.apgd_start_into(X_d, start_d, eps_d, p, *box, current_d)
    assert np.array_equal(current_d.copy_to_host(), cpu_state[0])
    for step in range(len(windows)):
        G, values, predicted = backend.loss_gradient(model, cpu_state[0], labels, "dlr")
        gradient_d = list(map(cuda.to_device, (G, values, predicted)))
        state_d = list(map(cuda.to_device, cpu_state))  # from the CPU's state at every step
        kernels.apgd_update_into(
            X,
            eps,
            p,
            *box,
            windows,
            step,
            labels,
            G,
            values,
            predicted,
            *cpu_state,
            topk_from_start,
        )
        apgd_launchers.apgd_update_into(
            *(X_d, eps_d, p, *box, windows_d, step, labels_d, *gradient_d, *state_d),
            topk_from_start,
        )
        for gpu, cpu in zip(state_d, cpu_state, strict=True):
            assert np.array_equal(gpu.copy_to_host(), cpu), step


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(("norm", "topk_from_start"), [("inf", False), ("1", False), ("1", True)])
@pytest.mark.usefixtures("small_blocks")
def test_cuda_backend_run_equals_its_gradients_and_the_cpu_update(norm, topk_from_start):
    """float32, 12 rows in 3 chunks over 2 lanes: bitwise the unfused run over the CUDA
    backend's own gradients (``reference_apgd.unfused_apgd_run``, the CPU's update); and
    the rows broken are the CPU backend's (the gradients differ by rounding)."""
    from advgrad.cuda_backend import CudaBackend

    model, X, labels, start, settings = run_case(np.float32, 12, norm, seed=7, steps=5)
    settings["topk_from_start"] = topk_from_start
    backend = CudaBackend(chunk_rows=8, lanes=2)
    gpu = backend.apgd_run(model, X, labels, start, "ce", **settings)
    unfused = reference_apgd.unfused_apgd_run(
        backend.loss_gradient, model, X, labels, start, "ce", **settings
    )
    assert same_run(gpu, unfused)
    cpu = get_backend("cpu").apgd_run(model, X, labels, start, "ce", **settings)
    assert np.array_equal(gpu[3], cpu[3])
    assert 0 < cpu[3].sum() < len(X)
