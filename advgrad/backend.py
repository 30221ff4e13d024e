"""Backends run the kernels of one device over prepared arrays; algorithms never branch on it.

A backend takes a validated ``Model`` and C-contiguous 2-D arrays of the model's dtype
(``advgrad.attacks`` prepares them) and returns host numpy arrays; the certified bounds take
their rows in float64, and training passes the parameters it updates as plain arrays. Every
backend has the methods of ``CpuBackend`` (here) and ``advgrad.cuda_backend.CudaBackend``:
gradients and steps, the gradients of the attack losses (``LOSSES``) and the logits,
iterative attacks, the runs of APGD, FAB and Square (``apgd_run``, ``fab_run``,
``square_run``), DeepFool, the forward pass, certified bounds and radii, training gradients
and optimiser updates. ``get_backend`` picks one by device name.

What both backends share (``output_rows``, ``check_workspace``, the work estimates) lives in
``advgrad.backend_common`` and is re-exported here.
"""

from __future__ import annotations

import numpy as np
from numba import parallel_chunksize

from advgrad.backend_common import (
    LOSSES,
    WORKSPACE_BYTES,
    HostOptimiser,
    bound_rows,
    check_workspace,
    deepfool_work,
    fab_arguments,
    float64_network,
    gradient_work,
    loss_arguments,
    output_rows,
    step_slices,
)
from advgrad.kernels import apgd as apgd_kernels
from advgrad.kernels import cpu
from advgrad.kernels import fab as fab_kernels
from advgrad.kernels import square as square_kernels
from advgrad.kernels.blas import blas_threads
from advgrad.model import Model

__all__ = [
    "DEVICES",
    "LOSSES",
    "SLICE_MULTIPLY_ADDS",
    "WORKSPACE_BYTES",
    "CpuBackend",
    "blas_threads",
    "bound_workspace_bytes",
    "check_workspace",
    "deepfool_work",
    "get_backend",
    "gradient_work",
    "output_rows",
    "step_slices",
]


SERIAL_BLOCKS = 2
SERIAL_MULTIPLY_ADDS = 2**23
"""A call on at most ``SERIAL_BLOCKS`` blocks of ``cpu.ROWS_PER_BLOCK`` rows and at most
this much work (about 0.3 ms on one core) runs a kernel's serial block function once per
block instead of its parallel kernel: bitwise the same result, at most about 0.15 ms slower
a call (512 rows of a digits-sized network: 0.24 against 0.11 us a row), and a first run on
small data (the bundled digits) compiles no parallel kernel, whose lowering is most of a
cold start."""


def _run_blocks(kernel, block_kernel, arguments: tuple, rows: tuple[int, ...], work: int) -> None:
    """``kernel(*arguments)``, or for a small call (``SERIAL_MULTIPLY_ADDS`` at ``work``
    multiply-adds a row), ``block_kernel`` on each aligned block in turn, with the
    arguments at the indices ``rows`` (one row per input row, or 0 rows: passed whole)
    sliced to the block."""
    n_rows = arguments[0].shape[0]
    if n_rows > SERIAL_BLOCKS * cpu.ROWS_PER_BLOCK or n_rows * work > SERIAL_MULTIPLY_ADDS:
        kernel(*arguments)
    elif n_rows <= cpu.ROWS_PER_BLOCK:
        block_kernel(*arguments)
    else:
        for start in range(0, n_rows, cpu.ROWS_PER_BLOCK):
            stop = min(start + cpu.ROWS_PER_BLOCK, n_rows)
            block_kernel(
                *(
                    argument[start:stop] if index in rows and len(argument) else argument
                    for index, argument in enumerate(arguments)
                )
            )


SLICE_MULTIPLY_ADDS = 2**26
"""Work of one slice of an iterative attack (at most about 0.1 s on one core). The iterative
kernels run in slices of steps, and between two slices control is back in Python, where a
signal handler can act (a second Ctrl-C stops a job at once); a small job is one slice."""
QUERY_SPEEDUP = 16
"""A Square query's multiply-adds (``advgrad.square.query_work``: a few rows of W1 in cache,
vectorised) run about this much faster than ``SLICE_MULTIPLY_ADDS`` assumes, so a slice of
queries takes this many times its work, about 0.1 s of a core."""


