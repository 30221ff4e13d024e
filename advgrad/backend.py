"""Backends run the kernels of one device over prepared arrays; algorithms never branch on it.

A backend takes a validated ``Model`` and C-contiguous 2-D arrays of the model's dtype
(``advgrad.attacks`` prepares them) and returns host numpy arrays.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np

from advgrad.kernels import cpu
from advgrad.model import Model


@functools.cache
def _kernel_blas_libraries() -> tuple:
    """threadpoolctl controllers of the BLAS that numba's ``np.dot`` calls (scipy's)."""
    import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS numba binds to)
    from threadpoolctl import ThreadpoolController

    libraries = ThreadpoolController().select(user_api="blas").lib_controllers
    scipy_own = [lib for lib in libraries if f"{os.sep}scipy" in lib.filepath]
    return tuple(scipy_own or libraries)


@contextmanager
def blas_threads(n_threads: int):
    """Set the thread count of the BLAS that the CPU kernels call, restoring it on exit.

    The batch kernels call ``np.dot`` from inside ``prange``; a multi-threaded BLAS there
    oversubscribes the cores, so they run under ``blas_threads(1)``. Wrap your own calls
    of ``advgrad.kernels.cpu`` batch kernels on more than ``ROWS_PER_BLOCK`` rows likewise.
    """
    libraries = _kernel_blas_libraries()
    previous = [lib.num_threads for lib in libraries]
    for lib in libraries:
        lib.set_num_threads(n_threads)
    try:
        yield
    finally:
        for lib, count in zip(libraries, previous, strict=True):
            lib.set_num_threads(count)


def _kernel_threads(n_rows: int):
    """The BLAS setting of batch kernels on ``n_rows`` rows: pinned to one thread when they
    run their row blocks in parallel (more than ``cpu.ROWS_PER_BLOCK`` rows)."""
    return blas_threads(1) if n_rows > cpu.ROWS_PER_BLOCK else nullcontext()


def _run_kernel(kernel, *args) -> None:
    """Call a batch kernel on args[0]'s rows under ``_kernel_threads``."""
    with _kernel_threads(args[0].shape[0]):
        kernel(*args)


WORKSPACE_BYTES = 2**30
"""Most scratch memory one block of a kernel may need (each thread runs one block at a time).
A network whose scratch exceeds it is refused up front: the scratch grows with the network's
shape, which a small compressed file can declare large (SECURITY.md)."""


def check_workspace(what: str, n_bytes: int) -> None:
    """Refuse ``what`` (e.g. "DeepFool") when one kernel block needs more than
    ``WORKSPACE_BYTES`` of scratch; raises ValueError saying so."""
    if n_bytes > WORKSPACE_BYTES:
        raise ValueError(
            f"{what} needs {n_bytes} bytes of scratch per block for this network, more than "
            f"the {WORKSPACE_BYTES} allowed (advgrad.backend.WORKSPACE_BYTES)"
        )


SLICE_MULTIPLY_ADDS = 2**26
"""Work of one slice of an iterative attack (at most about 0.1 s on one core). The iterative
kernels run in slices of steps, and between two slices control is back in Python, where a
signal handler can act (a second Ctrl-C stops a job at once); a small job is one slice."""


def gradient_work(model: Model) -> int:
    """Multiply-adds of one row's loss gradient: forward and backward through both layers."""
    d, H, C = model.n_inputs, model.n_hidden, model.n_classes
    return 2 * (d * H + H * C)


def deepfool_work(model: Model) -> int:
    """Multiply-adds of one row's DeepFool iteration: logits, their Jacobian (d, C), the
    distances to the C linearised boundaries."""
    d, H, C = model.n_inputs, model.n_hidden, model.n_classes
    return d * H + 2 * H * C + d * H * C + d * C


