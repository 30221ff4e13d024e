"""advgrad.kernels.cuda.square, the CUDA kernel of Square: ``CudaBackend`` runs of
``advgrad.square.square`` equal the CPU backend's, every norm, float32 and float64, flat and
image rows (channels first and last), in chunks over lanes and in many slices of queries,
whatever the threads per block. Without a GPU they run on the simulator
(``test_square_cuda_kernels_on_simulator``), where the rows run the CPU's compiled row
function and the results are bitwise the CPU's; on a GPU, NVVM's rounding may differ in a
margin's last bits, which can flip a proposal where two margins are that close, so there a
few rows may differ, each still a point of the ball and the box."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from children import assert_passes_on_simulator
from test_kernels_apgd import HAS_NUMBA_CUDA, SIMULATOR, needs_cuda, simulator_child
from test_square import BOX, EPS, NORMS, network

from advgrad.backend import CpuBackend
from advgrad.square import square

QUERIES = 60
GPU_ROWS_DIFFERING = 0.1
"""On a GPU, the fraction of rows whose point or query count may differ from the CPU's."""


@pytest.mark.cuda
@simulator_child
def test_square_cuda_kernels_on_simulator():
    assert_passes_on_simulator(__file__, "-k", "not on_simulator and not for_a_gpu")


@pytest.mark.cuda
@pytest.mark.skipif(SIMULATOR or not HAS_NUMBA_CUDA, reason="compiles for a GPU, not simulated")
def test_square_kernel_compiles_for_a_gpu():
    """The CUDA kernel runs the CPU kernel's row functions, which the simulator runs as CPU
    code: this compiles it for sm_90 (``scripts/kernel_resources.py``, NVVM and ptxas), so
    that a change to those functions that numba-cuda cannot lower (an allocation, an array
    expression, a slice assigned from an array) fails here. Skips without a CUDA toolkit."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "scripts/kernel_resources.py", "--only", "square_steps_rows float32"],
        cwd=root,
        env={k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    missing = ("not found: set CUDA_HOME", "kernel_resources.py needs lib")  # its tool checks
    if result.returncode and any(message in output for message in missing):
        pytest.skip(output.strip().splitlines()[-1])
    assert result.returncode == 0, output[-3000:]
    assert "0 of 1 kernels failed to compile" in result.stdout, output[-3000:]


def both_runs(dtype, norm, image_shape, backend):
    """Square on the rows of ``test_square.network`` (64 rows, every eighth mislabelled) on
    ``backend`` and on the CPU backend: (X_adv, queries_used) of each."""
    model, X, labels = network(dtype)
    options = {"eps": EPS[norm], "norm": norm, "queries": QUERIES, "seed": 3, **BOX}
    options["image_shape"] = image_shape
    got = square(model, X, labels, backend=backend, **options)
    expected = square(model, X, labels, backend=CpuBackend(), **options)
    return got, expected, model, X


def assert_runs_agree(got, expected, X, eps, norm):
    """Bitwise on the simulator; on a GPU, all but ``GPU_ROWS_DIFFERING`` of the rows, and
    every row in the ball of radius eps and the box."""
    (points, queries), (cpu_points, cpu_queries) = got, expected
    if SIMULATOR:
        assert np.array_equal(points.view(np.uint8), cpu_points.view(np.uint8))
        np.testing.assert_array_equal(queries, cpu_queries)
        return
    same = np.all(points == cpu_points, axis=1) & (queries == cpu_queries)
    assert np.mean(same) >= 1.0 - GPU_ROWS_DIFFERING
    order = {"inf": np.inf, "2": 2, "1": 1}[norm]
    sizes = np.linalg.norm((points - X).astype(np.float64), ord=order, axis=1)
    assert np.all(sizes <= eps * (1 + 1e-6)) and np.all((points >= 0.0) & (points <= 1.0))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(
    ("dtype", "norm", "image_shape"),
    [
        (np.float32, "inf", None),
        (np.float64, "inf", (4, 4, 3)),
        (np.float32, "2", (3, 4, 4)),
        (np.float64, "2", None),
        (np.float32, "1", (4, 4, 3)),
        (np.float64, "1", (3, 4, 4)),
    ],
)
def test_cuda_backend_square_equals_the_cpu_backend(dtype, norm, image_shape):
    """64 rows in chunks of at most 20 over 2 lanes, the state copied in and out of each."""
    from advgrad.cuda_backend import CudaBackend

    backend = CudaBackend(chunk_rows=20, lanes=2)
    got, expected, _, X = both_runs(dtype, norm, image_shape, backend)
    assert_runs_agree(got, expected, X, EPS[norm], norm)
    broken = (expected[1] > 0) & (expected[1] <= QUERIES)
    assert broken.any() and (expected[1] == QUERIES + 1).any()  # rows broken and not


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("norm", NORMS)
def test_cuda_square_in_many_slices_equals_the_cpu(norm, monkeypatch):
    """A search cut into slices of a few queries each (a launch per slice, the state back
    on the host between them) ends where the CPU's does."""
    from advgrad import cuda_backend
    from advgrad.cuda_backend import CudaBackend

    monkeypatch.setattr(cuda_backend, "SQUARE_SLICE_ROW_MULTIPLY_ADDS", 2**11)
    calls = []
    backend = CudaBackend(chunk_rows=64, lanes=1)
    run = backend.square_run
    monkeypatch.setattr(backend, "square_run", lambda *args: calls.append(args[7]) or run(*args))
    got, expected, _, X = both_runs(np.float32, norm, (3, 4, 4), backend)
    assert len(calls) > 5
    assert_runs_agree(got, expected, X, EPS[norm], norm)


@pytest.mark.cuda
@needs_cuda
def test_cuda_square_does_not_depend_on_the_threads_per_block(monkeypatch):
    """L2, float32: blocks of 3 threads and of 64, the same points and query counts."""
    from advgrad.cuda_backend import CudaBackend
    from advgrad.kernels.cuda import square as square_cuda

    backend = CudaBackend(chunk_rows=64, lanes=1)
    monkeypatch.setattr(square_cuda, "SQUARE_THREADS", 3)
    small = both_runs(np.float32, "2", None, backend)[0]
    monkeypatch.setattr(square_cuda, "SQUARE_THREADS", 64)
    large = both_runs(np.float32, "2", None, backend)[0]
    for a, b in zip(small, large, strict=True):
        assert np.array_equal(a, b)
