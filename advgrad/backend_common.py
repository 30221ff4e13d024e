"""What the CPU and the CUDA backends share, whatever the device.

``advgrad.backend`` (the CPU backend and ``get_backend``) and ``advgrad.cuda_backend`` both
import from here, and neither imports the other at import time; ``advgrad.backend``
re-exports the public ones, where users find them. Importing this module imports no numba.

- ``output_rows``: where a method writes rows like its input (``out=`` or a new array);
- ``WORKSPACE_BYTES``, ``check_workspace``: the bound on a kernel block's scratch;
- ``gradient_work``, ``deepfool_work``, ``step_slices``: the work of one row's step and
  the slices of steps the iterative methods run in;
- ``float64_network``, ``bound_rows``: the arrays as the certified-bound kernels take them;
- ``LOSSES``, ``TARGETED_LOSSES``, ``loss_arguments``: the losses of ``loss_gradient`` and
  its checked arguments;
- ``HostOptimiser``: the optimiser updates of training, on host parameter vectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from advgrad.model import Model

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


def float64_network(model: Model) -> tuple[np.ndarray, ...]:
    """``(W1, b1, W2, b2)`` of ``model`` in float64, as the certified-bound kernels take them
    (the model's own arrays when they are float64 already)."""
    return tuple(
        np.ascontiguousarray(w, dtype=np.float64) for w in (model.W1, model.b1, model.W2, model.b2)
    )


def bound_rows(X, classes, eps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (float64), classes (int64) and radii (float64), C-contiguous, as the certified-
    bound kernels take them (the arrays themselves when they are so already)."""
    return (
        np.ascontiguousarray(X, dtype=np.float64),
        np.ascontiguousarray(classes, dtype=np.int64),
        np.ascontiguousarray(eps, dtype=np.float64),
    )


LOSSES = ("ce", "dlr", "dlr-targeted", "cw", "logit-difference")
"""The losses of a backend's ``loss_gradient``, each a per-row quantity of the logits z that
an attack maximises: the cross-entropy -log softmax(z)_y, the difference of logits ratio
(Croce and Hein 2020) untargeted and targeted, the Carlini-Wagner margin, and the logit
difference z_t - z_y whose zero set FAB-T linearises. A loss's index here is its code in
the kernels (``advgrad.kernels.cpu.LOSS_CE``, ...)."""

LOSS_MIN_CLASSES = {"ce": 2, "dlr": 3, "dlr-targeted": 4, "cw": 2, "logit-difference": 2}
"""The fewest classes each loss is defined for (DLR's denominator needs the third, targeted
DLR's the fourth largest logit)."""

TARGETED_LOSSES = ("dlr-targeted", "logit-difference")
"""The losses that need the target class of each row ("cw" takes one optionally)."""


def loss_arguments(
    n_classes: int, n_rows: int, loss: str, labels, targets, kappa: float
) -> tuple[int, np.ndarray, np.ndarray, float]:
    """The arguments of the loss-gradient kernels for ``loss`` on ``n_rows`` rows, checked.

    Returns (the loss's code, labels (N,) int64, targets (N,) int64 or 0 rows for none,
    kappa as a float). Raises ValueError with a one-line reason: a loss not in ``LOSSES``, a
    model with fewer classes than ``LOSS_MIN_CLASSES``, targets missing (``TARGETED_LOSSES``)
    or given where they mean nothing ("ce", "dlr"), labels or targets that are not one class
    in [0, n_classes) per row, a NaN kappa.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if n_classes < LOSS_MIN_CLASSES[loss]:
        raise ValueError(
            f"the {loss} loss needs at least {LOSS_MIN_CLASSES[loss]} classes, "
            f"the model has {n_classes}"
        )
    if loss in TARGETED_LOSSES and targets is None:
        raise ValueError(f"the {loss} loss needs targets, the target class of each row")
    if loss in ("ce", "dlr") and targets is not None:
        raise ValueError(
            f"the {loss} loss takes no targets (targeted: dlr-targeted, cw or logit-difference)"
        )
    labels = _class_per_row("labels", labels, n_rows, n_classes)
    if targets is None:
        targets = np.empty(0, dtype=np.int64)
    else:
        targets = _class_per_row("targets", targets, n_rows, n_classes)
    if math.isnan(kappa):
        raise ValueError("kappa must be a number, got nan")
    return LOSSES.index(loss), labels, targets, float(kappa)


def fab_arguments(model: Model, n_rows: int, labels, targets) -> tuple[np.ndarray, np.ndarray, int]:
    """The arguments of a FAB run on ``n_rows`` rows, checked: labels (N,) int64, targets
    (N,) int64 or 0 rows (untargeted), and the multiply-adds of a row's step (untargeted:
    a gradient per class). Raises ValueError (one line) as ``loss_arguments``."""
    loss = "ce" if targets is None else "logit-difference"
    _, labels, targets, _ = loss_arguments(model.n_classes, n_rows, loss, labels, targets, 0.0)
    work = gradient_work(model) * (model.n_classes if targets.shape[0] == 0 else 1)
    return labels, targets, work


def _class_per_row(name: str, classes, n_rows: int, n_classes: int) -> np.ndarray:
    """``classes`` as a C-contiguous (n_rows,) int64 array, or ValueError naming ``name``."""
    classes = np.asarray(classes)
    if classes.shape != (n_rows,) or classes.dtype.kind not in "iu":
        raise ValueError(
            f"{name} must be one integer class per row, shape ({n_rows},), "
            f"got shape {classes.shape} of {classes.dtype}"
        )
    outside = np.flatnonzero((classes < 0) | (classes >= n_classes))
    if len(outside):
        row = int(outside[0])
        raise ValueError(
            f"{name} must be classes in [0, {n_classes}), got {classes[row]} at row {row}"
        )
    return np.ascontiguousarray(classes, dtype=np.int64)


class HostOptimiser:
    """The optimiser updates of training, on host parameter vectors, for every backend.

    The parameters being trained stay in host memory between batches (training reads them
    for its attacks and checks, and a batch's gradient is the work worth a device); an
    update is one pass over them, cheaper in place on the host than a copy to a device and
    back. Both backends run these on the CPU kernels, bitwise ``cpu.adam_update`` and
    ``cpu.momentum_update``.
    """

    @staticmethod
    def adam_update(theta, grad, m, v, step, lr, beta1, beta2, epsilon, weight_decay, n_decayed):
        """One Adam step in place on flat parameters; see ``cpu.adam_update``.

        theta, grad, m, v : (P,) arrays of one float dtype; theta, m and v are updated.
        """
        from advgrad.kernels import cpu

        cpu.adam_update(theta, grad, m, v, step, lr, beta1, beta2, epsilon, weight_decay, n_decayed)

    @staticmethod
    def momentum_update(theta, grad, velocity, lr, momentum, weight_decay, n_decayed):
        """One SGD-with-momentum step in place on flat parameters; see ``cpu.momentum_update``.

        theta, grad, velocity : (P,) arrays of one float dtype; theta and velocity are updated.
        """
        from advgrad.kernels import cpu

        cpu.momentum_update(theta, grad, velocity, lr, momentum, weight_decay, n_decayed)
