"""The CUDA backend: ``advgrad.kernels.cuda`` behind the same methods as ``CpuBackend``.

Its methods import numba.cuda when first used, and ``advgrad.backend.get_backend`` imports
this module only when the ``"cuda"`` device is asked for; ``cuda_available`` says whether
that can work here. What both backends share comes from ``advgrad.backend_common`` (this
module never imports ``advgrad.backend``).

Host numpy arrays go in and come out. Each ``CudaBackend`` keeps its own state on the GPU:
the model's weights between calls (one copy per ``Model`` object and dtype, freed with it:
the certified bounds take them in float64), and
``lanes`` CUDA streams with a set of device buffers each (reused across calls). A call's rows
stream through the GPU in chunks over the lanes: while one chunk's kernels run, the next
chunk is copied in and the previous one copied out. The copies are asynchronous where the
host arrays are page-locked (``CudaBackend.empty`` makes such arrays; file jobs read and
write through them); from ordinary memory the driver copies synchronously, and chunks still
overlap one another's kernels. Calls to one backend run one at a time; two backends share
nothing, so they may run at once (from two threads). ``shared_backend`` is one backend for
the calls of a whole process to share.

Training is the exception to streaming: ``parameter_gradient`` sums over its rows into host
arrays of the parameters' shape, and the parameters change at every batch, so each call
copies them (and the gradient it adds to) in and the sums out. The optimiser updates run on
the host (``HostOptimiser``), on the host parameters training keeps.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
import weakref

import numpy as np

from advgrad.backend_common import (
    HostOptimiser,
    bound_rows,
    fab_arguments,
    gradient_work,
    loss_arguments,
    output_rows,
    step_slices,
)
from advgrad.model import Model

DEFAULT_CHUNK_ROWS = 65536  # most rows on the GPU at once, over all lanes
LANES = 3  # chunks in flight: one copied in, one computed, one copied out, each on its stream
MIN_CHUNK_ROWS = 1024  # a call is cut into 2 * lanes chunks, but none smaller than this
SLICE_MULTIPLY_ADDS = 2**37  # iterative attacks: most work queued on the GPU between waits
MAX_SLICE_STEPS = 1024  # and most steps (a small chunk's steps are bound by their launches)
SQUARE_SLICE_ROW_MULTIPLY_ADDS = 2**25  # Square: one row's work between copies of the state


def cuda_available() -> tuple[bool, str]:
    """Whether the CUDA backend can run here, and why not (one line); never raises.

    Returns
    -------
    available : bool
    reason : str, what is missing when not available, else the device's name
    """
    if importlib.util.find_spec("numba_cuda") is None:
        return False, "numba-cuda is not installed (pip install numba-cuda)"
    try:
        from advgrad.kernels import cuda as kernels  # first: it makes numba.cuda importable
    except Exception as error:  # a broken install fails in many ways
        return False, f"numba-cuda cannot be imported: {_one_line(error)}"
    cuda = kernels.cuda
    try:
        if cuda.is_available():
            return True, _device_name(cuda.get_current_device())
        if kernels.internals.device_count() == 0:
            return False, "the CUDA driver sees no GPU"
        return False, "numba-cuda supports none of the GPUs the driver sees"
    except Exception as error:  # CudaSupportError and friends, from the driver
        return False, f"no usable CUDA driver: {_one_line(error)}"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()).rstrip(" :") or type(error).__name__


def _device_name(device) -> str:
    name = getattr(device, "name", "CUDA simulator")
    return name.decode() if isinstance(name, bytes) else str(name)


class CudaBackend(HostOptimiser):
    """Runs the numba.cuda kernels (``advgrad.kernels.cuda``) on the current GPU.

    Parameters
    ----------
    chunk_rows : int
        Most rows on the GPU at once (the lanes' chunks together); larger batches stream
        through.
    lanes : int
        Chunks in flight at once, each on its own CUDA stream with its own device buffers;
        1 runs the chunks one after another, copies and kernels in turn.

    The backend owns its lanes' streams and buffers and its copies of the weights: two
    backends share none of them.
    """

    name = "cuda"

    def __init__(self, chunk_rows: int = DEFAULT_CHUNK_ROWS, lanes: int = LANES) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        self.chunk_rows = int(chunk_rows)
        self.lanes = int(lanes)
        self._lock = threading.Lock()  # calls run one at a time, each over the lanes' streams
        self._lanes: list = []  # (stream, Workspace) per lane, made on first use
        self._weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @staticmethod
    def empty(shape, dtype) -> np.ndarray:
        """A new host array in page-locked memory: the GPU copies to and from it
        asynchronously, at the bus's full speed. Pass such arrays, and ``out=`` arrays,
        to the methods below when the same buffers serve many calls."""
        from advgrad.kernels import cuda as kernels

        return kernels.cuda.pinned_array(shape, dtype)

    def device_weights(self, model: Model, dtype=None) -> tuple:
        """``(W1, b1, W2, b2)`` of ``model`` as device arrays in ``dtype`` (default: the
        model's), uploaded once per model object and dtype and kept while the model lives."""
        dtype = model.dtype if dtype is None else np.dtype(dtype)
        copies = self._weights.setdefault(model, {})
        weights = copies.get(dtype)
        if weights is None:
            from advgrad.kernels import cuda as kernels

            to_device = kernels.cuda.to_device
            network = (model.W1, model.b1, model.W2, model.b2)
            weights = tuple(to_device(np.ascontiguousarray(w, dtype=dtype)) for w in network)
            copies[dtype] = weights
        return weights

    def chunk_rows_for(self, n_rows: int) -> int:
        """Rows per chunk for a call of ``n_rows`` rows: with several lanes, 2 * lanes chunks
        of equal size, fewer where a chunk would have under ``MIN_CHUNK_ROWS`` rows; with
        one lane, one chunk; more wherever a chunk would exceed ``chunk_rows // lanes``."""
        n_chunks = min(2 * self.lanes, n_rows // MIN_CHUNK_ROWS) if self.lanes > 1 else 1
        n_chunks = max(1, n_chunks, -(-n_rows // max(1, self.chunk_rows // self.lanes)))
        return max(1, -(-n_rows // n_chunks))

    def input_gradient(self, model: Model, X: np.ndarray, Y: np.ndarray):
        """G (N, d) and predicted classes (N,) int64; Y (N, C) or 0 rows for predictions."""
        from advgrad.kernels import cuda as kernels

        G = np.empty_like(X)
        predicted = np.empty(X.shape[0], dtype=np.int64)

        def launch(weights, inputs, outputs, stream, workspace):
            X_d, Y_d = inputs
            kernels.input_gradient_into(
                X_d, *weights, Y_d, *outputs, stream=stream, workspace=workspace
            )

        self._stream(model, (X, Y), (G, predicted), launch)
        return G, predicted

    def loss_gradient(self, model: Model, X, labels, loss, *, targets=None, kappa=0.0):
        """G (N, d), values (N,) and predicted (N,) int64 of a per-row attack loss, as
        ``CpuBackend.loss_gradient`` (within rounding; the same refusals), streamed in
        chunks (``kernels.loss_gradient_into``)."""
        from advgrad.kernels import cuda as kernels

        code, labels, targets, kappa = loss_arguments(
            model.n_classes, X.shape[0], loss, labels, targets, kappa
        )
        n_rows = X.shape[0]
        G = np.empty_like(X)
        values = np.empty(n_rows, dtype=X.dtype)
        predicted = np.empty(n_rows, dtype=np.int64)

        def launch(weights, inputs, outputs, stream, workspace):
            X_d, labels_d, targets_d = inputs
            kernels.loss_gradient_into(
                *(X_d, *weights, labels_d, targets_d, code, kappa, *outputs),
                stream=stream,
                workspace=workspace,
            )

        self._stream(model, (X, labels, targets), (G, values, predicted), launch)
        return G, values, predicted

    def logits(self, model: Model, X: np.ndarray) -> np.ndarray:
        """Logits Z (N, C) in X's dtype, A @ W2 + b2, as ``CpuBackend.logits`` (within
        rounding), streamed in chunks (``kernels.logits_into``)."""
        from advgrad.kernels import cuda as kernels

        Z = np.empty((X.shape[0], model.n_classes), dtype=X.dtype)

        def launch(weights, inputs, outputs, stream, workspace):
            kernels.logits_into(*inputs, *weights, *outputs, stream=stream, workspace=workspace)

        self._stream(model, (X,), (Z,), launch)
        return Z

    def fgm_step(self, model: Model, X, Y, eps, p, x_min, x_max, *, out=None, l1_coordinates=1):
        """X_adv (N, d) after one FGM step of norm p, and the clean predictions (N,) int64.

        Every method returning X_adv writes it into ``out`` when given (see ``output_rows``).
        """
        from advgrad.kernels import cuda as kernels

        X_adv = output_rows(X, out)
        predicted = np.empty(X.shape[0], dtype=np.int64)

        def launch(weights, inputs, outputs, stream, workspace):
            X_d, Y_d = inputs
            kernels.fgm_step_into(
                X_d,
                *weights,
                Y_d,
                eps,
                p,
                x_min,
                x_max,
                *outputs,
                l1_coordinates,
                stream=stream,
                workspace=workspace,
            )

        self._stream(model, (X, Y), (X_adv, predicted), launch)
        return X_adv, predicted

    def fgm_from_gradient(self, X, G, eps, p, x_min, x_max, *, out=None, l1_coordinates=1):
        """X_adv (N, d) after one FGM step of norm p along a gradient G (N, d) from
        :meth:`input_gradient`; bitwise what :meth:`fgm_step` gives."""
        from advgrad.kernels import cuda as kernels

        X_adv = output_rows(X, out)

        def launch(weights, inputs, outputs, stream, workspace):
            kernels.fgm_from_gradient_into(
                *(*inputs, eps, p, x_min, x_max, *outputs, l1_coordinates),
                stream=stream,
                workspace=workspace,
            )

        self._stream(None, (X, G), (X_adv,), launch)
        return X_adv

    def iterate(
        self,
        model,
        X,
        Y,
        X_start,
        eps,
        alpha,
        steps,
        p,
        decay,
        x_min,
        x_max,
        *,
        out=None,
        l1_coordinates=1,
    ):
        """Iterative FGM (BIM/PGD/MI-FGSM) from X_start: X_adv (N, d); eps, alpha (N,) float64;
        ``l1_coordinates`` as in ``CpuBackend.iterate``.

        Each chunk of rows is copied to the GPU once and runs every step there, in slices
        (``step_slices``, at most ``MAX_SLICE_STEPS`` steps): the host waits for one slice
        before queuing the next, so that a signal handler acts within a slice and nothing
        long is left queued when it stops the call.
        """
        from advgrad.kernels import cuda as kernels

        X_adv = output_rows(X, out)
        eps, alpha = (np.ascontiguousarray(a, dtype=np.float64) for a in (eps, alpha))
        settings = (p, decay, x_min, x_max)

        def launch(weights, inputs, outputs, stream, workspace):
            X_d, Y_d, X_start_d, eps_d, alpha_d = inputs
            (X_adv_d,) = outputs
            n_rows = X_d.shape[0]
            shape = (n_rows if decay > 0.0 else 0, X_d.shape[1])
            momentum = workspace.array("momentum", shape, X_d.dtype)
            kernels.iterate_start_into(
                X_d, X_start_d, eps_d, p, decay, x_min, x_max, X_adv_d, momentum, stream=stream
            )
            work = gradient_work(model)
            budget = min(SLICE_MULTIPLY_ADDS, MAX_SLICE_STEPS * n_rows * work)
            for k, count in enumerate(step_slices(steps, n_rows, work, budget)):
                if k:
                    stream.synchronize()
                kernels.iterate_steps_into(
                    *(X_d, *weights, Y_d, eps_d, alpha_d, count, *settings, X_adv_d, momentum),
                    l1_coordinates,
                    stream=stream,
                    workspace=workspace,
                )

        self._stream(model, (X, Y, X_start, eps, alpha), (X_adv,), launch)
        return X_adv

    def apgd_run(
        self,
        model: Model,
        X,
        labels,
        start,
        loss,
        *,
        targets,
        eps,
        p,
        windows,
        x_min,
        x_max,
        topk_from_start=False,
    ):
        """One APGD run: best (N, d), its loss (N,), the last misclassified iterate (N, d) and
        broken (N,) bool, as ``CpuBackend.apgd_run`` (within the rounding of the gradients;
        the same refusals and settings).

        Each chunk of rows is copied to the GPU once and runs every iteration there: the
        loss gradient (``kernels.loss_gradient_into``) into device scratch, then the update
        (``apgd_launchers.apgd_update_into``, bitwise the CPU's given the same gradients),
        in slices (``step_slices``) as :meth:`iterate` runs its steps.
        """
        from advgrad.kernels import cuda as kernels
        from advgrad.kernels.apgd import STATE_BEST, STATE_BROKEN, STATE_FIELDS
        from advgrad.kernels.cuda import apgd_launchers

        code, labels, targets, kappa = loss_arguments(
            model.n_classes, X.shape[0], loss, labels, targets, 0.0
        )
        eps = np.ascontiguousarray(eps, dtype=np.float64)
        best, adversarial = np.empty_like(X), np.empty_like(X)
        state = np.empty((X.shape[0], STATE_FIELDS))

        def launch(weights, inputs, outputs, stream, workspace):
            X_d, labels_d, targets_d, start_d, eps_d = inputs
            best_d, adversarial_d, state_d = outputs
            n_rows = X_d.shape[0]
            current, previous, best_G, G = (
                workspace.array(f"apgd_{name}", X_d.shape, X_d.dtype)
                for name in ("current", "previous", "best_G", "G")
            )
            values = workspace.array("apgd_values", (n_rows,), X_d.dtype)
            predicted = workspace.array("apgd_predicted", (n_rows,), np.int64)
            windows_d = _to_workspace(workspace, "apgd_windows", windows, stream)
            apgd_launchers.apgd_start_into(
                X_d, start_d, eps_d, p, x_min, x_max, current, stream=stream, workspace=workspace
            )
            work = gradient_work(model)
            budget = min(SLICE_MULTIPLY_ADDS, MAX_SLICE_STEPS * n_rows * work)
            done = 0
            for k, count in enumerate(step_slices(len(windows), n_rows, work, budget)):
                if k:
                    stream.synchronize()
                for step in range(done, done + count):
                    kernels.loss_gradient_into(
                        *(current, *weights, labels_d, targets_d, code, kappa, G, values),
                        predicted,
                        stream=stream,
                        workspace=workspace,
                    )
                    apgd_launchers.apgd_update_into(
                        *(X_d, eps_d, p, x_min, x_max, windows_d, step, labels_d, G, values),
                        *(predicted, current, previous, best_d, best_G, adversarial_d, state_d),
                        topk_from_start,
                        stream=stream,
                        workspace=workspace,
                    )
                done += count

        inputs = (X, labels, targets, start, eps)
        self._stream(model, inputs, (best, adversarial, state), launch)
        return best, state[:, STATE_BEST].astype(X.dtype), adversarial, state[:, STATE_BROKEN] != 0

    def fab_run(self, model: Model, X, labels, start, *, targets, p, steps, x_min, x_max):
        """One FAB run: closest (N, d) and distance (N,) float64, as ``CpuBackend.fab_run``
        (within the rounding of the gradients; the same refusals), targeted or not, for
        every norm.

        Each chunk of rows is copied to the GPU once and runs every iteration there
        (``fab_launchers.fab_steps_into``): the iterates' logits and the closest-point
        update, the gradient of the hyperplane's logit difference
        (``kernels.loss_gradient_into``; untargeted, one per class k != y, the nearest
        boundary kept) and the step, one thread per row; in slices (``step_slices``) as
        :meth:`apgd_run` runs its steps. A point backed up to gets its hidden layer from a
        forward pass, where the CPU forms it by linearity.
        """
        from advgrad.kernels.cuda import fab_launchers

        labels, targets, work = fab_arguments(model, X.shape[0], labels, targets)
        closest, distance = np.empty_like(X), np.empty(X.shape[0])
        box = (float(x_min), float(x_max))

        def launch(weights, inputs, outputs, stream, workspace):
            X_d, labels_d, targets_d, start_d = inputs
            closest_d, distance_d = outputs
            current = workspace.array("fab_current", X_d.shape, X_d.dtype)
            fab_launchers.fab_start_into(
                X_d, start_d, current, closest_d, distance_d, stream=stream
            )
            n_rows = X_d.shape[0]
            budget = min(SLICE_MULTIPLY_ADDS, MAX_SLICE_STEPS * n_rows * work)
            first = 0
            for k, count in enumerate(step_slices(steps + 1, n_rows, work, budget)):
                if k:
                    stream.synchronize()
                fab_launchers.fab_steps_into(
                    *(X_d, *weights, labels_d, targets_d, p, *box, steps, first, count),
                    *(current, closest_d, distance_d),
                    stream=stream,
                    workspace=workspace,
                )
                first += count

        start = np.ascontiguousarray(start, dtype=X.dtype)
        self._stream(model, (X, labels, targets, start), (closest, distance), launch)
        return closest, distance

    def square_slice_queries(self, active_rows: int, row_query_work: int) -> int:
        """The queries one ``square_run`` call should take: the rows run side by side, a
        thread each, and every call copies the search's state in and out, so a call takes
        ``SQUARE_SLICE_ROW_MULTIPLY_ADDS`` of one row's work whatever the rows (about 4,800
        L-inf queries of a (784, 256, 10) network), at least one."""
        return max(1, SQUARE_SLICE_ROW_MULTIPLY_ADDS // max(1, row_query_work))

    def square_run(self, model: Model, X, labels, rows, search, sides, first, count, state):
        """Steps of a Square search, as ``CpuBackend.square_run``, on the GPU: each chunk of
        rows and its state go to the device, where a thread per row runs the steps with the
        CPU's row function compiled for the GPU (``advgrad.kernels.cuda.square``), and the
        state comes back into ``state``."""
        from advgrad.kernels.cuda import square as square_cuda
        from advgrad.kernels.square import NORM_CODES

        seed, random_stream, p, eps, x_min, x_max, image = search
        scalars = (X.dtype.type(eps), X.dtype.type(x_min), X.dtype.type(x_max))
        W1_64 = self.device_weights(model, np.float64)[0]  # the CPU kernel's: W1 in float64
        W2T = np.ascontiguousarray(model.W2.T, dtype=np.float64)

        def launch(weights, inputs, outputs, stream, workspace):
            X_d, labels_d, rows_d, *given = inputs
            for given_d, out_d in zip(given, outputs, strict=True):
                out_d.copy_to_device(given_d, stream=stream)
            _, b1, _, b2 = weights
            square_cuda.square_steps_into(
                *(X_d, W1_64, b1, _to_workspace(workspace, "square_W2T", W2T, stream), b2),
                *(labels_d, rows_d, seed, random_stream, NORM_CODES[p], *scalars, image),
                *(_to_workspace(workspace, "square_sides", sides, stream), first, count),
                *outputs,
                stream=stream,
                workspace=workspace,
            )

        self._stream(model, (X, labels, rows, *state), state, launch)

    def deepfool(self, model: Model, X, p, overshoot, max_iter, x_min, x_max, *, out=None):
        """DeepFool: X_adv (N, d) and the iterations used per row (N,) int64."""
        from advgrad.kernels import cuda as kernels

        X_adv = output_rows(X, out)
        iterations = np.empty(X.shape[0], dtype=np.int64)

        def launch(weights, inputs, outputs, stream, workspace):
            kernels.deepfool_into(
                inputs[0],
                *weights,
                p,
                overshoot,
                max_iter,
                x_min,
                x_max,
                *outputs,
                stream=stream,
                workspace=workspace,
            )

        self._stream(model, (X,), (X_adv, iterations), launch)
        return X_adv, iterations

    def forward(self, model: Model, X: np.ndarray, Y: np.ndarray):
        """Probabilities P (N, C), per-row losses (N,) and predictions (N,) int64."""
        from advgrad.kernels import cuda as kernels

        n_rows = X.shape[0]
        P = np.empty((n_rows, model.n_classes), dtype=X.dtype)
        losses = np.empty(n_rows, dtype=X.dtype)
        predicted = np.empty(n_rows, dtype=np.int64)

        def launch(weights, inputs, outputs, stream, workspace):
            X_d, Y_d = inputs
            A = workspace.array("A", (X_d.shape[0], model.n_hidden), X_d.dtype)
            kernels.forward_into(
                X_d, *weights, Y_d, A, *outputs, stream=stream, workspace=workspace
            )

        self._stream(model, (X, Y), (P, losses, predicted), launch)
        return P, losses, predicted

    def margin_bounds(self, model: Model, X, classes, eps, p, x_min, x_max, crown, line_steps):
        """Certified lower bounds of each row's worst class margin over its eps-region:
        worst (N,) float64, as ``CpuBackend.margin_bounds`` (within float64 rounding, and
        as sound); the rows stream through the GPU in chunks."""
        from advgrad.kernels import cuda as kernels

        X, classes, eps = bound_rows(X, classes, eps)
        worst = np.empty(X.shape[0])

        def launch(weights, inputs, outputs, stream, workspace):
            kernels.margin_bounds_into(
                *(*inputs, p, x_min, x_max, *weights, crown, line_steps, *outputs),
                stream=stream,
                workspace=workspace,
            )

        self._stream(model, (X, classes, eps), (worst,), launch, np.float64)
        return worst

    def certified_radius(
        self, model: Model, X, classes, eps_grid, p, x_min, x_max, crown, line_steps, tolerance
    ):
        """Certified radius (N,) float64 and certificates (N, E) bool of every row, as
        ``CpuBackend.certified_radius``: each row's whole search (eps = 0, the grid, the
        bisection) runs on the GPU, one thread block per row at a time."""
        from advgrad.kernels import cuda as kernels

        X, classes, eps_grid = bound_rows(X, classes, eps_grid)
        radius = np.empty(X.shape[0])
        certified = np.empty((X.shape[0], eps_grid.shape[0]), dtype=np.bool_)

        def launch(weights, inputs, outputs, stream, workspace):
            grid_d = _to_workspace(workspace, "eps_grid", eps_grid, stream)
            kernels.certified_radius_into(
                *(*inputs, grid_d, p, x_min, x_max, *weights, crown, line_steps, tolerance),
                *outputs,
                stream=stream,
                workspace=workspace,
            )

        self._stream(model, (X, classes), (radius, certified), launch, np.float64)
        return radius, certified

    def parameter_gradient(
        self, network, X, Y, clean_weight, adv_weight, eps, x_min, x_max, gradient
    ) -> None:
        """Add the gradient of the (adversarial) training loss to ``gradient``, as
        ``CpuBackend.parameter_gradient`` (within rounding).

        ``network`` and ``gradient`` are host arrays: the parameters change between calls,
        so they are copied in on every call, with the gradient's current values, and the
        sums copied back out (a few copies of the parameters' size per batch). The rows go
        through in chunks of at most ``chunk_rows``, on one stream.
        """
        from advgrad.kernels import cuda as kernels

        with self._lock:
            stream, workspace = self._ready_lanes()[0]
            try:
                network_d = [
                    _to_workspace(workspace, f"train_network{i}", w, stream)
                    for i, w in enumerate(network)
                ]
                gradient_d = [
                    _to_workspace(workspace, f"train_gradient{i}", g, stream)
                    for i, g in enumerate(gradient)
                ]
                for start in range(0, X.shape[0], self.chunk_rows):
                    stop = start + self.chunk_rows
                    X_d = _to_workspace(workspace, "train_X", X[start:stop], stream)
                    Y_d = _to_workspace(workspace, "train_Y", Y[start:stop], stream)
                    kernels.parameter_gradient_into(
                        *(X_d, *network_d, Y_d, clean_weight, adv_weight, eps, x_min, x_max),
                        *gradient_d,
                        stream=stream,
                        workspace=workspace,
                    )
                for g, g_d in zip(gradient, gradient_d, strict=True):
                    g_d.copy_to_host(g, stream=stream)
            finally:
                stream.synchronize()  # nothing may still write into the gradient

    def _stream(self, model: Model | None, inputs, outputs, launch, weights_dtype=None) -> None:
        """Run ``launch`` on each chunk of rows, copying ``inputs`` in and ``outputs`` out.

        ``inputs[0]`` sets the rows; an input with 0 rows (labels Y meaning "the
        predictions") goes to the device with 0 rows. ``launch(weights, inputs_d, outputs_d,
        stream, workspace)`` queues the kernels of one chunk on device arrays; weights are
        the model's on the device, in ``weights_dtype`` (default: the model's; None without
        a model). Chunk k runs on lane k % lanes;
        with two lanes or more, its outputs are queued for copying out after chunk k + 1's
        kernels, so that a host blocked in a synchronous copy out still has the GPU busy.
        A lane's stream orders each chunk's copy in after the copy out of the lane's chunk
        before it, which used the same device buffers.
        """
        n_rows = inputs[0].shape[0]
        rows = self.chunk_rows_for(n_rows)
        with self._lock:
            lanes = self._ready_lanes()
            weights = None if model is None else self.device_weights(model, weights_dtype)
            queued = []  # (stream, start, stop, outputs_d) of the chunk not yet copied out
            try:
                for k, start in enumerate(range(0, n_rows, rows)):
                    stream, workspace = lanes[k % len(lanes)]
                    stop = min(start + rows, n_rows)
                    inputs_d = []
                    for i, host in enumerate(inputs):
                        part = host[start:stop]
                        part_d = workspace.array(f"in{i}", part.shape, part.dtype)
                        if len(part_d):
                            part_d.copy_to_device(part, stream=stream)
                        inputs_d.append(part_d)
                    outputs_d = [
                        workspace.array(f"out{i}", (stop - start, *out.shape[1:]), out.dtype)
                        for i, out in enumerate(outputs)
                    ]
                    launch(weights, inputs_d, outputs_d, stream, workspace)
                    queued.append((stream, start, stop, outputs_d))
                    if len(queued) > 1 or len(lanes) == 1:  # one lane: its buffers are next
                        _copy_out(outputs, *queued.pop(0))
                if queued:
                    _copy_out(outputs, *queued.pop())
            finally:
                for stream, _ in lanes:  # nothing may still write into the outputs
                    stream.synchronize()

    def _ready_lanes(self) -> list:
        """The ``lanes`` (stream, Workspace) pairs of this backend, made on first use; the
        caller holds the lock."""
        from advgrad.kernels import cuda as kernels

        while len(self._lanes) < self.lanes:
            self._lanes.append((kernels.cuda.stream(), kernels.Workspace()))
        return self._lanes[: self.lanes]


@functools.cache
def shared_backend() -> CudaBackend:
    """The process's ``CudaBackend`` with the default settings, made on first use: calls that
    ask for the "cuda" device share its streams, device buffers and copies of the weights
    rather than making their own each time."""
    return CudaBackend()


def _to_workspace(workspace, name: str, host: np.ndarray, stream):
    """``workspace.array(name, ...)`` shaped like ``host``, its copy queued on ``stream``."""
    device = workspace.array(name, host.shape, host.dtype)
    if host.size:
        device.copy_to_device(np.ascontiguousarray(host), stream=stream)
    return device


def _copy_out(outputs, stream, start, stop, outputs_d) -> None:
    """Queue the copies of one chunk's device outputs into rows start:stop of the hosts'."""
    for out, out_d in zip(outputs, outputs_d, strict=True):
        out_d.copy_to_host(out[start:stop], stream=stream)
