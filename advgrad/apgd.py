"""APGD and APGD-T (Croce & Hein, ICML 2020), written once over a backend.

Auto-PGD is PGD without a step size to tune: the step eta starts at 2 eps and halves at
checkpoints when progress stalls, each halving restarting from the best point so far; the
step follows the gradient with momentum 0.75. ``apgd`` maximises the cross-entropy
(``apgd-ce``) or the DLR loss (``apgd-dlr``); ``apgd_targeted`` (APGD-T) maximises the
targeted DLR loss against the highest non-true classes of the clean row, one after another.

The semantics are those of the reference implementation (fra31/auto-attack,
``autoattack/autopgd_base.py``), for the norms inf and 2:

- a run starts on the surface of the eps-ball: X + eps u / ||u||_p, u uniform in the unit
  ball (``advgrad.attacks.random_in_ball``: the reference's uniform cube for inf, Gaussian
  direction for 2), clipped into [x_min, x_max];
- step i: z = P(x_i + eta s(G_i)), s = sign (inf) or G / ||G||_2 (2, a zero row stays put);
  then, from the second step on, x_{i+1} = P(x_i + a (z - x_i) + (1 - a) (x_i - x_{i-1}))
  with a = ``MOMENTUM``; P is the projection into the eps-ball followed by the clip;
- checkpoints: the first after max(int(0.22 steps), 1) steps, each next window shorter by
  max(int(0.03 steps), 1) steps, down to max(int(0.06 steps), 1) (the paper's p_j); at a
  checkpoint a row halves eta and goes back to its best point (and its gradient) when
  (1) at most ``RHO`` of the steps of the window raised its loss over the step before, or
  (2) it did not halve at the previous checkpoint and its best loss has not risen since;
  one deliberate difference: the first step of a run is compared with the loss at the
  start, where the reference compares it with 0 (an unfilled slot of its loss history);
- every row runs every step; a row is broken by a run when any iterate is misclassified,
  and takes the last misclassified iterate (as the reference does);
- restarts (and, for APGD-T, the target classes, each with all its restarts) run in turn,
  each only on the rows that no run has broken yet, nor the clean prediction.

Rows no run breaks get the point of highest loss seen over all runs, the clean row
included (the reference returns the clean row there): the classification is the same,
and the output shows how close the attack came. For APGD-T the targeted DLR losses of the
different targets share their denominator, so they compare across targets; the clean
row's loss is taken against the first target, the highest non-true logit.

Random starts come from ``seed``: run r (APGD-T: target k, restart r, as run
k * restarts + r) of the row of absolute index i draws from the stream r of
``random_in_ball``, so a row's result does not depend on the batch it is processed in, as
far as the backend's loss and gradient of a row do not depend on the rows beside it (on
the CPU a row alone in its block takes another BLAS path, about 1e-16 apart; APGD's
comparisons of losses equal but for rounding can turn such a difference into another
point).

The gradients come from ``backend.loss_gradient``; the update of the iterates runs on the
host, in numpy, in the model's dtype.
"""

from __future__ import annotations

import math

import numpy as np

from advgrad.attacks import (
    as_rows,
    check_count,
    check_radius,
    check_seed,
    norm_order,
    random_in_ball,
)
from advgrad.backend import get_backend
from advgrad.backend_common import loss_arguments
from advgrad.model import Model

LOSSES = ("ce", "dlr")
NORMS = ("inf", "2")
INITIAL_STEP = 2.0
"""eta starts at INITIAL_STEP * eps (both norms)."""
MOMENTUM = 0.75
RHO = 0.75
"""Condition (1): a window in which at most this fraction of the steps raised the loss."""
FIRST_WINDOW, WINDOW_DECREASE, SHORTEST_WINDOW = 0.22, 0.03, 0.06
"""Checkpoint windows, as fractions of the steps (the paper's p_1, and p_{j+1} - p_j =
max(p_j - p_{j-1} - 0.03, 0.06))."""
TARGET_CLASSES = 9
"""APGD-T's default number of target classes (at most C - 1 are used)."""


def checkpoint_windows(steps: int) -> dict[int, int]:
    """The checkpoints of a run of ``steps`` steps: {steps done at the checkpoint: steps in
    the window that ends there}, as the reference rounds them (int of the fractions, at
    least 1). 100 steps: checkpoints after 22, 41, 57, 70, 80, 87, 93 and 99 steps."""
    window = max(int(FIRST_WINDOW * steps), 1)
    decrease = max(int(WINDOW_DECREASE * steps), 1)
    shortest = max(int(SHORTEST_WINDOW * steps), 1)
    windows = {}
    done = window
    while done <= steps:
        windows[done] = window
        window = max(window - decrease, shortest)
        done += window
    return windows


