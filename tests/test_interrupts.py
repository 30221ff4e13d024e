"""Interrupts inside a kernel (issue 15, class 7): a second Ctrl-C stops at once.

The iterative kernels (BIM, PGD, MI-FGSM, DeepFool) run in slices of steps with control back
in Python between them (``advgrad.backend.step_slices``), so the signal handler acts within a
slice whatever the step count. Here: the sliced runs are bitwise the one-call kernels, and
``advgrad attack`` with a billion steps stops within two seconds of a second SIGINT, keeping
its inputs and its last checkpoint.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from children import CHILD_ENV
from conftest import one_hot, random_network
from test_resume import assert_partial_kept, checkpoint_rows, one_line, save_synthetic

import advgrad
from advgrad import attacks, backend
from advgrad.backend import CpuBackend, deepfool_work, gradient_work, step_slices
from advgrad.io.checkpoint import partial_path
from advgrad.kernels import cpu
from advgrad.model import Model

DTYPES = [np.float32, np.float64]
NORMS = [np.inf, 2.0, 1.0]
# (name, decay, random start): BIM, PGD, MI-FGSM as ``advgrad.attacks`` runs them
ITERATIVE = [("bim", 0.0, False), ("pgd", 0.0, True), ("mifgsm", 1.0, False)]
RADIUS = {np.inf: 0.1, 2.0: 0.4, 1.0: 1.5}
N_ROWS = 2 * cpu.ROWS_PER_BLOCK + 37  # three row blocks, run in parallel


def assert_bitwise_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()


def slice_budget(n_rows: int, row_step_work: int, steps_per_slice: int) -> int:
    """The ``SLICE_MULTIPLY_ADDS`` that cuts a call on ``n_rows`` rows into slices of
    ``steps_per_slice`` steps."""
    return steps_per_slice * n_rows * row_step_work


def test_step_slices_cover_the_steps_in_bounded_slices():
    assert list(step_slices(10, 4, 5, budget=60)) == [3, 3, 3, 1]
    assert list(step_slices(10, 4, 5, budget=10**9)) == [10]  # a small job: one slice
    assert list(step_slices(3, 4, 5, budget=1)) == [1, 1, 1]  # at least a step a slice
    assert list(step_slices(0, 4, 5, budget=60)) == []
    assert list(step_slices(5, 0, 5, budget=60)) == [5]
    huge = step_slices(10**18, 256, 5000, budget=backend.SLICE_MULTIPLY_ADDS)
    assert next(huge) == backend.SLICE_MULTIPLY_ADDS // (256 * 5000)


def iterate_problem(dtype, p, random_start, seed=3):
    """A network, rows over three blocks, labels (every third row targeted), X_start, eps and
    alpha of an iterative attack."""
    rng = np.random.default_rng(seed)
    W1, b1, W2, b2 = random_network(rng, 13, 9, 4, dtype=dtype, scale=3.0)
    X = rng.random((N_ROWS, 13)).astype(dtype)
    Y = one_hot(rng.integers(0, 4, N_ROWS), 4, dtype=dtype)
    eps = RADIUS[p] * (0.5 + rng.random(N_ROWS))
    targeted = np.arange(N_ROWS) % 3 == 2
    Y[targeted] = np.roll(Y[targeted], 1, axis=1)
    alpha = np.where(targeted, -0.3, 0.3) * eps
    X_start = X
    if random_start:
        ball = attacks.random_in_ball(seed, 0, np.arange(N_ROWS), X.shape[1], p)
        X_start = (X + eps[:, None] * ball).astype(dtype)
    return Model(W1, b1, W2, b2), X, Y, X_start, eps, alpha


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize(("method", "decay", "random_start"), ITERATIVE)
def test_sliced_iterate_is_bitwise_one_call(monkeypatch, dtype, p, method, decay, random_start):
    model, X, Y, X_start, eps, alpha = iterate_problem(dtype, p, random_start)
    steps = 7
    one_call = np.empty_like(X)
    net = (model.W1, model.b1, model.W2, model.b2)
    with backend.blas_threads(1):
        cpu.iterate_into(X, *net, Y, X_start, eps, alpha, steps, p, decay, 0.0, 1.0, one_call)
    assert not np.array_equal(one_call, X_start)
    for steps_per_slice in (1, 3, steps, 100):  # 7 slices, 3 + 3 + 1, one slice, one slice
        budget = slice_budget(N_ROWS, gradient_work(model), steps_per_slice)
        monkeypatch.setattr(backend, "SLICE_MULTIPLY_ADDS", budget)
        sliced = CpuBackend().iterate(model, X, Y, X_start, eps, alpha, steps, p, decay, 0.0, 1.0)
        assert_bitwise_equal(sliced, one_call)


def stuck_and_moving_problem(dtype, seed=5):
    """A network and rows of which DeepFool moves some across a boundary in a few
    iterations and leaves others stuck at the clip range until max_iter."""
    rng = np.random.default_rng(seed)
    W1, b1, W2, b2 = random_network(rng, 11, 7, 3, dtype=dtype, scale=3.0)
    X = rng.random((N_ROWS, 11)).astype(dtype)
    return Model(W1, b1, W2, b2), X


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2.0, np.inf])
def test_sliced_deepfool_is_bitwise_one_call(monkeypatch, dtype, p):
    model, X = stuck_and_moving_problem(dtype)
    max_iter = 9
    net = (model.W1, model.b1, model.W2, model.b2)
    one_call = np.empty_like(X)
    iterations = np.empty(N_ROWS, dtype=np.int64)
    with backend.blas_threads(1):
        cpu.deepfool_into(X, *net, p, 0.02, max_iter, 0.0, 1.0, one_call, iterations)
    assert {1, max_iter} < set(iterations)  # rows that stop early, late, and not at all
    assert len(set(iterations)) > 4
    for steps_per_slice in (1, 2, 4, max_iter, 100):
        budget = slice_budget(N_ROWS, deepfool_work(model), steps_per_slice)
        monkeypatch.setattr(backend, "SLICE_MULTIPLY_ADDS", budget)
        sliced, sliced_iterations = CpuBackend().deepfool(model, X, p, 0.02, max_iter, 0.0, 1.0)
        assert_bitwise_equal(sliced, one_call)
        assert_bitwise_equal(sliced_iterations, iterations)


def test_deepfool_slices_stop_once_every_row_is_done(monkeypatch):
    """A huge max_iter costs nothing once every row has crossed its boundary."""
    model, X = stuck_and_moving_problem(np.float32)
    X = X[:50]
    _, iterations = CpuBackend().deepfool(model, X, 2.0, 0.02, 50, -np.inf, np.inf)
    assert iterations.max() < 50  # without a clip range every row crosses
    monkeypatch.setattr(backend, "SLICE_MULTIPLY_ADDS", 1)  # one iteration a slice
    started = time.perf_counter()
    _, huge = CpuBackend().deepfool(model, X, 2.0, 0.02, 10**15, -np.inf, np.inf)
    assert time.perf_counter() - started < 5.0
    assert_bitwise_equal(huge, iterations)


# ------------------------------------------------------------------------- the command line


def attack_command(model: Path, data: Path, out: Path, *options: str) -> list[str]:
    return [
        *(sys.executable, "-m", "advgrad", "attack", "--model", str(model), "--data", str(data)),
        *("--out", str(out), "--batch-size", "256", *options),
    ]


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll ``condition()`` until true; fail if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"ended (exit code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)


def interrupt_twice(args: list[str], log: Path, ready, delay: float) -> tuple[int, float, str]:
    """Run ``args``; ``delay`` seconds after ``ready()`` holds, send SIGINT, wait for its
    notice, and send SIGINT again. Returns the exit code, the seconds from the second SIGINT
    to the exit, and stderr."""
    with log.open("w") as stderr:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, env=CHILD_ENV)
        try:
            wait_for(ready, "the moment to interrupt", proc)
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            wait_for(
                lambda: "Ctrl-C again" in log.read_text(), "notice of the first SIGINT", proc, 10.0
            )
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
            try:
                returncode = proc.wait(timeout=30)
            finally:
                waited = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return returncode, waited, log.read_text()


def assert_stopped_at_once(returncode: int, waited: float, stderr: str) -> None:
    """Exit 130 within two seconds of the second SIGINT, with the notice of the first one and
    a single error line, no traceback."""
    assert returncode == 130, stderr
    assert waited < 2.0, f"exited {waited:.2f} s after the second SIGINT"
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 2, stderr
    assert lines[0] == "advgrad: stopping after the block in progress (Ctrl-C again stops at once)"
    assert lines[1].startswith("advgrad: interrupted; no complete output was written"), stderr


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in paths}


WARMED = {
    "bim": ("--steps", "2"),
    "mifgsm": ("--steps", "2"),
    "pgd": ("--steps", "2"),
    "deepfool": ("--max-iter", "2"),
}
"""The attacks this module interrupts, and a short run of each that compiles its kernels."""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """A float32 model 64 -> 32 -> 10 and 768 rows (three blocks of 256). The kernels of
    every attack interrupted here are compiled first, so that the Ctrl-C a test sends lands
    in the attack, not in the job's warm-up."""
    folder = tmp_path_factory.mktemp("interrupts")
    model, data = save_synthetic(folder, 3 * cpu.ROWS_PER_BLOCK, seed=7, d=64)
    for method, options in WARMED.items():
        warm = subprocess.run(  # fills the Numba cache when it is cold
            attack_command(model, data, folder / f"{method}.h5", "--method", method, *options),
            capture_output=True,
            text=True,
            env=CHILD_ENV,
            timeout=600,
        )
        assert warm.returncode == 0, warm.stderr
    return model, data


