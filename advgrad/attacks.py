"""Attacks on a ``Model``: input gradients, FGM, BIM, PGD, MI-FGSM, DeepFool, minimal eps.

Every attack is written once here, over a backend (``advgrad.backend``) that runs the
kernels of one device. Public functions take inputs ``X`` of shape (N, ...) whose trailing
dimensions flatten to the model's d, compute in the model's dtype, and return arrays shaped
like ``X``.

Randomness (PGD starts, random targets) comes from ``seed`` alone, drawn per group of
``RANDOM_GROUP_ROWS`` rows of absolute index, so the same seed gives the same numbers for a
row whatever the batch size it is processed in.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

from advgrad.backend import get_backend
from advgrad.model import Model

NORMS = {"inf": np.inf, "2": 2.0, "1": 1.0}
GRADIENT_METHODS = ("fgsm", "bim", "pgd", "mifgsm", "deepfool")
EVALUATION_METHODS = (
    "apgd-ce",
    "apgd-dlr",
    "apgd-t",
    "fab",
    "fab-t",
    "square",
    "autoattack",
    "cw",
)
"""The evaluation-grade attacks (``advgrad.autoattack``): each runs its own schedule,
against the labels or the clean predictions, untargeted (APGD-T chooses its targets) but
for C&W."""
METHODS = GRADIENT_METHODS + EVALUATION_METHODS
L1_STEP_METHODS = ("fgsm", "bim", "pgd", "mifgsm")
"""The methods whose L1 steps are sparse (``Attack.l1_coordinates``)."""
SLIDE_FRACTION = 0.01
"""The iterative methods' default share of coordinates an L1 step moves: SLIDE's top 1 %
(the coordinates above the 99th percentile of |G|, Tramer & Boneh 2019)."""
MINIMAL_NORM_METHODS = ("deepfool", "cw")
"""Attacks that look for the smallest perturbation, with no eps: a row's minimal eps is
the norm of its perturbation where the attack succeeds."""
PER_ROW_EPS_METHODS = (*GRADIENT_METHODS, "apgd-ce", "apgd-dlr", "apgd-t", "cw")
"""Attacks whose minimal eps a row can have (``minimal_eps``): they take an eps per row, or
(DeepFool, C&W) need none. Square, FAB, FAB-T and AutoAttack take one eps for every row."""
TARGET_CLASSES = 9
"""Default number of targets of APGD-T, FAB-T and AutoAttack's targeted attacks (at most
C - 1 are used), the reference's."""
DEFAULT_STEPS = {"bim": 10, "pgd": 10, "mifgsm": 10, "cw": 1000}
"""Default ``steps`` of the methods not in it: 100 (APGD, as the reference; 1 for fgsm)."""
VERSIONS = ("standard", "plus", "rand")
"""AutoAttack versions (``advgrad.autoattack.VERSIONS``)."""
TARGET_MODES = ("random", "least-likely")
RANDOM_GROUP_ROWS = 256
TARGET_STREAM = 2**31  # random-number stream of random targets; PGD restart r uses stream r
SOFT_LABEL_TOLERANCE = 1e-3  # largest |sum_k Y_nk - 1| accepted for soft labels
MAX_COUNT = 2**31 - 1
"""Largest value of a count setting (steps, restarts, max_iter here; hidden, epochs,
batch_size, patience and adv_steps of training): what every loop counter and HDF5 attribute
holds."""
SEED_LIMIT = 2**63
"""Seeds are integers in [0, SEED_LIMIT), so that they are stored as int64 attributes."""
MAX_BISECTIONS = 64
"""Most halvings of a minimal-eps search. The tolerance is at least the float64 spacing at
eps_max (``check_search``), so [0, eps_max] narrows to it in at most 54 halvings (a float64
significand and rounding); the bound makes the search end whatever the rounding does."""


