"""AutoAttack (Croce & Hein, ICML 2020) and its attacks, on prepared rows over a backend.

The evaluation-grade attacks, each written once in its own module over the backend, run
here under the settings an ``advgrad.attacks.Attack`` gives them: APGD with the
cross-entropy or DLR loss (``advgrad.apgd``), APGD-T, FAB and FAB-T (``advgrad.fab``) and
Square (``advgrad.square``). :func:`ensemble` is AutoAttack's protocol, as the reference
implementation (fra31/auto-attack) runs it: the attacks of a version run in turn, each
only on the rows that every attack before it left classified correctly; a row broken by
an attack takes that attack's adversarial point and is not attacked again; rows no attack
breaks, and rows the model already gets wrong, keep their clean values.

Versions (``VERSIONS``: the attacks in order, each a ``Component``), for the norms inf
and 2, as the reference sets them:

- "standard": APGD-CE (``steps``, default 100; one run), APGD-T (the ``target_classes``
  highest non-true classes, default 9, one run each), FAB-T (as many targets) and Square
  (``queries``, default 5000);
- "plus": APGD-CE and APGD-DLR with 5 restarts each, untargeted FAB with 5 restarts,
  Square, then APGD-T and FAB-T as in "standard";
- "rand": APGD-CE and APGD-DLR, one run each, for randomised defences; the reference
  averages 20 gradients per step (EOT), which for a deterministic network are one
  gradient, so each step takes it once.

For the norm 1 (``L1_VERSIONS``): "standard" runs APGD-CE with 5 restarts and APGD-T
against 5 classes, both at 3 eps, 2 eps, then eps (the reference's ``use_largereps``), then
FAB-T and Square; "rand" as above; "plus" is for inf and 2 only.

``restarts``, where given, replaces the restarts of the untargeted APGD and FAB runs of
every version (the reference's ``apgd.n_restarts`` and ``fab.n_restarts``), and
``target_classes`` the targets of APGD-T and FAB-T; the targeted attacks run once per
target, as there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from advgrad.apgd import LARGE_RADII, apgd, apgd_targeted
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
from advgrad.fab import fab, fab_targeted
from advgrad.model import Model
from advgrad.square import square


class Component(NamedTuple):
    """One attack of a version, as the reference sets it."""

    method: str
    restarts: int = 1
    """runs; the untargeted APGD and FAB take ``Attack.restarts`` instead, where given"""
    target_classes: int | None = None
    """the targeted attacks' targets; None: ``Attack.n_target_classes``"""
    large_radii: bool = False
    """L1 APGD: runs at 3 eps, 2 eps, then eps (``advgrad.apgd.radius_stages``)"""


VERSIONS = {
    "standard": (
        Component("apgd-ce"),
        Component("apgd-t"),
        Component("fab-t"),
        Component("square"),
    ),
    "plus": (
        Component("apgd-ce", restarts=5),
        Component("apgd-dlr", restarts=5),
        Component("fab", restarts=5),
        Component("square"),
        Component("apgd-t"),
        Component("fab-t"),
    ),
    "rand": (Component("apgd-ce"), Component("apgd-dlr")),
}
"""Each version's attacks for the norms inf and 2, in the order they run."""
L1_VERSIONS = {
    "standard": (
        Component("apgd-ce", restarts=5, large_radii=True),
        Component("apgd-t", target_classes=5, large_radii=True),
        Component("fab-t"),
        Component("square"),
    ),
    "rand": VERSIONS["rand"],
}
"""The versions for the norm 1 (the reference's "plus" is for inf and 2)."""
UNTARGETED_RESTARTS = ("apgd-ce", "apgd-dlr", "fab")
"""The attacks whose restarts ``Attack.restarts`` sets in a version, where given."""
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
    components : the attacks run, in order (the names of ``VERSIONS``)
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
    return ["clean", *components(attack.version, attack.norm)]


