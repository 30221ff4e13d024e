"""Host-side launching of the CUDA kernels: planning, workspaces and the launchers.

The ``*_into`` functions queue a few kernels on a stream and return at once; ``input_gradient``,
``fgm_step``, ``fgsm_step``, ``forward`` and ``loss`` return new device arrays. The module
constants size the launches; tests may lower them at any time (through the package, which
sets them here).
"""

import functools
import math

import numpy as np

from advgrad.kernels.cpu import LOSS_CE
from advgrad.kernels.cuda.internals import address_range, as_device, cuda, launch
from advgrad.kernels.cuda.products import (
    Tile,
    gemm_kernel,
    logit_rows_kernel,
    one_hot_rows,
    rows_kernel,
    small_batch_kernel,
)
from advgrad.kernels.cuda.steps import (
    deepfool_start,
    deepfool_step_kernel,
    gather_rows,
    hidden_slopes,
    iterate_step_kernel,
    norm_step_kernel,
    sign_step_rows,
)
from advgrad.kernels.cuda.training import add_weighted_products, hidden_activations

__all__ = [
    "BLOCKS_PER_MULTIPROCESSOR",
    "DEEPFOOL_ELEMENTS",
    "MIN_SPLIT_STEPS",
    "REGISTER_CAP",
    "ROW_THREADS",
    "SKINNY_ROWS",
    "SKINNY_TILE",
    "SMALL_BATCH_ROWS",
    "SMALL_COLUMNS",
    "SMALL_GROUP_ROWS",
    "SMALL_SLICES",
    "SMALL_WEIGHT_BYTES",
    "THREADS_PER_BLOCK",
    "WIDE_TILE",
    "Workspace",
    "deepfool_into",
    "fgm_from_gradient_into",
    "fgm_step",
    "fgm_step_into",
    "fgsm_step",
    "forward",
    "forward_into",
    "input_gradient",
    "input_gradient_into",
    "iterate_into",
    "iterate_start_into",
    "iterate_steps_into",
    "logits",
    "logits_into",
    "loss",
    "loss_gradient",
    "loss_gradient_into",
    "parameter_gradient_into",
]

THREADS_PER_BLOCK = 256  # row kernels; a power of two
ROW_THREADS = 32  # threads per row of the L2 / L1 step (a power of two)
WIDE_TILE = Tile(128, 128, 8, 8, 8)  # 256 threads, batches of more than SKINNY_ROWS rows
SKINNY_TILE = Tile(16, 64, 16, 2, 2)  # 256 threads, batches of at most SKINNY_ROWS rows
SKINNY_ROWS = 32
SMALL_BATCH_ROWS = 32  # batches of at most this many rows: one launch (small_batch_kernel)
SMALL_GROUP_ROWS = 4  # rows per block of small_batch_kernel, a power of two; a smaller batch, fewer
SMALL_COLUMNS = 8  # hidden units per thread in small_batch_kernel's X @ W1
SMALL_SLICES = 8  # blocks per group of rows in small_batch_kernel, each 1 / SMALL_SLICES of G
SMALL_WEIGHT_BYTES = 1 << 21  # larger W1: every block reading all of it costs more than launches
DEEPFOOL_ELEMENTS = 1 << 26  # DeepFool batch rows: its (rows * C, d + H) Jacobians and slopes
BLOCKS_PER_MULTIPROCESSOR = 2  # split-K aims at this many product blocks per SM
MIN_SPLIT_STEPS = 2  # depth steps per split, at least
REGISTER_CAP = {4: 128}  # float32 products: two 256-thread blocks per multiprocessor


class Workspace:
    """Device scratch buffers, grown on demand and reused across calls.

    Use one workspace per stream: kernels queued on two streams at once would share buffers.
    """

    def __init__(self) -> None:
        self._buffers: dict = {}
        self._views: dict = {}

    def array(self, name: str, shape: tuple[int, ...], dtype):
        """A C-contiguous device array of ``shape`` and ``dtype``; contents undefined.

        A later call with the same ``name`` and dtype may return the same memory.
        """
        dtype = np.dtype(dtype)
        view = self._views.get((name, shape, dtype))
        if view is None:
            size = math.prod(shape)
            buffer = self._buffers.get((name, dtype))
            if buffer is None or buffer.size < size:
                buffer = cuda.device_array(max(size, 1), dtype=dtype)
                self._buffers[name, dtype] = buffer
                self._views = {k: v for k, v in self._views.items() if k[::2] != (name, dtype)}
            view = buffer[:size].reshape(shape)
            self._views[name, shape, dtype] = view
        return view


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _multiprocessors() -> int:
    return getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 1)


def _tile(n_rows: int) -> Tile:
    return SKINNY_TILE if n_rows <= SKINNY_ROWS else WIDE_TILE


