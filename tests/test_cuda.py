"""CUDA kernels and backend against the CPU kernels and ``tests/reference.py``.

On a machine with a GPU these tests run on it. Without one they run on numba's CUDA simulator,
which must be switched on before numba is imported: ``test_kernels_on_simulator`` runs this
file again in a subprocess with ``NUMBA_ENABLE_CUDASIM=1``.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import re
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import reference

from advgrad import attacks
from advgrad.backend import CpuBackend
from advgrad.cuda_backend import CudaBackend, cuda_available, shared_backend
from advgrad.kernels import cpu
from advgrad.model import Model

pytestmark = [
    pytest.mark.cuda,
    # numba-cuda 0.30 makes generic-unit timedelta64 values, which numpy 2.5 deprecates
    pytest.mark.filterwarnings("ignore:The 'generic' unit for NumPy timedelta:DeprecationWarning"),
]

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def create_simulated_shared_arrays_under_a_lock() -> None:
    """Make the CUDA simulator share each shared array with every thread of a block.

    The simulator (numba-cuda 0.30) creates a shared array on the first call of
    ``cuda.shared.array`` from a source line, looking it up in a dict and filling it without
    a lock: two threads of a launch's first block that both find it missing each get an
    array of their own, and that block's reductions then read memory no other thread wrote
    (rare, more so under load; any kernel with shared memory can fail that way). Same
    lookup, under a lock.
    """
    from numba.cuda.simulator import kernelapi

    create = kernelapi.FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory, or refused
            return create(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            if key not in self._allocations:
                if isinstance(dtype, kernelapi.types.Type):
                    dtype = kernelapi.numpy_support.as_dtype(dtype)
                self._allocations[key] = np.empty(shape, dtype)
            return self._allocations[key]

    kernelapi.FakeCUDAShared.array = array


AVAILABLE, REASON = cuda_available()  # first: advgrad.kernels.cuda imports numba.cuda
if SIMULATOR:
    # The simulator runs each CUDA thread as a Python thread and polls them at every barrier:
    # switching threads more often than every 5 ms makes it several times faster.
    sys.setswitchinterval(1e-4)
    create_simulated_shared_arrays_under_a_lock()
needs_cuda = pytest.mark.skipif(
    not AVAILABLE, reason=f"{REASON}; test_kernels_on_simulator runs these on the simulator"
)
not_on_simulator = pytest.mark.skipif(SIMULATOR, reason="too slow on the CUDA simulator")

DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
NORMS = [np.inf, 2.0, 1.0]
# (N, d, H, C): N = 1; at and past SKINNY_ROWS; d and H not multiples of the small tiles
SHAPES = [(1, 37, 13, 3), (4, 19, 9, 4), (21, 23, 17, 3)]
LABELS = ["one-hot", "soft", "predicted"]


def test_cuda_available_answers_in_one_line():
    available, reason = cuda_available()
    assert isinstance(available, bool)
    assert reason
    assert "\n" not in reason


def test_import_advgrad_does_not_import_numba_cuda():
    code = (
        "import sys, advgrad, advgrad.kernels.cpu, advgrad.backend, advgrad.attacks\n"
        "assert 'numba.cuda' not in sys.modules, 'numba.cuda was imported'\n"
        "assert 'advgrad.kernels.cuda' not in sys.modules, 'advgrad.kernels.cuda was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed"
)
def test_numba_cuda_internals_are_where_the_kernels_look():
    """What ``advgrad.kernels.cuda`` takes from numba-cuda beyond its documented API is all
    there (the simulator's on the simulator; with a GPU, a hand-packed launch runs). A
    release that moves one fails here, naming it."""
    from advgrad.kernels.cuda import internals

    assert internals.missing() == []


@pytest.mark.skipif(
    importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed"
)
def test_a_changed_numba_cuda_internal_is_named(monkeypatch):
    from advgrad.kernels.cuda import internals

    monkeypatch.delattr(internals.cuda.devicearray, "is_cuda_ndarray")
    if SIMULATOR:
        monkeypatch.setattr(internals.cuda, "to_device", lambda array: object())
        assert internals.missing() == [
            "numba.cuda.devicearray.is_cuda_ndarray",
            "a simulated device array._ary",
        ]
        return
    from numba.cuda.cudadrv.devicearray import DeviceNDArrayBase

    monkeypatch.delattr(DeviceNDArrayBase, "_numba_type_")
    assert internals.missing() == [
        "numba.cuda.devicearray.is_cuda_ndarray",
        "numba.cuda DeviceNDArray._numba_type_",
    ]


@pytest.mark.skipif(
    importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed"
)
def test_only_internals_imports_numba_cuda():
    """The other modules of the package take numba.cuda from ``internals``, which aliases
    numpy's row_stack first; no other module of advgrad touches numpy's namespace."""
    from advgrad.kernels import cuda as kernels

    internals = Path(kernels.internals.__file__)
    for path in sorted(internals.parents[2].rglob("*.py")):
        source = path.read_text()
        assert ("row_stack" in source) == (path == internals), path
        if path.parent == internals.parent:
            imports_numba = re.search(r"^\s*(from|import) numba\b", source, re.MULTILINE)
            assert bool(imports_numba) == (path == internals), path
    assert kernels.cuda is kernels.internals.cuda


@pytest.mark.skipif(
    importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed"
)
def test_package_names_are_read_from_and_set_in_their_modules(monkeypatch):
    """``advgrad.kernels.cuda.<name>`` is the name where the code reads it: a constant set on
    the package is the one the launchers use, and one set in a module shows through."""
    from advgrad.kernels import cuda as kernels
    from advgrad.kernels.cuda import launchers, products

    assert kernels.Tile is products.Tile
    assert kernels.fgm_step_into is launchers.fgm_step_into
    threads, rows = launchers.THREADS_PER_BLOCK, launchers.SMALL_BATCH_ROWS
    monkeypatch.setattr(kernels, "THREADS_PER_BLOCK", 8)
    assert launchers.THREADS_PER_BLOCK == 8
    monkeypatch.setattr(launchers, "SMALL_BATCH_ROWS", 3)
    assert kernels.SMALL_BATCH_ROWS == 3
    monkeypatch.undo()  # restores through the package's property, whatever pytest's version
    assert launchers.THREADS_PER_BLOCK == kernels.THREADS_PER_BLOCK == threads
    assert launchers.SMALL_BATCH_ROWS == kernels.SMALL_BATCH_ROWS == rows
    assert {"fgsm_step", "Workspace", "sigmoid", "gemm_kernel", "cuda"} <= set(dir(kernels))
    with pytest.raises(AttributeError, match="no attribute 'fgsm'"):
        _ = kernels.fgsm


@pytest.mark.skipif(SIMULATOR or AVAILABLE, reason="the CUDA tests run in this process")
@pytest.mark.skipif(
    importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed"
)
def test_kernels_on_simulator(simulator_run):
    """This file's tests, on the simulator; the child started at collection (conftest)."""
    code, output = simulator_run.result()
    assert code == 0, output[-9000:]
    assert re.search(r"\b\d+ passed\b", output), output[-9000:]


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny blocks and tiles, so that small problems span many blocks and split the depth."""
    from advgrad.kernels import cuda as kernels

    monkeypatch.setattr(kernels, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(kernels, "ROW_THREADS", 4)  # two rows per block in the row kernels
    monkeypatch.setattr(kernels, "DEEPFOOL_ELEMENTS", 512)  # DeepFool: several batches
    monkeypatch.setattr(kernels, "WIDE_TILE", kernels.Tile(8, 8, 4, 2, 2))
    monkeypatch.setattr(kernels, "SKINNY_TILE", kernels.Tile(4, 8, 4, 2, 2))
    monkeypatch.setattr(kernels, "SKINNY_ROWS", 4)
    monkeypatch.setattr(kernels, "BLOCKS_PER_MULTIPROCESSOR", 8)
    monkeypatch.setattr(kernels, "MIN_SPLIT_STEPS", 1)
    # one launch for a single row (SHAPES[0]); the tiled products for 4 and 21 rows
    monkeypatch.setattr(kernels, "SMALL_BATCH_ROWS", 1)
    monkeypatch.setattr(kernels, "SMALL_GROUP_ROWS", 2)
    monkeypatch.setattr(kernels, "SMALL_COLUMNS", 2)
    monkeypatch.setattr(kernels, "SMALL_SLICES", 3)


@pytest.fixture
def one_launch(monkeypatch, small_blocks):
    """``small_blocks``, with every batch of up to 32 rows in one launch (small_batch_kernel)."""
    from advgrad.kernels import cuda as kernels

    monkeypatch.setattr(kernels, "SMALL_BATCH_ROWS", 32)


@pytest.fixture
def launches(monkeypatch):
    """The kernels launched, in order (names of their Python functions)."""
    from advgrad.kernels.cuda import launchers

    names = []
    launch = launchers.launch

    def record(kernel, *args):
        names.append(kernel.py_func.__name__)
        launch(kernel, *args)

    monkeypatch.setattr(launchers, "launch", record)
    return names


def network(shape, dtype, seed=0, logit_scale=1.0):
    """Random X (N, d) in [0, 1), weights, and one-hot labels, all of ``dtype``."""
    N, d, H, C = shape
    rng = np.random.default_rng(seed)
    X = rng.random((N, d))
    W1 = rng.normal(size=(d, H)) / np.sqrt(d) * 3.0
    b1 = rng.normal(size=H)
    W2 = rng.normal(size=(H, C)) * logit_scale
    b2 = rng.normal(size=C)
    Y = np.eye(C)[rng.integers(0, C, N)]
    return tuple(np.ascontiguousarray(a, dtype=dtype) for a in (X, W1, b1, W2, b2, Y))


def labels(kind, Y, seed=1):
    """One-hot Y, soft labels of its shape, or 0 rows (use the predictions)."""
    if kind == "one-hot":
        return Y
    if kind == "soft":
        soft = np.random.default_rng(seed).dirichlet(np.ones(Y.shape[1]), size=Y.shape[0])
        return soft.astype(Y.dtype)
    return Y[:0]


def reference_labels(Y, X, W1, b1, W2, b2):
    """Y itself, or the one-hot predictions when Y has 0 rows."""
    if len(Y):
        return Y
    _, Z2, _ = reference.forward(X, W1, b1, W2, b2)
    return np.eye(W2.shape[1])[Z2.argmax(axis=1)]


def to_device(*arrays):
    from numba import cuda

    return [cuda.to_device(a) for a in arrays]


def assert_close(actual, expected, dtype):
    """Element-wise within rtol of the largest |expected| (rtol 1e-5 float32, 1e-12 float64)."""
    rtol = RTOL[dtype]
    scale = np.abs(expected).max(initial=0.0)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def assert_fgm_close(actual, expected, G, p, dtype):
    """FGM outputs agree; for p = inf only where sign(G) is not within rounding of zero."""
    if p == np.inf:
        robust = np.abs(G) > 100 * RTOL[dtype] * np.abs(G).max(initial=0.0)
        actual, expected = actual[robust], expected[robust]
    assert_close(actual, expected, dtype)


def predictions(X, W1, b1, W2, b2):
    _, Z2, _ = reference.forward(X, W1, b1, W2, b2)
    return Z2.argmax(axis=1)


# (name, decay, random start): BIM, PGD, MI-FGSM as ``advgrad.attacks`` runs them
ITERATIVE = [("bim", 0.0, False), ("pgd", 0.0, True), ("mifgsm", 1.0, False)]
RADIUS = {np.inf: 0.1, 2.0: 0.4, 1.0: 1.5}


def iterate_problem(shape, dtype, p, random_start, seed=13):
    """X, the network, labels Y, X_start, eps and alpha of an iterative attack on ``shape``.

    Every third row is targeted (its label is another class and its alpha is negative), so
    one batch covers both directions; eps varies per row; the random start is PGD's.
    """
    X, W1, b1, W2, b2, Y = network(shape, dtype, seed=seed)
    N, d = X.shape
    rng = np.random.default_rng(seed)
    eps = RADIUS[p] * (0.5 + rng.random(N))
    targeted = np.arange(N) % 3 == 2
    Y[targeted] = np.roll(Y[targeted], 1, axis=1)
    alpha = np.where(targeted, -0.4, 0.4) * eps
    X_start = X
    if random_start:
        ball = attacks.random_in_ball(seed, 0, np.arange(N), d, p)
        X_start = (X + eps[:, None] * ball).astype(dtype)
    return (X, W1, b1, W2, b2), Y, X_start, eps, alpha


def fragile_rows(net, Y, X_start, eps, alpha, steps, p, decay):
    """Rows whose L-inf steps may differ between two devices: at some step of the CPU's
    trajectory a component of the step direction is within rounding of zero, so its sign
    (and from there the whole row) depends on rounding. No row is fragile for p = 2 or 1."""
    fragile = np.zeros(len(net[0]), dtype=bool)
    if p != np.inf:
        return fragile
    rtol = RTOL[net[0].dtype.type]
    momentum = np.zeros(net[0].shape)
    for step in range(steps):
        X_step = np.empty_like(net[0])
        cpu.iterate_into(*net, Y, X_start, eps, alpha, step, p, decay, 0.0, 1.0, X_step)
        G = np.empty_like(X_step)
        cpu.input_gradient_into(X_step, *net[1:], Y, G, np.empty(len(G), dtype=np.int64))
        direction = G.astype(np.float64)
        if decay > 0.0:
            total = np.abs(direction).sum(axis=1, keepdims=True)
            momentum = decay * momentum + direction / np.where(total > 0.0, total, 1.0)
            direction = momentum
        scale = np.abs(direction).max(axis=1, keepdims=True)
        fragile |= np.any(np.abs(direction) <= 100 * rtol * scale, axis=1) & (scale[:, 0] > 0)
    return fragile


def assert_rows_close(actual, expected, fragile, dtype):
    """``assert_close`` on the rows that are not fragile, which must be most of them."""
    assert np.count_nonzero(~fragile) >= 0.75 * len(fragile)
    assert_close(actual[~fragile], expected[~fragile], dtype)


# ---------------------------------------------------------------------------------------------
# Kernels against the CPU kernels and the reference


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", LABELS)
def test_input_gradient_matches_cpu_and_reference(dtype, shape, kind):
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network(shape, dtype)
    Y = labels(kind, Y)
    net = (X, W1, b1, W2, b2)
    G = np.full_like(X, np.nan)
    predicted = np.full(len(X), -1)
    G_d, predicted_d = to_device(G, predicted)
    kernels.input_gradient_into(*to_device(*net, Y), G_d, predicted_d)
    G, predicted = G_d.copy_to_host(), predicted_d.copy_to_host()

    G_cpu = np.empty_like(X)
    cpu.input_gradient_into(*net, Y, G_cpu, np.empty(len(X), dtype=np.int64))
    G_ref = reference.input_gradient(*net, reference_labels(Y, *net))
    assert G.dtype == dtype
    assert_close(G, G_ref, dtype)
    assert_close(G, G_cpu, dtype)
    np.testing.assert_array_equal(predicted, predictions(*net))


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("p", "eps"), [(np.inf, 0.05), (np.inf, -0.05), (2.0, 0.05), (1.0, -0.05)])
def test_fgm_step_matches_cpu_and_reference(dtype, shape, p, eps):
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network(shape, dtype, seed=2)
    net = (X, W1, b1, W2, b2)
    X_adv = kernels.fgm_step(*to_device(*net, Y), eps, p, 0.0, 1.0).copy_to_host()

    X_cpu = cpu.fgm_step(*net, Y, eps, p, 0.0, 1.0)
    X_ref = reference.fgm_step(*net, Y, eps, p, 0.0, 1.0)
    G_ref = reference.input_gradient(*net, Y)
    assert X_adv.dtype == dtype
    assert_fgm_close(X_adv, X_ref, G_ref, p, dtype)
    assert_fgm_close(X_adv, X_cpu, G_ref, p, dtype)


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", NORMS)
def test_fgm_step_with_predicted_labels(dtype, p):
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network(SHAPES[2], dtype, seed=3)
    net = (X, W1, b1, W2, b2)
    X_adv = np.empty_like(X)
    predicted = np.empty(len(X), dtype=np.int64)
    X_adv_d, predicted_d = to_device(X_adv, predicted)
    kernels.fgm_step_into(*to_device(*net, Y[:0]), 0.1, p, 0.0, 1.0, X_adv_d, predicted_d)

    Y_pred = reference_labels(Y[:0], *net)
    X_ref = reference.fgm_step(*net, Y_pred, 0.1, p, 0.0, 1.0)
    G_ref = reference.input_gradient(*net, Y_pred)
    assert_fgm_close(X_adv_d.copy_to_host(), X_ref, G_ref, p, dtype)
    np.testing.assert_array_equal(predicted_d.copy_to_host(), predictions(*net))


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize(("method", "decay", "random_start"), ITERATIVE)
def test_iterate_matches_cpu(dtype, p, method, decay, random_start):
    """BIM, PGD and MI-FGSM, untargeted and targeted rows in one batch, over many blocks."""
    from advgrad.kernels import cuda as kernels

    net, Y, X_start, eps, alpha = iterate_problem((12, 23, 17, 3), dtype, p, random_start)
    steps = 3
    X_adv_d = to_device(np.full_like(X_start, np.nan))[0]
    arrays = to_device(*net, Y, X_start, eps, alpha)
    kernels.iterate_into(*arrays, steps, p, decay, 0.0, 1.0, X_adv_d)
    X_adv = X_adv_d.copy_to_host()

    X_cpu = np.empty_like(X_adv)
    cpu.iterate_into(*net, Y, X_start, eps, alpha, steps, p, decay, 0.0, 1.0, X_cpu)
    assert X_adv.dtype == dtype
    assert np.all((X_adv >= 0.0) & (X_adv <= 1.0))
    sizes = np.linalg.norm((X_adv - net[0]).astype(np.float64), ord=p, axis=1)
    assert np.all(sizes <= eps * (1.0 + 10 * RTOL[dtype]))
    fragile = fragile_rows(net, Y, X_start, eps, alpha, steps, p, decay)
    assert_rows_close(X_adv, X_cpu, fragile, dtype)


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize(("method", "decay", "random_start"), ITERATIVE)
def test_iterate_in_slices_is_bitwise_one_call(dtype, p, method, decay, random_start):
    """``iterate_start_into`` then ``iterate_steps_into`` with 1 + 2 steps, the momentum
    carried between them: bitwise ``iterate_into`` with 3 steps."""
    from advgrad.kernels import cuda as kernels

    net, Y, X_start, eps, alpha = iterate_problem((7, 23, 17, 3), dtype, p, random_start)
    arrays = to_device(*net, Y)
    eps_d, alpha_d = to_device(eps, alpha)
    one_call_d = to_device(np.full_like(X_start, np.nan))[0]
    kernels.iterate_into(
        *arrays, to_device(X_start)[0], eps_d, alpha_d, 3, p, decay, 0.0, 1.0, one_call_d
    )
    sliced_d = to_device(X_start)[0]  # in place, as X_start may be X_adv
    momentum_d = to_device(
        np.full((len(X_start) if decay > 0 else 0, X_start.shape[1]), np.nan, dtype=dtype)
    )[0]
    kernels.iterate_start_into(arrays[0], sliced_d, eps_d, p, decay, 0.0, 1.0, sliced_d, momentum_d)
    for steps in (1, 2):
        kernels.iterate_steps_into(
            *arrays, eps_d, alpha_d, steps, p, decay, 0.0, 1.0, sliced_d, momentum_d
        )
    one_call, sliced = one_call_d.copy_to_host(), sliced_d.copy_to_host()
    assert not np.array_equal(one_call, X_start)
    assert sliced.tobytes() == one_call.tobytes()


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_backend_iterate_in_slices_is_bitwise_one_slice(monkeypatch, decay):
    """The backend's slices of one step (a wait between them) give bitwise one slice."""
    import advgrad.cuda_backend

    (X, *weights), Y, X_start, eps, alpha = iterate_problem((9, 23, 17, 4), np.float32, 1.0, True)
    model = Model(*weights)
    args = (model, X, Y, X_start, eps, alpha, 4, 1.0, decay, 0.0, 1.0)
    one_slice = CudaBackend(chunk_rows=9, lanes=3).iterate(*args)
    monkeypatch.setattr(advgrad.cuda_backend, "MAX_SLICE_STEPS", 1)
    sliced = CudaBackend(chunk_rows=9, lanes=3).iterate(*args)
    assert not np.array_equal(one_slice, X_start)
    assert sliced.tobytes() == one_slice.tobytes()


@needs_cuda
@pytest.mark.usefixtures("one_launch")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", NORMS)
def test_iterate_with_predicted_labels_in_place(dtype, p):
    """Y with 0 rows (the predictions at each iterate) and X_adv the X_start array itself;
    each gradient in one launch."""
    from advgrad.kernels import cuda as kernels

    net, Y, X_start, eps, alpha = iterate_problem((6, 19, 9, 4), dtype, p, True, seed=14)
    alpha = np.abs(alpha)
    X_start_d = to_device(X_start)[0]
    net_d = to_device(*net, Y[:0])
    kernels.iterate_into(*net_d, X_start_d, *to_device(eps, alpha), 2, p, 0.5, 0.0, 1.0, X_start_d)

    X_cpu = X_start.copy()
    cpu.iterate_into(*net, Y[:0], X_cpu, eps, alpha, 2, p, 0.5, 0.0, 1.0, X_cpu)
    fragile = fragile_rows(net, Y[:0], X_start, eps, alpha, 2, p, 0.5)
    assert_rows_close(X_start_d.copy_to_host(), X_cpu, fragile, dtype)


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", NORMS)
def test_iterate_projection_matches_cpu(dtype, p):
    """0 steps: only the projection of X_start, with rows inside the ball, outside it, with
    (nearly) tied magnitudes (the L1 threshold's hard case), and a zero radius."""
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network((7, 29, 5, 3), dtype, seed=15)
    rng = np.random.default_rng(15)
    X_start = (X + rng.normal(0.0, 0.2, size=X.shape)).astype(dtype)
    X_start[1] = X[1] + 0.001 * rng.normal(size=X.shape[1])  # inside every ball
    X_start[2] = X[2] + np.where(np.arange(X.shape[1]) % 2, 0.375, -0.375)  # all tied
    X_start[3] = X[3] + 0.01 * rng.normal(size=X.shape[1])
    X_start[3, :10] += 0.5  # ten nearly tied, the rest small
    eps = np.full(len(X), 0.3)
    eps[4] = 0.0
    X_adv_d = to_device(np.empty_like(X))[0]
    arrays = to_device(X, W1, b1, W2, b2, Y, X_start, eps, eps)
    kernels.iterate_into(*arrays, 0, p, 0.0, -10.0, 10.0, X_adv_d)
    X_adv = X_adv_d.copy_to_host()

    X_cpu = np.empty_like(X)
    cpu.iterate_into(X, W1, b1, W2, b2, Y, X_start, eps, eps, 0, p, 0.0, -10.0, 10.0, X_cpu)
    np.testing.assert_array_equal(X_adv[1], X_start[1])
    np.testing.assert_array_equal(X_adv[4], X[4])  # radius 0: back to X
    np.testing.assert_array_equal(X_cpu[4], X[4])
    assert_close(X_adv, X_cpu, dtype)
    sizes = np.linalg.norm((X_adv - X).astype(np.float64), ord=p, axis=1)
    outside = np.linalg.norm((X_start - X).astype(np.float64), ord=p, axis=1) > eps
    assert outside[[0, 2, 3]].all()
    np.testing.assert_allclose(sizes[outside], eps[outside], rtol=10 * RTOL[dtype])


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2.0, np.inf])
def test_deepfool_matches_cpu(dtype, p):
    """Rows that stop after different numbers of iterations, in batches of 4 rows."""
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, _ = network((11, 23, 17, 4), dtype, seed=16)
    net = (X, W1, b1, W2, b2)
    X_adv_d, iterations_d = to_device(np.full_like(X, np.nan), np.full(len(X), -1))
    kernels.deepfool_into(*to_device(*net), p, 0.02, 20, 0.0, 1.0, X_adv_d, iterations_d)
    X_adv, iterations = X_adv_d.copy_to_host(), iterations_d.copy_to_host()

    X_cpu = np.empty_like(X)
    iterations_cpu = np.empty(len(X), dtype=np.int64)
    cpu.deepfool_into(*net, p, 0.02, 20, 0.0, 1.0, X_cpu, iterations_cpu)
    assert len(set(iterations_cpu)) > 1
    np.testing.assert_array_equal(iterations, iterations_cpu)
    assert_close(X_adv, X_cpu, dtype)
    done = iterations < 20
    assert np.all(predictions(X_adv, *net[1:])[done] != predictions(*net)[done])


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
def test_deepfool_stops_at_max_iter():
    """max_iter 0 leaves X as it is; max_iter 1 stops every row after one iteration."""
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, _ = network((5, 13, 7, 3), np.float32, seed=17)
    net = (X, W1, b1, W2, b2)
    for max_iter in (0, 1):
        X_adv_d, iterations_d = to_device(np.full_like(X, np.nan), np.full(len(X), -1))
        kernels.deepfool_into(
            *to_device(*net), 2.0, 0.02, max_iter, 0.0, 1.0, X_adv_d, iterations_d
        )
        X_cpu = np.empty_like(X)
        iterations_cpu = np.empty(len(X), dtype=np.int64)
        cpu.deepfool_into(*net, 2.0, 0.02, max_iter, 0.0, 1.0, X_cpu, iterations_cpu)
        np.testing.assert_array_equal(iterations_d.copy_to_host(), iterations_cpu)
        assert_close(X_adv_d.copy_to_host(), X_cpu, np.float32)


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", LABELS)
def test_forward_matches_cpu_and_reference(dtype, shape, kind):
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network(shape, dtype, seed=4)
    Y = labels(kind, Y)
    net = (X, W1, b1, W2, b2)
    N, H, C = len(X), W1.shape[1], W2.shape[1]
    outputs = [np.empty((N, H), dtype), np.empty((N, C), dtype), np.empty(N, dtype)]
    outputs_d = to_device(*outputs, np.empty(N, dtype=np.int64))
    kernels.forward_into(*to_device(*net, Y), *outputs_d)
    A, P, losses, predicted = (a.copy_to_host() for a in outputs_d)

    A_ref, _, P_ref = reference.forward(*net)
    losses_ref = reference.loss(*net, reference_labels(Y, *net))
    A_cpu, P_cpu, losses_cpu = (np.empty_like(a) for a in outputs)
    cpu.forward_into(*net, Y, A_cpu, P_cpu, losses_cpu, np.empty(N, dtype=np.int64))
    for actual, expected, computed_on_cpu in [
        (A, A_ref, A_cpu),
        (P, P_ref, P_cpu),
        (losses, losses_ref, losses_cpu),
    ]:
        assert_close(actual, expected, dtype)
        assert_close(actual, computed_on_cpu, dtype)
    np.testing.assert_array_equal(predicted, predictions(*net))


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
def test_allocating_kernels(dtype):
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network(SHAPES[1], dtype, seed=5)
    net = (X, W1, b1, W2, b2)
    net_d = to_device(*net)
    Y_d = to_device(Y)[0]
    assert_close(
        kernels.input_gradient(*net_d, Y_d).copy_to_host(),
        reference.input_gradient(*net, Y),
        dtype,
    )
    G_ref = reference.input_gradient(*net, Y)
    assert_fgm_close(
        kernels.fgsm_step(*net_d, Y_d, 0.1, 0.0, 1.0).copy_to_host(),
        reference.fgm_step(*net, Y, 0.1, np.inf, 0.0, 1.0),
        G_ref,
        np.inf,
        dtype,
    )
    A, P, predicted = (a.copy_to_host() for a in kernels.forward(*net_d))
    A_ref, _, P_ref = reference.forward(*net)
    assert_close(A, A_ref, dtype)
    assert_close(P, P_ref, dtype)
    np.testing.assert_array_equal(predicted, predictions(*net))
    assert_close(kernels.loss(*net_d, Y_d).copy_to_host(), reference.loss(*net, Y), dtype)