def version_components(version: str, norm: str = "inf") -> tuple[Component, ...]:
    """The attacks of ``version`` for ``norm`` ("inf", "2" or "1"), in the order they run;
    ValueError (one line) for a version the norm does not have."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {', '.join(VERSIONS)}, got {version!r}")
    versions = L1_VERSIONS if str(norm).removesuffix(".0") == "1" else VERSIONS
    if version not in versions:
        raise ValueError(
            f"autoattack's {version} version is for the norms inf and 2; in L1: "
            f"{', '.join(L1_VERSIONS)}"
        )
    return versions[version]


def components(version: str, norm: str = "inf") -> tuple[str, ...]:
    """The names of the attacks of ``version`` for ``norm``, in the order they run."""
    return tuple(component.method for component in version_components(version, norm))


def component_settings(attack: Attack) -> list[str]:
    """What each attack of AutoAttack ``attack`` runs with, a line each in the order they
    run (an output's ``components`` attribute), e.g. "apgd-t: 100 steps, 1 restart,
    5 target classes, radii 3, 2, 1 x eps"."""
    lines = []
    for component in version_components(attack.version, attack.norm):
        run = component_attack(attack, component)
        if run.method == "square":
            parts = [f"{run.queries} queries"]
        else:
            restarts = run.n_restarts
            parts = [f"{run.n_steps} steps", f"{restarts} restart{'s' * (restarts != 1)}"]
        if run.method in ("apgd-t", "fab-t"):
            parts.append(f"{run.n_target_classes} target classes")
        if component.large_radii:
            parts.append(f"radii {', '.join(f'{r:g}' for r in LARGE_RADII)} x eps")
        lines.append(f"{run.method}: {', '.join(parts)}")
    return lines


def version_restarts(version: str, norm: str = "inf") -> int:
    """The restarts ``version`` gives its untargeted APGD and FAB runs (1 where it has none)."""
    return max(
        (
            component.restarts
            for component in version_components(version, norm)
            if component.method in UNTARGETED_RESTARTS
        ),
        default=1,
    )


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
    large_radii: bool = False,
) -> np.ndarray:
    """One evaluation-grade attack (``advgrad.attacks.EVALUATION_METHODS``) on prepared
    rows (N, d) against ``labels.reference`` (N,) int64 (C&W, targeted: towards it);
    returns X_adv (N, d).

    ``eps`` overrides ``attack.eps``; ``first_row`` is the absolute index of the first row,
    or (N,) that of every row (random draws depend on it, not on the batch; see
    ``advgrad.attacks.row_indices``); ``image_shape`` the rows' image shape for Square;
    ``large_radii``: APGD's L1 runs at 3 eps, 2 eps, then eps (AutoAttack's L1).
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
    runs = {"steps": attack.n_steps, "restarts": attack.n_restarts}
    if attack.method in ("apgd-ce", "apgd-dlr"):
        loss = attack.method.removeprefix("apgd-")
        return apgd(model, rows, reference, loss=loss, large_radii=large_radii, **runs, **common)
    if attack.method == "apgd-t":
        targets = attack.n_target_classes
        return apgd_targeted(
            *(model, rows, reference),
            target_classes=targets,
            large_radii=large_radii,
            **runs,
            **common,
        )
    if attack.method == "fab":
        return fab(model, rows, reference, **runs, **common)
    if attack.method == "fab-t":
        return fab_targeted(
            model, rows, reference, target_classes=attack.n_target_classes, **runs, **common
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
    first_row = row_indices(first_row, len(rows))
    no_labels = np.zeros((0, model.n_classes), dtype=rows.dtype)
    predicted = backend.forward(model, rows, no_labels)[2]
    labels_of = label_matrix(model, reference, len(rows))
    X_adv = rows.copy()
    broken_by = np.where(predicted == reference, ROBUST, CLEAN).astype(np.int8)
    for k, component in enumerate(version_components(attack.version, attack.norm), start=1):
        todo = np.flatnonzero(broken_by == ROBUST)
        if not todo.size:
            break
        part = Labels(labels_of[todo], reference[todo], predicted[todo])
        X_try = run_attack(
            *(model, rows[todo], part, component_attack(attack, component), clip),
            eps=eps,
            first_row=first_row[todo],
            backend=backend,
            image_shape=image_shape,
            large_radii=component.large_radii,
        )
        hit = backend.forward(model, X_try, no_labels)[2] != reference[todo]
        X_adv[todo[hit]] = X_try[hit]
        broken_by[todo[hit]] = k
    return EnsembleResult(X_adv, broken_by, components(attack.version, attack.norm))


def component_attack(attack: Attack, component: Component) -> Attack:
    """The ``Attack`` that runs ``component`` of AutoAttack ``attack``: its method, its
    restarts (``attack.restarts`` for the untargeted APGD and FAB, where given) and its
    targets (``attack.target_classes`` where given)."""
    restarts = component.restarts
    if attack.restarts is not None and component.method in UNTARGETED_RESTARTS:
        restarts = attack.restarts
    targets = attack.target_classes
    if targets is None:
        targets = component.target_classes
    return replace(attack, method=component.method, restarts=restarts, target_classes=targets)


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