@pytest.mark.parametrize("method", ["bim", "mifgsm"])
def test_second_ctrl_c_stops_a_billion_steps_at_once(tmp_path, files, method):
    model, data = files
    inputs = snapshot(model, data)
    out = tmp_path / "adv.h5"
    args = attack_command(model, data, out, "--method", method, "--steps", "1000000000")

    # the partial output is created just before the first block is attacked
    stopped = interrupt_twice(args, tmp_path / "stderr", partial_path(out).exists, 0.5)
    assert_stopped_at_once(*stopped)
    assert snapshot(model, data) == inputs
    assert not out.exists()


def test_second_ctrl_c_stops_deepfool_stuck_at_the_clip_range(tmp_path, files):
    """DeepFool with a huge --max-iter on rows it cannot move across a boundary: the class
    biases are far apart, so the rows stop at the clip range and iterate until max_iter."""
    model_path, data = files
    model = advgrad.load_model(model_path)
    b2 = np.zeros_like(model.b2)
    b2[0] = 1000.0
    stuck = tmp_path / "stuck-model.h5"
    advgrad.save_model(Model(model.W1, model.b1, model.W2, b2), stuck)
    inputs = snapshot(stuck, data)
    out = tmp_path / "adv.h5"
    args = attack_command(stuck, data, out, "--method", "deepfool", "--max-iter", "1000000000")

    stopped = interrupt_twice(args, tmp_path / "stderr", partial_path(out).exists, 0.5)
    assert_stopped_at_once(*stopped)
    assert snapshot(stuck, data) == inputs
    assert not out.exists()


