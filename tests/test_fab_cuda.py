"""advgrad.kernels.cuda.fab, the CUDA twin of advgrad.kernels.fab: the projections and the
row updates equal the CPU's bitwise given the same inputs (instances full of ties among
them); ``CudaBackend.fab_run`` equals ``CpuBackend.fab_run`` within the rounding of the
gradients, targeted and untargeted, every norm, float32 and float64, with a box and without,
rows broken and not; its results do not depend on the threads per block. Without a GPU they
run on the simulator (``test_fab_cuda_kernels_on_simulator``)."""

from __future__ import annotations

import numpy as np
import pytest
from children import assert_passes_on_simulator
from conftest import random_network
from test_cuda import small_blocks  # noqa: F401 (a fixture)
from test_fab import grid_instances, random_instances
from test_kernels_apgd import needs_cuda, simulator_child

import advgrad
from advgrad.backend import CpuBackend
from advgrad.kernels import fab as kernels
from advgrad.kernels import fab_projection

P = {"inf": np.inf, "2": 2.0, "1": 1.0}
NO_BOX = (-np.inf, np.inf)
ROUNDING = 1000
"""How far a CUDA run's points and distances may lie from the CPU's, in units of X's dtype's
rounding (eps), relative to max(1, |value|): the GPU's gradient launchers sum in another
order than the CPU's products, so the logits and gradients differ in their last bits, and
a step moves the iterate by f / ||g|| in the direction of g (L2: by f g / ||g||^2), which
carries a difference of a few eps in f or g, many where f is small beside the logits; two
steps of ``fab_case`` reach about 80 eps."""


@pytest.mark.cuda
@simulator_child
def test_fab_cuda_kernels_on_simulator():
    assert_passes_on_simulator(__file__, "-k", "not on_simulator")


def fab_case(dtype, seed=2):
    """A random network of scale 10 (d 12, H 8, C 4), 10 rows in [0, 1], their predicted
    classes and their least likely classes as targets: 2 steps break some rows, not all."""
    rng = np.random.default_rng(seed)
    model = advgrad.Model(*random_network(rng, 12, 8, 4, dtype=dtype, scale=10.0))
    X = rng.uniform(0.0, 1.0, (10, 12)).astype(dtype)
    labels = advgrad.predict(model, X)
    targets = np.argmin(CpuBackend().logits(model, X), axis=1)
    return model, X, labels, targets


