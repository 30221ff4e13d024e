"""Host-side launchers of the APGD kernels (``advgrad.kernels.cuda.apgd``), the twins of
``advgrad.kernels.apgd``'s ``apgd_start_into`` and ``apgd_update_into`` on device arrays.

Each queues one kernel on ``stream`` and returns at once; the rows' scratch (a row of X's
dtype, 2 d float64 for the L1 selections, a rounding slot) comes from the ``workspace`` (a
``launchers.Workspace``; None allocates fresh buffers). The fused run is
``launchers.loss_gradient_into`` then ``apgd_update_into``, per iteration, on one stream
(``advgrad.cuda_backend.CudaBackend.apgd_run``).
"""

import numpy as np

from advgrad.kernels.cuda.apgd import apgd_start_rows, apgd_update_rows
from advgrad.kernels.cuda.internals import as_device
from advgrad.kernels.cuda.launchers import Workspace

__all__ = ["APGD_THREADS", "apgd_start_into", "apgd_update_into"]

APGD_THREADS = 64
"""Threads per block of the APGD kernels (one row a thread); tests may lower it."""


def _scratch(workspace, n_rows: int, d: int, dtype):
    workspace = workspace or Workspace()
    return (
        workspace.array("apgd_Z", (n_rows, d), dtype),
        workspace.array("apgd_scratch", (n_rows, 2 * d), np.float64),
        workspace.array("apgd_slot", (n_rows,), dtype),
    )


def _box(dtype, x_min: float, x_max: float) -> tuple[float, float]:
    """The box's bounds rounded to ``dtype`` (the CPU kernels compare in it)."""
    kind = np.dtype(dtype).type
    return float(kind(x_min)), float(kind(x_max))


def _grid(n_rows: int) -> int:
    return max(1, -(-n_rows // APGD_THREADS))


def apgd_start_into(X, start, eps, p, x_min, x_max, current, *, stream=0, workspace=None):
    """``cpu apgd.apgd_start_into`` on device arrays: X, start, current (N, d) of one float
    dtype, eps (N,) float64."""
    X, start, eps, current = map(as_device, (X, start, eps, current))
    n_rows, d = X.shape
    if n_rows == 0:
        return
    _, scratch, slot = _scratch(workspace, n_rows, d, X.dtype)
    lo, hi = _box(X.dtype, x_min, x_max)
    apgd_start_rows[_grid(n_rows), APGD_THREADS, stream](
        X, start, eps, float(p), lo, hi, current, scratch, slot
    )


def apgd_update_into(
    X,
    eps,
    p,
    x_min,
    x_max,
    windows,
    step,
    labels,
    G,
    values,
    predicted,
    current,
    previous,
    best,
    best_G,
    adversarial,
    state,
    topk_from_start=False,
    *,
    stream=0,
    workspace=None,
):
    """``cpu apgd.apgd_update_into`` on device arrays (windows: an (steps + 1,) int64
    device array); bitwise the CPU's given the same G, values and predictions."""
    arrays = (X, eps, windows, labels, G, values, predicted)
    X, eps, windows, labels, G, values, predicted = map(as_device, arrays)
    rows = (current, previous, best, best_G, adversarial, state)
    current, previous, best, best_G, adversarial, state = map(as_device, rows)
    n_rows, d = X.shape
    if n_rows == 0:
        return
    Z, scratch, slot = _scratch(workspace, n_rows, d, X.dtype)
    lo, hi = _box(X.dtype, x_min, x_max)
    apgd_update_rows[_grid(n_rows), APGD_THREADS, stream](
        *(X, eps, float(p), lo, hi, windows, int(step), labels, G, values, predicted),
        *(current, previous, best, best_G, adversarial, state, Z, scratch, slot),
        bool(topk_from_start),
    )