def _split_depth(n_rows: int, n_cols: int, depth: int, tile: Tile) -> tuple[int, int]:
    """Number of splits of the shared dimension and the depth of each (a multiple of tile.depth).

    Splits only when the output tiles alone leave multiprocessors idle.
    """
    tiles = _ceil_div(n_rows, tile.rows) * _ceil_div(n_cols, tile.cols)
    wanted = BLOCKS_PER_MULTIPROCESSOR * _multiprocessors() // tiles
    splits = max(1, min(wanted, depth // (tile.depth * MIN_SPLIT_STEPS)))
    split_depth = _ceil_div(_ceil_div(depth, splits), tile.depth) * tile.depth
    return _ceil_div(depth, split_depth), split_depth


def _gemm(A, B, b_transposed, n_rows, splits, split_depth, X, eps, x_min, x_max, sign, out, stream):
    """Queue ``gemm_kernel`` over the tiles of the (n_rows, M) product and its splits."""
    tile = _tile(n_rows)
    n_cols = B.shape[0] if b_transposed else B.shape[1]
    grid = (_ceil_div(n_cols, tile.cols), _ceil_div(n_rows, tile.rows), splits)
    kernel = gemm_kernel(tile, b_transposed, REGISTER_CAP.get(A.dtype.itemsize))
    launch(
        kernel,
        grid,
        tile.threads,
        stream,
        A,
        B,
        n_rows,
        split_depth,
        X,
        eps,
        x_min,
        x_max,
        sign,
        out,
    )


def _hidden_product(X, W1, workspace, stream):
    """Queue ``X @ W1`` into the workspace's Z1 ``(splits * N, H)``, the split partial sums
    (the depth is split only when the output tiles alone leave multiprocessors idle)."""
    n_rows, depth = X.shape
    n_hidden = W1.shape[1]
    splits, split_depth = _split_depth(n_rows, n_hidden, depth, _tile(n_rows))
    Z1 = workspace.array("Z1", (splits * n_rows, n_hidden), X.dtype)
    _gemm(X, W1, False, n_rows, splits, split_depth, X, 0.0, 0.0, 0.0, False, Z1, stream)
    return Z1


def _row_blocks(n_rows: int, n_classes: int) -> tuple[int, int, int, int]:
    """(blocks, threads per block, rows per block, threads per logit) of a per-row kernel
    (``rows_kernel``, ``logit_rows_kernel``): ``THREADS_PER_BLOCK`` threads, rows spread over
    the multiprocessors."""
    threads = THREADS_PER_BLOCK
    if threads & (threads - 1):
        raise ValueError(f"THREADS_PER_BLOCK must be a power of two, got {threads}")
    per_block = max(1, min(threads // n_classes, _ceil_div(n_rows, _multiprocessors())))
    pair_threads = _pair_threads(threads, per_block, n_classes)
    return _ceil_div(n_rows, per_block), threads, per_block, pair_threads


def _forward_rows(X, W1, b1, W2, b2, Y, A, Z2, losses, predicted, workspace, stream, delta):
    """Queue the hidden product and the row kernel; returns Z1, the split partial sums of
    ``X @ W1``. With ``delta`` (gradient mode) Z2 gets P - Y and A (None: the first N rows
    of Z1) gets D1; else Z2 gets P and A the activations."""
    Z1 = _hidden_product(X, W1, workspace, stream)
    blocks, threads, per_block, pair_threads = _row_blocks(X.shape[0], W2.shape[1])
    launch(
        rows_kernel(threads),
        blocks,
        threads,
        stream,
        Z1,
        b1,
        W2,
        b2,
        Y,
        per_block,
        pair_threads,
        delta,
        Z1 if A is None else A,
        Z2,
        losses,
        predicted,
    )
    return Z1


def _logit_rows(X, W1, b1, W2, b2, classes, loss, kappa, outputs, workspace, stream):
    """Queue the hidden product and ``logit_rows_kernel``; returns Z1, whose first N rows
    hold the activations, or with ``classes`` D1.

    ``classes``: (labels, targets) device arrays for the margin loss ``loss`` (Z2 then gets
    dL/dz), or None for the logits alone. ``outputs``: (Z2 (N, C), values (N,), predicted
    (N,)), the last two unused without classes (0 rows allowed).
    """
    Z1 = _hidden_product(X, W1, workspace, stream)
    blocks, threads, per_block, pair_threads = _row_blocks(X.shape[0], W2.shape[1])
    gradient = classes is not None
    if not gradient:
        no_classes = workspace.array("no_classes", (0,), np.int64)
        classes = (no_classes, no_classes)
    Z2, values, predicted = outputs
    launch(
        logit_rows_kernel(threads),
        blocks,
        threads,
        stream,
        Z1,
        b1,
        W2,
        b2,
        *classes,
        int(loss),
        float(kappa),
        gradient,
        per_block,
        pair_threads,
        Z1,
        Z2,
        values,
        predicted,
    )
    return Z1


def _pair_threads(threads: int, rows: int, n_classes: int) -> int:
    """Threads per (row, class) logit when a block of ``threads`` takes ``rows`` rows."""
    return 1 << (max(1, threads // (rows * n_classes)).bit_length() - 1)


def _gradient(
    X, W1, b1, W2, b2, Y, eps, x_min, x_max, sign, predicted, out, workspace, stream, losses=None
):
    """Queue ``G = dJ/dX`` into out, or the L-inf step from it with ``sign``; the rows'
    cross-entropy into ``losses`` (N,) when given.

    One launch (``small_batch_kernel``) for a batch of at most ``SMALL_BATCH_ROWS`` rows whose
    W1 is at most ``SMALL_WEIGHT_BYTES``; else three: the hidden product, ``rows_kernel`` and
    the back-product with the step in its epilogue. out must not overlap X.
    """
    n_rows, depth = X.shape
    n_hidden, n_classes = W2.shape
    eps, x_min, x_max = float(eps), float(x_min), float(x_max)
    if losses is None:
        losses = workspace.array("losses", (n_rows,), X.dtype)
    if n_rows > SMALL_BATCH_ROWS or W1.size * W1.dtype.itemsize > SMALL_WEIGHT_BYTES:
        Z2 = workspace.array("Z2", (n_rows, n_classes), X.dtype)
        net = (X, W1, b1, W2, b2, Y)
        D1 = _forward_rows(*net, None, Z2, losses, predicted, workspace, stream, True)
        _gemm(D1, W1, True, n_rows, 1, n_hidden, X, eps, x_min, x_max, sign, out, stream)
        return
    threads = THREADS_PER_BLOCK
    group = 1 << (min(n_rows, SMALL_GROUP_ROWS) - 1).bit_length()  # 1, 2, 4, ...
    # a slice narrower than an eighth of a block leaves most of it idle in the back-product
    slices = max(1, min(SMALL_SLICES, depth * 8 // threads))
    A = workspace.array("small_A", (slices * n_rows, n_hidden), X.dtype)
    Z2 = workspace.array("Z2", (slices * n_rows, n_classes), X.dtype)
    launch(
        small_batch_kernel(threads, group, SMALL_COLUMNS),
        (slices, _ceil_div(n_rows, group), 1),
        threads,
        stream,
        X,
        W1,
        b1,
        W2,
        b2,
        Y,
        _pair_threads(threads, SMALL_GROUP_ROWS, n_classes),  # not by batch: same sums
        eps,
        x_min,
        x_max,
        sign,
        A,
        Z2,
        losses,
        predicted,
        out,
    )


def _overlap(a, b) -> bool:
    """Whether two non-empty device arrays share any byte."""
    (a_low, a_high), (b_low, b_high) = address_range(a), address_range(b)
    return a_low < b_high and b_low < a_high


def input_gradient_into(X, W1, b1, W2, b2, Y, G, predicted, *, stream=0, workspace=None):
    """dJ/dX of the per-sample cross-entropy, for every row.

    One launch for a batch of at most ``SMALL_BATCH_ROWS`` rows and a small W1
    (``small_batch_kernel``), else three (the hidden product, ``rows_kernel``, the
    back-product); G may overlap X (then it is written by a copy from scratch).

    Parameters
    ----------
    X : (N, d) float32 or float64 device array
    W1, b1, W2, b2 : the network, device arrays of X's dtype
    Y : (N, C) device array of X's dtype, one-hot or soft labels; or 0 rows for the predictions
    G : (N, d) device array of X's dtype, output: ((P - Y) W2^T * A * (1 - A)) W1^T
    predicted : (N,) int64 device array, output: the model's predicted class of each row
    stream : numba stream the kernels are queued on (default: the default stream)
    workspace : Workspace for scratch buffers; None allocates fresh ones
    """
    X, W1, b1, W2, b2, Y, G, predicted = map(as_device, (X, W1, b1, W2, b2, Y, G, predicted))
    if X.shape[0] == 0:
        return
    workspace = Workspace() if workspace is None else workspace
    out = workspace.array("G", X.shape, X.dtype) if _overlap(X, G) else G
    _gradient(X, W1, b1, W2, b2, Y, 0.0, 0.0, 0.0, False, predicted, out, workspace, stream)
    if out is not G:
        G.copy_to_device(out, stream=stream)


def loss_gradient_into(
    X,
    W1,
    b1,
    W2,
    b2,
    labels,
    targets,
    loss,
    kappa,
    G,
    values,
    predicted,
    *,
    stream=0,
    workspace=None,
):
    """The input gradient of a per-row loss of the logits, for every row
    (``cpu.loss_gradient_into``).

    ``LOSS_CE`` runs ``input_gradient_into``'s kernels on the one-hot labels
    (``one_hot_rows``), so its G is bitwise that one's. The margin losses take three
    launches: the hidden product, ``logit_rows_kernel`` (logits, ``margin_loss_row`` per
    row, D1) and the back-product. G may overlap X (then it is written by a copy from
    scratch).

    Parameters
    ----------
    X : (N, d) float32 or float64 device array
    W1, b1, W2, b2 : the network, device arrays of X's dtype
    labels : (N,) int64 device array, the true classes, in [0, C)
    targets : (N,) int64 device array, the target classes, in [0, C); 0 rows for none
    loss : int, ``cpu.LOSS_CE``, ``LOSS_DLR`` (C >= 3), ``LOSS_DLR_TARGETED`` (C >= 4),
        ``LOSS_CW`` or ``LOSS_LOGIT_DIFFERENCE``
    kappa : float, the confidence of ``LOSS_CW``
    G : (N, d) device array of X's dtype, output: d(loss)/dX per row
    values : (N,) device array of X's dtype, output: the loss of each row
    predicted : (N,) int64 device array, output: argmax of the logits of each row
    stream : numba stream the kernels are queued on (default: the default stream)
    workspace : Workspace for scratch buffers; None allocates fresh ones
    """
    arrays = map(as_device, (X, W1, b1, W2, b2, labels, targets, G, values, predicted))
    X, W1, b1, W2, b2, labels, targets, G, values, predicted = arrays
    n_rows = X.shape[0]
    if n_rows == 0:
        return
    workspace = Workspace() if workspace is None else workspace
    out = workspace.array("G", X.shape, X.dtype) if _overlap(X, G) else G
    n_hidden, n_classes = W2.shape
    if loss == LOSS_CE:
        Y = workspace.array("loss_Y", (n_rows, n_classes), X.dtype)
        launch(one_hot_rows, _flat_grid(Y.size), THREADS_PER_BLOCK, stream, labels, Y)
        network = (X, W1, b1, W2, b2, Y)
        _gradient(*network, 0.0, 0.0, 0.0, False, predicted, out, workspace, stream, values)
    else:
        Z2 = workspace.array("Z2", (n_rows, n_classes), X.dtype)
        outputs = (Z2, values, predicted)
        classes = (labels, targets)
        D1 = _logit_rows(X, W1, b1, W2, b2, classes, loss, kappa, outputs, workspace, stream)
        _gemm(D1, W1, True, n_rows, 1, n_hidden, X, 0.0, 0.0, 0.0, False, out, stream)
    if out is not G:
        G.copy_to_device(out, stream=stream)


def logits_into(X, W1, b1, W2, b2, Z, *, stream=0, workspace=None):
    """The logits of every row (``cpu.logits_into``): the hidden product and
    ``logit_rows_kernel``, the logits that ``loss_gradient_into``'s margin losses take.

    Parameters
    ----------
    X : (N, d) float32 or float64 device array
    W1, b1, W2, b2 : the network, device arrays of X's dtype
    Z : (N, C) device array of X's dtype, output: A @ W2 + b2
    stream : numba stream the kernels are queued on (default: the default stream)
    workspace : Workspace for scratch buffers; None allocates fresh ones
    """
    X, W1, b1, W2, b2, Z = map(as_device, (X, W1, b1, W2, b2, Z))
    if X.shape[0] == 0:
        return
    workspace = Workspace() if workspace is None else workspace
    unused = workspace.array("no_values", (0,), X.dtype)
    no_classes = workspace.array("no_classes", (0,), np.int64)
    outputs = (Z, unused, no_classes)
    _logit_rows(X, W1, b1, W2, b2, None, 0, 0.0, outputs, workspace, stream)


def fgm_step_into(
    X, W1, b1, W2, b2, Y, eps, p, x_min, x_max, X_adv, predicted, q=1, *, stream=0, workspace=None
):
    """One fast-gradient step of norm p on every row.

    The L-inf step is fused into the gradient's last kernel: one launch for a batch of at most
    ``SMALL_BATCH_ROWS`` rows and a small W1, else three (see ``input_gradient_into``). The L2
    and L1 steps, and any step whose X_adv overlaps X, take one launch more
    (``fgm_from_gradient_into``).

    Parameters
    ----------
    X : (N, d) float32 or float64 device array
    W1, b1, W2, b2 : the network, device arrays of X's dtype
    Y : (N, C) device array of X's dtype, labels; or 0 rows to use the predictions
    eps : float, step length; negative to descend the loss (targeted attacks)
    p : float, np.inf (sign of G), 2.0 (G / ||G||_2) or 1.0 (sign(G) / q on the q
        coordinates of largest |G|, ``cpu.step_row``)
    x_min, x_max : float, the clip range
    X_adv : (N, d) device array of X's dtype, output: clip(X + eps * direction(G), x_min, x_max);
        a row whose gradient is zero is only clipped. It may be X itself.
    predicted : (N,) int64 device array, output: the model's predicted class of each clean row
    q : int, the coordinates an L1 step moves (default 1: the steepest L1 step)
    stream : numba stream the kernels are queued on (default: the default stream)
    workspace : Workspace for scratch buffers; None allocates fresh ones
    """
    X, W1, b1, W2, b2, Y, X_adv, predicted = map(
        as_device, (X, W1, b1, W2, b2, Y, X_adv, predicted)
    )
    n_rows = X.shape[0]
    if n_rows == 0:
        return
    workspace = Workspace() if workspace is None else workspace
    net = (X, W1, b1, W2, b2, Y)
    overlap = _overlap(X, X_adv)
    if p == np.inf and not overlap:
        _gradient(*net, eps, x_min, x_max, True, predicted, X_adv, workspace, stream)
        return
    G = workspace.array("G", X.shape, X.dtype) if overlap else X_adv
    _gradient(*net, 0.0, 0.0, 0.0, False, predicted, G, workspace, stream)
    fgm_from_gradient_into(X, G, eps, p, x_min, x_max, X_adv, q, stream=stream, workspace=workspace)


def fgm_from_gradient_into(X, G, eps, p, x_min, x_max, X_adv, q=1, *, stream=0, workspace=None):
    """One fast-gradient step of norm p on every row, from a gradient computed before.

    Given the G of ``input_gradient_into`` on the same rows, ``fgm_step_into`` gives bitwise
    the same X_adv; this one lets several eps (or norms) share one gradient. One launch:
    ``sign_step_rows`` for p = inf, ``norm_step_kernel`` for p = 2 or 1.

    Parameters
    ----------
    X : (N, d) float32 or float64 device array
    G : (N, d) device array of X's dtype, the loss gradient
    eps : float, step length; negative to descend the loss (targeted attacks)
    p : float, np.inf, 2.0 or 1.0
    x_min, x_max : float, the clip range
    X_adv : (N, d) device array of X's dtype, output: clip(X + eps * direction(G), x_min,
        x_max); it may be G or X itself
    q : int, the coordinates an L1 step moves (default 1: the steepest L1 step)
    stream : numba stream the kernels are queued on (default: the default stream)
    workspace : Workspace for the L1 step's scratch rows; None allocates fresh ones
    """
    X, G, X_adv = map(as_device, (X, G, X_adv))
    if X.shape[0] == 0:
        return
    eps, x_min, x_max = float(eps), float(x_min), float(x_max)
    threads = THREADS_PER_BLOCK
    if p == np.inf:
        launch(sign_step_rows, _flat_grid(X.size), threads, stream, X, G, eps, x_min, x_max, X_adv)
        return
    blocks, row_threads = _row_grid(X.shape[0])
    kernel = norm_step_kernel(threads, row_threads)
    scratch = _l1_scratch(X, p, Workspace() if workspace is None else workspace)
    options = (eps, float(p), int(q), scratch, x_min, x_max)
    launch(kernel, blocks, threads, stream, X, G, *options, X_adv)


def _l1_scratch(X, p, workspace):
    """The scratch rows of the L1 steps' selection: (N, d) of X's dtype for p = 1, else
    (0, d)."""
    shape = (X.shape[0] if p == 1.0 else 0, X.shape[1])
    return workspace.array("l1_scratch", shape, X.dtype)


def forward_into(X, W1, b1, W2, b2, Y, A, P, losses, predicted, *, stream=0, workspace=None):
    """Forward pass of every row (two launches).

    Parameters
    ----------
    X : (N, d) float32 or float64 device array
    W1, b1, W2, b2 : the network, device arrays of X's dtype
    Y : (N, C) device array of X's dtype, labels for the loss; or 0 rows for the predictions
    A : (N, H) device array of X's dtype, output: hidden activations sigmoid(X W1 + b1)
    P : (N, C) device array of X's dtype, output: probabilities softmax(A W2 + b2)
    losses : (N,) device array of X's dtype, output: logsumexp(Z2) - sum_k Y_k Z2_k per row
    predicted : (N,) int64 device array, output: argmax of the logits Z2 per row
    stream : numba stream the kernels are queued on (default: the default stream)
    workspace : Workspace for scratch buffers; None allocates fresh ones
    """
    arrays = map(as_device, (X, W1, b1, W2, b2, Y, A, P, losses, predicted))
    X, W1, b1, W2, b2, Y, A, P, losses, predicted = arrays
    if X.shape[0] == 0:
        return
    workspace = Workspace() if workspace is None else workspace
    _forward_rows(X, W1, b1, W2, b2, Y, A, P, losses, predicted, workspace, stream, False)


def parameter_gradient_into(
    X,
    W1,
    b1,
    W2,
    b2,
    Y,
    clean_weight,
    adv_weight,
    eps,
    x_min,
    x_max,
    dW1,
    db1,
    dW2,
    db2,
    *,
    stream=0,
    workspace=None,
):
    """Gradients of the (adversarial) training loss with respect to W1, b1, W2, b2, added in.

    The twin of ``cpu.parameter_gradient_into``: the loss is ``clean_weight * sum_n J(X_n,
    Y_n) + adv_weight * sum_n J(X'_n, Y_n)``, X' = clip(X + eps * sign(dJ/dX), x_min, x_max)
    held fixed; ``adv_weight = 0`` skips the adversarial pass. A pass is the hidden product
    and ``rows_kernel`` (D1 and P - Y), ``hidden_activations``, four launches of
    ``add_weighted_products`` (X^T D1, A^T (P - Y) and the two column sums); the clean pass
    of an adversarial gradient also takes the back-product with the FGSM step in its
    epilogue, into a scratch X'.

    Parameters
    ----------
    X : (N, d) float32 or float64 device array
    W1, b1, W2, b2 : the network, device arrays of X's dtype
    Y : (N, C) device array of X's dtype, one-hot or soft labels; or 0 rows for the
        predictions
    clean_weight, adv_weight : float, weights of the clean and the adversarial loss
    eps : float, L-inf radius of the adversarial rows
    x_min, x_max : float, their clip range
    dW1 (d, H), db1 (H,), dW2 (H, C), db2 (C,) : device arrays of X's dtype; the gradients
        are *added* to them
    stream : numba stream the kernels are queued on (default: the default stream)
    workspace : Workspace for scratch buffers; None allocates fresh ones
    """
    arrays = map(as_device, (X, W1, b1, W2, b2, Y, dW1, db1, dW2, db2))
    X, W1, b1, W2, b2, Y, dW1, db1, dW2, db2 = arrays
    if X.shape[0] == 0:
        return
    workspace = Workspace() if workspace is None else workspace
    network, gradient = (W1, b1, W2, b2), (dW1, db1, dW2, db2)
    step = (float(eps), float(x_min), float(x_max))
    X_adv = workspace.array("train_X_adv", X.shape, X.dtype) if adv_weight != 0.0 else None
    scratch = (gradient, workspace, stream)
    _parameter_pass(X, *network, Y, float(clean_weight), step, X_adv, *scratch)
    if X_adv is not None:
        _parameter_pass(X_adv, *network, Y, float(adv_weight), step, None, *scratch)


def _parameter_pass(X, W1, b1, W2, b2, Y, weight, step, X_adv, gradient, workspace, stream):
    """Queue the addition of ``weight`` times the parameter gradients of the rows' summed
    loss to ``gradient`` (dW1, db1, dW2, db2); with ``X_adv``, also the FGSM step of the rows,
    ``step`` = (eps, x_min, x_max), into it."""
    n_rows = X.shape[0]
    n_hidden, n_classes = W2.shape
    threads = THREADS_PER_BLOCK
    losses = workspace.array("losses", (n_rows,), X.dtype)
    predicted = workspace.array("train_predicted", (n_rows,), np.int64)
    D2 = workspace.array("Z2", (n_rows, n_classes), X.dtype)
    D1 = workspace.array("train_D1", (n_rows, n_hidden), X.dtype)
    Z1 = _forward_rows(X, W1, b1, W2, b2, Y, D1, D2, losses, predicted, workspace, stream, True)
    A = workspace.array("train_A", (n_rows, n_hidden), X.dtype)
    launch(hidden_activations, _flat_grid(A.size), threads, stream, Z1, b1, A)
    if X_adv is not None:
        _gemm(D1, W1, True, n_rows, 1, n_hidden, X, *step, True, X_adv, stream)
    dW1, db1, dW2, db2 = gradient
    for left, right, use_left, out in (
        (X, D1, True, dW1),
        (D1, D1, False, db1.reshape(1, n_hidden)),
        (A, D2, True, dW2),
        (D2, D2, False, db2.reshape(1, n_classes)),
    ):
        grid = _flat_grid(out.size)
        launch(add_weighted_products, grid, threads, stream, left, right, weight, use_left, out)


def iterate_start_into(X, X_start, eps, p, decay, x_min, x_max, X_adv, momentum, *, stream=0):
    """The first iterate of ``iterate_steps_into`` (``cpu.iterate_start_into``): X_start
    projected into the eps-ball of norm p around X and into [x_min, x_max], and a zero
    momentum. One launch of ``iterate_step_kernel``.

    Parameters
    ----------
    X : (N, d) float32 or float64 device array, the clean rows (centres of the balls)
    X_start : (N, d) device array of X's dtype (X for BIM, a random point of the ball for PGD)
    eps : (N,) float64 device array, radius per row
    p : float, np.inf, 2.0 or 1.0
    decay : float, momentum decay; 0 for plain BIM/PGD
    x_min, x_max : float, the clip range
    X_adv : (N, d) device array of X's dtype, output: the first iterate; may be X_start itself
    momentum : (N, d) device array of X's dtype, output: zeros when decay > 0; unused (0 rows
        allowed) otherwise
    stream : numba stream the kernel is queued on (default: the default stream)
    """
    X, X_start, eps, X_adv, momentum = map(as_device, (X, X_start, eps, X_adv, momentum))
    n_rows = X.shape[0]
    if n_rows == 0:
        return
    blocks, row_threads = _row_grid(n_rows)
    kernel = iterate_step_kernel(THREADS_PER_BLOCK, row_threads)
    # without a step the kernel reads neither the gradient nor the step length: X_start
    # and eps stand in for them
    options = (eps, eps, float(p), 1, X[:0], float(decay), float(x_min), float(x_max))
    launch(
        kernel,
        blocks,
        THREADS_PER_BLOCK,
        stream,
        X,
        X_start,
        X_start,
        momentum,
        *options,
        False,
        X_adv,
    )


def iterate_steps_into(
    X,
    W1,
    b1,
    W2,
    b2,
    Y,
    eps,
    alpha,
    steps,
    p,
    decay,
    x_min,
    x_max,
    X_adv,
    momentum,
    q=1,
    *,
    stream=0,
    workspace=None,
):
    """``steps`` more steps of the iterative attack from the iterate X_adv and momentum
    (``cpu.iterate_steps_into``): ``iterate_start_into`` then this with s_1, s_2, ... steps
    queues exactly the launches of ``iterate_into`` with s_1 + s_2 + ... steps.

    Parameters
    ----------
    X, W1, b1, W2, b2, Y, eps, alpha, p, decay, x_min, x_max : as in ``iterate_into``
    steps : int, the steps of this slice
    X_adv : (N, d) device array of X's dtype, the iterate; updated
    momentum : (N, d) device array of X's dtype, the MI-FGSM momentum when decay > 0;
        updated. Unused (0 rows allowed) otherwise
    q : int, the coordinates an L1 step moves, as in ``iterate_into``
    stream : numba stream the kernels are queued on (default: the default stream)
    workspace : Workspace for scratch buffers; None allocates fresh ones
    """
    arrays = map(as_device, (X, W1, b1, W2, b2, Y, eps, alpha, X_adv, momentum))
    X, W1, b1, W2, b2, Y, eps, alpha, X_adv, momentum = arrays
    n_rows = X.shape[0]
    if n_rows == 0:
        return
    workspace = Workspace() if workspace is None else workspace
    predicted = workspace.array("iterate_predicted", (n_rows,), np.int64)
    G = workspace.array("iterate_G", X.shape, X.dtype)
    blocks, row_threads = _row_grid(n_rows)
    kernel = iterate_step_kernel(THREADS_PER_BLOCK, row_threads)
    scratch = _l1_scratch(X, p, workspace)
    options = (eps, alpha, float(p), int(q), scratch, float(decay), float(x_min), float(x_max))
    for _ in range(steps):
        _gradient(X_adv, W1, b1, W2, b2, Y, 0.0, 0.0, 0.0, False, predicted, G, workspace, stream)
        launch(
            kernel, blocks, THREADS_PER_BLOCK, stream, X, X_adv, G, momentum, *options, True, X_adv
        )


def iterate_into(
    X,
    W1,
    b1,
    W2,
    b2,
    Y,
    X_start,
    eps,
    alpha,
    steps,
    p,
    decay,
    x_min,
    x_max,
    X_adv,
    q=1,
    *,
    stream=0,
    workspace=None,
):
    """Iterative fast-gradient attack (BIM, PGD, MI-FGSM) on every row, all on the device.

    From X_start projected into the ball, ``steps`` times: G = dJ/dX at the iterate (with
    ``decay > 0``, the direction is the MI-FGSM momentum of G / ||G||_1 instead), a step of
    length alpha in norm p, then the projection back into the eps-ball around X (L1: the
    exact Euclidean projection) and into [x_min, x_max]; as ``cpu.iterate_into``. Each step
    is the gradient (one launch, or three for more than ``SMALL_BATCH_ROWS`` rows; see
    ``input_gradient_into``) and ``iterate_step_kernel``; nothing is copied between the host
    and the device. ``iterate_start_into`` and ``iterate_steps_into`` queue the same in
    slices of steps.

    Parameters
    ----------
    X : (N, d) float32 or float64 device array, the clean rows (centres of the balls)
    W1, b1, W2, b2 : the network, device arrays of X's dtype
    Y : (N, C) device array of X's dtype, labels held fixed over the steps; or 0 rows to
        use the predictions at each iterate
    X_start : (N, d) device array of X's dtype, the first iterate (X for BIM, a random point
        of the ball for PGD)
    eps : (N,) float64 device array, radius per row
    alpha : (N,) float64 device array, step length per row; negative to descend (targeted)
    steps : int
    p : float, np.inf, 2.0 or 1.0
    decay : float, momentum decay; 0 for plain BIM/PGD
    x_min, x_max : float, the clip range
    X_adv : (N, d) device array of X's dtype, output; may be X_start itself
    q : int, the coordinates an L1 step moves (``cpu.iterate_into``; default 1)
    stream : numba stream the kernels are queued on (default: the default stream)
    workspace : Workspace for scratch buffers; None allocates fresh ones
    """
    X = as_device(X)
    workspace = Workspace() if workspace is None else workspace
    shape = (X.shape[0] if decay > 0.0 else 0, X.shape[1])
    momentum = workspace.array("iterate_momentum", shape, X.dtype)
    iterate_start_into(X, X_start, eps, p, decay, x_min, x_max, X_adv, momentum, stream=stream)
    iterate_steps_into(
        *(X, W1, b1, W2, b2, Y, eps, alpha, steps, p, decay, x_min, x_max, X_adv, momentum, q),
        stream=stream,
        workspace=workspace,
    )


def deepfool_into(
    X,
    W1,
    b1,
    W2,
    b2,
    p,
    overshoot,
    max_iter,
    x_min,
    x_max,
    X_adv,
    iterations,
    *,
    stream=0,
    workspace=None,
):
    """DeepFool (Moosavi-Dezfooli et al. 2016), multi-class, for every row (``cpu.deepfool_into``).

    Each iteration linearises all C logits at the iterate, moves to the nearest linearised
    class boundary in norm p (2.0, or np.inf with the L1 dual norm and a sign step), and
    stops when the predicted class changes or after ``max_iter`` iterations; the accumulated
    perturbation is scaled by 1 + overshoot. An iteration works on the rows still moving
    only: ``X @ W1`` (``gemm_kernel``), ``hidden_slopes``, the logits ``A @ W2`` and all
    their gradients ``J = S @ W1^T`` (two more products, J is (rows * C, d)), then
    ``deepfool_step_kernel``; the rows still moving are read back (a synchronisation per
    iteration). Rows go through in batches of at most ``DEEPFOOL_ELEMENTS / (C (d + H))``.

    Parameters
    ----------
    X : (N, d) float32 or float64 device array
    W1, b1, W2, b2 : the network, device arrays of X's dtype
    p : float, 2.0 or np.inf
    overshoot : float, e.g. 0.02
    max_iter : int
    x_min, x_max : float, the clip range
    X_adv : (N, d) device array of X's dtype, output
    iterations : (N,) int64 device array, output: iterations used per row (max_iter when it
        failed)
    stream : numba stream the kernels are queued on (default: the default stream)
    workspace : Workspace for scratch buffers; None allocates fresh ones
    """
    X, W1, b1, W2, b2, X_adv, iterations = map(as_device, (X, W1, b1, W2, b2, X_adv, iterations))
    n_rows, depth = X.shape
    n_hidden, n_classes = W2.shape
    workspace = Workspace() if workspace is None else workspace
    batch = max(1, DEEPFOOL_ELEMENTS // (n_classes * (depth + n_hidden)))
    options = (float(p), float(overshoot), float(x_min), float(x_max))
    for start in range(0, n_rows, batch):
        stop = min(start + batch, n_rows)
        part = (X[start:stop], X_adv[start:stop], iterations[start:stop])
        _deepfool_batch(*part, W1, b1, W2, b2, options, int(max_iter), workspace, stream)


def _deepfool_batch(X, X_adv, iterations, W1, b1, W2, b2, options, max_iter, workspace, stream):
    """DeepFool on the rows of X; each iteration works on the rows still moving only."""
    n_rows, depth = X.shape
    n_hidden, n_classes = W2.shape
    threads = THREADS_PER_BLOCK
    total = workspace.array("deepfool_total", X.shape, np.float64)
    original = workspace.array("deepfool_original", (n_rows,), np.int64)
    active = workspace.array("deepfool_active", (n_rows,), np.uint8)
    launch(deepfool_start, _flat_grid(X.size), threads, stream, X, total, X_adv, iterations)
    moving = np.arange(n_rows, dtype=np.int64)
    uploaded = 0  # length of the row list on the device; it only ever shrinks
    for iteration in range(max_iter):
        count = len(moving)
        rows = workspace.array("deepfool_rows", (count,), np.int64)
        if count != uploaded:
            rows.copy_to_device(moving, stream=stream)
            uploaded = count
        X_work = workspace.array("deepfool_X", (count, depth), X.dtype)
        launch(gather_rows, _flat_grid(X_work.size), threads, stream, X_adv, rows, X_work)
        splits, split_depth = _split_depth(count, n_hidden, depth, _tile(count))
        Z1 = workspace.array("Z1", (splits * count, n_hidden), X.dtype)
        _gemm(
            X_work, W1, False, count, splits, split_depth, X_work, 0.0, 0.0, 0.0, False, Z1, stream
        )
        S = workspace.array("deepfool_S", (count * n_classes, n_hidden), X.dtype)
        grid = _flat_grid(count * n_hidden)
        launch(hidden_slopes, grid, threads, stream, Z1, b1, W2, count, S)
        Z = workspace.array("deepfool_Z", (count, n_classes), X.dtype)
        _gemm(Z1, W2, False, count, 1, n_hidden, Z, 0.0, 0.0, 0.0, False, Z, stream)
        J = workspace.array("deepfool_J", (count * n_classes, depth), X.dtype)
        _gemm(S, W1, True, count * n_classes, 1, n_hidden, J, 0.0, 0.0, 0.0, False, J, stream)
        blocks, row_threads = _row_grid(count)
        state = (original, total, active, iterations, X_adv)
        step = deepfool_step_kernel(threads, row_threads)
        launch(step, blocks, threads, stream, X, rows, Z, b2, J, *options, iteration == 0, *state)
        moved = active.copy_to_host(stream=stream)
        if not isinstance(stream, int):
            stream.synchronize()  # the copy was only queued
        moving = np.flatnonzero(moved)
        if not len(moving):
            break


def _row_grid(n_rows: int) -> tuple[int, int]:
    """Blocks and threads per row of a row kernel (``THREADS_PER_BLOCK`` threads a block)."""
    row_threads = min(THREADS_PER_BLOCK, ROW_THREADS)
    rows_per_block = THREADS_PER_BLOCK // row_threads
    return min(_ceil_div(n_rows, rows_per_block), 32 * _multiprocessors()), row_threads


def _flat_grid(size: int) -> int:
    """Blocks of a grid-stride kernel over ``size`` elements."""
    return max(1, min(_ceil_div(size, THREADS_PER_BLOCK), 32 * _multiprocessors()))


def _like(shape, X, stream, dtype=None):
    return cuda.device_array(shape, dtype=X.dtype if dtype is None else dtype, stream=stream)


def input_gradient(X, W1, b1, W2, b2, Y, *, stream=0):
    """dJ/dX (N, d) device array of X's dtype; see ``input_gradient_into``."""
    X = as_device(X)
    G = _like(X.shape, X, stream)
    predicted = _like(X.shape[0], X, stream, np.int64)
    input_gradient_into(X, W1, b1, W2, b2, Y, G, predicted, stream=stream)
    return G


def fgm_step(X, W1, b1, W2, b2, Y, eps, p, x_min, x_max, q=1, *, stream=0):
    """X_adv = clip(X + eps * direction_p(dJ/dX), x_min, x_max) as a new device array (q:
    the coordinates an L1 step moves, as in ``fgm_step_into``)."""
    X = as_device(X)
    X_adv = _like(X.shape, X, stream)
    predicted = _like(X.shape[0], X, stream, np.int64)
    fgm_step_into(X, W1, b1, W2, b2, Y, eps, p, x_min, x_max, X_adv, predicted, q, stream=stream)
    return X_adv


def fgsm_step(X, W1, b1, W2, b2, Y, eps, x_min, x_max, *, stream=0):
    """FGSM: X_adv = clip(X + eps * sign(dJ/dX), x_min, x_max) as a new device array.

    Parameters
    ----------
    X : (N, d) float32 or float64 device array
    W1, b1, W2, b2 : the network, device arrays of X's dtype
    Y : (N, C) device array of X's dtype, one-hot or soft labels; or 0 rows for the predictions
    eps : float, L-inf step; negative to descend the loss
    x_min, x_max : float, the clip range

    Returns
    -------
    X_adv : (N, d) device array of X's dtype
    """
    return fgm_step(X, W1, b1, W2, b2, Y, eps, np.inf, x_min, x_max, stream=stream)


def forward(X, W1, b1, W2, b2, *, stream=0):
    """Hidden activations A (N, H), probabilities P (N, C), predictions (N,) int64, on device."""
    X, W2 = as_device(X), as_device(W2)
    n_rows, (n_hidden, n_classes) = X.shape[0], W2.shape
    A = _like((n_rows, n_hidden), X, stream)
    P = _like((n_rows, n_classes), X, stream)
    losses = _like(n_rows, X, stream)
    predicted = _like(n_rows, X, stream, np.int64)
    forward_into(X, W1, b1, W2, b2, P[:0], A, P, losses, predicted, stream=stream)
    return A, P, predicted


def loss_gradient(X, W1, b1, W2, b2, labels, targets, loss, kappa, *, stream=0):
    """G (N, d), values (N,) and predicted (N,) int64, new device arrays; see
    ``loss_gradient_into``."""
    X = as_device(X)
    G = _like(X.shape, X, stream)
    values = _like(X.shape[0], X, stream)
    predicted = _like(X.shape[0], X, stream, np.int64)
    loss_gradient_into(
        *(X, W1, b1, W2, b2, labels, targets, loss, kappa, G, values, predicted), stream=stream
    )
    return G, values, predicted


def logits(X, W1, b1, W2, b2, *, stream=0):
    """Logits Z (N, C), a new device array of X's dtype; see ``logits_into``."""
    X, W2 = as_device(X), as_device(W2)
    Z = _like((X.shape[0], W2.shape[1]), X, stream)
    logits_into(X, W1, b1, W2, b2, Z, stream=stream)
    return Z


def loss(X, W1, b1, W2, b2, Y, *, stream=0):
    """Per-sample cross-entropy J (N,) device array of X (N, d) against Y (N, C), via logsumexp."""
    X, W2 = as_device(X), as_device(W2)
    n_rows, (n_hidden, n_classes) = X.shape[0], W2.shape
    A = _like((n_rows, n_hidden), X, stream)
    P = _like((n_rows, n_classes), X, stream)
    losses = _like(n_rows, X, stream)
    predicted = _like(n_rows, X, stream, np.int64)
    forward_into(X, W1, b1, W2, b2, Y, A, P, losses, predicted, stream=stream)
    return losses