@pytest.fixture
def small_fab_blocks(monkeypatch, small_blocks):  # noqa: F811 (the fixture)
    """``small_blocks``, and FAB row kernels of 4 threads a block: 10 rows span 3 blocks."""
    from advgrad.kernels.cuda import fab_launchers

    monkeypatch.setattr(fab_launchers, "FAB_THREADS", 4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("norm", ["inf", "2", "1"])
@pytest.mark.parametrize("box", [(0.0, 1.0), NO_BOX, (-0.5, 0.75)])
@pytest.mark.parametrize("instances", [grid_instances, random_instances])
@pytest.mark.usefixtures("small_fab_blocks")
def test_cuda_projection_equals_the_cpu_projection(norm, box, instances):
    """Bitwise ``fab.hyperplane_projection``, row by row: ties, zero normals and gaps,
    infeasible hyperplanes; L2 also with normals and gaps scaled by 2^-600 (squares that
    underflow but for the kernels' scaling)."""
    from advgrad.kernels.cuda.fab_launchers import hyperplane_projection_into
    from advgrad.kernels.cuda.internals import cuda

    p = P[norm]
    X, W, gap = instances(1, 12, 24, box)
    for scale in (1.0, 2.0**-600) if p == 2.0 else (1.0,):
        expected = np.empty_like(X)
        scratch, index = np.empty((2, X.shape[1])), np.empty(X.shape[1], dtype=np.int64)
        for n in range(len(X)):
            fab_projection.hyperplane_projection(
                p, X[n], W[n] * scale, gap[n] * scale, *box, expected[n], scratch, index
            )
        D = cuda.device_array_like(X)
        instance = map(cuda.to_device, (X, W * scale, gap * scale))
        hyperplane_projection_into(p, *instance, *box, D)
        assert np.array_equal(D.copy_to_host(), expected)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(
    ("norm", "dtype", "box"),
    [("inf", np.float32, (0.0, 1.0)), ("2", np.float64, NO_BOX), ("1", np.float32, NO_BOX)],
)
@pytest.mark.usefixtures("small_fab_blocks")
def test_cuda_keep_and_step_equal_the_cpu_rows(norm, dtype, box):
    """Three iterations of a targeted run, from the CPU's state and with its logits,
    gradients and f at each: the closest points, distances and iterates bitwise those of
    ``keep_closest_row`` and ``fab_step_row``."""
    from advgrad.kernels.cuda.fab_launchers import fab_keep_into, fab_step_into
    from advgrad.kernels.cuda.internals import cuda

    p = P[norm]
    model, X, labels, targets = fab_case(dtype)
    backend = CpuBackend()
    current, closest, distance = X.copy(), X.copy(), np.full(len(X), np.inf)
    to_current, to_clean = np.empty(X.shape[1]), np.empty(X.shape[1])
    scratch, index = np.empty((2, X.shape[1])), np.empty(X.shape[1], dtype=np.int64)
    kept = 0
    for step in range(3):
        if step > 0:
            Z = backend.logits(model, current)
            state = list(map(cuda.to_device, (current, closest, distance)))
            fab_keep_into(*map(cuda.to_device, (X, labels, Z)), p, *state)
            for n in np.flatnonzero(np.argmax(Z, axis=1) != labels):
                kernels.keep_closest_row(X[n], current[n], p, closest[n], distance[n : n + 1])
                kept += 1
            for gpu, cpu in zip(state, (current, closest, distance), strict=True):
                assert np.array_equal(gpu.copy_to_host(), cpu), step
        Z = backend.logits(model, current).astype(np.float64)
        f = Z[np.arange(len(X)), targets] - Z[np.arange(len(X)), labels]
        G = backend.loss_gradient(model, current, labels, "logit-difference", targets=targets)[0]
        current_d = cuda.to_device(current)
        fab_step_into(*map(cuda.to_device, (X, G, f)), p, *box, current_d)
        for n in range(len(X)):
            kernels.fab_step_row(
                X[n], current[n], G[n], f[n], p, *box, to_current, to_clean, scratch, index
            )
        assert np.array_equal(current_d.copy_to_host(), current), step
    assert kept > 0


def assert_runs_agree(gpu, cpu, dtype):
    """Closest points and finite distances within ``ROUNDING``, the same rows broken
    (finite distance), some rows broken and some not."""
    (gpu_closest, gpu_distance), (cpu_closest, cpu_distance) = gpu, cpu
    tolerance = ROUNDING * np.finfo(dtype).eps
    assert gpu_closest.dtype == dtype and gpu_distance.dtype == np.float64
    broken = np.isfinite(cpu_distance)
    assert np.array_equal(np.isfinite(gpu_distance), broken)
    assert 0 < broken.sum() < len(broken)
    np.testing.assert_allclose(gpu_closest, cpu_closest, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(gpu_distance[broken], cpu_distance[broken], rtol=tolerance)


def both_runs(dtype, norm, box, targeted, backend):
    """``fab_run`` of ``fab_case`` (2 steps) on ``backend`` and on the CPU backend."""
    model, X, labels, targets = fab_case(dtype)
    start = np.clip(X, *box)
    settings = {"targets": targets if targeted else None, "p": P[norm], "steps": 2}
    settings |= {"x_min": box[0], "x_max": box[1]}
    gpu = backend.fab_run(model, X, labels, start, **settings)
    return gpu, CpuBackend().fab_run(model, X, labels, start, **settings)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(
    ("norm", "dtype", "box", "targeted"),
    [
        ("inf", np.float32, (0.0, 1.0), True),
        ("inf", np.float64, NO_BOX, True),
        ("2", np.float32, NO_BOX, True),
        ("2", np.float64, (0.0, 1.0), True),
        ("1", np.float32, (0.0, 1.0), True),
        ("1", np.float64, NO_BOX, True),
        ("inf", np.float64, (0.0, 1.0), False),
        ("2", np.float32, NO_BOX, False),
        ("1", np.float32, (0.0, 1.0), False),
    ],
)
@pytest.mark.usefixtures("small_fab_blocks")
def test_cuda_backend_fab_run_equals_the_cpu_run(norm, dtype, box, targeted):
    """10 rows in 2 chunks over 2 lanes: within ``ROUNDING`` of the CPU backend's run."""
    from advgrad.cuda_backend import CudaBackend

    gpu, cpu = both_runs(dtype, norm, box, targeted, CudaBackend(chunk_rows=6, lanes=2))
    assert_runs_agree(gpu, cpu, dtype)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.usefixtures("small_fab_blocks")
def test_cuda_fab_run_does_not_depend_on_the_threads_per_block(monkeypatch):
    """Untargeted L1, float32: blocks of 4 threads and of 64, bitwise the same run."""
    from advgrad.cuda_backend import CudaBackend
    from advgrad.kernels.cuda import fab_launchers

    backend = CudaBackend(chunk_rows=10, lanes=1)
    small = both_runs(np.float32, "1", (0.0, 1.0), False, backend)[0]
    monkeypatch.setattr(fab_launchers, "FAB_THREADS", 64)
    large = both_runs(np.float32, "1", (0.0, 1.0), False, backend)[0]
    for a, b in zip(small, large, strict=True):
        assert np.array_equal(a, b)
