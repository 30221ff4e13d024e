"""Carlini & Wagner's L2 attack (IEEE S&P 2017), written once over a backend.

C&W-L2 looks, for each row x0, for the closest point x of the box [x_min, x_max] that the
model classifies as the attack wants: any class but the label y (untargeted), or the target
t, with a logit margin of at least the confidence kappa. It minimises

    ||x - x0||_2^2 + c * (kappa - m(x)),    m = ``backend.loss_gradient``'s "cw" loss,

m(x) = min(max_{i != y} z_i - z_y, kappa) (targeted: min(z_t - max_{i != t} z_i, kappa)),
the negative of the paper's f shifted by kappa, so the second term is the paper's
c * max(f(x), -kappa) + c * kappa >= 0. The box is a change of variables: x = x_min +
(tanh(w) + 1) / 2 * (x_max - x_min), and Adam runs on w (a finite box is needed). The
constant c is searched per row: it starts at ``c_init``, is multiplied by 10 after each
search step that found no adversarial point while none has been found, and is bisected
between the largest failed and the smallest successful c once one has.

The semantics are those of the authors' code (carlini/nn_robust_attacks, ``l2_attack.py``):

- each search step starts again from x0 (w0 = arctanh of x0 scaled into (-1, 1) and shrunk
  by ``TANH_SHRINK``, rows outside the box clipped into it first), with a fresh Adam;
- step i evaluates the objective, its gradient and the classification at the current w,
  keeps the point when it meets the goal closer to x0 than every point kept before, then
  takes the Adam step (lr ``learning_rate``, betas 0.9 and 0.999, epsilon 1e-8, with
  Kingma and Ba's bias correction);
- early abort: every max(steps // 10, 1) steps a row whose objective is above 0.9999 times
  its value at the previous check stops its search step;
- the goal: the predicted class is not y (targeted: is t) and m(x) >= kappa in the
  model's dtype (m is clipped there: the margin reached kappa).

Two deliberate differences: the early abort compares each row's own objective (the
authors' code compares the batch's sum), so a row's result does not depend on the rows
beside it, as far as the backend's loss and gradient of a row do not; and distances are
measured from x0 itself, where the authors' code measures them from x0 after the round
trip through tanh space. Rows whose clean point already meets the goal are returned
unchanged with l2 = 0. There is no randomness.

The gradients come from ``backend.loss_gradient``, evaluated in the model's dtype; the
objective's gradient by the chain rule, w, Adam's moments and the distances are float64
numpy arrays on the host, one entry per row.
"""

from __future__ import annotations

import math

import numpy as np

from advgrad.attacks import as_rows, check_count, check_radius
from advgrad.backend import get_backend
from advgrad.backend_common import loss_arguments
from advgrad.model import Model

SEARCH_STEPS = 9
"""Steps of the search over c (the authors' default)."""
STEPS = 1000
"""Adam steps per search step: CleverHans' default; the authors' code takes 10,000 and
torchattacks 50. With the early abort a row runs about 400 of them per search step on
average (a random (784, 64, 10) network); cutting them to 100 left C&W below DeepFool-L2's
distance on 69% of the rows there instead of 93%, while 10,000 would multiply the cost of
the rows that keep improving slowly for little gain."""
C_INIT = 1e-2
"""The first c: ART's and CleverHans' initial constant. The authors' code starts at 1e-3,
which spends one more of the search steps multiplying c by 10 before it brackets c."""
LEARNING_RATE = 1e-2
BETA1, BETA2, ADAM_EPSILON = 0.9, 0.999, 1e-8
TANH_SHRINK = 0.999999
"""x0 scaled into (-1, 1) is multiplied by this before arctanh, so that a row on the edge
of the box has a finite w (the authors' value)."""
ABORT_FACTOR = 0.9999
"""A row stops its search step when its objective at a check is above this fraction of its
objective at the check before."""
NO_UPPER_BOUND = 1e10
"""The upper bound of c of a row that has not yet met the goal (the authors' value); below
``BISECT_BELOW`` c is bisected, above it multiplied by 10."""
BISECT_BELOW = 1e9