def apgd(
    model: Model,
    X,
    labels=None,
    *,
    eps: float,
    norm="inf",
    loss: str = "ce",
    steps: int = 100,
    restarts: int = 1,
    seed: int = 0,
    x_min: float = -math.inf,
    x_max: float = math.inf,
    backend=None,
    first_row: int = 0,
) -> np.ndarray:
    """APGD with the cross-entropy (``apgd-ce``) or the DLR loss (``apgd-dlr``).

    Parameters
    ----------
    model : Model
    X : (N, ...) array, trailing dimensions flatten to d; computed in the model's dtype
    labels : (N,) int, the true classes; None: the model's predictions
    eps : float > 0, the radius of the ball in ``norm``
    norm : "inf" or "2"
    loss : "ce" or "dlr" (the DLR loss needs at least 3 classes)
    steps : int >= 1, steps of each run
    restarts : int >= 1, runs from independent random starts
    seed : int in [0, 2**63), seeds the starts
    x_min, x_max : float, the valid input range (infinite: no clip)
    backend : a backend (``advgrad.backend.get_backend``); None: the CPU's
    first_row : int >= 0, the absolute index of X's first row (random starts depend on it)

    Returns
    -------
    X_adv : array shaped like X, in the model's dtype: for each row the last misclassified
        iterate of the first run that broke it, else the point of highest loss seen, the
        clean row included (rows the model already misclassifies stay unchanged)

    Raises ValueError (one line) for a bad setting, label or shape.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    plan = [(stream, loss, None) for stream in range(check_count("restarts", restarts))]
    rows, labels, p, backend = _prepared(model, X, labels, loss, eps, norm, x_min, x_max, backend)
    settings = _run_settings(eps, p, steps, seed, first_row, x_min, x_max, backend)
    return _worst_case(model, rows, labels, plan, **settings).reshape(np.shape(X))


def apgd_targeted(
    model: Model,
    X,
    labels=None,
    *,
    eps: float,
    norm="inf",
    steps: int = 100,
    restarts: int = 1,
    target_classes: int = TARGET_CLASSES,
    seed: int = 0,
    x_min: float = -math.inf,
    x_max: float = math.inf,
    backend=None,
    first_row: int = 0,
) -> np.ndarray:
    """APGD-T: APGD on the targeted DLR loss, against each of the ``target_classes``
    highest non-true logits of the clean row in turn (ranks 1, 2, ...), ``restarts`` runs
    each, every run on the rows still not broken.

    Parameters are those of ``apgd`` (no ``loss``), and
    target_classes : int >= 1, the number of targets; at most C - 1 are used. The model
        needs at least 4 classes (the loss's denominator uses the 4th highest logit).

    Returns
    -------
    X_adv : array shaped like X, in the model's dtype (as ``apgd``; the loss compared for
        the rows no run breaks is the targeted DLR loss of each run's target)
    """
    C = model.n_classes
    if C < 4:
        raise ValueError(f"APGD-T needs a model of at least 4 classes, this one has {C}")
    n_targets = min(check_count("target_classes", target_classes), C - 1)
    n_restarts = check_count("restarts", restarts)
    rows, labels, p, backend = _prepared(model, X, labels, "ce", eps, norm, x_min, x_max, backend)
    settings = _run_settings(eps, p, steps, seed, first_row, x_min, x_max, backend)
    others = backend.logits(model, rows).astype(np.float64)
    others[np.arange(len(rows)), labels] = -np.inf
    ranked = np.argsort(-others, axis=1, kind="stable")[:, :n_targets]
    plan = [
        (rank * n_restarts + restart, "dlr-targeted", ranked[:, rank])
        for rank in range(n_targets)
        for restart in range(n_restarts)
    ]
    return _worst_case(model, rows, labels, plan, **settings).reshape(np.shape(X))


def _prepared(model, X, labels, loss, eps, norm, x_min, x_max, backend):
    """Validated rows (N, d), labels (N,) int64, norm order and backend; ``loss`` ("ce" or
    "dlr") must be defined for the model's classes."""
    if str(norm).removesuffix(".0") not in NORMS:
        raise ValueError(f"APGD supports the norms {' and '.join(NORMS)}, got {norm!r}")
    if not check_radius("eps", eps, model.dtype) > 0.0:
        raise ValueError("eps must be > 0")
    if not x_min <= x_max:
        raise ValueError(f"clip range ({x_min}, {x_max}) is empty")
    backend = backend or get_backend()
    rows = as_rows(model, X)
    if labels is None:
        labels = np.argmax(backend.logits(model, rows), axis=1)
    _, labels, _, _ = loss_arguments(model.n_classes, len(rows), loss, labels, None, 0.0)
    return rows, labels, norm_order(norm), backend


def _run_settings(eps, p, steps, seed, first_row, x_min, x_max, backend) -> dict:
    return {
        "eps": float(eps),
        "p": p,
        "steps": check_count("steps", steps),
        "seed": check_seed(seed),
        "first_row": check_count("first_row", first_row, minimum=0),
        "x_min": float(x_min),
        "x_max": float(x_max),
        "backend": backend,
    }


def _worst_case(model, rows, labels, plan, *, first_row, seed, **settings) -> np.ndarray:
    """Run ``plan`` ((stream, loss, targets (N,) or None) per run) in turn, each on the rows
    still not broken; returns X_adv (N, d) (see ``apgd``)."""
    backend = settings["backend"]
    _, first_loss, first_targets = plan[0]
    _, best_values, predicted = backend.loss_gradient(
        model, rows, labels, first_loss, targets=first_targets
    )
    X_adv = rows.copy()
    broken = predicted != labels
    index = first_row + np.arange(len(rows))
    for stream, loss, targets in plan:
        todo = np.flatnonzero(~broken)
        if not todo.size:
            break
        start = _surface_start(
            rows[todo], settings["eps"], settings["p"], seed, stream, index[todo]
        )
        best, values, adversarial, hit = _run(
            *(model, rows[todo], labels[todo], start, loss),
            targets=None if targets is None else targets[todo],
            **settings,
        )
        X_adv[todo[hit]] = adversarial[hit]
        broken[todo[hit]] = True
        better = ~hit & (values > best_values[todo])
        X_adv[todo[better]] = best[better]
        best_values[todo[better]] = values[better]
    return X_adv


def _surface_start(rows, eps, p, seed, stream, index) -> np.ndarray:
    """X + eps u / ||u||_p for u from ``random_in_ball``, in the rows' dtype (not clipped)."""
    ball = random_in_ball(seed, stream, index, rows.shape[1], p)
    length = np.linalg.norm(ball, ord=p, axis=1, keepdims=True)
    with np.errstate(over="ignore"):  # inf past the dtype's range, like PGD's starts
        return (rows + eps * (ball / np.where(length > 0.0, length, 1.0))).astype(rows.dtype)


def _run(model, rows, labels, start, loss, *, targets, eps, p, steps, x_min, x_max, backend):
    """One APGD run from ``start`` (N, d).

    Returns (best (N, d), its loss (N,), the last misclassified iterate (N, d), broken (N,)
    bool); the rows of the third are meaningful where ``broken``.
    """
    if p == np.inf:  # the ball and the clip are one clip: [X - eps, X + eps] clipped itself
        lower = np.clip(rows - eps, x_min, x_max)
        upper = np.clip(rows + eps, x_min, x_max)
    else:
        lower, upper = x_min, x_max

    def project(V):
        """V (N, d) into the eps-ball around the rows, then into [x_min, x_max], in place;
        a row inside the ball is not touched before the clip."""
        if p == 2.0:
            delta = V - rows
            length = np.sqrt(np.einsum("ij,ij->i", delta, delta))
            outside = np.flatnonzero(length > eps)
            V[outside] = rows[outside] + delta[outside] * (eps / length[outside])[:, None]
        np.clip(V, lower, upper, out=V)

    def evaluate(V):
        return backend.loss_gradient(model, V, labels, loss, targets=targets)

    current = start.copy()
    project(current)
    G, values, predicted = evaluate(current)
    best, best_G, best_values = current.copy(), G.copy(), values.copy()
    adversarial = current.copy()
    broken = predicted != labels
    previous, scratch = current.copy(), np.empty_like(current)
    previous_values = values
    eta = np.full((len(rows), 1), INITIAL_STEP * eps, dtype=rows.dtype)
    increases = np.zeros(len(rows), dtype=np.int64)
    halved_last = np.ones(len(rows), dtype=bool)
    best_at_last = best_values.copy()
    windows = checkpoint_windows(steps)
    for step in range(steps):
        _step_direction(G, p, out=scratch)
        scratch *= eta
        scratch += current
        project(scratch)
        if step > 0:  # momentum: current + a (z - current) + (1 - a) (current - previous)
            scratch -= current
            scratch *= MOMENTUM
            scratch += current
            np.subtract(current, previous, out=previous)
            previous *= 1.0 - MOMENTUM
            scratch += previous
            project(scratch)
        previous, current, scratch = current, scratch, previous
        G, values, predicted = evaluate(current)
        hit = np.flatnonzero(predicted != labels)
        adversarial[hit] = current[hit]
        broken[hit] = True
        increases += values > previous_values
        previous_values = values
        improved = np.flatnonzero(values > best_values)
        best[improved] = current[improved]
        best_G[improved] = G[improved]
        best_values[improved] = values[improved]
        window = windows.get(step + 1)
        if window is not None:
            halve = (increases <= RHO * window) | (~halved_last & (best_at_last >= best_values))
            halved_last = halve
            best_at_last = best_values.copy()
            increases[:] = 0
            back = np.flatnonzero(halve)
            eta[back] /= 2.0
            current[back] = best[back]
            G[back] = best_G[back]
    return best, best_values, adversarial, broken


def _step_direction(G, p, out) -> None:
    """sign(G) (inf) or G / ||G||_2 (2; a zero row stays zero) per row, into ``out``."""
    if p == np.inf:
        np.sign(G, out=out)
    else:
        length = np.sqrt(np.einsum("ij,ij->i", G, G))[:, None]
        np.divide(G, np.where(length > 0.0, length, 1.0), out=out)
