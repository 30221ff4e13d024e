"""advgrad.kernels.blas: the batch kernels pin the BLAS that np.dot calls to one thread while
their row blocks run in parallel, restore it after, from Python and from users' jitted code,
and stay cacheable."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llvmlite.binding
import numpy as np
from conftest import one_hot, random_network
from numba import njit, prange
from threadpoolctl import threadpool_info

from advgrad.kernels import blas, cpu

TESTS = Path(__file__).parent


def kernel_blas_threads() -> int:
    """The thread count of the BLAS that the kernels pin, as threadpoolctl reads it."""
    (count,) = [i["num_threads"] for i in threadpool_info() if i["filepath"] == blas.PINNED_LIBRARY]
    return count


def run_child(script: str, **environment: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh Python that imports from tests/ (its last stdout line is
    the result); the environment gets ``environment`` added."""
    env = os.environ | environment
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )


def test_the_blas_that_np_dot_calls_is_found():
    """scipy's OpenBLAS here: the pins below set a real thread count."""
    assert blas.PINNED_LIBRARY is not None
    assert f"{os.sep}scipy" in blas.PINNED_LIBRARY


@njit
def _pin(n_blocks):
    return blas.pin_blas(n_blocks)


@njit
def _unpin(pinned):
    blas.unpin_blas(pinned)


def test_pins_nest_and_the_last_unpin_restores_the_count():
    before = kernel_blas_threads()
    with blas.blas_threads(3):
        assert not _pin(1)  # one block runs serially: BLAS keeps its threads
        assert kernel_blas_threads() == 3
        outer = _pin(2)
        assert outer and kernel_blas_threads() == 1
        inner = _pin(7)
        _unpin(inner)
        assert kernel_blas_threads() == 1
        _unpin(outer)
        assert kernel_blas_threads() == 3
        assert not blas.pin_blas(2)  # from Python: nothing (nothing runs in parallel there)
        assert kernel_blas_threads() == 3
    assert kernel_blas_threads() == before


def mnist_shaped(n_rows: int):
    """A float32 network of the MNIST shape (784, 256, 10), inputs and one-hot labels: its
    block products are large enough for a threaded BLAS to round them differently."""
    rng = np.random.default_rng(11)
    network = random_network(rng, 784, 256, 10, dtype=np.float32, scale=0.2)
    X = rng.random((n_rows, 784), dtype=np.float32)
    return X, network, one_hot(rng.integers(0, 10, n_rows), 10, np.float32)


def gradient_and_step(X, network, Y):
    """Outputs of the four kernels that carry the gradient's products, called directly."""
    n_rows = X.shape[0]
    G, X_adv = np.empty_like(X), np.empty_like(X)
    predicted = np.empty(n_rows, dtype=np.int64)
    cpu.input_gradient_into(X, *network, Y, G, predicted)
    cpu.fgm_step_into(X, *network, Y, 0.1, np.inf, 0.0, 1.0, X_adv, predicted)
    A, P, _ = cpu.forward(X, *network)
    gradients = [np.zeros_like(a) for a in network]
    cpu.parameter_gradient_into(X, *network, Y, 0.5, 0.5, 0.1, 0.0, 1.0, *gradients)
    return [G, X_adv, predicted, A, P, *gradients]


def test_direct_calls_give_bitwise_the_results_under_blas_threads_1():
    """With a multi-threaded BLAS around them, kernels on 3 blocks give bitwise what they
    give under ``blas_threads(1)`` (before the pin, a direct call rounded differently on
    most entries of G at this shape) and leave the thread count as it was."""
    X, network, Y = mnist_shaped(3 * cpu.ROWS_PER_BLOCK)
    with blas.blas_threads(1):
        pinned = gradient_and_step(X, network, Y)
    with blas.blas_threads(2):
        direct = gradient_and_step(X, network, Y)
        assert kernel_blas_threads() == 2
    for expected, got in zip(pinned, direct, strict=True):
        assert got.tobytes() == expected.tobytes()


def test_overlapping_calls_from_python_threads_restore_the_count():
    """Kernels released from the GIL overlap on two Python threads: the pins count, so the
    last one out restores the count the first one saved (bitwise results all the same)."""
    X, network, Y = mnist_shaped(2 * cpu.ROWS_PER_BLOCK)
    expected = cpu.input_gradient(X, *network, Y)
    with blas.blas_threads(3), ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: cpu.input_gradient(X, *network, Y), range(16)))
        assert kernel_blas_threads() == 3
    assert all(G.tobytes() == expected.tobytes() for G in results)