@needs_cuda
@pytest.mark.parametrize(
    ("dtype", "shape"), [(np.float64, (3, 20, 12, 3)), (np.float32, (40, 20, 12, 3))]
)
def test_default_blocks(dtype, shape):
    """The shipped tile sizes, skinny (3 rows) and wide (40 rows)."""
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network(shape, dtype, seed=6)
    net = (X, W1, b1, W2, b2)
    net_d = to_device(*net, Y)
    G_ref = reference.input_gradient(*net, Y)
    assert_close(kernels.input_gradient(*net_d).copy_to_host(), G_ref, dtype)
    X_adv = kernels.fgm_step(*net_d, 0.1, np.inf, 0.0, 1.0).copy_to_host()
    assert_fgm_close(
        X_adv, reference.fgm_step(*net, Y, 0.1, np.inf, 0.0, 1.0), G_ref, np.inf, dtype
    )


@needs_cuda
@not_on_simulator
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rows", [1, 32, 33, 600])
@pytest.mark.parametrize("p", NORMS)
def test_full_size_network(dtype, n_rows, p):
    """A digits-sized network (d = 784, H = 256, C = 10) with the shipped tiles, on the GPU."""
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network((n_rows, 784, 256, 10), dtype, seed=7)
    net = (X, W1, b1, W2, b2)
    net_d = to_device(*net, Y)
    G_ref = reference.input_gradient(*net, Y)
    assert_close(kernels.input_gradient(*net_d).copy_to_host(), G_ref, dtype)
    X_adv = kernels.fgm_step(*net_d, 0.03, p, 0.0, 1.0).copy_to_host()
    assert_fgm_close(X_adv, reference.fgm_step(*net, Y, 0.03, p, 0.0, 1.0), G_ref, p, dtype)