def check_count(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an int in [minimum, MAX_COUNT]; ValueError naming ``name`` otherwise."""
    try:
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r:.40}") from None
    if not minimum <= count <= MAX_COUNT:
        raise ValueError(f"{name} must be at least {minimum} and at most {MAX_COUNT}, got {count}")
    return count


def check_seed(value) -> int:
    """``value`` as an int in [0, SEED_LIMIT); ValueError otherwise."""
    try:
        seed = operator.index(value)
    except TypeError:
        raise ValueError(f"seed must be an integer, got {value!r:.40}") from None
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def check_radius(name: str, value, dtype=np.float64) -> float:
    """``value`` as a float: >= 0 and finite in ``dtype`` (the compute dtype), else a
    ValueError naming ``name``. A radius beyond dtype's largest value would turn every
    perturbed input into inf, and a bisection up to it would never end."""
    radius = float(value)
    largest = float(np.finfo(dtype).max)
    if not 0.0 <= radius <= largest:  # NaN fails too
        raise ValueError(
            f"{name} must be >= 0 and finite (at most {largest:.4g} in {np.dtype(dtype)}), "
            f"got {radius:g}"
        )
    return radius


def check_search(
    eps_max, tolerance, dtype, *, names: tuple[str, str] = ("eps_max", "tolerance")
) -> tuple[float, float]:
    """The top ``eps_max`` and the ``tolerance`` of a bisection on [0, eps_max], as floats.

    eps_max must be > 0 and finite in ``dtype`` (``check_radius``); the tolerance must be
    finite and at least the float64 spacing at eps_max: no bisection of float64 values can
    resolve eps more finely there, so a smaller one would never be reached. Refusals are
    ValueErrors naming the option (``names``: the eps_max's and the tolerance's).
    """
    eps_max = check_radius(names[0], eps_max, dtype)
    if eps_max == 0.0:
        raise ValueError(f"{names[0]}, the top of the search, must be > 0")
    tolerance = float(tolerance)
    spacing = float(np.spacing(eps_max))
    if not (math.isfinite(tolerance) and tolerance > 0.0 and tolerance >= spacing):
        raise ValueError(
            f"{names[1]} must be finite and at least {spacing:.3g} (the float64 spacing at "
            f"{names[0]} = {eps_max:g}: a bisection resolves eps no finer), got {tolerance:g}"
        )
    return eps_max, tolerance


def as_rows(model: Model, X) -> np.ndarray:
    """X (N, ...) as a C-contiguous (N, d) array of the model's dtype; validates d."""
    X = np.asarray(X)
    if X.ndim < 1:
        raise ValueError("X must have a leading row dimension, got a scalar")
    if X.dtype.kind not in "fiu":
        raise ValueError(f"X must be numeric, got dtype {X.dtype}")
    rows = X.reshape(X.shape[0], -1) if X.ndim != 2 else X
    if rows.shape[1] != model.n_inputs:
        raise ValueError(
            f"X rows have {rows.shape[1]} features (shape {X.shape}); the model expects "
            f"d = {model.n_inputs}"
        )
    return np.ascontiguousarray(rows, dtype=model.dtype)


def label_matrix(model: Model, y, n_rows: int) -> np.ndarray:
    """Labels as a (N, C) float matrix of the model's dtype; (0, C) when ``y`` is None.

    ``y`` holds integer classes (N,) in [0, C), or soft labels (N, C) with rows summing to 1.
    None means "use the model's own predictions" (the kernels' 0-row convention).
    """
    C = model.n_classes
    if y is None:
        return np.zeros((0, C), dtype=model.dtype)
    y = np.asarray(y)
    if y.shape[:1] != (n_rows,):
        raise ValueError(f"y has {y.shape[:1] or 'no'} rows, X has {n_rows}")
    if y.ndim == 1:
        if y.dtype.kind not in "iu":
            raise ValueError(f"integer labels expected for 1-D y, got dtype {y.dtype}")
        bad = np.flatnonzero((y < 0) | (y >= C))
        if bad.size:
            raise ValueError(f"label {y[bad[0]]} at row {bad[0]} is outside [0, {C})")
        Y = np.zeros((n_rows, C), dtype=model.dtype)
        Y[np.arange(n_rows), y] = 1.0
        return Y
    if y.ndim != 2 or y.shape[1] != C or y.dtype.kind != "f":
        raise ValueError(f"soft labels must be float (N, {C}), got {y.dtype} {y.shape}")
    if not np.isfinite(y).all() or (y < 0).any():
        raise ValueError("soft labels must be finite and non-negative")
    worst = np.abs(y.sum(axis=1) - 1.0).max(initial=0.0)
    if worst > SOFT_LABEL_TOLERANCE:
        raise ValueError(f"soft label rows must sum to 1 (off by up to {worst:.3g})")
    return np.ascontiguousarray(y, dtype=model.dtype)


def norm_order(norm) -> float:
    """The p of a norm name: "inf" -> np.inf, "2" -> 2.0, "1" -> 1.0 (2 and 2.0 accepted)."""
    key = str(norm).removesuffix(".0")
    if key not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return NORMS[key]


@dataclass(frozen=True)
class Attack:
    """An attack and its parameters.

    Attributes
    ----------
    method : "fgsm" (one fast-gradient step, in any norm), "bim", "pgd", "mifgsm",
        "deepfool", or one of ``EVALUATION_METHODS``: "apgd-ce", "apgd-dlr", "apgd-t",
        "fab", "fab-t", "square", "autoattack", "cw"
    eps : radius of the perturbation in ``norm`` (DeepFool, C&W: not used)
    norm : "inf", "2" or "1" (DeepFool: "inf" or "2"; C&W: "2"; AutoAttack's "plus" version:
        "inf" or "2")
    steps : iterations of bim, pgd and mifgsm (None: 10), of APGD and AutoAttack's APGD
        (None: 100)
    step_size : step length alpha; None: 2.5 eps / steps for pgd (Madry et al.), eps / steps
        for bim and mifgsm (APGD sets its own)
    restarts : pgd, APGD and FAB runs from independent random starts; each row keeps its worst
        case. None: 1, and for AutoAttack its version's (``advgrad.autoattack.VERSIONS``)
    decay : mifgsm momentum decay mu
    overshoot, max_iter : DeepFool's overshoot and iteration limit
    target : None (untargeted), a class index, "random" or "least-likely"
    seed : seeds every random choice
    target_classes : APGD-T, FAB-T (and AutoAttack's targeted attacks): the highest
        non-true classes attacked in turn, at most C - 1; None: ``TARGET_CLASSES``
    queries : Square's queries per row
    version : AutoAttack's version, "standard", "plus" or "rand" (``advgrad.autoattack.VERSIONS``)
    confidence, search_steps : C&W's margin kappa and its binary search steps over c (its
        ``steps`` are Adam's per search step, default 1000)
    l1_coordinates : norm "1" with fgsm, bim, pgd or mifgsm only: each step moves eps / q
        (alpha / q) along sign(G) on the q coordinates of largest |G| (SLIDE's sparse step;
        q above d counts as d). None: the default of ``l1_step_coordinates``: for fgsm the
        steepest step that fits the clip range, q = ceil(eps / (x_max - x_min)) (1 without a
        range), and SLIDE's top 1 % for the iterative methods
    """

    method: str = "fgsm"
    eps: float = 0.1
    norm: str = "inf"
    steps: int | None = None
    step_size: float | None = None
    restarts: int | None = None
    decay: float = 1.0
    overshoot: float = 0.02
    max_iter: int = 50
    target: int | str | None = None
    seed: int = 0
    target_classes: int | None = None
    queries: int = 5000
    version: str = "standard"
    confidence: float = 0.0
    search_steps: int = 9
    l1_coordinates: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        object.__setattr__(self, "norm", str(self.norm).removesuffix(".0"))
        norm_order(self.norm)
        check_radius("eps", self.eps)
        if self.version not in VERSIONS:
            raise ValueError(f"version must be one of {', '.join(VERSIONS)}, got {self.version!r}")
        for name in (
            "n_steps",
            "n_restarts",
            "max_iter",
            "n_target_classes",
            "queries",
            "search_steps",
        ):
            check_count(name.removeprefix("n_"), getattr(self, name))
        if self.method in EVALUATION_METHODS:
            self._check_evaluation_method()
        check_seed(self.seed)
        if self.step_size is not None and not check_radius("step size", self.step_size) > 0.0:
            raise ValueError(f"step size must be > 0, got {self.step_size}")
        if not (0.0 <= self.decay < math.inf and 0.0 <= self.overshoot < math.inf):
            raise ValueError("decay and overshoot must be >= 0 and finite")
        if isinstance(self.target, str) and self.target not in TARGET_MODES:
            raise ValueError(
                f"target must be a class index, 'random' or 'least-likely', got {self.target!r}"
            )
        if self.method == "deepfool" and (self.norm == "1" or self.target is not None):
            raise ValueError("deepfool is untargeted and supports the norms inf and 2")
        if self.l1_coordinates is not None:
            if self.norm != "1" or self.method not in L1_STEP_METHODS:
                raise ValueError(
                    "l1 coordinates apply to the L1 steps of "
                    f"{', '.join(L1_STEP_METHODS)} (norm 1) only; drop it"
                )
            check_count("l1 coordinates", self.l1_coordinates)

    def _check_evaluation_method(self) -> None:
        if self.method == "cw":
            if self.norm != "2":
                raise ValueError(f"cw is an L2 attack (norm 2), got norm {self.norm!r}")
            if not 0.0 <= self.confidence < math.inf:
                raise ValueError(f"confidence must be >= 0 and finite, got {self.confidence}")
            return
        if self.target is not None:
            raise ValueError(
                f"{self.method} is untargeted (apgd-t chooses its own targets); drop the target"
            )
        if self.step_size is not None:
            raise ValueError(f"{self.method} sets its own step size; drop the step size")
        if self.fewest_steps > 1:
            from advgrad.apgd import radius_stages  # it builds on this module

            try:
                radius_stages(self.n_steps, large_radii=True)
            except ValueError:
                raise ValueError(
                    "autoattack in L1 runs APGD's steps at 3 eps, 2 eps, then eps, which "
                    f"leaves no step at eps of steps={self.n_steps}: take 3 or at least 5"
                ) from None

    def check_range(self, dtype) -> None:
        """Refuse (ValueError) an eps or step size beyond the largest value of ``dtype``,
        the compute dtype: every perturbed input would be inf."""
        check_radius("eps", self.eps, dtype)
        check_radius("step size", self.alpha, dtype)

    @property
    def n_steps(self) -> int:
        """``steps``, or the method's default where it is None (``DEFAULT_STEPS``)."""
        return DEFAULT_STEPS.get(self.method, 100) if self.steps is None else self.steps

    @property
    def fewest_steps(self) -> int:
        """The fewest ``steps`` this attack takes: for an AutoAttack version with APGD at
        large radii (L1 standard) a step at each of its radii (``apgd.LARGE_RADII``), else 1."""
        if self.method != "autoattack":
            return 1
        from advgrad.apgd import LARGE_RADII  # both build on this module
        from advgrad.autoattack import version_components

        components = version_components(self.version, self.norm)
        return len(LARGE_RADII) if any(c.large_radii for c in components) else 1

    @property
    def n_target_classes(self) -> int:
        """``target_classes``, or ``TARGET_CLASSES`` (9) where it is None (AutoAttack's L1
        APGD-T then takes its version's 5)."""
        return TARGET_CLASSES if self.target_classes is None else self.target_classes

    @property
    def n_restarts(self) -> int:
        """``restarts``, or where it is None 1, and for AutoAttack the restarts its version
        gives its untargeted APGD and FAB (``advgrad.autoattack.version_restarts``)."""
        if self.restarts is not None:
            return self.restarts
        if self.method == "autoattack":
            from advgrad.autoattack import version_restarts  # it builds on this module

            return version_restarts(self.version, self.norm)
        return 1

    def l1_step_coordinates(self, n_features: int, clip=(-math.inf, math.inf)) -> int:
        """q, the coordinates an L1 step moves on rows of ``n_features`` features clipped to
        ``clip``: ``l1_coordinates``, else, for fgsm, the fewest coordinates that can take
        all of eps within the clip range, ceil(eps / (x_max - x_min)) (1 without a finite
        range: the steepest step, all of eps on the largest |G_i|; a coordinate cannot move
        further than the range), and ceil(SLIDE_FRACTION * d) for the iterative methods
        (SLIDE's top 1 %: steps on one coordinate at a time stall on the box and make slow
        progress); at most d, at least 1."""
        if self.l1_coordinates is not None:
            return max(1, min(self.l1_coordinates, n_features))
        if self.method == "fgsm":
            width = clip[1] - clip[0]
            fill = math.ceil(self.eps / width) if 0.0 < width < math.inf else 1
            return max(1, min(fill, n_features))
        return max(1, math.ceil(SLIDE_FRACTION * n_features))

    @property
    def targeted(self) -> bool:
        """Whether the attack descends the loss toward a target class."""
        return self.target is not None

    @property
    def alpha(self) -> float:
        """The step length of the iterative methods (``eps`` for fgsm)."""
        if self.method == "fgsm":
            return self.eps
        if self.step_size is not None:
            return self.step_size
        return (2.5 if self.method == "pgd" else 1.0) * self.eps / self.n_steps

    def describe(self) -> dict:
        """The parameters that matter for this method, as attribute-friendly values."""
        out = {"attack": self.method, "norm": self.norm, "seed": self.seed}
        if self.method == "cw":
            out |= {"steps": self.n_steps, "confidence": self.confidence}
            out |= {"search_steps": self.search_steps, "targeted": self.targeted}
            return out | ({"target": str(self.target)} if self.targeted else {})
        if self.method in EVALUATION_METHODS:
            out["eps"] = self.eps
            if self.method != "square":
                out |= {"steps": self.n_steps, "restarts": self.n_restarts}
            if self.method in ("apgd-t", "fab-t", "autoattack"):
                out["target_classes"] = self.n_target_classes
            if self.method in ("square", "autoattack"):
                out["queries"] = self.queries
            if self.method == "autoattack":
                from advgrad.autoattack import component_settings  # it builds on this module

                out |= {"version": self.version, "components": component_settings(self)}
            return out | {"targeted": False}
        if self.method != "deepfool":
            out |= {"eps": self.eps, "step_size": self.alpha}
            out["steps"] = 1 if self.method == "fgsm" else self.n_steps
        if self.method == "pgd":
            out["restarts"] = self.n_restarts
        if self.method == "mifgsm":
            out["decay"] = self.decay
        if self.l1_coordinates is not None:
            out["l1_coordinates"] = self.l1_coordinates
        if self.method == "deepfool":
            out |= {"overshoot": self.overshoot, "max_iter": self.max_iter}
        out["targeted"] = self.targeted
        if self.targeted:
            out["target"] = str(self.target)
        return out


DEFAULT_ATTACK = Attack()
"""FGSM (L-inf, eps 0.1), untargeted."""


def row_uniforms(seed: int, stream: int, index: np.ndarray, width: int) -> np.ndarray:
    """Uniform [0, 1) numbers (len(index), width), one row for each absolute row index.

    Rows are drawn in aligned groups of ``RANDOM_GROUP_ROWS`` from generators seeded with
    (seed, stream, group), so a row gets the same numbers in any batch and any subset.
    """
    index = np.asarray(index, dtype=np.int64)
    out = np.empty((len(index), width))
    groups = index // RANDOM_GROUP_ROWS
    for group in np.unique(groups):
        block = np.random.default_rng([seed, stream, int(group)]).random((RANDOM_GROUP_ROWS, width))
        mine = groups == group
        out[mine] = block[index[mine] - group * RANDOM_GROUP_ROWS]
    return out


def row_indices(first_row, n_rows: int) -> np.ndarray:
    """The absolute index of every row, (N,) int64: first_row + 0, 1, ... for an int, or
    the (N,) array given (each in [0, 2**31 - 1], as ``check_count`` bounds an int); random
    draws are keyed by it, so a row's do not depend on its batch."""
    if np.ndim(first_row) == 0:
        first = check_count("first_row", first_row, minimum=0)
        return first + np.arange(n_rows, dtype=np.int64)
    index = np.asarray(first_row)
    if index.shape != (n_rows,) or index.dtype.kind not in "iu":
        raise ValueError(
            f"first_row must be an integer or one integer per row, shape ({n_rows},), got "
            f"shape {index.shape} of {index.dtype}"
        )
    for row in np.flatnonzero((index < 0) | (index > np.iinfo(np.int32).max))[:1]:
        check_count(f"first_row at row {row}", int(index[row]), minimum=0)
    return index.astype(np.int64)


def ranked_targets(Z: np.ndarray, labels: np.ndarray, n_targets: int) -> np.ndarray:
    """The ``n_targets`` classes of highest logit other than the label, in descending order
    (the first index first on ties): (N, n_targets) int64 of Z (N, C) and labels (N,);
    the targets of APGD-T and FAB-T."""
    others = Z.astype(np.float64)
    others[np.arange(len(Z)), labels] = -np.inf
    return np.argsort(-others, axis=1, kind="stable")[:, :n_targets]


def random_in_ball(seed: int, stream: int, index: np.ndarray, d: int, p: float) -> np.ndarray:
    """Points uniform in the unit ball of norm p in R^d, float64 (len(index), d), one for
    each absolute row index.

    inf: uniform coordinates; 2: Gaussian direction, radius u^(1/d); 1: signed Dirichlet(1)
    coordinates (from d + 1 exponentials), which is uniform in the L1 ball.
    """
    u = row_uniforms(seed, stream, index, 2 * d + 1)
    u = np.clip(u, np.finfo(np.float64).tiny, None)
    if p == np.inf:
        return 2.0 * u[:, :d] - 1.0
    if p == 2.0:
        from scipy.special import ndtri  # 0.15 s to import: only where a draw needs it

        direction = ndtri(u[:, :d])
        length = np.linalg.norm(direction, axis=1, keepdims=True)
        return direction / np.maximum(length, 1e-300) * u[:, d : d + 1] ** (1.0 / d)
    exponentials = -np.log(u[:, : d + 1])
    magnitude = exponentials[:, :d] / exponentials.sum(axis=1, keepdims=True)
    return np.where(u[:, d + 1 :] < 0.5, -magnitude, magnitude)


def choose_targets(model: Model, probabilities, reference, target, seed: int, first_row: int):
    """Target classes (N,) int64: a fixed class, the least likely one, or a random other class.

    ``reference`` (N,) are the classes a random target must differ from (the labels, or the
    clean predictions).
    """
    C = model.n_classes
    n_rows = len(probabilities)
    if target == "least-likely":
        return np.argmin(probabilities, axis=1).astype(np.int64)
    if target == "random":
        u = row_uniforms(seed, TARGET_STREAM, np.arange(first_row, first_row + n_rows), 1)[:, 0]
        offset = 1 + np.minimum((u * (C - 1)).astype(np.int64), C - 2)
        return (reference + offset) % C
    target = int(target)
    if not 0 <= target < C:
        raise ValueError(f"target class {target} is outside [0, {C})")
    return np.full(n_rows, target, dtype=np.int64)


@dataclass(frozen=True)
class Labels:
    """What one block of rows is attacked with.

    Y (N, C): the labels ascended (untargeted) or the targets descended (targeted);
    reference (N,): the class success is measured against (success = prediction differs
    from it, or, targeted, equals it); predicted (N,): the clean predictions.
    """

    Y: np.ndarray
    reference: np.ndarray
    predicted: np.ndarray


def attack_labels(model, rows, y, attack: Attack, first_row: int = 0, backend=None) -> Labels:
    """Labels and targets of a block of rows (see ``Labels``); y None: the predictions."""
    backend = backend or get_backend()
    probabilities, _, predicted = backend.forward(model, rows, label_matrix(model, None, len(rows)))
    Y = label_matrix(model, predicted if y is None else y, len(rows))
    truth = predicted if y is None else np.argmax(Y, axis=1)
    if not attack.targeted:
        return Labels(Y, truth, predicted)
    targets = choose_targets(model, probabilities, truth, attack.target, attack.seed, first_row)
    return Labels(label_matrix(model, targets, len(rows)), targets, predicted)


def success_of(reference: np.ndarray, predicted_adv: np.ndarray, targeted: bool) -> np.ndarray:
    """Per row: the attack reached its target, or moved the prediction off the reference
    (``Labels.reference``)."""
    if targeted:
        return predicted_adv == reference
    return predicted_adv != reference


def perturb(
    model: Model,
    rows: np.ndarray,
    labels: Labels,
    attack: Attack,
    clip: tuple[float, float],
    *,
    eps=None,
    first_row: int | np.ndarray = 0,
    backend=None,
    out: np.ndarray | None = None,
    image_shape=None,
) -> np.ndarray:
    """Run ``attack`` on prepared rows (N, d) of the model's dtype; returns X_adv (N, d),
    written into ``out`` when given (C-contiguous, like the rows).

    The evaluation-grade attacks (``EVALUATION_METHODS``) run in ``advgrad.autoattack``;
    ``image_shape`` is the rows' image shape for Square's windows (None: flat).

    ``eps`` overrides attack.eps, per row (N,) or scalar; iterative step sizes scale with
    it. PGD with restarts keeps, per row, a successful result first, then the highest loss
    (lowest, targeted). ``first_row`` is the absolute index of the first row, or (N,) int
    the absolute index of every row: random starts are a function of it.
    """
    backend = backend or get_backend()
    index = row_indices(first_row, len(rows))
    if attack.method in EVALUATION_METHODS:
        from advgrad.autoattack import run_attack  # it builds on this module

        X_adv = run_attack(
            *(model, rows, labels, attack, clip),
            eps=eps,
            first_row=index,
            backend=backend,
            image_shape=image_shape,
        )
        if out is None:
            return X_adv
        out[...] = X_adv
        return out
    x_min, x_max = clip
    p = norm_order(attack.norm)
    if attack.method == "deepfool":
        return backend.deepfool(
            model, rows, p, attack.overshoot, attack.max_iter, x_min, x_max, out=out
        )[0]
    sign = -1.0 if attack.targeted else 1.0
    radius = np.broadcast_to(np.asarray(attack.eps if eps is None else eps, np.float64), len(rows))
    coordinates = attack.l1_step_coordinates(rows.shape[1], clip)
    if attack.method == "fgsm" and eps is None:
        step = sign * attack.eps
        return backend.fgm_step(
            *(model, rows, labels.Y, step, p, x_min, x_max), out=out, l1_coordinates=coordinates
        )[0]
    steps = 1 if attack.method == "fgsm" else attack.n_steps
    ratio = attack.alpha / attack.eps if attack.eps > 0 else 0.0
    alpha = np.ascontiguousarray(sign * radius * (1.0 if attack.method == "fgsm" else ratio))
    radius = np.ascontiguousarray(radius)
    decay = attack.decay if attack.method == "mifgsm" else 0.0
    best, best_score = None, None
    for restart in range(attack.n_restarts if attack.method == "pgd" else 1):
        start = rows
        if attack.method == "pgd":
            ball = random_in_ball(attack.seed, restart, index, rows.shape[1], p)
            with np.errstate(over="ignore"):  # inf past dtype's range; jobs refuse such rows
                start = (rows + radius[:, None] * ball).astype(rows.dtype)
        X_adv = backend.iterate(
            *(model, rows, labels.Y, start, radius, alpha, steps, p, decay, x_min, x_max),
            out=out if best is None else None,
            l1_coordinates=coordinates,
        )
        if attack.method != "pgd" or attack.n_restarts == 1:
            return X_adv
        _, losses, predicted = backend.forward(model, X_adv, labels.Y)
        hit = success_of(labels.reference, predicted, attack.targeted)
        score = np.where(hit, np.inf, sign * losses)
        if best is None:
            best, best_score = X_adv, score
        else:
            better = score > best_score
            best[better] = X_adv[better]
            best_score = np.maximum(score, best_score)
    return best


def check_searchable(attack: Attack) -> None:
    """Refuse (ValueError) a minimal-eps search of an attack without one (not in
    ``PER_ROW_EPS_METHODS``)."""
    if attack.method not in PER_ROW_EPS_METHODS:
        raise ValueError(
            f"{attack.method} takes one eps for every row, so no minimal eps per row is "
            f"searched for it (--min-eps: {', '.join(PER_ROW_EPS_METHODS)})"
        )


def perturbation_sizes(rows: np.ndarray, X_adv: np.ndarray, hit: np.ndarray, norm) -> np.ndarray:
    """(N,) float64: ||X_adv - rows|| in ``norm`` where ``hit``, else inf: the minimal eps
    of an attack of minimal norm (``MINIMAL_NORM_METHODS``)."""
    sizes = np.linalg.norm((X_adv - rows).astype(np.float64), ord=norm_order(norm), axis=1)
    return np.where(hit, sizes, np.inf)


def minimal_eps(
    model: Model,
    rows: np.ndarray,
    labels: Labels,
    attack: Attack,
    clip: tuple[float, float],
    *,
    eps_max: float,
    tolerance: float,
    first_row: int = 0,
    backend=None,
) -> np.ndarray:
    """Per row, the smallest eps in [0, eps_max] at which ``attack`` succeeds, by bisection.

    Returns (N,) float64: a verified successful eps within ``tolerance`` of a verified
    failing one (0 where the clean prediction already fails, inf where eps_max fails too).
    DeepFool and C&W are not bisected: the result is the norm of the perturbation where
    it succeeds.
    eps_max and the tolerance are checked by ``check_search`` (ValueError), so the search
    ends, after at most ``MAX_BISECTIONS`` halvings.
    """
    backend = backend or get_backend()
    check_search(eps_max, tolerance, rows.dtype)
    check_searchable(attack)

    def succeeds(subset, eps):
        sub = Labels(labels.Y[subset], labels.reference[subset], labels.predicted[subset])
        X_adv = perturb(
            *(model, rows[subset], sub, attack, clip),
            eps=eps,
            first_row=first_row + subset,
            backend=backend,
        )
        predicted = backend.forward(model, X_adv, sub.Y[:0])[2]
        return success_of(sub.reference, predicted, attack.targeted), X_adv

    everyone = np.arange(len(rows))
    if attack.method in MINIMAL_NORM_METHODS:
        hit, X_adv = succeeds(everyone, None)
        return perturbation_sizes(rows, X_adv, hit, attack.norm)
    low = np.zeros(len(rows))
    high = np.full(len(rows), float(eps_max))
    already = success_of(labels.reference, labels.predicted, attack.targeted)
    high[already] = 0.0
    active = everyone[~already]
    if active.size:
        hit, _ = succeeds(active, high[active])
        high[active[~hit]] = np.inf
        active = active[hit]
    for _ in range(MAX_BISECTIONS):
        if not active.size:
            break
        middle = 0.5 * (low[active] + high[active])
        hit, _ = succeeds(active, middle)
        high[active[hit]] = middle[hit]
        low[active[~hit]] = middle[~hit]
        active = active[high[active] - low[active] > tolerance]
    return high


MODEL_RANGE = "model"
"""The array API's default ``clip``: the model's declared range (see ``declared_range``)."""


def declared_range(*sources) -> tuple[float, float] | None:
    """The default clip range, one rule for the command line and the array API: the
    ``(x_min, x_max)`` of the first source that declares both (a dataset's attributes, then
    the model; the array API sees only the model), else None (no clipping)."""
    for source in sources:
        if source.x_min is not None and source.x_max is not None:
            return float(source.x_min), float(source.x_max)
    return None


def prepared_rows(model, X, attack: Attack, clip, device):
    """(rows (N, d) in the model's dtype, (x_min, x_max), backend) for an array attack."""
    attack.check_range(model.dtype)
    rows = as_rows(model, X)
    if isinstance(clip, str):
        if clip != MODEL_RANGE:
            raise ValueError(f"clip must be (x_min, x_max), None or {MODEL_RANGE!r}, got {clip!r}")
        clip = declared_range(model)
    x_min, x_max = (-np.inf, np.inf) if clip is None else (float(clip[0]), float(clip[1]))
    if not x_min <= x_max:
        raise ValueError(f"clip range ({x_min}, {x_max}) is empty")
    return rows, (x_min, x_max), get_backend(device)


def run(
    model: Model, X, y=None, attack: Attack = DEFAULT_ATTACK, *, clip=MODEL_RANGE, device="cpu"
):
    """Run any ``Attack`` on X (N, ...); returns X_adv shaped like X, in the model's dtype.

    ``y``: (N,) int labels, (N, C) soft labels, or None for the model's predictions;
    targets come from ``attack.target``. ``clip``: (x_min, x_max), None (no clipping) or
    "model" (the default: the model's declared range, else none; ``declared_range``).
    """
    rows, clip, backend = prepared_rows(model, X, attack, clip, device)
    labels = attack_labels(model, rows, y, attack, backend=backend)
    return perturb(model, rows, labels, attack, clip, backend=backend).reshape(np.shape(X))


def input_gradient(model: Model, X, y=None, *, device: str = "cpu") -> np.ndarray:
    """dJ/dX of the per-sample softmax cross-entropy.

    Parameters
    ----------
    model : Model
    X : (N, ...) array, trailing dimensions flatten to d
    y : (N,) int labels, (N, C) float soft labels, or None for the model's predictions

    Returns
    -------
    G : array shaped like X, in the model's dtype (float32 or float64)
    """
    rows = as_rows(model, X)
    G, _ = get_backend(device).input_gradient(model, rows, label_matrix(model, y, len(rows)))
    return G.reshape(np.shape(X))


def fgsm(
    model: Model,
    X,
    y=None,
    *,
    eps: float,
    norm="inf",
    clip: tuple[float, float] | str | None = MODEL_RANGE,
    targeted: bool = False,
    device: str = "cpu",
    l1_coordinates: int | None = None,
) -> np.ndarray:
    """One fast-gradient step: X' = clip(X + eps * direction(dJ/dX)).

    Parameters
    ----------
    model : Model
    X : (N, ...) array, trailing dimensions flatten to d
    y : (N,) int labels, (N, C) soft labels, or None to attack the model's predictions;
        with ``targeted=True`` the target classes (required)
    eps : float >= 0, the step length in the chosen norm
    norm : "inf" (sign of the gradient), "2" (G / ||G||_2) or "1" (sign(G) / q on the q
        coordinates of largest |G|)
    clip : (x_min, x_max); None for no clipping; default "model": the model's x_min/x_max
        when it declares them, else no clipping (the command line's rule, ``declared_range``)
    targeted : descend the loss toward ``y`` instead of ascending it
    l1_coordinates : norm "1" only: q (``Attack.l1_coordinates``); None: 1, the steepest step

    Returns
    -------
    X_adv : array shaped like X, in the model's dtype
    """
    if targeted and y is None:
        raise ValueError("a targeted attack needs the target classes as y")
    attack = Attack("fgsm", eps=eps, norm=norm, l1_coordinates=l1_coordinates)
    rows, clip, backend = prepared_rows(model, X, attack, clip, device)
    Y = label_matrix(model, y, len(rows))
    step = -attack.eps if targeted else attack.eps
    p = norm_order(attack.norm)
    X_adv, _ = backend.fgm_step(
        *(model, rows, Y, step, p, *clip),
        l1_coordinates=attack.l1_step_coordinates(rows.shape[1], clip),
    )
    return X_adv.reshape(np.shape(X))


def pgd(model: Model, X, y=None, *, eps: float, clip=MODEL_RANGE, device="cpu", **options):
    """Projected gradient descent (Madry et al.) from random starts in the eps-ball.

    ``options``: norm, steps, step_size, restarts, target, seed (see ``Attack``).
    Returns X_adv shaped like X.
    """
    return run(model, X, y, Attack("pgd", eps=eps, **options), clip=clip, device=device)


def bim(model: Model, X, y=None, *, eps: float, clip=MODEL_RANGE, device="cpu", **options):
    """Basic iterative method (Kurakin et al.): iterated FGM from X, projected into the ball.

    ``options``: norm, steps, step_size, target (see ``Attack``). Returns X_adv like X.
    """
    return run(model, X, y, Attack("bim", eps=eps, **options), clip=clip, device=device)


def mi_fgsm(model: Model, X, y=None, *, eps: float, clip=MODEL_RANGE, device="cpu", **options):
    """Momentum iterative FGSM (Dong et al.); ``options``: decay, norm, steps, step_size."""
    return run(model, X, y, Attack("mifgsm", eps=eps, **options), clip=clip, device=device)


def deepfool(model: Model, X, *, norm="2", clip=MODEL_RANGE, device="cpu", **options):
    """DeepFool (Moosavi-Dezfooli et al.); ``options``: overshoot, max_iter. X_adv like X."""
    return run(model, X, None, Attack("deepfool", norm=norm, **options), clip=clip, device=device)


def minimal_eps_of(
    model: Model,
    X,
    y=None,
    attack: Attack = DEFAULT_ATTACK,
    *,
    eps_max: float = 1.0,
    tolerance: float = 1e-3,
    clip=MODEL_RANGE,
    device="cpu",
) -> np.ndarray:
    """Per row of X (N, ...), the smallest eps at which ``attack`` succeeds (see minimal_eps)."""
    rows, clip, backend = prepared_rows(model, X, attack, clip, device)
    labels = attack_labels(model, rows, y, attack, backend=backend)
    return minimal_eps(
        model, rows, labels, attack, clip, eps_max=eps_max, tolerance=tolerance, backend=backend
    )


def predict_proba(model: Model, X, *, device: str = "cpu") -> np.ndarray:
    """Class probabilities (N, C) of X (N, ...), in the model's dtype."""
    rows = as_rows(model, X)
    P, _, _ = get_backend(device).forward(model, rows, label_matrix(model, None, len(rows)))
    return P


def predict(model: Model, X, *, device: str = "cpu") -> np.ndarray:
    """Predicted classes (N,) int64 of X (N, ...)."""
    rows = as_rows(model, X)
    _, _, predicted = get_backend(device).forward(model, rows, label_matrix(model, None, len(rows)))
    return predicted


def loss(model: Model, X, y=None, *, device: str = "cpu") -> np.ndarray:
    """Per-sample cross-entropy (N,) of X against y (None: against the predictions)."""
    rows = as_rows(model, X)
    _, losses, _ = get_backend(device).forward(model, rows, label_matrix(model, y, len(rows)))
    return losses
