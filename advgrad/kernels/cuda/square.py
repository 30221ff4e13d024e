"""The CUDA kernel of Square, the twin of ``advgrad.kernels.square.square_steps_into``: one
thread per row, grid-stride over the rows, each running its row's steps with the CPU's own
row function, ``square.square_row_steps``, which numba-cuda compiles for the GPU. One
algorithm, in one place: the kernel only hands each thread its row's scratch.

A query moves one or two windows of a row and costs a few multiply-adds per hidden unit,
so a GPU is kept busy by many rows at once, each thread running all of its row's queries
of a launch in turn, not by splitting a query. ``square_steps_into`` launches it.

On the simulator the rows run the CPU's compiled row function itself, so results there are
the CPU's bit for bit. On a GPU, NVVM may fuse a multiply and an add or order the logits'
dot products (compiled with reassociation) differently from the CPU: a margin's last bits
may differ, and where two margins are that close, a proposal may be taken on one and not on
the other.
"""

import numpy as np

from advgrad.kernels.cuda.internals import SIMULATOR, as_device, cuda
from advgrad.kernels.cuda.launchers import Workspace
from advgrad.kernels.square import NORM_1, square_row_steps

__all__ = ["SQUARE_THREADS", "square_steps_into", "square_steps_rows"]

SQUARE_THREADS = 64
"""Threads per block of the Square kernel (one row a thread); tests may lower it."""


if SIMULATOR:

    def native(array):
        """The numpy array under a simulator's device array (the CPU's row function, which
        the simulator runs as compiled CPU code, takes numpy arrays)."""
        return array._ary

else:

    @cuda.jit(device=True)
    def native(array):
        """The array itself: on a GPU the row function takes the device array as it is."""
        return array


@cuda.jit
def square_steps_rows(
    X, W1, b1, W2T, b2, labels, rows, seed, stream, norm, eps, x_min, x_max,
    channels, height, width, channels_last, sides, first, count,
    X_best, margins, queries_used, hidden, sizes,
    pattern, fresh, z1, a, delta, proposal, moved, support, points, centres, values, pairs,
):  # fmt: skip
    """Steps first, ..., first + count - 1 of every row's search (``square_steps_into``);
    the arguments after ``sizes`` are each row's scratch, (N, ...) device arrays."""
    image = (channels, height, width, channels_last)
    state = (native(X_best), native(margins), native(queries_used), native(hidden))
    for n in range(cuda.grid(1), X.shape[0], cuda.gridsize(1)):
        projection = (
            native(support)[n],
            native(points)[n],
            native(centres)[n],
            native(values)[n],
            native(pairs)[n],
        )
        work = (
            native(pattern)[n],
            native(fresh)[n],
            native(z1)[n],
            native(a)[n],
            native(delta)[n],
            native(proposal)[n],
            native(moved)[n],
            projection,
        )
        square_row_steps(
            *(n, native(X), native(W1), native(b1), native(W2T), native(b2), native(labels)),
            *(native(rows), seed, stream, norm, eps, x_min, x_max, image, native(sides)),
            *(first, count, *state, native(sizes), work),
        )


def square_steps_into(
    X, W1, b1, W2T, b2, labels, rows, seed, random_stream, norm, eps, x_min, x_max, image,
    sides, first, count, X_best, margins, queries_used, hidden, sizes,
    *, stream=0, workspace=None,
):  # fmt: skip
    """``square.square_steps_into`` on device arrays, one launch.

    Parameters
    ----------
    X : (N, d) float32 or float64 device array, the clean rows
    W1 : (d, H) float64 device array; b1 : (H,) device array of X's dtype
    W2T : (C, H) float64 device array (W2 transposed); b2 : (C,) device array of X's dtype
    labels, rows : (N,) int64 device arrays, the true classes and the rows' absolute indices
    seed, random_stream : ints, the seed and the start's random stream
    norm : ``square.NORM_INF``, ``NORM_2`` or ``NORM_1``
    eps, x_min, x_max : scalars of X's dtype (numpy's), the radius and the box
    image : (c, h, w, channels_last) ints
    sides : (queries,) int64 device array, the window side of each update
    first, count : ints, the steps to run (step 0 the start; step i update i - 1)
    X_best, margins, queries_used, hidden, sizes : the search's state (device arrays shaped
        as ``square.square_steps_into``'s), updated
    stream : numba stream the kernel is queued on (default: the default stream)
    workspace : Workspace for the rows' scratch (at most 24 d + 16 H bytes a row besides
        its windows, and 48 d more for L1's projection); None allocates fresh buffers
    """
    arrays = (X, W1, b1, W2T, b2, labels, rows, sides, X_best, margins, queries_used)
    X, W1, b1, W2T, b2, labels, rows, sides, X_best, margins, queries_used = map(as_device, arrays)
    hidden, sizes = as_device(hidden), as_device(sizes)
    n_rows, d = X.shape
    if n_rows == 0:
        return
    workspace = workspace or Workspace()
    side = min(image[1], image[2])
    H = W1.shape[1]
    projected = d if norm == NORM_1 else 0  # the L1 projection's scratch: L1 alone
    scratch = [
        workspace.array(f"square_{name}", (n_rows, *shape), dtype)
        for name, shape, dtype in (
            ("pattern", (side, side), np.float64),
            ("fresh", (image[0], side, side), np.float64),
            ("z1", (H,), np.float64),
            ("a", (H,), np.float64),
            ("delta", (d,), np.float64),
            ("proposal", (d,), X.dtype),
            ("moved", (d,), np.int64),
            ("support", (projected,), np.int64),
            ("points", (projected,), np.float64),
            ("centres", (projected,), X.dtype),
            ("values", (projected,), X.dtype),
            ("pairs", (2 * projected,), np.float64),
        )
    ]
    blocks = max(1, -(-n_rows // SQUARE_THREADS))
    square_steps_rows[blocks, SQUARE_THREADS, stream](
        *(X, W1, b1, W2T, b2, labels, rows, int(seed), int(random_stream), int(norm)),
        *(eps, x_min, x_max, *(int(v) for v in image), sides, int(first), int(count)),
        *(X_best, margins, queries_used, hidden, sizes, *scratch),
    )
