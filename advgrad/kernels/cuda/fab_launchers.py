"""Host-side launchers of the FAB kernels (``advgrad.kernels.cuda.fab``) on device arrays:
``fab_steps_into``, the twin of ``advgrad.kernels.fab.fab_steps_into``, and the pieces it
queues.

Each queues kernels on ``stream`` and returns at once; the rows' scratch (two float64
projections, a (2, d) float64 scratch, an int64 index and the L1 buckets per row) comes
from the ``workspace`` (a ``launchers.Workspace``; None allocates fresh buffers). A FAB
iteration on the GPU is the iterates' logits (``launchers.logits_into``) and
``fab_keep_rows``, then the input gradient of the hyperplane's z_k - z_y
(``launchers.loss_gradient_into`` with ``LOSS_LOGIT_DIFFERENCE``: one launch set for a
target, C - 1 for untargeted FAB) and ``fab_step_rows``, all on one stream
(``advgrad.cuda_backend.CudaBackend.fab_run``).
"""

import numpy as np

from advgrad.kernels.cpu import LOSS_LOGIT_DIFFERENCE
from advgrad.kernels.cuda.fab import (
    fab_keep_rows,
    fab_start_rows,
    fab_step_rows,
    hyperplane_projection_rows,
    nearest_boundary_rows,
    other_class_rows,
)
from advgrad.kernels.cuda.internals import as_device
from advgrad.kernels.cuda.launchers import Workspace, logits_into, loss_gradient_into
from advgrad.kernels.fab_projection import L1_BUCKETS

__all__ = [
    "FAB_THREADS",
    "boundary_into",
    "fab_keep_into",
    "fab_start_into",
    "fab_step_into",
    "fab_steps_into",
    "hyperplane_projection_into",
]

FAB_THREADS = 64
"""Threads per block of the FAB row kernels (one row a thread); tests may lower it."""


