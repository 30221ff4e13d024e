"""Backends run the kernels of one device over prepared arrays; algorithms never branch on it.

A backend takes a validated ``Model`` and C-contiguous 2-D arrays of the model's dtype
(``advgrad.attacks`` prepares them) and returns host numpy arrays.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager

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


def _run_kernel(kernel, *args) -> None:
    """Call a batch kernel on args[0]'s rows, with BLAS pinned to one thread when the
    kernel will run its row blocks in parallel (more than ``cpu.ROWS_PER_BLOCK`` rows)."""
    if args[0].shape[0] > cpu.ROWS_PER_BLOCK:
        with blas_threads(1):
            kernel(*args)
    else:
        kernel(*args)


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
        """Iterative FGM (BIM/PGD/MI-FGSM) from X_start: X_adv (N, d); eps, alpha (N,) float64."""
        X_adv = output_rows(X, out)
        _run_kernel(
            cpu.iterate_into,
            *(X, model.W1, model.b1, model.W2, model.b2, Y, X_start, eps, alpha, steps, p),
            *(decay, x_min, x_max, X_adv),
        )
        return X_adv

    def deepfool(self, model: Model, X, p, overshoot, max_iter, x_min, x_max, *, out=None):
        """DeepFool: X_adv (N, d) and the iterations used per row (N,) int64."""
        X_adv = output_rows(X, out)
        iterations = np.empty(X.shape[0], dtype=np.int64)
        _run_kernel(
            cpu.deepfool_into,
            *(X, model.W1, model.b1, model.W2, model.b2, p, overshoot, max_iter, x_min, x_max),
            *(X_adv, iterations),
        )
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
    from advgrad.cuda_backend import CudaBackend, cuda_available

    usable, reason = cuda_available()
    if usable:
        return CudaBackend()
    if device == "auto":
        return CpuBackend()
    raise ValueError(f"--device cuda is not usable here: {reason}")
