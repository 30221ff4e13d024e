"""APGD and APGD-T (Croce & Hein, ICML 2020), and l1-APGD (Croce & Hein, ICCV 2021), written
once over a backend.

Auto-PGD is PGD without a step size to tune: the step eta starts at 2 eps and halves at
checkpoints when progress stalls, each halving restarting from the best point so far; the
step follows the gradient with momentum 0.75. ``apgd`` maximises the cross-entropy
(``apgd-ce``) or the DLR loss (``apgd-dlr``); ``apgd_targeted`` (APGD-T) maximises the
targeted DLR loss against the highest non-true classes of the clean row, one after another.

The semantics are those of the reference implementation (fra31/auto-attack,
``autoattack/autopgd_base.py``), for the norms inf, 2 and 1:

- a run starts on the surface of the eps-ball: X + eps u / ||u||_p, u uniform in the unit
  ball (``advgrad.attacks.random_in_ball``: the reference's uniform cube for inf, Gaussian
  direction for 2), clipped into [x_min, x_max]; L1 (as the reference): X plus standard
  normal noise, projected into the L1 ball intersected with the box;
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
- L1 (l1-APGD): eta starts at eps; a step moves the coordinates of the largest |G| (a
  fraction topk of them, 0.2 at first) by eta / (their count) each, along sign(G), with
  no momentum; P is the exact Euclidean projection into the L1 ball intersected with the
  box (the reference's ``L1_projection``); a checkpoint every max(int(0.04 steps), 1)
  steps sets topk to the best point's moved coordinates / d / 1.5 and, when the best point
  got sparser (fewer than 0.95 times the moved coordinates of the checkpoint before),
  resets eta to eps and goes back to the best point, else divides eta by 1.5 (eta stays
  in [eps / 10, eps]) (``advgrad.kernels.apgd`` names these constants);
- every row runs every step; a row is broken by a run when any iterate is misclassified,
  and takes the last misclassified iterate (as the reference does);
- restarts (and, for APGD-T, the target classes, each with all its restarts) run in turn,
  each only on the rows that no run has broken yet, nor the clean prediction;
- ``large_radii`` (L1 only; the reference's ``use_largereps``, which its L1 AutoAttack
  turns on): each run goes in three stages, at 3 eps, 2 eps, then eps, of ceil(0.3 steps),
  ceil(0.3 steps) and the rest of the steps, each a run of its own (its checkpoints, eta
  from its radius) that starts from the best point of the stage before projected into
  its ball, the first from the run's random start; every stage's first steps move the
  coordinates the start has moved / d / 1.5 (not 0.2 of them), as the reference's runs
  from a given start do. Only the last stage, at eps, counts: a row is broken by its
  misclassified iterates, and its best point competes for the highest loss.

Rows no run breaks get the point of highest loss seen over all runs, the clean row
included (the reference returns the clean row there): the classification is the same,
and the output shows how close the attack came. For APGD-T the targeted DLR losses of the
different targets share their denominator, so they compare across targets; the clean
row's loss is taken against the first target, the highest non-true logit.

Random starts come from ``seed``: run r (APGD-T: target k, restart r, as run
k * restarts + r) of the row of absolute index i draws from the stream r of
``random_in_ball`` (L1: ``row_uniforms``), so a row's result does not depend on the batch
it is processed in, as far as the backend's loss and gradient of a row do not depend on
the rows beside it (on the CPU a row alone in its block takes another BLAS path, about
1e-16 apart; APGD's comparisons of losses equal but for rounding can turn such a
difference into another point).

``eps`` may differ per row ((N,) array: the minimal-eps bisection), and ``first_row`` may
give the absolute index of every row ((N,) int array: AutoAttack runs each attack on the
rows still classified correctly).

Each run is one call of ``backend.apgd_run``: the backend evaluates the loss gradient and
updates the iterates in fused kernels (``advgrad.kernels.apgd``), in the model's dtype.
"""

from __future__ import annotations

import math

import numpy as np

from advgrad.attacks import (
    TARGET_CLASSES,
    as_rows,
    check_count,
    check_radius,
    check_seed,
    norm_order,
    random_in_ball,
    ranked_targets,
    row_indices,
    row_uniforms,
)
from advgrad.backend import get_backend
from advgrad.backend_common import loss_arguments
from advgrad.kernels.apgd import INITIAL_STEP, MOMENTUM, RHO
from advgrad.model import Model

__all__ = [
    "INITIAL_STEP",
    "LARGE_RADII",
    "MOMENTUM",
    "RHO",
    "apgd",
    "apgd_targeted",
    "checkpoint_windows",
    "radius_stages",
]

LOSSES = ("ce", "dlr")
NORMS = ("inf", "2", "1")
FIRST_WINDOW, WINDOW_DECREASE, SHORTEST_WINDOW = 0.22, 0.03, 0.06
"""Checkpoint windows, as fractions of the steps (the paper's p_1, and p_{j+1} - p_j =
max(p_j - p_{j-1} - 0.03, 0.06))."""
L1_WINDOW = 0.04
"""L1: a checkpoint every max(int(L1_WINDOW * steps), 1) steps."""
LARGE_RADII = (3.0, 2.0, 1.0)
"""``large_radii``: the radii of the stages of a run, as multiples of eps."""
LARGE_RADII_STEPS = 0.3
"""``large_radii``: each stage but the last takes ceil(LARGE_RADII_STEPS * steps) steps."""