# (N, d, H, C) for the one-launch kernel with small_blocks' 8 threads, 2 rows a block, 2
# hidden units a thread and 3 slices: a partial last group of rows; 2 ranges of the inputs
# (H = 5); 2 passes over the hidden units (H = 17); slices 3 columns wide, each column's
# back-product summed by 2 threads (d = 7)
ONE_LAUNCH_SHAPES = [(5, 23, 5, 3), (3, 19, 17, 4), (4, 7, 6, 3)]


@needs_cuda
@pytest.mark.usefixtures("one_launch")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ONE_LAUNCH_SHAPES)
@pytest.mark.parametrize("kind", LABELS)
def test_one_launch_gradient_matches_cpu_and_reference(dtype, shape, kind, launches):
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network(shape, dtype, seed=21)
    Y = labels(kind, Y)
    net = (X, W1, b1, W2, b2)
    G_d, predicted_d = to_device(np.full_like(X, np.nan), np.full(len(X), -1))
    kernels.input_gradient_into(*to_device(*net, Y), G_d, predicted_d)

    assert launches == ["small"]
    G_cpu = np.empty_like(X)
    cpu.input_gradient_into(*net, Y, G_cpu, np.empty(len(X), dtype=np.int64))
    G = G_d.copy_to_host()
    assert_close(G, reference.input_gradient(*net, reference_labels(Y, *net)), dtype)
    assert_close(G, G_cpu, dtype)
    np.testing.assert_array_equal(predicted_d.copy_to_host(), predictions(*net))


