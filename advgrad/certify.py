"""Certified robustness: provable per-row radii, next to what the strongest attack finds.

A row x is *certified* at eps when x and every input an attack can reach from it,
clip(x + delta, x_min, x_max) with ||delta|| <= eps in the L-inf or L2 norm (for x inside
the clip box: the ball intersected with the box), are classified as its label.
Two bounds on the class margins z_y - z_k prove it (kernels: ``advgrad.kernels.cpu``,
section "certified bounds"):

- ``"ibp"``: interval bounds. Each pre-activation z_j = x W1[:, j] + b1[j] is bounded
  exactly over the region (z_j +- eps ||W1[:, j]||_1 for L-inf, +- eps ||W1[:, j]||_2 for
  L2, with the clip box), the sigmoid is monotone, and each margin is minimised exactly
  over the resulting box of activations.
- ``"crown"``: each sigmoid is relaxed between two lines valid over its pre-activation
  interval (chords and tangents by the curvature region, tangents through an end point
  found by bisection where the interval spans 0, as in CROWN, Zhang et al. 2018), which
  makes a margin lower bound linear in x, minimised exactly over the region (dual norm).
  Per margin the larger of this bound and the interval bound is kept, so it is never
  looser than ``"ibp"``.

The certified radius of a row is found by bisection on eps to ``tolerance``: it is the
largest eps whose bound was verified, so the row is certified at every eps up to it.

Certificates are about the network in exact arithmetic with its stored weights: bounds are
computed in float64 and loosened to cover float64 rounding. A float32 model's own
inference rounds its logits (to about 1e-6); a row whose certified margin is smaller than
that could in principle still flip under float32 inference.

The empirical side brackets each radius from above: PGD with restarts at every eps, and
the smallest adversarial eps that ``advgrad.attacks.minimal_eps`` finds with it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from advgrad.attacks import (
    Attack,
    as_rows,
    attack_labels,
    check_radius,
    check_search,
    label_matrix,
    minimal_eps,
    norm_order,
    perturb,
)
from advgrad.backend import bound_workspace_bytes, check_workspace, get_backend
from advgrad.model import Model
from advgrad.quantiles import lower_quantiles

NORMS = ("inf", "2")
METHODS = ("crown", "ibp")
DEFAULT_EPS = (0.01, 0.02, 0.05, 0.1)
DEFAULT_TOLERANCE = 1e-3
DEFAULT_ATTACK = Attack("pgd", steps=50, restarts=5)
"""The empirical side: PGD (step 2.5 eps / steps), 50 steps, 5 random restarts."""
LINE_STEPS = 20
"""Bisection steps of the sigmoid tangent lines that CROWN uses on intervals spanning 0."""


@dataclass(frozen=True)
class Bracket:
    """Medians over the correctly classified rows of the per-row bracket
    [certified radius, smallest adversarial eps found]; inf where more than half of the
    rows had no adversarial example found up to eps_max. ``found`` is the fraction of those
    rows where one was found."""

    rows: int
    median_lower: float
    median_upper: float
    median_gap: float
    found: float


@dataclass(frozen=True)
class CertifyResult:
    """Result of ``certify``.

    Attributes
    ----------
    norm : "inf" or "2"
    method : "crown" or "ibp"
    eps_values : the eps the accuracies are given at, ascending
    eps_max, tolerance : the radius search range [0, eps_max] and its bisection tolerance
    clip : (x_min, x_max) of the region (infinite: none)
    labels : (N,) int64, the classes certified (the labels, or the clean predictions)
    predicted : (N,) int64, the clean predictions
    radius : (N,) float64, certified radius (0 where not even the clean row is certified)
    certified : (N, E) bool, certified at each eps
    attack : the attack of the empirical side, or None when none ran
    attack_eps : (N,) float64 or None, the smallest eps at which the attack found an
        adversarial example (0 for misclassified rows, inf when none up to eps_max)
    robust : (N, E) bool or None, classified correctly and no adversarial example found
        within eps (empirical robustness, an upper bound of the true robust accuracy)
    certify_seconds, attack_seconds : time spent on bounds and on attacks
    label_source : "labels" (given or the dataset's /y) or "predictions"

    The fractions and the time per row are None for 0 rows (one None per eps).
    """

    norm: str
    method: str
    eps_values: tuple[float, ...]
    eps_max: float
    tolerance: float
    clip: tuple[float, float]
    labels: np.ndarray
    predicted: np.ndarray
    radius: np.ndarray
    certified: np.ndarray
    attack: Attack | None = None
    attack_eps: np.ndarray | None = None
    robust: np.ndarray | None = None
    certify_seconds: float = 0.0
    attack_seconds: float = 0.0
    label_source: str = "labels"

    @property
    def n_rows(self) -> int:
        """N."""
        return len(self.radius)

    @property
    def clean_accuracy(self) -> float | None:
        """Fraction of rows whose clean prediction is the label."""
        return float(np.mean(self.predicted == self.labels)) if self.n_rows else None

    @property
    def certified_accuracy(self) -> tuple[float | None, ...]:
        """Per eps, the fraction of rows certified."""
        return self._per_eps(self.certified)

    @property
    def robust_accuracy(self) -> tuple[float | None, ...] | None:
        """Per eps, the fraction of rows the attack failed on (None without attack)."""
        return None if self.robust is None else self._per_eps(self.robust)

    def _per_eps(self, flags: np.ndarray) -> tuple[float | None, ...]:
        if not self.n_rows:
            return (None,) * len(self.eps_values)
        return tuple(float(v) for v in flags.mean(axis=0))

    @property
    def contradictions(self) -> int:
        """Rows certified at an eps where the attack succeeded: 0 unless a bound is wrong."""
        if self.robust is None:
            return 0
        return int((self.certified & ~self.robust).any(axis=1).sum())

    @property
    def seconds_per_row(self) -> float | None:
        """Certification time per row (attacks excluded)."""
        return self.certify_seconds / self.n_rows if self.n_rows else None

    def bracket(self) -> Bracket | None:
        """Medians of the per-row brackets (None without attack or correct rows)."""
        if self.attack_eps is None:
            return None
        correct = self.predicted == self.labels
        return bracket_of(lambda: [(self.radius, self.attack_eps, correct)])


def bracket_of(
    blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]],
) -> Bracket | None:
    """Medians of the brackets [radius, attack_eps] of the correctly classified rows.

    Parameters
    ----------
    blocks : callable
        Gives the rows in blocks, each time it is called (a few times: see
        ``advgrad.quantiles.lower_quantiles``): (radius (n,) float64, attack_eps (n,)
        float64, correct (n,) bool); for arrays in memory, ``lambda: [(radius, eps, correct)]``.

    Returns
    -------
    Bracket or None
        None when no row is correct.
    """

    def side(which: int) -> Callable[[], Iterator[np.ndarray]]:
        def values() -> Iterator[np.ndarray]:
            for radius, attack_eps, correct in blocks():
                lower, upper = radius[correct], attack_eps[correct]
                yield (lower, upper, upper - lower)[which]

        return values

    medians = [lower_quantiles(side(which), (0.5,)) for which in range(3)]
    if medians[0] is None:
        return None
    rows = found = 0
    for _, attack_eps, correct in blocks():
        rows += int(correct.sum())
        found += int(np.isfinite(attack_eps[correct]).sum())
    return Bracket(rows, *(median for (median,) in medians), found=found / rows)


def check_norm(norm) -> str:
    """``norm`` as "inf" or "2"; ValueError for any other."""
    norm = str(norm).removesuffix(".0")
    if norm not in NORMS:
        raise ValueError(f"certification supports the norms {' and '.join(NORMS)}, got {norm!r}")
    return norm


def _check_options(method: str, eps_values, tolerance: float, clip) -> tuple:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    values = sorted({float(e) for e in eps_values})
    if not all(math.isfinite(e) and e >= 0.0 for e in values):
        raise ValueError(f"eps values must be finite and >= 0, got {list(eps_values)}")
    if not (math.isfinite(tolerance) and tolerance > 0.0):
        raise ValueError(f"the tolerance must be > 0, got {tolerance}")
    x_min, x_max = (-math.inf, math.inf) if clip is None else (float(clip[0]), float(clip[1]))
    if not x_min < x_max:
        raise ValueError(f"clip range ({x_min}, {x_max}) is empty")
    return tuple(values), (x_min, x_max)


def default_eps_max(norm: str, clip: tuple[float, float], n_inputs: int, eps_values) -> float:
    """The top of the radius search: the whole clip box (its width for L-inf, times
    sqrt(d) for L2), else 4 times the largest eps (1 when they are all 0)."""
    width = clip[1] - clip[0]
    if math.isfinite(width):
        return width if norm == "inf" else width * math.sqrt(n_inputs)
    return 4.0 * max(eps_values, default=0.0) or 1.0


def _classes(model: Model, rows: np.ndarray, y, backend) -> np.ndarray:
    if y is None:
        return backend.forward(model, rows, label_matrix(model, None, len(rows)))[2]
    return np.argmax(label_matrix(model, y, len(rows)), axis=1).astype(np.int64)


def margin_bounds(
    model: Model,
    X,
    y=None,
    *,
    eps,
    norm="inf",
    method: str = "crown",
    clip: tuple[float, float] | None = (0.0, 1.0),
    device: str = "cpu",
) -> np.ndarray:
    """Certified lower bounds of each row's worst class margin over its eps-region.

    Parameters
    ----------
    model : Model
    X : (N, ...) array, trailing dimensions flatten to d
    y : (N,) int labels, (N, C) soft labels (their argmax), or None for the predictions
    eps : float or (N,) floats >= 0, the radius per row
    norm : "inf" or "2"
    method : "crown" or "ibp"
    clip : (x_min, x_max) or None
    device : "cpu", "cuda" or "auto" (``advgrad.backend.get_backend``)

    Returns
    -------
    (N,) float64: a lower bound of min over k != y of z_y - z_k over the region; > 0 proves
    that every input of the region is classified as y.
    """
    norm = check_norm(norm)
    _, clip = _check_options(method, (), 1.0, clip)
    rows = as_rows(model, X)
    radius = np.ascontiguousarray(np.broadcast_to(np.asarray(eps, np.float64), len(rows)))
    if not (np.isfinite(radius).all() and (radius >= 0).all()):
        raise ValueError("eps must be finite and >= 0")
    backend = get_backend(device)
    classes = _classes(model, rows, y, backend)
    crown = method == "crown"
    return backend.margin_bounds(
        model, rows, classes, radius, norm_order(norm), *clip, crown, LINE_STEPS
    )


@dataclass(frozen=True)
class CertifySettings:
    """Checked settings of a certification (``certify_settings``)."""

    norm: str
    method: str
    eps_values: tuple[float, ...]
    eps_max: float
    tolerance: float
    clip: tuple[float, float]
    attack: Attack | None
    device: str = "cpu"


@dataclass(frozen=True)
class CertifiedRows:
    """Per-row results of ``certify_rows`` on a block of rows."""

    classes: np.ndarray
    predicted: np.ndarray
    radius: np.ndarray
    certified: np.ndarray
    attack_eps: np.ndarray | None
    robust: np.ndarray | None
    X_adv: np.ndarray | None  # the attack at the largest eps
    predicted_adv: np.ndarray | None
    certify_seconds: float
    attack_seconds: float


def certify_rows(
    model: Model, rows, y, settings: CertifySettings, first_row: int, *, out=None
) -> CertifiedRows:
    """Certify prepared rows (m, d) against y (None: the predictions), and run the attack
    of ``settings`` on them (its examples at the largest eps written into ``out`` (m, d)
    when given); ``first_row`` is the absolute index of the first row (seeds the attack)."""
    backend = get_backend(settings.device)
    predicted = backend.forward(model, rows, label_matrix(model, None, len(rows)))[2]
    classes = predicted if y is None else _classes(model, rows, y, backend)
    grid = sorted({*settings.eps_values, settings.eps_max})
    started = time.perf_counter()
    radius, certified = backend.certified_radius(
        *(model, rows, classes, grid, norm_order(settings.norm), *settings.clip),
        *(settings.method == "crown", LINE_STEPS, settings.tolerance),
    )
    certify_seconds = time.perf_counter() - started
    certified = certified[:, [grid.index(e) for e in settings.eps_values]]
    if settings.attack is None:
        return CertifiedRows(
            classes, predicted, radius, certified, None, None, None, None, certify_seconds, 0.0
        )
    started = time.perf_counter()
    attack = replace(settings.attack, norm=settings.norm, eps=settings.eps_max, target=None)
    labels = attack_labels(model, rows, classes, attack, first_row, backend)
    hits = np.empty((len(rows), len(settings.eps_values)), dtype=bool)
    X_adv = predicted_adv = None
    for column, eps in enumerate(settings.eps_values):
        X_adv = perturb(
            model,
            rows,
            labels,
            attack,
            settings.clip,
            eps=eps,
            first_row=first_row,
            backend=backend,
            out=out,
        )
        predicted_adv = backend.forward(model, X_adv, labels.Y[:0])[2]
        hits[:, column] = predicted_adv != classes
    attack_eps = minimal_eps(
        model,
        rows,
        labels,
        attack,
        settings.clip,
        eps_max=settings.eps_max,
        tolerance=settings.tolerance,
        first_row=first_row,
        backend=backend,
    )
    # an adversarial example at a listed eps also bounds the row's radius from above
    values = np.asarray(settings.eps_values)
    found_at = np.where(hits, values[None, :], np.inf).min(axis=1, initial=np.inf)
    attack_eps = np.minimum(attack_eps, found_at)
    robust = ~hits & (attack_eps[:, None] > values[None, :]) & (predicted == classes)[:, None]
    return CertifiedRows(
        classes,
        predicted,
        radius,
        certified,
        attack_eps,
        robust,
        X_adv,
        predicted_adv,
        certify_seconds,
        time.perf_counter() - started,
    )


def certify_settings(
    model, norm, eps_values, method, tolerance, clip, eps_max, attack, device="cpu"
) -> CertifySettings:
    """The checked settings; every radius finite in the model's dtype and a tolerance that
    the bisections reach (``check_search``), so every search ends; ``device`` usable
    (``advgrad.backend.get_backend``)."""
    get_backend(device)
    norm = check_norm(norm)
    check_workspace("certification", bound_workspace_bytes(model))
    eps_values, clip = _check_options(method, eps_values, tolerance, clip)
    if not eps_values:
        raise ValueError("give at least one eps value")
    for eps in eps_values:
        check_radius("eps", eps, model.dtype)
    name = "eps_max"
    if eps_max is None:
        eps_max = default_eps_max(norm, clip, model.n_inputs, eps_values)
        name = "the default eps_max"
    eps_max, tolerance = check_search(eps_max, tolerance, model.dtype, names=(name, "tolerance"))
    if attack is not None:
        if attack.method != "pgd":
            raise ValueError(f"the empirical side runs pgd, got {attack.method!r}")
        for eps in (*eps_values, eps_max):
            replace(attack, norm=norm, eps=eps, target=None).check_range(model.dtype)
    return CertifySettings(norm, method, eps_values, eps_max, tolerance, clip, attack, device)


def _combine(
    parts: Sequence[CertifiedRows], settings: CertifySettings, label_source: str
) -> CertifyResult:
    def joined(name, shape):
        values = [getattr(part, name) for part in parts]
        if any(value is None for value in values):
            return None
        return np.concatenate(values) if values else np.empty(shape)

    E = len(settings.eps_values)
    return CertifyResult(
        norm=settings.norm,
        method=settings.method,
        eps_values=settings.eps_values,
        eps_max=settings.eps_max,
        tolerance=settings.tolerance,
        clip=settings.clip,
        labels=joined("classes", 0).astype(np.int64),
        predicted=joined("predicted", 0).astype(np.int64),
        radius=joined("radius", 0),
        certified=joined("certified", (0, E)).astype(bool),
        attack=settings.attack,
        attack_eps=joined("attack_eps", 0),
        robust=None if settings.attack is None else joined("robust", (0, E)).astype(bool),
        certify_seconds=sum(part.certify_seconds for part in parts),
        attack_seconds=sum(part.attack_seconds for part in parts),
        label_source=label_source,
    )


def certify(
    model: Model,
    X,
    y=None,
    *,
    norm="inf",
    eps_values: Sequence[float] = DEFAULT_EPS,
    method: str = "crown",
    tolerance: float = DEFAULT_TOLERANCE,
    clip: tuple[float, float] | None = (0.0, 1.0),
    eps_max: float | None = None,
    attack: Attack | None = None,
    first_row: int = 0,
    device: str = "cpu",
) -> CertifyResult:
    """Certified radii and accuracies of X, optionally next to an attack's.

    Parameters
    ----------
    model : Model (float32 or float64; bounds are computed in float64)
    X : (N, ...) array, trailing dimensions flatten to d
    y : (N,) int labels, (N, C) soft labels (their argmax), or None to certify the
        model's own predictions
    norm : "inf" or "2"
    eps_values : radii at which to report certified (and robust) accuracy
    method : "crown" (CROWN-style linear bounds, never looser than ibp) or "ibp"
    tolerance : bisection tolerance of the certified radius (and of the attack's minimal eps)
    clip : (x_min, x_max), the valid input box, or None
    eps_max : top of the radius search; default ``default_eps_max``
    attack : None, or a pgd ``Attack`` (e.g. ``DEFAULT_ATTACK``; its eps, norm and target
        are ignored) run at every eps and bisected for each row's minimal adversarial eps
    first_row : absolute index of X's first row (seeds the attack's random starts)
    device : "cpu", "cuda" or "auto" (``advgrad.backend.get_backend``)
    device : "cpu", "cuda" or "auto" (``advgrad.backend.get_backend``)

    Returns
    -------
    CertifyResult
    """
    settings = certify_settings(
        model, norm, eps_values, method, tolerance, clip, eps_max, attack, device
    )
    rows = as_rows(model, X)
    part = certify_rows(model, rows, y, settings, first_row)
    return _combine([part], settings, "predictions" if y is None else "labels")
