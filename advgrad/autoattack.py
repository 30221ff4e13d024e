"""AutoAttack (Croce & Hein, ICML 2020) and its attacks, on prepared rows over a backend.

The evaluation-grade attacks, each written once in its own module over the backend, run
here under the settings an ``advgrad.attacks.Attack`` gives them: APGD with the
cross-entropy or DLR loss (``advgrad.apgd``), APGD-T, FAB-T (``advgrad.fab``) and Square
(``advgrad.square``). :func:`ensemble` is AutoAttack's protocol, as the reference
implementation (fra31/auto-attack) runs it: the attacks of a version run in turn, each
only on the rows that every attack before it left classified correctly; a row broken by
an attack takes that attack's adversarial point and is not attacked again; rows no attack
breaks, and rows the model already gets wrong, keep their clean values.

Versions (``VERSIONS``), for the norms inf and 2:

- "standard": APGD-CE (``steps``, ``restarts``, default 100 and 1), APGD-T (the
  ``target_classes`` highest non-true classes, default 9), FAB-T (as many targets) and
  Square (``queries``, default 5000);
- "rand": APGD-CE and APGD-DLR, for randomised defences; the reference averages 20
  gradients per step (EOT), which for a deterministic network are one gradient, so each
  step takes it once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from advgrad.apgd import apgd, apgd_targeted
from advgrad.attacks import (
    MODEL_RANGE,
    PER_ROW_EPS_METHODS,
    Attack,
    Labels,
    attack_labels,
    label_matrix,
    prepared_rows,
    row_indices,
)
from advgrad.cw import carlini_wagner_l2
from advgrad.fab import fab_targeted
from advgrad.model import Model
from advgrad.square import square

VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
CLEAN = 0
"""``broken_by`` of a row the model already misclassifies."""
ROBUST = -1
"""``broken_by`` of a row no attack broke."""


@dataclass(frozen=True)
class EnsembleResult:
    """What :func:`ensemble` found.

    Attributes
    ----------
    X_adv : (N, d), the rows' dtype: the adversarial point of each broken row, else the row
    broken_by : (N,) int8: k >= 1 when ``components[k - 1]`` broke the row, ``CLEAN`` (0)
        when the clean row is already misclassified, ``ROBUST`` (-1) when no attack broke it
    components : the attacks run, in order (``VERSIONS``)
    """

    X_adv: np.ndarray
    broken_by: np.ndarray
    components: tuple[str, ...]

    def robust_after(self, k: int) -> np.ndarray:
        """(N,) bool: the rows still classified correctly after the first ``k`` attacks."""
        return (self.broken_by == ROBUST) | (self.broken_by > k)


def broken_by_names(attack: Attack) -> list[str] | None:
    """What the values of an AutoAttack output's ``/broken_by`` column name: entry k of
    the list for the value k ("clean" for 0); -1 is a row no attack broke. None for the
    other attacks (no such column)."""
    if attack.method != "autoattack":
        return None
    return ["clean", *VERSIONS[attack.version]]


def run_attack(
    model: Model,
    rows: np.ndarray,
    labels: Labels,
    attack: Attack,
    clip: tuple[float, float],
    *,
    eps=None,
    first_row,
    backend,
    image_shape=None,
) -> np.ndarray:
    """One evaluation-grade attack (``advgrad.attacks.EVALUATION_METHODS``) on prepared
    rows (N, d) against ``labels.reference`` (N,) int64 (C&W, targeted: towards it);
    returns X_adv (N, d).

    ``eps`` overrides ``attack.eps``; ``first_row`` is the absolute index of the first row,
    or (N,) that of every row (random draws depend on it, not on the batch; see
    ``advgrad.attacks.row_indices``); ``image_shape`` the rows' image shape for Square.
    """
    reference = labels.reference
    if attack.method == "cw":
        targets = reference if attack.targeted else None
        truth = labels.predicted if attack.targeted else reference
        return carlini_wagner_l2(
            *(model, rows, truth),
            x_min=clip[0],
            x_max=clip[1],
            confidence=attack.confidence,
            search_steps=attack.search_steps,
            steps=attack.n_steps,
            targets=targets,
            backend=backend,
        )[0]
    if attack.method == "autoattack":
        return ensemble(
            *(model, rows, reference, attack, clip),
            eps=eps,
            first_row=first_row,
            backend=backend,
            image_shape=image_shape,
        ).X_adv
    radius = attack.eps if eps is None else eps
    if np.ndim(radius) and attack.method not in PER_ROW_EPS_METHODS:
        raise ValueError(f"{attack.method} takes one eps for every row")
    if np.ndim(radius) == 0 and radius == 0.0:  # the ball is the row itself
        return rows.copy()
    common = {
        "eps": radius if np.ndim(radius) else float(radius),
        "norm": attack.norm,
        "seed": attack.seed,
        "x_min": clip[0],
        "x_max": clip[1],
        "backend": backend,
        "first_row": first_row,
    }
    runs = {"steps": attack.n_steps, "restarts": attack.restarts}
    if attack.method in ("apgd-ce", "apgd-dlr"):
        loss = attack.method.removeprefix("apgd-")
        return apgd(model, rows, reference, loss=loss, **runs, **common)
    if attack.method == "apgd-t":
        return apgd_targeted(
            model, rows, reference, target_classes=attack.target_classes, **runs, **common
        )
    if attack.method == "fab-t":
        return fab_targeted(
            model, rows, reference, target_classes=attack.target_classes, **runs, **common
        )
    if attack.method == "square":
        X_adv, _ = square(
            model, rows, reference, queries=attack.queries, image_shape=image_shape, **common
        )
        return X_adv
    raise ValueError(f"{attack.method} is not an evaluation-grade attack")


def ensemble(
    model: Model,
    rows: np.ndarray,
    reference: np.ndarray,
    attack: Attack,
    clip: tuple[float, float],
    *,
    eps=None,
    first_row,
    backend,
    image_shape=None,
) -> EnsembleResult:
    """AutoAttack of ``attack.version`` on prepared rows (N, d) against the classes
    ``reference`` (N,) int64; the arguments are those of :func:`run_attack`."""
    components = VERSIONS[attack.version]
    first_row = row_indices(first_row, len(rows))
    no_labels = np.zeros((0, model.n_classes), dtype=rows.dtype)
    predicted = backend.forward(model, rows, no_labels)[2]
    labels_of = label_matrix(model, reference, len(rows))
    X_adv = rows.copy()
    broken_by = np.where(predicted == reference, ROBUST, CLEAN).astype(np.int8)
    for k, method in enumerate(components, start=1):
        todo = np.flatnonzero(broken_by == ROBUST)
        if not todo.size:
            break
        part = Labels(labels_of[todo], reference[todo], predicted[todo])
        X_try = run_attack(
            *(model, rows[todo], part, replace(attack, method=method), clip),
            eps=eps,
            first_row=first_row[todo],
            backend=backend,
            image_shape=image_shape,
        )
        hit = backend.forward(model, X_try, no_labels)[2] != reference[todo]
        X_adv[todo[hit]] = X_try[hit]
        broken_by[todo[hit]] = k
    return EnsembleResult(X_adv, broken_by, components)


def auto_attack(
    model: Model,
    X,
    y=None,
    *,
    eps: float,
    norm: str = "inf",
    version: str = "standard",
    clip=MODEL_RANGE,
    device: str = "cpu",
    **options,
) -> EnsembleResult:
    """AutoAttack on X (N, ...): the ``EnsembleResult`` (X_adv shaped like X, in the
    model's dtype, and which attack broke each row).

    ``y``: (N,) int labels, (N, C) soft labels, or None for the model's predictions.
    ``clip`` as in ``advgrad.attacks.run``; ``options`` are further ``Attack`` fields
    (steps, restarts, target_classes, queries, seed).
    """
    attack = Attack("autoattack", eps=eps, norm=norm, version=version, **options)
    rows, clip, backend = prepared_rows(model, X, attack, clip, device)
    labels = attack_labels(model, rows, y, attack, backend=backend)
    result = ensemble(
        *(model, rows, labels.reference, attack, clip),
        first_row=0,
        backend=backend,
    )
    return replace(result, X_adv=result.X_adv.reshape(np.shape(X)))