@njit
def _users_own_step(X, W1, b1, W2, b2, Y):
    """A user's jitted code calling the kernels (a wrapper and an ``_into`` kernel)."""
    G = cpu.input_gradient(X, W1, b1, W2, b2, Y)
    predicted = np.empty(X.shape[0], dtype=np.int64)
    cpu.input_gradient_into(X, W1, b1, W2, b2, Y, G, predicted)
    return cpu.fgsm_step(X, W1, b1, W2, b2, Y, 0.1, 0.0, 1.0)


@njit(parallel=True)
def _users_own_parallel_loop(X, W1, b1, W2, b2, Y, G, predicted):
    """A user's prange over two chunks, each calling a kernel that pins on its own."""
    chunk = X.shape[0] // 2
    for i in prange(2):
        rows = slice(i * chunk, (i + 1) * chunk)
        cpu.input_gradient_into(X[rows], W1, b1, W2, b2, Y[rows], G[rows], predicted[rows])


def kernel_calls(n_rows: int) -> dict:
    """Every public batch kernel that calls the BLAS (and the allocating wrappers, and
    users' jitted code) as a zero-argument call on ``n_rows`` rows: float32, the bounds in
    float64, the argument types of ``test_kernels_cpu.batch_kernel_outputs``."""
    rng = np.random.default_rng(12)
    d, H, C = 40, 20, 5
    net = random_network(rng, d, H, C, dtype=np.float32, scale=3.0)
    X = rng.uniform(size=(n_rows, d)).astype(np.float32)
    Y = one_hot(rng.integers(0, C, n_rows), C, np.float32)
    out, predicted = np.empty_like(X), np.empty(n_rows, dtype=np.int64)
    eps, alpha = np.full(n_rows, 2.0), np.full(n_rows, 0.3)
    momentum = np.zeros_like(X)
    total, active = np.zeros(X.shape), np.ones(n_rows, dtype=np.bool_)
    original, iterations = np.full(n_rows, -1), np.zeros(n_rows, dtype=np.int64)
    gradients = [np.zeros_like(a) for a in net]
    X64, labels = X.astype(np.float64), np.argmax(Y, axis=1)
    bounds = (0.0, 1.0, *(a.astype(np.float64) for a in net), True, 20)
    worst, radius = np.empty(n_rows), np.empty(n_rows)
    certified, grid = np.empty((n_rows, 2), dtype=np.bool_), np.array([0.01, 0.1])
    rows = (X, *net, Y)
    return {
        "input_gradient_into": lambda: cpu.input_gradient_into(*rows, out, predicted),
        "fgm_step_into": lambda: cpu.fgm_step_into(*rows, 0.1, 2.0, 0.0, 1.0, out, predicted),
        "forward_into": lambda: cpu.forward_into(
            *rows,
            np.empty((n_rows, H), "f4"),
            np.empty((n_rows, C), "f4"),
            out[:, 0].copy(),
            predicted,
        ),
        "iterate_into": lambda: cpu.iterate_into(*rows, X, eps, alpha, 2, 1.0, 0.9, 0.0, 1.0, out),
        "iterate_steps_into": lambda: cpu.iterate_steps_into(
            *rows, eps, alpha, 2, 1.0, 0.9, 0.0, 1.0, out, momentum
        ),
        "deepfool_into": lambda: cpu.deepfool_into(
            X, *net, 2.0, 0.02, 3, 0.0, 1.0, out, iterations
        ),
        "deepfool_steps_into": lambda: cpu.deepfool_steps_into(
            X, *net, 2.0, 0.02, 3, 0.0, 1.0, out, total, original, active, iterations
        ),
        "parameter_gradient_into": lambda: cpu.parameter_gradient_into(
            *rows, 0.5, 0.5, 0.1, 0.0, 1.0, *gradients
        ),
        "margin_bounds_into": lambda: cpu.margin_bounds_into(
            X64, labels, eps / 50, np.inf, *bounds, worst
        ),
        "certified_radius_into": lambda: cpu.certified_radius_into(
            X64, labels, grid, 2.0, *bounds, 1e-4, radius, certified
        ),
        "input_gradient": lambda: cpu.input_gradient(*rows),
        "fgm_step": lambda: cpu.fgm_step(*rows, 0.1, 2.0, 0.0, 1.0),
        "fgsm_step": lambda: cpu.fgsm_step(*rows, 0.1, 0.0, 1.0),
        "forward": lambda: cpu.forward(X, *net),
        "loss": lambda: cpu.loss(*rows),
        "users_own_step": lambda: _users_own_step(*rows),
        "users_own_parallel_loop": lambda: _users_own_parallel_loop(*rows, out, predicted),
    }