def checkpoint_windows(steps: int, norm="inf") -> dict[int, int]:
    """The checkpoints of a run of ``steps`` steps: {steps done at the checkpoint: steps in
    the window that ends there}, as the reference rounds them (int of the fractions, at
    least 1). 100 steps: checkpoints after 22, 41, 57, 70, 80, 87, 93 and 99 steps; norm
    "1": every max(int(0.04 steps), 1) steps."""
    if norm_order(norm) == 1.0:
        window = max(int(L1_WINDOW * steps), 1)
        return {done: window for done in range(window, steps + 1, window)}
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


def radius_stages(steps: int, large_radii: bool = False) -> list[tuple[float, int]]:
    """The stages of a run of ``steps`` steps: (radius as a multiple of eps, steps) each.
    Without ``large_radii`` one stage, (1.0, steps); with it (``LARGE_RADII``), as the
    reference rounds them: 3 eps and 2 eps for ceil(0.3 steps) each (the float product),
    then eps for the rest; 100 steps: 30, 30 and 40. Raises ValueError (one line) when no
    step is left for the last stage (steps 1, 2 and 4)."""
    if not large_radii:
        return [(1.0, steps)]
    first = math.ceil(LARGE_RADII_STEPS * steps)
    rest = steps - first * (len(LARGE_RADII) - 1)
    if rest < 1:
        raise ValueError(
            f"large_radii runs {first} steps at each of 3 eps and 2 eps, which leaves none "
            f"at eps of steps={steps}: take steps = 3 or at least 5"
        )
    return [(radius, first) for radius in LARGE_RADII[:-1]] + [(LARGE_RADII[-1], rest)]


def apgd(
    model: Model,
    X,
    labels=None,
    *,
    eps,
    norm="inf",
    loss: str = "ce",
    steps: int = 100,
    restarts: int = 1,
    seed: int = 0,
    x_min: float = -math.inf,
    x_max: float = math.inf,
    backend=None,
    first_row=0,
    large_radii: bool = False,
) -> np.ndarray:
    """APGD with the cross-entropy (``apgd-ce``) or the DLR loss (``apgd-dlr``).

    Parameters
    ----------
    model : Model
    X : (N, ...) array, trailing dimensions flatten to d; computed in the model's dtype
    labels : (N,) int, the true classes; None: the model's predictions
    eps : float > 0, the radius of the ball in ``norm``; or (N,) floats > 0, one per row
    norm : "inf", "2" or "1" (l1-APGD)
    loss : "ce" or "dlr" (the DLR loss needs at least 3 classes)
    steps : int >= 1, steps of each run
    restarts : int >= 1, runs from independent random starts
    seed : int in [0, 2**63), seeds the starts
    x_min, x_max : float, the valid input range (infinite: no clip)
    backend : a backend (``advgrad.backend.get_backend``); None: the CPU's
    first_row : int >= 0, the absolute index of X's first row, or (N,) int >= 0, the
        absolute index of every row (random starts depend on it)
    large_radii : bool, norm "1" only: each run in stages at 3 eps, 2 eps, then eps
        (``radius_stages``; the reference's ``use_largereps``, as its L1 AutoAttack runs)

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
    rows, labels, p, backend = _prepared(model, X, labels, loss, norm, x_min, x_max, backend)
    settings = _run_settings(rows, eps, p, steps, large_radii, seed, first_row, x_min, x_max)
    settings["backend"] = backend
    return _worst_case(model, rows, labels, plan, **settings).reshape(np.shape(X))


def apgd_targeted(
    model: Model,
    X,
    labels=None,
    *,
    eps,
    norm="inf",
    steps: int = 100,
    restarts: int = 1,
    target_classes: int = TARGET_CLASSES,
    seed: int = 0,
    x_min: float = -math.inf,
    x_max: float = math.inf,
    backend=None,
    first_row=0,
    large_radii: bool = False,
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
    rows, labels, p, backend = _prepared(model, X, labels, "ce", norm, x_min, x_max, backend)
    settings = _run_settings(rows, eps, p, steps, large_radii, seed, first_row, x_min, x_max)
    settings["backend"] = backend
    ranked = ranked_targets(backend.logits(model, rows), labels, n_targets)
    plan = [
        (rank * n_restarts + restart, "dlr-targeted", ranked[:, rank])
        for rank in range(n_targets)
        for restart in range(n_restarts)
    ]
    return _worst_case(model, rows, labels, plan, **settings).reshape(np.shape(X))


def _prepared(model, X, labels, loss, norm, x_min, x_max, backend):
    """Validated rows (N, d), labels (N,) int64, norm order and backend; ``loss`` ("ce" or
    "dlr") must be defined for the model's classes."""
    if str(norm).removesuffix(".0") not in NORMS:
        raise ValueError(f"APGD supports the norms {', '.join(NORMS)}, got {norm!r}")
    if not x_min <= x_max:
        raise ValueError(f"clip range ({x_min}, {x_max}) is empty")
    backend = backend or get_backend()
    rows = as_rows(model, X)
    if labels is None:
        labels = np.argmax(backend.logits(model, rows), axis=1)
    _, labels, _, _ = loss_arguments(model.n_classes, len(rows), loss, labels, None, 0.0)
    return rows, labels, norm_order(norm), backend