def test_second_ctrl_c_inside_a_block_keeps_the_checkpoint_and_resumes(tmp_path, files):
    model, data = files
    inputs = snapshot(model, data)
    out = tmp_path / "adv.h5"
    args = attack_command(model, data, out, "--method", "pgd", "--steps", "500")

    def first_block_written() -> bool:  # the second block is being attacked
        return (checkpoint_rows(out) or 0) >= cpu.ROWS_PER_BLOCK

    assert_stopped_at_once(*interrupt_twice(args, tmp_path / "stderr", first_block_written, 0))
    assert snapshot(model, data) == inputs
    assert_partial_kept(out, cpu.ROWS_PER_BLOCK)

    rerun = subprocess.run(args, capture_output=True, text=True, env=CHILD_ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    rows = 3 * cpu.ROWS_PER_BLOCK
    assert f"resuming after row {cpu.ROWS_PER_BLOCK} of {rows}" in one_line(rerun.stderr)
    assert advgrad.load_dataset(out)[0].shape[0] == rows
    assert snapshot(model, data) == inputs


LOST_INTERRUPTS = {
    # an exception raised in a finaliser (as in a ctypes callback) is printed and lost
    "swallowed": """
        class NativeCallback:
            def __del__(self):
                time.sleep(0.001)

        while True:
            NativeCallback()
    """,
    "replaced": """
        while True:
            try:
                time.sleep(0.001)
            except KeyboardInterrupt:
                raise RuntimeError("no compiled object yet") from None
    """,
}
"""Work that loses the KeyboardInterrupt of the second Ctrl-C as a native library can: while
Numba compiles a kernel, llvmlite's ctypes callback swallows it (printing "Exception
ignored ... KeyboardInterrupt"), and Numba then fails with a RuntimeError of its own."""


@pytest.mark.parametrize("work", LOST_INTERRUPTS.values(), ids=LOST_INTERRUPTS.keys())
def test_second_ctrl_c_stops_even_where_its_interrupt_is_lost(tmp_path, work):
    script = tmp_path / "command.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from advgrad.cli.reports import reported_errors, stop_on_signals\n"
        "with reported_errors(), stop_on_signals():\n"
        "    Path(sys.argv[1]).touch()\n" + textwrap.indent(textwrap.dedent(work), "    ")
    )
    started = tmp_path / "started"
    args = [sys.executable, str(script), str(started)]
    assert_stopped_at_once(*interrupt_twice(args, tmp_path / "stderr", started.exists, 0))