def record_pins(folder: str) -> None:
    """In a fresh process: register spies as the BLAS's thread functions (a count of 4;
    every count set recorded), then make every call of ``kernel_calls`` on 3 blocks and on
    1 block, and save the counts each one set as pins.json in ``folder``."""
    counts_set = []
    get = ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 4)
    set_ = ctypes.CFUNCTYPE(None, ctypes.c_int)(counts_set.append)
    for symbol, spy in ((blas.GET_THREADS_SYMBOL, get), (blas.SET_THREADS_SYMBOL, set_)):
        llvmlite.binding.add_symbol(symbol, ctypes.cast(spy, ctypes.c_void_p).value)
    recorded = {}
    for n_rows in (3 * cpu.ROWS_PER_BLOCK, cpu.ROWS_PER_BLOCK):
        for name, call in kernel_calls(n_rows).items():
            counts_set.clear()
            call()
            recorded[f"{name} {n_rows}"] = list(counts_set)
    (Path(folder) / "pins.json").write_text(json.dumps(recorded))


def test_every_batch_kernel_pins_while_its_blocks_run_in_parallel(tmp_path):
    """Spies in place of the BLAS's thread functions see each kernel, wrapper and user's
    jitted function on 3 blocks set 1 thread, then the saved 4 back; on 1 block nothing."""
    done = run_child(f"import test_blas\ntest_blas.record_pins({str(tmp_path)!r})")
    assert done.returncode == 0, done.stderr
    recorded = json.loads((tmp_path / "pins.json").read_text())
    many, one = 3 * cpu.ROWS_PER_BLOCK, cpu.ROWS_PER_BLOCK
    assert len(recorded) == 2 * 17
    for name in kernel_calls(1):
        if name == "users_own_parallel_loop":  # two chunks in parallel: pins may overlap
            assert recorded[f"{name} {many}"] in ([1, 4], [1, 4, 1, 4])
        elif name == "users_own_step":  # three kernel calls
            assert recorded[f"{name} {many}"] == [1, 4] * 3
        else:
            assert recorded[f"{name} {many}"] == [1, 4], name
        assert recorded[f"{name} {one}"] == [], name


CACHE_PROBE = """
import json
import numpy as np
from advgrad.kernels import blas, cpu
from threadpoolctl import threadpool_info
rng = np.random.default_rng(0)
X, W1, W2 = rng.random((300, 6)), rng.random((6, 4)), rng.random((4, 3))
b1, b2, Y = np.zeros(4), np.zeros(3), np.eye(3)[rng.integers(0, 3, 300)]
def threads():
    return [i["num_threads"] for i in threadpool_info() if i["filepath"] == blas.PINNED_LIBRARY]
before = threads()
if {into!r}:
    X_adv, predicted = np.empty_like(X), np.empty(300, dtype=np.int64)
    cpu.fgm_step_into(X, W1, b1, W2, b2, Y, 0.1, np.inf, 0.0, 1.0, X_adv, predicted)
    kernel = cpu.fgm_step_into
else:
    X_adv = cpu.fgsm_step(X, W1, b1, W2, b2, Y, 0.1, 0.0, 1.0)
    kernel = cpu.fgsm_step
print(json.dumps({{
    "threads": [before, threads()],
    "hits": sum(kernel.stats.cache_hits.values()),
    "misses": sum(kernel.stats.cache_misses.values()),
    "sum": float(X_adv.sum()),
}}))
"""


def test_a_new_process_loads_the_kernels_from_the_cache(tmp_path):
    """The pins keep the kernels cacheable: in a fresh NUMBA_CACHE_DIR, a process that ran
    ``fgm_step_into``, then one that compiled ``fgsm_step`` over it (loading the kernel from
    the cache), then one that loads ``fgsm_step`` from the cache, compiling nothing and
    writing no file, and runs it (the numba issue that crashed it is covered)."""
    cache = tmp_path / "numba-cache"
    results = []
    for into in (True, False, False):
        if len(results) == 2:
            files_before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
        done = run_child(CACHE_PROBE.format(into=into), NUMBA_CACHE_DIR=str(cache))
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout.splitlines()[-1]))
    compiled_into, compiled_step, loaded_step = results
    assert (compiled_into["hits"], compiled_into["misses"]) == (0, 1)
    assert (compiled_step["hits"], compiled_step["misses"]) == (0, 1)
    assert (loaded_step["hits"], loaded_step["misses"]) == (1, 0)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == files_before
    assert loaded_step["sum"] == compiled_step["sum"] == compiled_into["sum"]
    for result in results:  # the BLAS's thread count before and after the call
        assert result["threads"][0] == result["threads"][1] and len(result["threads"][0]) == 1