def carlini_wagner_l2(
    model: Model,
    X,
    labels=None,
    *,
    x_min: float,
    x_max: float,
    confidence: float = 0.0,
    c_init: float = C_INIT,
    search_steps: int = SEARCH_STEPS,
    steps: int = STEPS,
    learning_rate: float = LEARNING_RATE,
    targets=None,
    abort_early: bool = True,
    backend=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Carlini & Wagner's L2 attack: per row, the closest point found that meets the goal.

    Parameters
    ----------
    model : Model
    X : (N, ...) array, trailing dimensions flatten to d; computed in the model's dtype
    labels : (N,) int, the true classes; None: the model's predictions
    x_min, x_max : float, finite, x_min < x_max: the box the points stay in
    confidence : float >= 0, kappa: the logit margin the goal asks for
    c_init : float > 0, the first constant c of every row
    search_steps : int >= 1, steps of the search over c
    steps : int >= 1, Adam steps of each search step
    learning_rate : float > 0, Adam's step size
    targets : (N,) int, the target class of each row (a targeted attack); None: untargeted
    abort_early : bool, stop a row's search step when its objective stalls
    backend : a backend (``advgrad.backend.get_backend``); None: the CPU's

    Returns
    -------
    X_adv : array shaped like X, in the model's dtype: for each row the closest point to
        it that met the goal, else the row unchanged
    l2 : (N,) float64, ||X_adv - X||_2 per row (of the rows in the model's dtype): 0 for
        rows whose clean point already meets the goal, inf where no point met it

    Raises ValueError (one line) for a bad setting, label, target or shape.
    """
    kappa = check_radius("confidence", confidence, model.dtype)
    c_init = _positive("c_init", c_init, model.dtype)
    learning_rate = _positive("learning_rate", learning_rate, model.dtype)
    search_steps = check_count("search_steps", search_steps)
    steps = check_count("steps", steps)
    x_min, x_max = float(x_min), float(x_max)
    largest = float(np.finfo(model.dtype).max)
    if not (-largest <= x_min < x_max <= largest and math.isfinite(x_max - x_min)):
        raise ValueError(
            f"C&W needs a box x_min < x_max of finite width in {model.dtype} (tanh maps "
            f"onto it), got ({x_min:g}, {x_max:g})"
        )
    backend = backend or get_backend()
    rows = as_rows(model, X)
    if labels is None:
        labels = np.argmax(backend.logits(model, rows), axis=1)
    _, labels, targets, _ = loss_arguments(model.n_classes, len(rows), "cw", labels, targets, kappa)
    search = _Search(model, rows, labels, targets if len(targets) else None, kappa, backend)
    search.run(x_min, x_max, c_init, search_steps, steps, learning_rate, abort_early)
    return search.X_adv.reshape(np.shape(X)), np.sqrt(search.best_squared)


def _positive(name: str, value, dtype) -> float:
    """``value`` as a float > 0 and finite in ``dtype``; ValueError naming ``name``."""
    number = check_radius(name, value, dtype)
    if number == 0.0:
        raise ValueError(f"{name} must be > 0")
    return number


class _Search:
    """The per-row state of one attack: the best points and squared distances so far."""

    def __init__(self, model, rows, labels, targets, kappa, backend):
        self.model, self.rows, self.labels, self.targets = model, rows, labels, targets
        self.kappa, self.backend = kappa, backend
        self.kappa_reached = rows.dtype.type(kappa)  # m(x) when the margin reached kappa
        self.X_adv = rows.copy()
        self.best_squared = np.full(len(rows), np.inf)
        _, values, predicted = self._loss_gradient(rows, np.arange(len(rows)))
        self.best_squared[self._goal(values, predicted, np.arange(len(rows)))] = 0.0

    def _loss_gradient(self, X, index):
        """``backend.loss_gradient``'s "cw" loss of the rows X of the attack's rows index."""
        targets = None if self.targets is None else self.targets[index]
        return self.backend.loss_gradient(
            self.model, X, self.labels[index], "cw", targets=targets, kappa=self.kappa
        )

    def _goal(self, values, predicted, index):
        """Whether each point met the goal: the class the attack wants, margin kappa."""
        wanted = predicted != self.labels[index]
        if self.targets is not None:
            wanted = predicted == self.targets[index]
        return wanted & (values >= self.kappa_reached)

    def run(self, x_min, x_max, c_init, search_steps, steps, learning_rate, abort_early):
        """The search over c of the rows not met at the clean point, updating the best points."""
        todo = np.flatnonzero(self.best_squared != 0.0)
        if not len(todo):
            return
        start = self.rows[todo].astype(np.float64)
        half = 0.5 * (x_max - x_min)
        scaled = (np.clip(start, x_min, x_max) - x_min) / half - 1.0
        w_start = np.arctanh(scaled * TANH_SHRINK)
        c = np.full(len(todo), c_init)
        lower = np.zeros(len(todo))
        upper = np.full(len(todo), NO_UPPER_BOUND)
        box = (x_min, x_max, half)
        for _ in range(search_steps):
            met = self._descend(todo, start, w_start, c, box, steps, learning_rate, abort_early)
            upper = np.where(met, np.minimum(upper, c), upper)
            lower = np.where(met, lower, np.maximum(lower, c))
            c = np.where(upper < BISECT_BELOW, 0.5 * (lower + upper), np.where(met, c, 10.0 * c))

    def _descend(self, todo, start, w_start, c, box, steps, learning_rate, abort_early):
        """One search step: Adam on w from w_start for the rows ``todo`` (their clean rows
        ``start``, float64) with constants c; returns whether each row met the goal.

        The float64 arrays of the live rows are updated in place (scratch included), so that
        a step allocates none of the size of the rows but the model's copy of the points."""
        x_min, x_max, half = box
        met = np.zeros(len(todo), dtype=bool)
        live = np.arange(len(todo))  # the rows still descending, as positions in todo
        origin, c_live, w = start, c, w_start.copy()
        first, second = np.zeros_like(w), np.zeros_like(w)  # Adam's moments
        tanh_w, X, slope, gradient = (np.empty_like(w) for _ in range(4))
        previous = np.full(len(todo), np.inf)
        check_every = max(steps // 10, 1)
        for step in range(steps):
            index = todo[live]
            np.tanh(w, out=tanh_w)
            np.add(tanh_w, 1.0, out=X)
            X *= half
            X += x_min
            np.clip(X, x_min, x_max, out=X)  # rounding only
            X_model = X.astype(self.rows.dtype, copy=False)
            G, values, predicted = self._loss_gradient(X_model, index)
            goal = self._goal(values, predicted, index)
            met[live[goal]] = True
            self._keep(index[goal], X_model[goal], origin[goal])
            offset = np.subtract(X, origin, out=X)
            # d/dw of ||x - x0||^2 + c (kappa - m(x)): (2 (x - x0) - c dm/dx) half (1 - t^2)
            np.multiply(G, c_live[:, None], out=gradient)
            np.subtract(np.multiply(offset, 2.0, out=slope), gradient, out=gradient)
            np.multiply(tanh_w, tanh_w, out=slope)
            np.subtract(1.0, slope, out=slope)
            slope *= half
            gradient *= slope
            _adam_step(w, first, second, gradient, slope, step + 1, learning_rate)
            if abort_early and step % check_every == 0:
                objective = np.einsum("nd,nd->n", offset, offset) + c_live * (self.kappa - values)
                going = ~(objective > ABORT_FACTOR * previous)
                if not going.all():
                    live, origin, c_live = live[going], origin[going], c_live[going]
                    w, first, second = w[going], first[going], second[going]
                    tanh_w, X, slope, gradient = (np.empty_like(w) for _ in range(4))
                    if not len(live):
                        break
                previous = objective[going]
        return met

    def _keep(self, index, X, origin):
        """Keep the points X (float64 ``origin``: their clean rows) of the rows ``index``
        that are closer to their clean rows than the best points so far."""
        offset = X - origin
        squared = np.einsum("nd,nd->n", offset, offset)
        closer = squared < self.best_squared[index]
        self.best_squared[index[closer]] = squared[closer]
        self.X_adv[index[closer]] = X[closer]


def _adam_step(w, first, second, gradient, scratch, count, learning_rate):
    """Adam's step number ``count`` on w along ``gradient``, all (n, d) float64 in place
    (``gradient`` and ``scratch`` are overwritten): Kingma and Ba's bias-corrected step
    lr m_hat / (sqrt(v_hat) + eps), its corrections folded into the scalars."""
    first *= BETA1
    first += np.multiply(gradient, 1.0 - BETA1, out=scratch)
    second *= BETA2
    second += np.multiply(np.square(gradient, out=gradient), 1.0 - BETA2, out=gradient)
    correction = math.sqrt(1.0 - BETA2**count)
    np.sqrt(second, out=scratch)
    scratch += ADAM_EPSILON * correction
    np.divide(first, scratch, out=scratch)
    scratch *= learning_rate * correction / (1.0 - BETA1**count)
    w -= scratch