@needs_cuda
@pytest.mark.usefixtures("one_launch")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ONE_LAUNCH_SHAPES)
@pytest.mark.parametrize(("p", "eps"), [(np.inf, 0.05), (np.inf, -0.05), (2.0, 0.05), (1.0, -0.05)])
def test_one_launch_fgm_step_matches_cpu_and_reference(dtype, shape, p, eps, launches):
    """The L-inf step in one launch; L2 and L1 add the row-norm kernel."""
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network(shape, dtype, seed=22)
    net = (X, W1, b1, W2, b2)
    X_adv = kernels.fgm_step(*to_device(*net, Y), eps, p, 0.0, 1.0).copy_to_host()

    assert launches == (["small"] if p == np.inf else ["small", "norm_step"])
    G_ref = reference.input_gradient(*net, Y)
    assert_fgm_close(X_adv, reference.fgm_step(*net, Y, eps, p, 0.0, 1.0), G_ref, p, dtype)
    assert_fgm_close(X_adv, cpu.fgm_step(*net, Y, eps, p, 0.0, 1.0), G_ref, p, dtype)


@needs_cuda
@pytest.mark.usefixtures("one_launch")
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_launch_rows_do_not_depend_on_the_batch(dtype):
    """A row's gradient is bitwise the same alone, in any batch and at any position in a block
    (its sums run in one fixed order), and agrees with the tiled products to rounding."""
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network(ONE_LAUNCH_SHAPES[0], dtype, seed=23)
    weights = to_device(W1, b1, W2, b2)

    def gradient(rows):
        G_d, predicted_d = to_device(np.empty_like(X[rows]), np.empty(len(rows), dtype=np.int64))
        X_d, Y_d = to_device(X[rows], Y[rows])
        kernels.input_gradient_into(X_d, *weights, Y_d, G_d, predicted_d)
        return G_d.copy_to_host()

    G = gradient(np.arange(len(X)))
    for rows in ([0], [3], [1, 2, 3], [4, 0, 2]):
        np.testing.assert_array_equal(gradient(np.array(rows)), G[rows])
    kernels.SMALL_BATCH_ROWS = 0  # the fixture's monkeypatch restores it
    assert_close(gradient(np.arange(len(X))), G, dtype)


