"""Host-side launching of the certified-bound kernels (``advgrad.kernels.cuda.bounds``).

``margin_bounds_into`` and ``certified_radius_into`` take the arguments of their CPU twins
in ``advgrad.kernels.cpu``, as device arrays, and queue their kernels on ``stream``. The
module constants size the launches; tests may lower them at any time (through the package,
which sets them here).
"""

import numpy as np

from advgrad.kernels.cuda.bounds import (
    bound_constants,
    certified_radius_kernel,
    margin_bounds_kernel,
)
from advgrad.kernels.cuda.internals import as_device, launch
from advgrad.kernels.cuda.launchers import Workspace

__all__ = [
    "BOUND_BLOCKS",
    "BOUND_SCRATCH_BYTES",
    "BOUND_THREADS",
    "certified_radius_into",
    "margin_bounds_into",
]

BOUND_THREADS = 128  # threads per block of the bound kernels, one row a block; a power of two
BOUND_BLOCKS = 4096  # most blocks of a bound kernel (each works through its share of the rows)
BOUND_SCRATCH_BYTES = 1 << 28  # and most scratch over all of them: 2 d + 9 H float64 a block


def _prepare(X, W1, workspace, stream):
    """Threads, blocks, the network's constants (W1^T, col1, col2) and the blocks' scratch
    for a bound kernel on the rows of X; queues ``bound_constants``."""
    threads = BOUND_THREADS
    if threads & (threads - 1):
        raise ValueError(f"BOUND_THREADS must be a power of two, got {threads}")
    d, H = W1.shape
    width = 2 * d + 9 * H
    blocks = max(1, min(X.shape[0], BOUND_BLOCKS, BOUND_SCRATCH_BYTES // (8 * width)))
    W1T = workspace.array("bound_W1T", (H, d), np.float64)
    col1 = workspace.array("bound_col1", (H,), np.float64)
    col2 = workspace.array("bound_col2", (H,), np.float64)
    launch(bound_constants, -(-H // threads), threads, stream, W1, W1T, col1, col2)
    work = workspace.array("bound_work", (blocks, width), np.float64)
    return threads, blocks, (W1T, col1, col2), work


def margin_bounds_into(
    X,
    labels,
    eps,
    p,
    x_min,
    x_max,
    W1,
    b1,
    W2,
    b2,
    crown,
    steps,
    worst,
    *,
    stream=0,
    workspace=None,
):
    """Certified lower bound of the worst class margin of every row over its region.

    The twin of ``cpu.margin_bounds_into``: the same bounds, sound, equal within float64
    rounding. Two launches: ``bound_constants``, then ``margin_bounds_kernel`` (a block of
    ``BOUND_THREADS`` threads per row at a time).

    Parameters
    ----------
    X : (N, d) float64 device array, the rows (centres of the regions)
    labels : (N,) int64 device array, the class each row must keep
    eps : (N,) float64 device array, the radius of each row's region
    p : float, np.inf or 2.0
    x_min, x_max : float, the clip range (infinite values: none)
    W1, b1, W2, b2 : the network, float64 device arrays
    crown : bool, CROWN-style linear bounds (kept where larger than the interval bounds)
    steps : int, bisection steps of the sigmoid tangent lines (e.g. 20)
    worst : (N,) float64 device array, output: lower bound of min over k != y of
        z_y - z_k over the region; > 0 proves that the whole region keeps the class
    stream : numba stream the kernels are queued on (default: the default stream)
    workspace : Workspace for scratch buffers; None allocates fresh ones
    """
    X, labels, eps, W1, b1, W2, b2, worst = map(as_device, (X, labels, eps, W1, b1, W2, b2, worst))
    if X.shape[0] == 0:
        return
    workspace = Workspace() if workspace is None else workspace
    threads, blocks, (W1T, col1, col2), work = _prepare(X, W1, workspace, stream)
    launch(
        margin_bounds_kernel(threads),
        blocks,
        threads,
        stream,
        *(X, labels, eps, float(p), float(x_min), float(x_max), W1, W1T, b1, W2, b2, col1, col2),
        *(bool(crown), int(steps), work, worst),
    )


def certified_radius_into(
    X,
    labels,
    eps_grid,
    p,
    x_min,
    x_max,
    W1,
    b1,
    W2,
    b2,
    crown,
    steps,
    tolerance,
    radius,
    certified,
    *,
    stream=0,
    workspace=None,
):
    """Certified radius of every row: bisection on eps over the margin bound.

    The twin of ``cpu.certified_radius_into``: each row's whole search runs in one block
    (``certified_radius_kernel``), with the CPU's steps; the radii agree with the CPU's
    unless a bound falls within float64 rounding of 0 on the way.

    Parameters
    ----------
    X, labels, p, x_min, x_max, W1, b1, W2, b2, crown, steps : as in ``margin_bounds_into``
    eps_grid : (E,) float64 device array, ascending, >= 0; its largest value bounds the search
    tolerance : float > 0
    radius : (N,) float64 device array, output
    certified : (N, E) bool device array, output: the row is certified at eps_grid[g]
    stream : numba stream the kernels are queued on (default: the default stream)
    workspace : Workspace for scratch buffers; None allocates fresh ones
    """
    arrays = (X, labels, eps_grid, W1, b1, W2, b2, radius, certified)
    X, labels, eps_grid, W1, b1, W2, b2, radius, certified = map(as_device, arrays)
    if X.shape[0] == 0:
        return
    workspace = Workspace() if workspace is None else workspace
    threads, blocks, (W1T, col1, col2), work = _prepare(X, W1, workspace, stream)
    launch(
        certified_radius_kernel(threads),
        blocks,
        threads,
        stream,
        *(X, labels, eps_grid, float(p), float(x_min), float(x_max), W1, W1T, b1, W2, b2),
        *(col1, col2, bool(crown), int(steps), float(tolerance), work, radius, certified),
    )