def bound_workspace_bytes(model: Model) -> int:
    """Bytes of scratch one block of the CPU bound kernels needs: ``cpu.bound_workspace``
    for ``cpu.ROWS_PER_BLOCK`` rows, float64 (CROWN keeps C x (H + d) coefficients per row)."""
    d, H, C = model.n_inputs, model.n_hidden, model.n_classes
    return cpu.ROWS_PER_BLOCK * 8 * (2 * d + 9 * H + C * (H + d) + 3 * C + 1)


class CpuBackend(HostOptimiser):
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
        cpu.input_gradient_into(X, model.W1, model.b1, model.W2, model.b2, Y, G, predicted)
        return G, predicted

    def loss_gradient(self, model: Model, X, labels, loss, *, targets=None, kappa=0.0):
        """The input gradient of a per-row attack loss of the logits (``cpu.loss_gradient_into``).

        Parameters
        ----------
        model : Model
        X : (N, d) float32 or float64, C-contiguous, the model's dtype
        labels : (N,) int, the true class of each row
        loss : str, one of ``LOSSES``, each a quantity an attack maximises, of the logits z
            (b2 included) and pi_1, pi_2, ... the classes by descending logit:
            "ce" -log softmax(z)_y; "dlr" -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 +
            1e-12) (C >= 3); "dlr-targeted" -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 +
            1e-12) (C >= 4); "cw" min(max_{i != y} z_i - z_y, kappa), with targets
            min(z_t - max_{i != t} z_i, kappa). A tied maximum is differentiated through its
            first index; where "cw" is clipped at kappa its gradient is 0.
        targets : (N,) int, the target class of each row: required by "dlr-targeted",
            optional for "cw", refused by "ce" and "dlr"
        kappa : float, the confidence of "cw"

        Returns
        -------
        G : (N, d) X's dtype, d(loss)/dX per row ("ce": bitwise ``input_gradient`` with
            one-hot labels)
        values : (N,) X's dtype, the loss of each row
        predicted : (N,) int64, argmax of the logits (the first on ties)

        Raises ValueError with a one-line reason for a loss not in ``LOSSES``, too few
        classes for it, targets missing or refused, or classes out of range.
        """
        code, labels, targets, kappa = loss_arguments(
            model.n_classes, X.shape[0], loss, labels, targets, kappa
        )
        n_rows = X.shape[0]
        G = np.empty_like(X)
        values = np.empty(n_rows, dtype=X.dtype)
        predicted = np.empty(n_rows, dtype=np.int64)
        network = (model.W1, model.b1, model.W2, model.b2)
        _run_blocks(
            cpu.loss_gradient_into,
            cpu.loss_gradient_block,
            (X, *network, labels, targets, code, kappa, G, values, predicted),
            rows=(0, 5, 6, 9, 10, 11),
            work=gradient_work(model),
        )
        return G, values, predicted

    def logits(self, model: Model, X: np.ndarray) -> np.ndarray:
        """Logits Z (N, C) in X's dtype, A @ W2 + b2, of X (N, d) (float32 or float64,
        C-contiguous, the model's dtype): bitwise the z that :meth:`loss_gradient`
        differentiates."""
        Z = np.empty((X.shape[0], model.n_classes), dtype=X.dtype)
        _run_blocks(
            cpu.logits_into,
            cpu.logits_block,
            (X, model.W1, model.b1, model.W2, model.b2, Z),
            rows=(0, 5),
            work=gradient_work(model) // 2,
        )
        return Z

    def fgm_step(self, model: Model, X, Y, eps, p, x_min, x_max, *, out=None, l1_coordinates=1):
        """X_adv (N, d) after one FGM step of norm p, and the clean predictions (N,) int64.

        Every method returning X_adv writes it into ``out`` when given (see ``output_rows``).
        An L1 step moves the ``l1_coordinates`` coordinates of largest |G| (the kernels' q,
        ``cpu.step_row``; 1: the steepest L1 step); other norms ignore it.
        """
        X_adv = output_rows(X, out)
        predicted = np.empty(X.shape[0], dtype=np.int64)
        _run_blocks(
            cpu.fgm_step_into,
            cpu.fgm_block,
            (
                *(X, model.W1, model.b1, model.W2, model.b2, Y, eps, p, x_min, x_max, X_adv),
                *(predicted, l1_coordinates),
            ),
            rows=(0, 5, 10, 11),
            work=gradient_work(model),
        )
        return X_adv, predicted

    def fgm_from_gradient(self, X, G, eps, p, x_min, x_max, *, out=None, l1_coordinates=1):
        """X_adv (N, d) after one FGM step of norm p along a gradient G (N, d) from
        :meth:`input_gradient`; bitwise what :meth:`fgm_step` gives."""
        X_adv = output_rows(X, out)
        cpu.fgm_from_gradient_into(X, G, eps, p, x_min, x_max, X_adv, l1_coordinates)
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
        """Iterative FGM (BIM/PGD/MI-FGSM) from X_start: X_adv (N, d); eps, alpha (N,) float64.

        The steps run in slices (``step_slices``), the momentum carried between them. An L1
        step moves the ``l1_coordinates`` coordinates of largest |G| (as :meth:`fgm_step`).
        """
        X_adv = output_rows(X, out)
        n_rows = X.shape[0]
        momentum = np.empty((n_rows if decay > 0.0 else 0, X.shape[1]), dtype=X.dtype)
        settings = (p, decay, x_min, x_max)
        cpu.iterate_start_into(X, X_start, eps, p, decay, x_min, x_max, X_adv, momentum)
        for count in step_slices(steps, n_rows, gradient_work(model), SLICE_MULTIPLY_ADDS):
            cpu.iterate_steps_into(
                *(X, model.W1, model.b1, model.W2, model.b2, Y, eps, alpha, count),
                *(*settings, X_adv, momentum, l1_coordinates),
            )
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
        """One APGD run (``advgrad.apgd``; the kernels: ``advgrad.kernels.apgd``).

        Parameters
        ----------
        model : Model
        X : (N, d) float32 or float64, C-contiguous, the model's dtype: the clean rows
        labels : (N,) int, the true classes
        start : (N, d) X's dtype, the starting points (projected here)
        loss, targets : the loss the run maximises, as in :meth:`loss_gradient` (kappa 0)
        eps : (N,) float64, the radius of each row's ball
        p : float, np.inf, 2.0 or 1.0 (l1-APGD)
        windows : (steps + 1,) int64, windows[i] > 0 the length of the checkpoint window
            that ends after step i (``advgrad.apgd.checkpoint_windows``)
        x_min, x_max : float, the box
        topk_from_start : bool, L1: the first steps move a fraction of the coordinates set
            by the start's moved ones, not ``L1_FIRST_TOPK`` (``apgd_update_into``)

        Returns
        -------
        best : (N, d) X's dtype, the point of highest loss of the run
        best_values : (N,) X's dtype, its loss
        adversarial : (N, d) X's dtype, the last misclassified iterate, where ``broken``
        broken : (N,) bool, some iterate was misclassified

        The iterations run in slices (``step_slices``), each evaluating and updating the
        iterates in one fused kernel (``apgd_steps_into``), the gradients in its blocks'
        scratch.
        """
        code, labels, targets, kappa = loss_arguments(
            model.n_classes, X.shape[0], loss, labels, targets, 0.0
        )
        n_rows = X.shape[0]
        current, previous, best, best_G, adversarial = (np.empty_like(X) for _ in range(5))
        state = np.empty((n_rows, apgd_kernels.STATE_FIELDS))
        apgd_kernels.apgd_start_into(X, start, eps, p, x_min, x_max, current)
        network = (model.W1, model.b1, model.W2, model.b2)
        run = (X, *network, labels, targets, code, kappa, eps, p, x_min, x_max, windows)
        iterates = (current, previous, best, best_G, adversarial, state)
        iterations = windows.shape[0]
        first = 0
        for count in step_slices(iterations, n_rows, gradient_work(model), SLICE_MULTIPLY_ADDS):
            _run_blocks(
                apgd_kernels.apgd_steps_into,
                apgd_kernels.apgd_steps_block,
                (*run, first, count, *iterates, topk_from_start),
                rows=(0, 5, 6, 9, 16, 17, 18, 19, 20, 21),
                work=gradient_work(model) * count,
            )
            first += count
        broken = state[:, apgd_kernels.STATE_BROKEN] != 0.0
        return best, state[:, apgd_kernels.STATE_BEST].astype(X.dtype), adversarial, broken

    def fab_run(self, model: Model, X, labels, start, *, targets, p, steps, x_min, x_max):
        """One FAB run (``advgrad.fab``; the kernels: ``advgrad.kernels.fab``).

        Parameters
        ----------
        model : Model
        X : (N, d) float32 or float64, C-contiguous, the model's dtype: the clean rows
        labels : (N,) int, the true classes
        start : (N, d) X's dtype, the starting points
        targets : (N,) int, the target class of each row (FAB-T), or None: untargeted, the
            nearest linearised boundary at each step
        p : float, np.inf, 2.0 or 1.0
        steps : int >= 1, the steps of the run
        x_min, x_max : float, the box (infinite: none)

        Returns
        -------
        closest : (N, d) X's dtype, the misclassified iterate closest to its row, where
            found, else the row
        distance : (N,) float64, its distance to the row in norm p, inf where none

        The iterations run in slices (``step_slices``), each one fused kernel
        (``fab_steps_into``). Raises ValueError (one line) for classes out of range.
        """
        labels, targets, work = fab_arguments(model, X.shape[0], labels, targets)
        n_rows = X.shape[0]
        current = np.array(start, dtype=X.dtype, order="C")
        closest = X.copy()
        distance = np.full(n_rows, np.inf)
        clean_hidden = np.empty((n_rows, model.n_hidden), dtype=X.dtype)
        network = (model.W1, model.b1, model.W2, model.b2)
        run = (X, *network, labels, targets, p, float(x_min), float(x_max), steps)
        first = 0
        for count in step_slices(steps + 1, n_rows, work, SLICE_MULTIPLY_ADDS):
            _run_blocks(
                fab_kernels.fab_steps_into,
                fab_kernels.fab_steps_block,
                (*run, first, count, current, closest, distance, clean_hidden),
                rows=(0, 5, 6, 13, 14, 15, 16),
                work=work * count,
            )
            first += count
        return closest, distance

    def square_slice_queries(self, active_rows: int, row_query_work: int) -> int:
        """The queries one ``square_run`` call of a Square search should take, with
        ``active_rows`` rows unbroken at ``row_query_work`` multiply-adds a row and query:
        about 0.1 s of a core (``SLICE_MULTIPLY_ADDS`` at ``QUERY_SPEEDUP``), at least one."""
        work = max(1, active_rows * row_query_work)
        return max(1, QUERY_SPEEDUP * SLICE_MULTIPLY_ADDS // work)

    def square_run(self, model: Model, X, labels, rows, search, sides, first, count, state):
        """Steps first, ..., first + count - 1 of a Square search (``advgrad.square``; the
        kernel: ``advgrad.kernels.square.square_steps_into``), in place on ``state``.

        Parameters
        ----------
        model : Model
        X : (N, d) float32 or float64, C-contiguous, the model's dtype: the clean rows
        labels, rows : (N,) int64, the true classes and each row's absolute index
        search : (seed, stream, p, eps, x_min, x_max, image): the seed, the start's random
            stream, the norm (np.inf, 2.0 or 1.0), the radius, the box (floats) and the
            image (c, h, w, channels_last) ints
        sides : (queries,) int64, the window side of each update
        first, count : int, the steps to run (step 0 the start, step i update i - 1)
        state : (X_best (N, d) X's dtype, margins (N,) float64, queries_used (N,) int64,
            hidden (N, 2, H) float64, sizes (N,) float64), the search's state, written
            by step 0 (see ``square_steps_into``)
        """
        seed, stream, p, eps, x_min, x_max, image = search
        scalars = (X.dtype.type(eps), X.dtype.type(x_min), X.dtype.type(x_max))
        network = (model.W1, model.b1, model.W2, model.b2)
        code = square_kernels.NORM_CODES[p]
        given = (X, *network, labels, rows, seed, stream, code, *scalars, image, sides)
        with parallel_chunksize(1):  # rows stop at different queries: blocks one by one
            _run_blocks(
                square_kernels.square_steps_into,
                square_kernels.square_steps_block,
                (*given, first, count, *state),
                rows=(0, 5, 6, 17, 18, 19, 20, 21),
                work=count * (image[0] + model.n_classes) * model.n_hidden,  # at least
            )

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
        _run_blocks(
            cpu.forward_into,
            cpu.forward_block,
            (X, model.W1, model.b1, model.W2, model.b2, Y, A, P, losses, predicted),
            rows=(0, 5, 6, 7, 8, 9),
            work=gradient_work(model) // 2,
        )
        return P, losses, predicted

    def margin_bounds(self, model: Model, X, classes, eps, p, x_min, x_max, crown, line_steps):
        """Certified lower bounds of each row's worst class margin over its eps-region.

        Parameters
        ----------
        model : Model (its weights are used in float64)
        X : (N, d) float array, the rows (taken in float64)
        classes : (N,) int, the class each row must keep
        eps : (N,) float >= 0, the radius of each row's region
        p : float, np.inf or 2.0
        x_min, x_max : float, the clip range (infinite: none)
        crown : bool, CROWN-style linear bounds besides the interval bounds
        line_steps : int, bisection steps of the sigmoid tangent lines

        Returns
        -------
        worst : (N,) float64, a lower bound of min over k != y of z_y - z_k over the region
            (``cpu.margin_bounds_into``); > 0 proves the row keeps its class there.

        Raises ValueError when one block's scratch would exceed ``WORKSPACE_BYTES``.
        """
        check_workspace("certification", bound_workspace_bytes(model))
        X, classes, eps = bound_rows(X, classes, eps)
        worst = np.empty(X.shape[0])
        cpu.margin_bounds_into(
            *(X, classes, eps, p, x_min, x_max, *float64_network(model), crown, line_steps),
            worst,
        )
        return worst

    def certified_radius(
        self, model: Model, X, classes, eps_grid, p, x_min, x_max, crown, line_steps, tolerance
    ):
        """Certified radius of every row, by bisection on eps over :meth:`margin_bounds`.

        Parameters
        ----------
        model, X, classes, p, x_min, x_max, crown, line_steps : as in :meth:`margin_bounds`
        eps_grid : (E,) float, ascending, >= 0; its largest value tops the search
        tolerance : float > 0, the bisection stops when the bracket is this narrow

        Returns
        -------
        radius : (N,) float64, the largest eps whose bound was verified (0 when the row
            is not certified even at eps = 0)
        certified : (N, E) bool, the row is certified at eps_grid[g]
            (``cpu.certified_radius_into``)
        """
        check_workspace("certification", bound_workspace_bytes(model))
        X, classes, eps_grid = bound_rows(X, classes, eps_grid)
        radius = np.empty(X.shape[0])
        certified = np.empty((X.shape[0], eps_grid.shape[0]), dtype=np.bool_)
        cpu.certified_radius_into(
            *(X, classes, eps_grid, p, x_min, x_max, *float64_network(model), crown, line_steps),
            *(tolerance, radius, certified),
        )
        return radius, certified

    def parameter_gradient(
        self, network, X, Y, clean_weight, adv_weight, eps, x_min, x_max, gradient
    ) -> None:
        """Add the gradient of the (adversarial) training loss to ``gradient``.

        The loss is ``clean_weight * sum_n J(X_n, Y_n) + adv_weight * sum_n J(X'_n, Y_n)``,
        X' the FGSM step clip(X + eps * sign(dJ/dX), x_min, x_max) held fixed
        (``cpu.parameter_gradient_into``); ``adv_weight = 0`` skips the adversarial pass.

        Parameters
        ----------
        network : (W1 (d, H), b1 (H,), W2 (H, C), b2 (C,)), host arrays of X's dtype: the
            parameters being trained, read afresh on every call
        X : (N, d) float32 or float64, C-contiguous
        Y : (N, C) of X's dtype, one-hot or soft labels
        clean_weight, adv_weight, eps, x_min, x_max : float
        gradient : (dW1, db1, dW2, db2), host arrays shaped like ``network``; the gradient
            is added to them in place
        """
        cpu.parameter_gradient_into(
            *(X, *network, Y, clean_weight, adv_weight, eps, x_min, x_max, *gradient),
        )


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