@needs_cuda
@pytest.mark.usefixtures("one_launch")
@pytest.mark.parametrize("p", [np.inf, 2.0])
def test_fgm_step_and_gradient_in_place(p, launches):
    """X_adv (or G) = X itself: the one-launch kernel reads X from every block while others
    write, so the gradient goes to scratch first, then a second launch takes the step (or a
    copy stores it); same results."""
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network(ONE_LAUNCH_SHAPES[1], np.float64, seed=24)
    net_d = to_device(X, W1, b1, W2, b2, Y)
    X_adv = kernels.fgm_step(*net_d, 0.05, p, 0.0, 1.0).copy_to_host()
    del launches[:]
    X_d = net_d[0]
    kernels.fgm_step_into(*net_d, 0.05, p, 0.0, 1.0, X_d, to_device(np.empty(len(X), int))[0])

    assert launches == ["small", "sign_step_rows" if p == np.inf else "norm_step"]
    np.testing.assert_array_equal(X_d.copy_to_host(), X_adv)
    X_d = to_device(X)[0]
    kernels.input_gradient_into(X_d, *net_d[1:], X_d, to_device(np.empty(len(X), int))[0])
    G = kernels.input_gradient(to_device(X)[0], *net_d[1:]).copy_to_host()
    np.testing.assert_array_equal(X_d.copy_to_host(), G)
    assert kernels.launchers._overlap(X_d[1:], X_d[:2])
    assert not kernels.launchers._overlap(X_d[2:], X_d[:2])
    assert not kernels.launchers._overlap(X_d, to_device(X)[0])


# ---------------------------------------------------------------------------------------------
# Edge cases


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", NORMS)
def test_zero_gradient_rows_stay_put(dtype, p):
    """Row 0 saturates every hidden unit (A is exactly 1), so its gradient is exactly 0."""
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network(SHAPES[1], dtype, seed=8)
    W1[0] = 1.0
    X[0] = 0.0
    X[0, 0] = 1e5
    net = (X, W1, b1, W2, b2)
    G = kernels.input_gradient(*to_device(*net, Y)).copy_to_host()
    X_adv = kernels.fgm_step(*to_device(*net, Y), 0.1, p, -1e6, 1e6).copy_to_host()
    assert np.all(G[0] == 0.0)
    assert np.all(np.isfinite(X_adv))
    np.testing.assert_array_equal(X_adv[0], X[0])
    assert np.all(np.any(X_adv[1:] != X[1:], axis=1))


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", NORMS)
def test_zero_weights_give_an_unperturbed_batch(dtype, p):
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network(SHAPES[0], dtype, seed=9)
    W1[:] = 0.0
    X_adv = kernels.fgm_step(*to_device(X, W1, b1, W2, b2, Y), 0.1, p, 0.0, 1.0)
    np.testing.assert_array_equal(X_adv.copy_to_host(), X)


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits_stay_finite(dtype):
    """Logits of about +-1e4: softmax saturates, yet P, losses and G stay finite and right."""
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network(SHAPES[1], dtype, seed=10, logit_scale=1e4)
    net = (X, W1, b1, W2, b2)
    assert np.abs(reference.forward(*net)[1]).max() > 1e3
    net_d = to_device(*net, Y)
    losses = kernels.loss(*net_d).copy_to_host()
    _, P, _ = (a.copy_to_host() for a in kernels.forward(*net_d[:5]))
    G = kernels.input_gradient(*net_d).copy_to_host()
    for values in (losses, P, G):
        assert np.all(np.isfinite(values))
    assert_close(losses, reference.loss(*net, Y), dtype)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=RTOL[dtype])
    assert_close(G, reference.input_gradient(*net, Y), dtype)


@needs_cuda
def test_empty_batch():
    from advgrad.kernels import cuda as kernels

    X, W1, b1, W2, b2, Y = network((0, 5, 4, 3), np.float32)
    net_d = to_device(X, W1, b1, W2, b2)
    Y_d, X_adv_d, eps_d, iterations_d = to_device(Y, X, np.zeros(0), np.zeros(0, dtype=np.int64))
    assert kernels.fgm_step(*net_d, Y_d, 0.1, 2.0, 0.0, 1.0).shape == (0, 5)
    kernels.iterate_into(*net_d, Y_d, X_adv_d, eps_d, eps_d, 3, 1.0, 1.0, 0.0, 1.0, X_adv_d)
    kernels.deepfool_into(*net_d, 2.0, 0.02, 3, 0.0, 1.0, X_adv_d, iterations_d)


# ---------------------------------------------------------------------------------------------
# The backend


def model_of(dtype, shape=(0, 23, 17, 3), seed=11):
    _, W1, b1, W2, b2, _ = network(shape, dtype, seed=seed)
    return Model(W1, b1, W2, b2)


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize(
    ("dtype", "kind"), [(np.float32, "one-hot"), (np.float64, "soft"), (np.float32, "predicted")]
)
def test_backend_matches_cpu_backend(dtype, kind):
    model = model_of(dtype)
    X, *_, Y = network((9, 23, 17, 3), dtype, seed=12)
    Y = labels(kind, Y)
    gpu, host = CudaBackend(chunk_rows=5), CpuBackend()
    assert gpu.name == "cuda"

    (G, predicted), (G_cpu, predicted_cpu) = (b.input_gradient(model, X, Y) for b in (gpu, host))
    assert G.dtype == dtype
    assert predicted.dtype == np.int64
    assert_close(G, G_cpu, dtype)
    np.testing.assert_array_equal(predicted, predicted_cpu)

    for p in NORMS:
        (X_adv, predicted), (X_cpu, _) = (
            b.fgm_step(model, X, Y, 0.05, p, 0.0, 1.0) for b in (gpu, host)
        )
        assert_fgm_close(X_adv, X_cpu, G_cpu, p, dtype)
        np.testing.assert_array_equal(predicted, predicted_cpu)

    outputs, outputs_cpu = (b.forward(model, X, Y) for b in (gpu, host))
    for actual, expected in zip(outputs, outputs_cpu, strict=True):
        assert actual.dtype == expected.dtype
        assert_close(actual, expected, dtype)


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize(
    ("dtype", "attack"),
    [
        (np.float32, attacks.Attack("bim", eps=0.1, norm="inf", steps=3)),
        (np.float64, attacks.Attack("pgd", eps=0.5, norm="2", steps=2, restarts=2, target=1)),
        (np.float32, attacks.Attack("mifgsm", eps=2.0, norm="1", steps=3, target="random")),
        (np.float32, attacks.Attack("deepfool", norm="2")),
        (np.float64, attacks.Attack("deepfool", norm="inf", max_iter=5)),
    ],
    ids=["bim-inf", "pgd-2-targeted", "mifgsm-1-targeted", "deepfool-2", "deepfool-inf"],
)
def test_attacks_run_on_cuda(dtype, attack):
    """``advgrad.attacks.run`` with device="cuda" gives the CPU's adversarial examples."""
    model = model_of(dtype)
    X, *_, Y = network((9, 23, 17, 3), dtype, seed=18)
    y = Y.argmax(axis=1)
    X_adv, X_cpu = (attacks.run(model, X, y, attack, device=device) for device in ("cuda", "cpu"))
    fragile = np.zeros(len(X), dtype=bool)
    if attack.method == "bim":
        labels = attacks.attack_labels(model, X, y, attack)
        eps = np.full(len(X), attack.eps)
        alpha = eps / attack.steps
        net = (X, model.W1, model.b1, model.W2, model.b2)
        fragile = fragile_rows(net, labels.Y, X, eps, alpha, attack.steps, np.inf, 0.0)
    assert X_adv.dtype == dtype
    assert_rows_close(X_adv, X_cpu, fragile, dtype)


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
def test_backend_iterate_and_deepfool_stream_in_chunks():
    """Chunks of 3 rows over 3 lanes: X, Y, X_start, eps and alpha go in per chunk, X_adv
    comes out."""
    (X, *weights), Y, X_start, eps, alpha = iterate_problem((9, 23, 17, 4), np.float32, 2.0, True)
    model = Model(*weights)
    gpu, host = CudaBackend(chunk_rows=9, lanes=3), CpuBackend()
    outputs = [
        b.iterate(model, X, Y, X_start, eps, alpha, 2, 2.0, 0.0, 0.0, 1.0) for b in (gpu, host)
    ]
    assert outputs[0].dtype == np.float32
    assert_close(*outputs, np.float32)
    (X_adv, iterations), (X_cpu, iterations_cpu) = (
        b.deepfool(model, X, 2.0, 0.02, 10, 0.0, 1.0) for b in (gpu, host)
    )
    assert iterations.dtype == np.int64
    np.testing.assert_array_equal(iterations, iterations_cpu)
    assert_close(X_adv, X_cpu, np.float32)


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_fgm_from_gradient_is_fgm_step(dtype):
    """Steps from one shared gradient equal ``fgm_step``'s bitwise (chunks of 3 rows)."""
    model = model_of(dtype)
    X, *_, Y = network((9, 23, 17, 3), dtype, seed=19)
    gpu = CudaBackend(chunk_rows=9, lanes=3)
    G, _ = gpu.input_gradient(model, X, Y)
    G_cpu, _ = CpuBackend().input_gradient(model, X, Y)
    for p, eps in [(np.inf, 0.05), (np.inf, -0.05), (2.0, 0.3), (1.0, -0.5)]:
        X_adv = gpu.fgm_from_gradient(X, G, eps, p, 0.0, 1.0)
        np.testing.assert_array_equal(X_adv, gpu.fgm_step(model, X, Y, eps, p, 0.0, 1.0)[0])
        X_cpu = CpuBackend().fgm_from_gradient(X, G_cpu, eps, p, 0.0, 1.0)
        assert_fgm_close(X_adv, X_cpu, G_cpu, p, dtype)


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
def test_backend_writes_into_a_given_array():
    """``out`` gets, chunk by chunk (3 rows), what a new array gets; bad ones are refused."""
    model = model_of(np.float32)
    X, *_, Y = network((9, 23, 17, 3), np.float32, seed=5)
    gpu = CudaBackend(chunk_rows=9, lanes=3)
    out = np.full_like(X, np.nan)
    assert gpu.fgm_step(model, X, Y, 0.1, np.inf, 0.0, 1.0, out=out)[0] is out
    np.testing.assert_array_equal(out, gpu.fgm_step(model, X, Y, 0.1, np.inf, 0.0, 1.0)[0])
    out[:] = np.nan
    assert gpu.deepfool(model, X, 2.0, 0.02, 10, 0.0, 1.0, out=out)[0] is out
    np.testing.assert_array_equal(out, gpu.deepfool(model, X, 2.0, 0.02, 10, 0.0, 1.0)[0])
    with pytest.raises(ValueError, match="out must be a C-contiguous"):
        gpu.fgm_step(model, X, Y, 0.1, np.inf, 0.0, 1.0, out=out[:4])