def _grid(n_rows: int) -> int:
    return max(1, -(-n_rows // FAB_THREADS))


def _dual(p: float) -> float:
    """The dual norm of p: the norm of the gradient in a boundary's linearised distance."""
    return 1.0 if p == np.inf else (2.0 if p == 2.0 else np.inf)


def _projection_scratch(workspace, n_rows: int, d: int):
    """The rows' scratch of ``hyperplane_projection``: (N, 2, d) float64, (N, d) int64 and
    (N, L1_BUCKETS) float64."""
    return (
        workspace.array("fab_scratch", (n_rows, 2, d), np.float64),
        workspace.array("fab_index", (n_rows, d), np.int64),
        workspace.array("fab_buckets", (n_rows, L1_BUCKETS), np.float64),
    )


def hyperplane_projection_into(p, X, W, gap, x_min, x_max, D, *, stream=0, workspace=None):
    """``fab.hyperplane_projection`` of every row, one launch.

    Parameters
    ----------
    p : float, np.inf, 2.0 or 1.0
    X, W : (N, d) float32 or float64 device arrays of one dtype: the points and the normals
    gap : (N,) float64 device array, the change of <w, v> that reaches each hyperplane
    x_min, x_max : float, the box (infinite: none on that side)
    D : (N, d) float64 device array, output: the perturbations
    stream : numba stream the kernel is queued on (default: the default stream)
    workspace : Workspace for the rows' scratch; None allocates fresh buffers
    """
    X, W, gap, D = map(as_device, (X, W, gap, D))
    n_rows, d = X.shape
    if n_rows == 0:
        return
    scratch = _projection_scratch(workspace or Workspace(), n_rows, d)
    hyperplane_projection_rows[_grid(n_rows), FAB_THREADS, stream](
        float(p), X, W, gap, float(x_min), float(x_max), D, *scratch
    )


def fab_start_into(X, start, current, closest, distance, *, stream=0):
    """A run's state before iteration 0 (as ``CpuBackend.fab_run`` sets it): current =
    start and closest = X, (N, d) device arrays of X's dtype; distance (N,) float64 = inf."""
    X, start, current, closest, distance = map(as_device, (X, start, current, closest, distance))
    if X.shape[0]:
        fab_start_rows[_grid(X.shape[0]), FAB_THREADS, stream](X, start, current, closest, distance)


def fab_keep_into(X, labels, Z, p, current, closest, distance, *, stream=0):
    """After the logits Z (N, C) of the iterates current (N, d): where argmax Z (the first on
    ties) is not the label, the closest point and its distance are updated and the iterate
    backs up (``fab.keep_closest_row``, bitwise). X, current, closest: (N, d) device arrays
    of one float dtype, labels (N,) int64, distance (N,) float64; p: np.inf, 2.0 or 1.0."""
    arrays = (X, labels, Z, current, closest, distance)
    X, labels, Z, current, closest, distance = map(as_device, arrays)
    if X.shape[0]:
        fab_keep_rows[_grid(X.shape[0]), FAB_THREADS, stream](
            X, labels, Z, float(p), current, closest, distance
        )


def fab_step_into(X, G, f, p, x_min, x_max, current, *, stream=0, workspace=None):
    """One FAB step of every row in place on current (``fab.fab_step_row``, bitwise given
    the same G and f): toward the hyperplane f[n] + <G[n], v - current[n]> = 0 within
    [x_min, x_max]. X, G, current: (N, d) device arrays of one float dtype; f (N,) device
    array, float64 or of X's dtype; p: np.inf, 2.0 or 1.0; workspace: for the rows'
    scratch (None allocates fresh buffers)."""
    X, G, f, current = map(as_device, (X, G, f, current))
    n_rows, d = X.shape
    if n_rows == 0:
        return
    workspace = workspace or Workspace()
    to_current = workspace.array("fab_to_current", (n_rows, d), np.float64)
    to_clean = workspace.array("fab_to_clean", (n_rows, d), np.float64)
    scratch = _projection_scratch(workspace, n_rows, d)
    fab_step_rows[_grid(n_rows), FAB_THREADS, stream](
        X, G, f, float(p), float(x_min), float(x_max), current, to_current, to_clean, *scratch
    )


def boundary_into(X, W1, b1, W2, b2, labels, targets, p, G, f, *, stream=0, workspace=None):
    """The hyperplane f + <g, v - x> = 0 of every row x of X that a FAB step goes to: for
    a target t, f = z_t - z_y and g its input gradient (``loss_gradient_into``); untargeted
    (targets of 0 rows), of the classes k != y the one whose linearised boundary is nearest
    in the dual norm of p (the first on ties), as ``fab.nearest_boundary_block``.

    Parameters
    ----------
    X : (N, d) float32 or float64 device array, the points
    W1, b1, W2, b2 : the network, device arrays of X's dtype
    labels : (N,) int64 device array, the true classes
    targets : (N,) int64 device array, the target classes; 0 rows for untargeted
    p : float, np.inf, 2.0 or 1.0
    G : (N, d) device array of X's dtype, output: the hyperplanes' normals g
    f : (N,) device array of X's dtype, output: their values f at X
    stream : numba stream the kernels are queued on (default: the default stream)
    workspace : Workspace for scratch buffers; None allocates fresh ones
    """
    X, W1, b1, W2, b2, labels, targets, G, f = map(
        as_device, (X, W1, b1, W2, b2, labels, targets, G, f)
    )
    n_rows, d = X.shape
    if n_rows == 0:
        return
    workspace = workspace or Workspace()
    network = (W1, b1, W2, b2)
    predicted = workspace.array("fab_predicted", (n_rows,), np.int64)
    if targets.shape[0]:
        loss_gradient_into(
            *(X, *network, labels, targets, LOSS_LOGIT_DIFFERENCE, 0.0, G, f, predicted),
            stream=stream,
            workspace=workspace,
        )
        return
    others = workspace.array("fab_others", (W2.shape[1] - 1, n_rows), np.int64)
    G_k = workspace.array("fab_G_k", (n_rows, d), X.dtype)
    f_k = workspace.array("fab_f_k", (n_rows,), X.dtype)
    nearest = workspace.array("fab_nearest", (n_rows,), np.float64)
    grid = _grid(n_rows)
    other_class_rows[grid, FAB_THREADS, stream](labels, others)
    for j in range(others.shape[0]):
        loss_gradient_into(
            *(X, *network, labels, others[j], LOSS_LOGIT_DIFFERENCE, 0.0, G_k, f_k, predicted),
            stream=stream,
            workspace=workspace,
        )
        nearest_boundary_rows[grid, FAB_THREADS, stream](j == 0, _dual(p), G_k, f_k, G, f, nearest)


def fab_steps_into(
    X,
    W1,
    b1,
    W2,
    b2,
    labels,
    targets,
    p,
    x_min,
    x_max,
    steps,
    first_step,
    count,
    current,
    closest,
    distance,
    *,
    stream=0,
    workspace=None,
):
    """Iterations first_step, ..., first_step + count - 1 of a FAB run on every row, the
    twin of ``fab.fab_steps_into`` on device arrays (``fab_start_into`` sets the state
    before iteration 0).

    Iteration i: for i > 0 the iterates' logits (``logits_into``) and ``fab_keep_rows``
    (a misclassified iterate updates the closest point and backs up); for i < steps the
    hyperplane at the iterate (``boundary_into``) and ``fab_step_rows``. Where the CPU
    forms the hidden layer of a point backed up to by linearity, the GPU takes it from a
    forward pass of that point, within the gradient's launches (equal up to rounding); the
    hyperplane's f is z_t - z_y in X's dtype (the CPU's: in float64), so the iterates
    equal the CPU's within the rounding of the gradients.

    Parameters
    ----------
    X : (N, d) float32 or float64 device array, the clean rows
    W1, b1, W2, b2 : the network, device arrays of X's dtype
    labels : (N,) int64 device array, the true classes
    targets : (N,) int64 device array, the target classes (FAB-T); 0 rows: untargeted
    p : float, np.inf, 2.0 or 1.0
    x_min, x_max : float, the box (infinite: none)
    steps : int, the steps of the run (iterations 0, ..., steps)
    first_step, count : int, the iterations of this call (first_step + count <= steps + 1)
    current : (N, d) device array of X's dtype, the iterates, updated
    closest : (N, d) device array of X's dtype, the closest misclassified iterates, updated
    distance : (N,) float64 device array, their distances in norm p to X, updated
    stream : numba stream the kernels are queued on (default: the default stream)
    workspace : Workspace for scratch buffers; None allocates fresh ones
    """
    X, W1, b1, W2, b2, labels, targets, current, closest, distance = map(
        as_device, (X, W1, b1, W2, b2, labels, targets, current, closest, distance)
    )
    n_rows, d = X.shape
    if n_rows == 0:
        return
    workspace = workspace or Workspace()
    network = (W1, b1, W2, b2)
    p, x_min, x_max = float(p), float(x_min), float(x_max)
    Z = workspace.array("fab_Z", (n_rows, W2.shape[1]), X.dtype)
    G = workspace.array("fab_G", (n_rows, d), X.dtype)
    f = workspace.array("fab_f", (n_rows,), X.dtype)
    for step in range(first_step, first_step + count):
        if step > 0:
            logits_into(current, *network, Z, stream=stream, workspace=workspace)
            fab_keep_into(X, labels, Z, p, current, closest, distance, stream=stream)
        if step == steps:
            break
        boundary_into(
            current, *network, labels, targets, p, G, f, stream=stream, workspace=workspace
        )
        fab_step_into(X, G, f, p, x_min, x_max, current, stream=stream, workspace=workspace)