def _run_settings(rows, eps, p, steps, large_radii, seed, first_row, x_min, x_max) -> dict:
    """The checked settings of the runs but the backend: eps and the row indices per row;
    the stages of a run (``radius_stages``), each as (radius factor, checkpoint windows
    as the backend takes them: (stage steps + 1,) int64, the window ending after each
    step, 0 for none)."""
    n_rows = len(rows)
    steps = check_count("steps", steps)
    if large_radii and p != 1.0:
        norm = "inf" if p == np.inf else "2"
        raise ValueError(f"large_radii is for the norm 1 (l1-APGD), got norm {norm!r}")
    stages = []
    for factor, stage_steps in radius_stages(steps, large_radii):
        windows = np.zeros(stage_steps + 1, dtype=np.int64)
        for done, window in checkpoint_windows(stage_steps, "1" if p == 1.0 else "inf").items():
            windows[done] = window
        stages.append((factor, windows))
    return {
        "eps": _radii(eps, n_rows, rows.dtype),
        "p": p,
        "stages": stages,
        "topk_from_start": bool(large_radii),
        "seed": check_seed(seed),
        "index": row_indices(first_row, n_rows),
        "x_min": float(x_min),
        "x_max": float(x_max),
    }


def _radii(eps, n_rows: int, dtype) -> np.ndarray:
    """eps, a float or one per row, as (N,) float64, each > 0 and finite in ``dtype``."""
    if np.ndim(eps) == 0:
        if not check_radius("eps", eps, dtype) > 0.0:
            raise ValueError("eps must be > 0")
        return np.full(n_rows, float(eps))
    radii = np.asarray(eps)
    if radii.shape != (n_rows,) or radii.dtype.kind not in "fiu":
        raise ValueError(
            f"eps must be a number or one per row, shape ({n_rows},), got shape "
            f"{radii.shape} of {radii.dtype}"
        )
    radii = radii.astype(np.float64)
    for row in np.flatnonzero(~(radii > 0.0))[:1]:
        raise ValueError(f"eps must be > 0, got {radii[row]:g} at row {row}")
    for row in np.flatnonzero(radii > float(np.finfo(dtype).max))[:1]:
        check_radius(f"eps at row {row}", radii[row], dtype)
    return radii


def _worst_case(model, rows, labels, plan, *, index, seed, **settings) -> np.ndarray:
    """Run ``plan`` ((stream, loss, targets (N,) or None) per run) in turn, each on the rows
    still not broken; returns X_adv (N, d) (see ``apgd``)."""
    backend, eps, p = settings["backend"], settings["eps"], settings["p"]
    _, first_loss, first_targets = plan[0]
    _, best_values, predicted = backend.loss_gradient(
        model, rows, labels, first_loss, targets=first_targets
    )
    X_adv = rows.copy()
    broken = predicted != labels
    for stream, loss, targets in plan:
        todo = np.flatnonzero(~broken)
        if not todo.size:
            break
        best = _start(rows[todo], eps[todo], p, seed, stream, index[todo])
        for factor, windows in settings["stages"]:  # each from the best of the one before
            best, values, adversarial, hit = backend.apgd_run(
                *(model, rows[todo], labels[todo], best, loss),
                targets=None if targets is None else targets[todo],
                eps=factor * eps[todo],
                p=p,
                windows=windows,
                x_min=settings["x_min"],
                x_max=settings["x_max"],
                topk_from_start=settings["topk_from_start"],
            )
        X_adv[todo[hit]] = adversarial[hit]
        broken[todo[hit]] = True
        better = ~hit & (values > best_values[todo])
        X_adv[todo[better]] = best[better]
        best_values[todo[better]] = values[better]
    return X_adv


def _start(rows, eps, p, seed, stream, index) -> np.ndarray:
    """The start of a run, in the rows' dtype, before the projection the run applies:
    X + eps u / ||u||_p for u from ``random_in_ball`` (inf, 2), X plus standard normal
    noise (1, as the reference)."""
    d = rows.shape[1]
    if p == 1.0:
        uniforms = row_uniforms(seed, stream, index, d)
        from scipy.special import ndtri  # 0.15 s to import: only where a run needs it

        noise = ndtri(np.clip(uniforms, np.finfo(np.float64).tiny, None))
    else:
        ball = random_in_ball(seed, stream, index, d, p)
        length = np.linalg.norm(ball, ord=p, axis=1, keepdims=True)
        noise = eps[:, None] * (ball / np.where(length > 0.0, length, 1.0))
    with np.errstate(over="ignore"):  # inf past the dtype's range, like PGD's starts
        return (rows + noise).astype(rows.dtype)