@needs_cuda
def test_backend_keeps_weights_on_device_per_model():
    """One upload per model and backend, kept across calls and freed with the model."""
    model = model_of(np.float32)
    X, *_, Y = network((3, 23, 17, 3), np.float32)
    gpu, other = CudaBackend(), CudaBackend()
    gpu.input_gradient(model, X, Y)
    cached = gpu.device_weights(model)
    gpu.fgm_step(model, X, Y, 0.1, np.inf, 0.0, 1.0)
    assert all(a is b for a, b in zip(gpu.device_weights(model), cached, strict=True))
    assert not any(a is b for a, b in zip(other.device_weights(model), cached, strict=True))
    freed = weakref.ref(cached[0])
    del model, cached
    gc.collect()
    assert freed() is None


def test_shared_backend_is_one_backend_with_the_defaults():
    from advgrad.cuda_backend import DEFAULT_CHUNK_ROWS, LANES

    backend = shared_backend()
    assert backend is shared_backend()
    assert (backend.chunk_rows, backend.lanes) == (DEFAULT_CHUNK_ROWS, LANES)


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
def test_backends_with_different_lanes_share_no_state(monkeypatch):
    """Two backends (3 lanes of chunks of 3 rows; 1 lane of chunks of 3), used alternately,
    each give bitwise what a fresh backend of their own kind gives and the CPU's results
    (to rounding), on streams and workspaces of their own."""
    from advgrad import cuda_backend
    from advgrad.kernels import cuda as kernels

    monkeypatch.setattr(cuda_backend, "MIN_CHUNK_ROWS", 3)
    used = {}  # id(backend) -> {(stream, workspace)} its launches ran on
    launch = kernels.fgm_step_into
    model = model_of(np.float32)
    X, *_, Y = network((17, 23, 17, 3), np.float32, seed=25)

    def run(backend, p):
        def record(*args, stream, workspace):
            used.setdefault(id(backend), set()).add((stream, workspace))
            launch(*args, stream=stream, workspace=workspace)

        monkeypatch.setattr(kernels, "fgm_step_into", record)
        return backend.fgm_step(model, X, Y, 0.05, p, 0.0, 1.0)

    three, one = CudaBackend(chunk_rows=9, lanes=3), CudaBackend(chunk_rows=3, lanes=1)
    for p in (np.inf, 2.0, 1.0):
        first = run(three, p)
        second = run(one, p)
        again = run(three, p)
        alone = run(CudaBackend(chunk_rows=3, lanes=1), p)
        for a, b, c, d in zip(first, second, again, alone, strict=True):
            assert a.tobytes() == c.tobytes() == b.tobytes() == d.tobytes()
        G_cpu, predicted_cpu = CpuBackend().input_gradient(model, X, Y)
        X_cpu, _ = CpuBackend().fgm_step(model, X, Y, 0.05, p, 0.0, 1.0)
        assert_fgm_close(first[0], X_cpu, G_cpu, p, np.float32)
        np.testing.assert_array_equal(first[1], predicted_cpu)
    lanes_three, lanes_one = used[id(three)], used[id(one)]
    assert (len(lanes_three), len(lanes_one)) == (3, 1)
    streams = [id(stream) for stream, _ in lanes_three | lanes_one]
    workspaces = [id(workspace) for _, workspace in lanes_three | lanes_one]
    assert len(set(streams)) == len(set(workspaces)) == 4
    assert not set(map(id, three.device_weights(model))) & set(map(id, one.device_weights(model)))


def test_backend_rejects_empty_chunks():
    with pytest.raises(ValueError, match="chunk_rows"):
        CudaBackend(chunk_rows=0)


# ---------------------------------------------------------------------------------------------
# Streaming: chunks over lanes