def step_slices(steps: int, n_rows: int, row_step_work: int, budget: int) -> Iterator[int]:
    """The step counts of the slices that ``steps`` steps on ``n_rows`` rows run in: as many
    steps a slice as fit ``budget`` multiply-adds at ``row_step_work`` per row and step, at
    least one; the last slice takes the rest."""
    per_slice = max(1, budget // max(1, n_rows * row_step_work))
    for done in range(0, steps, per_slice):
        yield min(per_slice, steps - done)


def output_rows(X: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """Where a backend writes rows like ``X``: ``out`` when given (it must have X's shape and
    dtype and be C-contiguous, and not overlap X), else a new array."""
    if out is None:
        return np.empty_like(X)
    if out.shape != X.shape or out.dtype != X.dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a C-contiguous {X.shape} {X.dtype} array, got {out.shape} {out.dtype}"
        )
    if np.may_share_memory(out, X):
        raise ValueError("out must not overlap the input rows")
    return out


class CpuBackend:
    """Runs the Numba CPU kernels (``advgrad.kernels.cpu``)."""

    name = "cpu"

    @staticmethod
    def empty(shape, dtype) -> np.ndarray:
        """A new host array for rows this backend takes or fills (on the CPU: ``np.empty``)."""
        return np.empty(shape, dtype)

    def input_gradient(self, model: Model, X: np.ndarray, Y: np.ndarray):
        """G (N, d) and predicted classes (N,) int64; Y (N, C) or 0 rows for predictions."""
        G = np.empty_like(X)
        predicted = np.empty(X.shape[0], dtype=np.int64)
        _run_kernel(
            cpu.input_gradient_into, X, model.W1, model.b1, model.W2, model.b2, Y, G, predicted
        )
        return G, predicted

    def fgm_step(self, model: Model, X, Y, eps, p, x_min, x_max, *, out=None):
        """X_adv (N, d) after one FGM step of norm p, and the clean predictions (N,) int64.

        Every method returning X_adv writes it into ``out`` when given (see ``output_rows``).
        """
        X_adv = output_rows(X, out)
        predicted = np.empty(X.shape[0], dtype=np.int64)
        _run_kernel(
            cpu.fgm_step_into,
            *(X, model.W1, model.b1, model.W2, model.b2, Y, eps, p, x_min, x_max, X_adv, predicted),
        )
        return X_adv, predicted

    def fgm_from_gradient(self, X, G, eps, p, x_min, x_max, *, out=None):
        """X_adv (N, d) after one FGM step of norm p along a gradient G (N, d) from
        :meth:`input_gradient`; bitwise what :meth:`fgm_step` gives."""
        X_adv = output_rows(X, out)
        cpu.fgm_from_gradient_into(X, G, eps, p, x_min, x_max, X_adv)
        return X_adv

    def iterate(self, model, X, Y, X_start, eps, alpha, steps, p, decay, x_min, x_max, *, out=None):
        """Iterative FGM (BIM/PGD/MI-FGSM) from X_start: X_adv (N, d); eps, alpha (N,) float64.

        The steps run in slices (``step_slices``), the momentum carried between them.
        """
        X_adv = output_rows(X, out)
        n_rows = X.shape[0]
        momentum = np.empty((n_rows if decay > 0.0 else 0, X.shape[1]), dtype=X.dtype)
        settings = (p, decay, x_min, x_max)
        with _kernel_threads(n_rows):
            cpu.iterate_start_into(X, X_start, eps, p, decay, x_min, x_max, X_adv, momentum)
            for count in step_slices(steps, n_rows, gradient_work(model), SLICE_MULTIPLY_ADDS):
                cpu.iterate_steps_into(
                    *(X, model.W1, model.b1, model.W2, model.b2, Y, eps, alpha, count),
                    *(*settings, X_adv, momentum),
                )
        return X_adv

    def deepfool(self, model: Model, X, p, overshoot, max_iter, x_min, x_max, *, out=None):
        """DeepFool: X_adv (N, d) and the iterations used per row (N,) int64.

        The iterations run in slices (``step_slices``) until no row moves any more.
        """
        d, H, C = model.n_inputs, model.n_hidden, model.n_classes
        check_workspace("DeepFool", (H * C + d * C + H + C) * X.dtype.itemsize)
        X_adv = output_rows(X, out)
        n_rows = X.shape[0]
        iterations = np.empty(n_rows, dtype=np.int64)
        total = np.empty(X.shape, dtype=np.float64)
        original = np.empty(n_rows, dtype=np.int64)
        active = np.empty(n_rows, dtype=np.bool_)
        state = (X_adv, total, original, active, iterations)
        with _kernel_threads(n_rows):
            cpu.deepfool_start_into(X, *state)
            for count in step_slices(max_iter, n_rows, deepfool_work(model), SLICE_MULTIPLY_ADDS):
                cpu.deepfool_steps_into(
                    *(X, model.W1, model.b1, model.W2, model.b2, p, overshoot, count),
                    *(x_min, x_max, *state),
                )
                if not active.any():
                    break
        return X_adv, iterations

    def forward(self, model: Model, X: np.ndarray, Y: np.ndarray):
        """Probabilities P (N, C), per-row losses (N,) and predictions (N,) int64."""
        n_rows = X.shape[0]
        A = np.empty((n_rows, model.n_hidden), dtype=X.dtype)
        P = np.empty((n_rows, model.n_classes), dtype=X.dtype)
        losses = np.empty(n_rows, dtype=X.dtype)
        predicted = np.empty(n_rows, dtype=np.int64)
        _run_kernel(
            cpu.forward_into, X, model.W1, model.b1, model.W2, model.b2, Y, A, P, losses, predicted
        )
        return P, losses, predicted


DEVICES = ("cpu", "cuda", "auto")


def get_backend(device: str = "cpu"):
    """The backend for ``device``: "cpu", "cuda" (an NVIDIA GPU through numba-cuda) or
    "auto" (CUDA when a device is usable, else CPU). numba.cuda is imported only here.

    Raises ValueError with a one-line reason when "cuda" is asked for and unusable.
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return CpuBackend()
    from advgrad.cuda_backend import cuda_available, shared_backend

    usable, reason = cuda_available()
    if usable:
        return shared_backend()
    if device == "auto":
        return CpuBackend()
    raise ValueError(f"--device cuda is not usable here: {reason}")