@pytest.mark.parametrize("lanes", [1, 2, 3, 5])
@pytest.mark.parametrize("chunk_rows", [1, 7, 100, 65536])
def test_chunk_rows_for_cuts_calls_for_overlap(lanes, chunk_rows):
    """Chunks are of equal size (to rounding), at most chunk_rows on the GPU over all lanes;
    with several lanes a call of 2 * MIN_CHUNK_ROWS rows or more is cut into 2 to 2 * lanes
    chunks of at least MIN_CHUNK_ROWS rows, unless the memory bound cuts it finer."""
    from advgrad.cuda_backend import MIN_CHUNK_ROWS

    backend = CudaBackend(chunk_rows, lanes)
    largest = max(1, chunk_rows // lanes)
    for n_rows in (0, 1, 5, 1023, 1024, 2047, 2048, 6000, 6144, 10**5, 10**6 + 3):
        rows = backend.chunk_rows_for(n_rows)
        assert 1 <= rows <= largest
        if n_rows == 0:
            continue
        n_chunks = -(-n_rows // rows)
        assert rows == -(-n_rows // n_chunks)  # balanced
        if lanes == 1:
            assert n_chunks == -(-n_rows // chunk_rows)
        elif largest >= n_rows:  # the memory bound holds the whole call
            assert n_chunks <= 2 * lanes
            assert rows >= min(n_rows, MIN_CHUNK_ROWS)
            assert (n_chunks >= 2) == (n_rows >= 2 * MIN_CHUNK_ROWS)


def test_backend_rejects_no_lanes():
    with pytest.raises(ValueError, match="lanes must be at least 1"):
        CudaBackend(lanes=0)


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("p", [np.inf, 2.0])
def test_backend_pipelines_chunks_over_lanes(monkeypatch, p):
    """Chunk k runs on lane k % 3 and is copied out after chunk k + 1 is launched (one lane:
    at once); the rows are bitwise those of one lane, chunk after chunk."""
    from advgrad import cuda_backend
    from advgrad.kernels import cuda as kernels

    monkeypatch.setattr(cuda_backend, "MIN_CHUNK_ROWS", 3)
    events = []
    launch, copy_out = kernels.fgm_step_into, cuda_backend._copy_out

    def record_launch(X, *args, stream, workspace):
        events.append(("launch", X.shape[0], stream))
        launch(X, *args, stream=stream, workspace=workspace)

    def record_copy_out(outputs, stream, start, stop, outputs_d):
        events.append(("out", stop - start, stream))
        copy_out(outputs, stream, start, stop, outputs_d)

    monkeypatch.setattr(kernels, "fgm_step_into", record_launch)
    monkeypatch.setattr(cuda_backend, "_copy_out", record_copy_out)
    model = model_of(np.float32)
    X, *_, Y = network((17, 23, 17, 3), np.float32, seed=20)
    results = {}
    for lanes in (3, 1):
        events.clear()
        gpu = CudaBackend(chunk_rows=3 * lanes, lanes=lanes)  # chunks of 3 rows either way
        out = gpu.empty(X.shape, X.dtype)
        results[lanes] = gpu.fgm_step(model, X, Y, 0.05, p, 0.0, 1.0, out=out)
        assert results[lanes][0] is out
        kinds = [kind for kind, _, _ in events]
        expected = ["launch", "out"] * 6 if lanes == 1 else ["launch"] + ["launch", "out"] * 5
        assert kinds == (expected if lanes == 1 else [*expected, "out"])
        launches = [event for event in events if event[0] == "launch"]
        copies = [event for event in events if event[0] == "out"]
        assert [rows for _, rows, _ in launches] == [3, 3, 3, 3, 3, 2]
        assert [rows for _, rows, _ in copies] == [3, 3, 3, 3, 3, 2]
        streams = [stream for _, _, stream in launches]
        assert all(a is b for a, b in zip(streams, streams[lanes:], strict=False))
        assert len({id(stream) for stream in streams}) == lanes
        assert all(c[2] is s for c, s in zip(copies, streams, strict=True))  # its own lane
    for one, three in zip(results[1], results[3], strict=True):
        np.testing.assert_array_equal(three, one)
    G_cpu, predicted_cpu = CpuBackend().input_gradient(model, X, Y)
    X_cpu, _ = CpuBackend().fgm_step(model, X, Y, 0.05, p, 0.0, 1.0)
    assert_fgm_close(results[3][0], X_cpu, G_cpu, p, np.float32)
    np.testing.assert_array_equal(results[3][1], predicted_cpu)


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
def test_file_attack_on_cuda_streams_through_page_locked_blocks(tmp_path, monkeypatch):
    """A file job on the GPU reads and attacks its blocks in ``CudaBackend.empty`` arrays, in
    chunks over the lanes, and writes what the CPU writes (to rounding)."""
    import advgrad
    from advgrad import cuda_backend
    from advgrad.attacks import Attack
    from advgrad.jobs.attack import attack_file

    monkeypatch.setattr(cuda_backend, "MIN_CHUNK_ROWS", 4)
    allocated = []
    empty = CudaBackend.empty

    def record_empty(shape, dtype):
        allocated.append(shape)
        return empty(shape, dtype)

    monkeypatch.setattr(CudaBackend, "empty", staticmethod(record_empty))
    model = model_of(np.float32)
    X, *_, Y = network((30, 23, 17, 3), np.float32, seed=21)
    advgrad.save_model(model, tmp_path / "model.h5")
    advgrad.save_dataset(tmp_path / "data.h5", X, Y.argmax(axis=1))
    for device in ("cuda", "cpu"):
        attack_file(
            *(tmp_path / "model.h5", tmp_path / "data.h5", tmp_path / f"{device}.h5"),
            Attack(eps=0.5, norm="2"),
            clip=(0.0, 1.0),
            device=device,
        )
    rows_per_block = allocated[0][0]
    assert rows_per_block >= len(X)
    assert allocated == [(rows_per_block, 23)] * len(allocated) and len(allocated) >= 2
    (X_gpu, y_gpu), (X_cpu, y_cpu) = (
        advgrad.load_dataset(tmp_path / f"{device}.h5") for device in ("cuda", "cpu")
    )
    np.testing.assert_array_equal(y_gpu, y_cpu)
    assert_close(X_gpu, X_cpu, np.float32)


# ---------------------------------------------------------------------------------------------
# Certified bounds and training gradients (``bounds``, ``bound_launchers``, ``training``)

LINE_STEPS = 20
BOUND_GRID = np.array([0.0, 0.02, 0.1, 0.4])


@pytest.fixture
def small_bound_blocks(monkeypatch):
    """Blocks of 4 threads, and 2 of them: each strides over several inputs, hidden units and
    rows."""
    from advgrad.kernels import cuda as kernels

    monkeypatch.setattr(kernels, "BOUND_THREADS", 4)
    monkeypatch.setattr(kernels, "BOUND_BLOCKS", 2)


def bound_problem(seed=2):
    """Rows (5, 6) in [0, 1] (row 1 a little outside), their predicted classes, radii (row 0
    at 0) and a float64 network (6, 5, 3) whose certified radii fall inside BOUND_GRID."""
    X, W1, b1, W2, b2, _ = network((5, 6, 5, 3), np.float64, seed=seed)
    X[1, 2] = 1.02  # outside the clip box: the L2 ball is not used for this row
    classes = predictions(X, W1, b1, W2, b2).astype(np.int64)
    eps = np.array([0.0, 0.01, 0.03, 0.1, 0.3])
    return X, classes, eps, (W1, b1, W2, b2)


@needs_cuda
@pytest.mark.usefixtures("small_bound_blocks")
@pytest.mark.parametrize("p", [np.inf, 2.0])
def test_margin_bounds_match_cpu_and_reference(p):
    """The CUDA bounds are the CPU's within float64 rounding; the interval bounds are below
    the exact interval bound of ``reference``, by no more than the rounding allowance."""
    from advgrad.kernels import cuda as kernels

    X, classes, eps, net = bound_problem()
    for crown in (False, True):
        expected = np.empty(len(X))
        cpu.margin_bounds_into(X, classes, eps, p, 0.0, 1.0, *net, crown, LINE_STEPS, expected)
        worst = to_device(np.full(len(X), np.nan))[0]
        kernels.margin_bounds_into(
            *to_device(X, classes, eps), p, 0.0, 1.0, *to_device(*net), crown, LINE_STEPS, worst
        )
        worst = worst.copy_to_host()
        np.testing.assert_allclose(worst, expected, rtol=1e-12, atol=1e-12)
        if not crown:
            exact = reference.interval_margin_bound(X, classes, eps, p, 0.0, 1.0, *net)
            assert (worst <= exact).all()
            np.testing.assert_allclose(worst, exact, rtol=0.0, atol=1e-7)
    assert worst[0] > 0.0  # at eps = 0, at the row's own prediction


@needs_cuda
@pytest.mark.usefixtures("small_bound_blocks")
@pytest.mark.parametrize("p", [np.inf, 2.0])
def test_certified_radius_matches_cpu(p):
    """Every bound on the way keeps its sign, so the searches end at the CPU's radii."""
    from advgrad.kernels import cuda as kernels

    X, classes, _, net = bound_problem()
    expected_radius = np.empty(len(X))
    expected_certified = np.empty((len(X), len(BOUND_GRID)), dtype=np.bool_)
    settings = (p, 0.0, 1.0, *net, True, LINE_STEPS, 1e-3)
    cpu.certified_radius_into(
        X, classes, BOUND_GRID, *settings, expected_radius, expected_certified
    )
    radius, certified = to_device(np.full(len(X), np.nan), np.ones_like(expected_certified))
    settings = (p, 0.0, 1.0, *to_device(*net), True, LINE_STEPS, 1e-3)
    kernels.certified_radius_into(*to_device(X, classes, BOUND_GRID), *settings, radius, certified)
    np.testing.assert_array_equal(radius.copy_to_host(), expected_radius)
    np.testing.assert_array_equal(certified.copy_to_host(), expected_certified)
    assert (~np.isin(expected_radius, BOUND_GRID)).any()  # some rows were bisected


def training_problem(dtype, seed=4):
    """Rows (6, 11), one-hot labels, a network (11, 7, 3) and a gradient to add to, with no
    component of dJ/dX within rounding of 0 (the FGSM pass takes its sign)."""
    X, W1, b1, W2, b2, Y = network((6, 11, 7, 3), dtype, seed=seed)
    G = reference.input_gradient(X, W1, b1, W2, b2, Y)
    assert np.abs(G).min() > 1e-3 * np.abs(G).max()
    start = [np.full_like(w, 0.5) for w in (W1, b1, W2, b2)]
    return X, Y, (W1, b1, W2, b2), start


def objective(X, Y, net, clean_weight, adv_weight, eps):
    """The training loss of ``parameter_gradient_into``, in float64 (``reference``)."""
    G = reference.input_gradient(X, *net, Y)
    X_adv = np.clip(X + eps * np.sign(G), 0.0, 1.0)
    clean, adversarial = reference.loss(X, *net, Y), reference.loss(X_adv, *net, Y)
    return clean_weight * clean.sum() + adv_weight * adversarial.sum()


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adv_weight", [0.0, 0.4])
def test_parameter_gradient_matches_cpu_and_finite_differences(dtype, adv_weight):
    """Added into a given gradient, as the CPU's; in float64, a central difference of the
    whole objective at the first and last element of each parameter."""
    from advgrad.kernels import cuda as kernels

    X, Y, net, start = training_problem(dtype)
    settings = (0.6, adv_weight, 0.05, 0.0, 1.0)
    expected = [g.copy() for g in start]
    cpu.parameter_gradient_into(X, *net, Y, *settings, *expected)
    gradient = to_device(*start)
    kernels.parameter_gradient_into(*to_device(X, *net, Y), *settings, *gradient)
    gradient = [g.copy_to_host() for g in gradient]
    for actual, wanted in zip(gradient, expected, strict=True):
        assert actual.dtype == dtype
        assert_close(actual, wanted, dtype)
    if dtype != np.float64:
        return
    h = 1e-6
    for which, grad in enumerate(gradient):
        for index in [(0,) * grad.ndim, tuple(s - 1 for s in grad.shape)]:
            shifted = [[w.copy() for w in net] for _ in range(2)]
            shifted[0][which][index] += h
            shifted[1][which][index] -= h
            difference = objective(X, Y, shifted[0], 0.6, adv_weight, 0.05)
            difference -= objective(X, Y, shifted[1], 0.6, adv_weight, 0.05)
            np.testing.assert_allclose(grad[index] - 0.5, difference / (2 * h), rtol=1e-6)


@needs_cuda
@pytest.mark.usefixtures("small_blocks", "small_bound_blocks")
def test_backend_bounds_and_training_match_cpu_backend(monkeypatch):
    """Chunks of 2 rows over 2 lanes for the bounds (a float32 model, bounded in float64),
    2 chunks of at most 4 rows for the gradient; results as the CPU backend's."""
    from advgrad import cuda_backend

    monkeypatch.setattr(cuda_backend, "MIN_CHUNK_ROWS", 2)
    gpu, host = CudaBackend(chunk_rows=4, lanes=2), CpuBackend()
    X, classes, eps, net = bound_problem()
    model = Model(*(w.astype(np.float32) for w in net))
    bounds = [
        b.margin_bounds(model, X, classes, eps, 2.0, 0.0, 1.0, True, LINE_STEPS)
        for b in (gpu, host)
    ]
    assert bounds[0].dtype == np.float64
    np.testing.assert_allclose(*bounds, rtol=1e-12, atol=1e-12)
    settings = (np.inf, 0.0, 1.0, True, LINE_STEPS, 1e-3)
    (radius, certified), (radius_cpu, certified_cpu) = (
        b.certified_radius(model, X, classes, BOUND_GRID, *settings) for b in (gpu, host)
    )
    np.testing.assert_array_equal(radius, radius_cpu)
    np.testing.assert_array_equal(certified, certified_cpu)

    X, Y, net, start = training_problem(np.float64)
    gradients = [[g.copy() for g in start] for _ in range(2)]
    for b, gradient in zip((gpu, host), gradients, strict=True):
        b.parameter_gradient(net, X, Y, 0.6, 0.4, 0.05, 0.0, 1.0, gradient)
    for actual, wanted in zip(*gradients, strict=True):
        assert_close(actual, wanted, np.float64)


# ---------------------------------------------------------------------------------------------
# The loss switch: logits and the gradients of the attack losses

LOSS_CASES = [
    ("ce", False),
    ("dlr", False),
    ("dlr-targeted", True),
    ("cw", False),
    ("cw", True),
    ("logit-difference", True),
]
LOSS_CODES = {
    "ce": cpu.LOSS_CE,
    "dlr": cpu.LOSS_DLR,
    "dlr-targeted": cpu.LOSS_DLR_TARGETED,
    "cw": cpu.LOSS_CW,
    "logit-difference": cpu.LOSS_LOGIT_DIFFERENCE,
}
KAPPA = 0.5


def loss_problem(shape, dtype, seed=21):
    """X and the network (``network``), labels and target classes other than them. The
    labels alternate between the largest and the second largest logit: a DLR loss whose
    label is the third largest is constant, its gradient rounding noise on either device."""
    X, W1, b1, W2, b2, _ = network(shape, dtype, seed=seed, logit_scale=0.5)
    order = np.argsort(-reference.logits(X, W1, b1, W2, b2), axis=1, kind="stable")
    labels = order[np.arange(len(X)), np.arange(len(X)) % 2]
    targets = (labels + 1 + np.arange(len(X)) % (W2.shape[1] - 1)) % W2.shape[1]
    return (X, W1, b1, W2, b2), labels, targets


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("loss", "targeted"), LOSS_CASES)
@pytest.mark.parametrize("shape", [(1, 9, 5, 4), (13, 19, 9, 5)])
def test_loss_gradient_and_logits_match_cpu(dtype, loss, targeted, shape):
    """The kernels against the CPU's on many blocks (every row's gradient, value, argmax)."""
    from advgrad.kernels import cuda as kernels

    net, labels, targets = loss_problem(shape, dtype)
    chosen = targets if targeted else labels[:0]
    arguments = (labels, chosen, LOSS_CODES[loss], KAPPA)
    G, values, predicted = (
        a.copy_to_host()
        for a in kernels.loss_gradient(*to_device(*net, *arguments[:2]), *arguments[2:])
    )
    G_cpu, values_cpu, predicted_cpu = cpu.loss_gradient(*net, *arguments)
    assert (G.dtype, values.dtype, predicted.dtype) == (dtype, dtype, np.int64)
    assert_close(G, G_cpu, dtype)
    assert_close(values, values_cpu, dtype)
    np.testing.assert_array_equal(predicted, predicted_cpu)
    assert_close(kernels.logits(*to_device(*net)).copy_to_host(), cpu.logits(*net), dtype)
    if loss == "ce":  # the cross-entropy kernels on the one-hot labels, bitwise
        expected = kernels.input_gradient(*to_device(*net, np.eye(shape[3], dtype=dtype)[labels]))
        assert G.tobytes() == expected.copy_to_host().tobytes()


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize(("loss", "targeted"), LOSS_CASES)
def test_backend_loss_gradient_and_logits_match_cpu_backend(loss, targeted):
    """Chunks of 5 rows; the same refusals as the CPU backend; no rows."""
    dtype = np.float32
    net, labels, targets = loss_problem((12, 19, 9, 5), dtype, seed=22)
    model = Model(*net[1:])
    X = net[0]
    gpu, host = CudaBackend(chunk_rows=5), CpuBackend()
    chosen = targets if targeted else None
    results = [
        b.loss_gradient(model, X, labels, loss, targets=chosen, kappa=KAPPA) for b in (gpu, host)
    ]
    for actual, expected in zip(*results, strict=True):
        assert actual.dtype == expected.dtype
        assert_close(actual, expected, dtype)
    assert_close(gpu.logits(model, X), host.logits(model, X), dtype)
    empty = gpu.loss_gradient(
        model, X[:0], labels[:0], loss, targets=None if chosen is None else targets[:0], kappa=KAPPA
    )
    assert [a.shape for a in empty] == [(0, 19), (0,), (0,)]
    assert gpu.logits(model, X[:0]).shape == (0, 5)
    with pytest.raises(ValueError, match=r"^labels must be classes in \[0, 5\), got 5 at row 0$"):
        gpu.loss_gradient(model, X, np.full_like(labels, 5), loss, targets=chosen)


@needs_cuda
@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q", [1, 3, 40])
def test_sparse_l1_steps_match_cpu(dtype, q):
    """The sparse L1 step with q coordinates (``top_coordinates``): fgm_step and the
    iterative MI-FGSM steps equal the CPU kernels' over many blocks (within rounding: the
    simulator adds in X's dtype)."""
    from advgrad.kernels import cuda as kernels

    net, Y, X_start, eps, alpha = iterate_problem((12, 23, 17, 3), dtype, 1.0, False)
    X_adv = kernels.fgm_step(*to_device(*net, Y), 0.5, 1.0, 0.0, 1.0, q).copy_to_host()
    assert_close(X_adv, cpu.fgm_step(*net, Y, 0.5, 1.0, 0.0, 1.0, q), dtype)
    X_adv_d = to_device(np.full_like(X_start, np.nan))[0]
    kernels.iterate_into(
        *to_device(*net, Y, X_start, eps, alpha), 2, 1.0, 0.9, 0.0, 1.0, X_adv_d, q
    )
    X_cpu = np.empty_like(X_start)
    cpu.iterate_into(*net, Y, X_start, eps, alpha, 2, 1.0, 0.9, 0.0, 1.0, X_cpu, q)
    fragile = fragile_rows(net, Y, X_start, eps, alpha, 2, 1.0, 0.9)
    assert_rows_close(X_adv_d.copy_to_host(), X_cpu, fragile, dtype)
