"""Training of the two-layer sigmoid network: mini-batches, Adam or SGD with momentum, weight
decay, early stopping on a validation split, and adversarial training (Goodfellow et al. 2015).

The objective of one mini-batch of B rows is the *mean* cross-entropy

    alpha * (1/B) sum_n J(x_n, y_n) + (1 - alpha) * (1/B) sum_n J(x'_n, y_n)
        + weight_decay / 2 * (||W1||^2 + ||W2||^2)

with x' = clip(x + eps * sign(dJ/dx)) (FGSM, or PGD from ``advgrad.attacks``); plain training
is eps = 0 (alpha = 1). Gradients come from the backend's ``parameter_gradient`` (CPU or
CUDA), which fuses the FGSM step into the clean backward pass.

Randomness (initial weights, the validation split, the order of the rows in every epoch, PGD
starts) comes from ``seed`` alone, and the kernels add up their row blocks in a fixed order
with BLAS on one thread: the same data, configuration and seed give bitwise the same model.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

import advgrad
from advgrad.attacks import (
    Attack,
    Labels,
    as_rows,
    check_count,
    check_radius,
    check_seed,
    label_matrix,
    perturb,
)
from advgrad.backend import blas_threads, get_backend
from advgrad.errors import InputFileError
from advgrad.model import FLOAT_DTYPES, MAX_WEIGHTS, Model

OPTIMIZERS = ("adam", "sgd")
ADVERSARIAL_METHODS = ("fgsm", "pgd")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of ``train``.

    Attributes
    ----------
    hidden : H, the number of hidden units
    epochs : the most passes over the training rows
    batch_size : rows per mini-batch (the last batch of an epoch may be smaller)
    lr : learning rate; None: 0.01 for adam, 0.1 for sgd
    optimizer : "adam" or "sgd" (with momentum)
    momentum : sgd's momentum
    weight_decay : L2 penalty on W1 and W2 (not the biases), added to the mean loss as
        weight_decay / 2 * ||W||^2
    seed : seeds every random choice
    validation_fraction : share of the rows held out for early stopping (0: none, train
        for ``epochs`` and keep the last weights)
    patience : stop after this many epochs without a lower validation loss, and keep the
        weights of the best epoch
    adv_eps : L-inf radius of adversarial training; 0 trains on clean rows only
    adv_alpha : weight alpha of the clean loss in the adversarial objective
    adv_method : "fgsm" (the paper) or "pgd" (Madry et al.; ``adv_steps`` steps, one start)
    adv_steps : PGD's number of steps
    dtype : the compute dtype, "float32" or "float64"

    The counts (hidden, epochs, batch_size, patience, adv_steps) are integers in
    [1, ``advgrad.attacks.MAX_COUNT``], the seed in [0, 2**63); ValueError otherwise.
    """

    hidden: int = 64
    epochs: int = 300
    batch_size: int = 32
    lr: float | None = None
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    validation_fraction: float = 0.1
    patience: int = 30
    adv_eps: float = 0.0
    adv_alpha: float = 0.5
    adv_method: str = "fgsm"
    adv_steps: int = 10
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("hidden", "epochs", "batch_size", "patience", "adv_steps"):
            check_count(name, getattr(self, name))
        check_seed(self.seed)
        if np.dtype(self.dtype) not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        check_radius("adv_eps", self.adv_eps, self.dtype)
        if not 0.0 <= self.adv_alpha <= 1.0:
            raise ValueError(f"adv_alpha must be in [0, 1], got {self.adv_alpha}")
        if self.adv_method not in ADVERSARIAL_METHODS:
            raise ValueError(f"adv_method must be fgsm or pgd, got {self.adv_method!r}")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the optimizer's default."""
        if self.lr is not None:
            return self.lr
        return 0.01 if self.optimizer == "adam" else 0.1

    @property
    def adversarial(self) -> bool:
        """Whether the objective has an adversarial term."""
        return self.adv_eps > 0.0 and self.adv_alpha < 1.0

    def describe(self) -> dict:
        """The settings as model-file attributes (``lr`` resolved; unused ones left out)."""
        out = asdict(self) | {"lr": self.learning_rate}
        if self.optimizer != "sgd":
            del out["momentum"]
        if not self.adversarial:
            for name in ("adv_alpha", "adv_method", "adv_steps"):
                del out[name]
        elif self.adv_method != "pgd":
            del out["adv_steps"]
        return out


@dataclass(frozen=True)
class EpochStats:
    """Loss and accuracy after one epoch (clean rows; validation: None without a split)."""

    epoch: int
    train_loss: float
    train_accuracy: float
    validation_loss: float | None
    validation_accuracy: float | None


@dataclass(frozen=True)
class TrainResult:
    """What ``train`` returns.

    ``model`` holds the weights of ``best_epoch`` (the last epoch without a validation split)
    and, in ``metadata``, the configuration, the training data's hash and the final metrics.
    """

    model: Model
    history: tuple[EpochStats, ...]
    best_epoch: int
    stopped_early: bool
    seconds: float


class _Parameters:
    """W1, W2, b1, b2 as views of one flat vector (weights first, for the weight decay)."""

    def __init__(self, d: int, H: int, C: int, dtype: np.dtype) -> None:
        self.flat = np.zeros(d * H + H * C + H + C, dtype=dtype)
        self.n_weights = d * H + H * C
        self.W1 = self.flat[: d * H].reshape(d, H)
        self.W2 = self.flat[d * H : self.n_weights].reshape(H, C)
        self.b1 = self.flat[self.n_weights : self.n_weights + H]
        self.b2 = self.flat[self.n_weights + H :]

    @property
    def network(self) -> tuple[np.ndarray, ...]:
        """(W1, b1, W2, b2), the argument order of the kernels."""
        return self.W1, self.b1, self.W2, self.b2


def _evaluate(backend, params: _Parameters, rows, Y) -> tuple[float, float]:
    """Mean loss and accuracy of rows (N, d) against labels Y (N, C)."""
    _, losses, predicted = backend.forward(Model(*params.network), rows, Y)
    accuracy = float(np.mean(predicted == np.argmax(Y, axis=1)))
    return float(np.mean(losses, dtype=np.float64)), accuracy


def network_shape(
    d: int,
    y: np.ndarray,
    config: TrainConfig,
    n_classes: int | None = None,
    *,
    max_weights: int = MAX_WEIGHTS,
    labels_file: str | os.PathLike | None = None,
) -> tuple[int, int, int]:
    """(d, H, C) of the network ``train`` makes, checked before anything is allocated.

    C is ``n_classes``, else the columns of soft labels, else the largest integer label + 1
    (at least 2).

    Raises
    ------
    ValueError
        ``y`` is not (N,) integer or (N, C) soft labels, or W1 (d x H) or W2 (H x C) would
        have more than ``max_weights`` elements.
    InputFileError
        Instead of the ValueError, naming ``labels_file``'s /y, when C comes from its labels.
    """
    H = config.hidden
    if d * H > max_weights:
        raise ValueError(
            f"W1 would have {d} x {H} = {d * H} weights ({d} features, hidden {H}), more than "
            f"max_weights = {max_weights}; use fewer hidden units or raise max_weights"
        )
    source = None
    if n_classes is not None:
        C = int(n_classes)
    elif y.ndim == 2:
        C, source = y.shape[1], f"the soft labels have {y.shape[1]} columns"
    elif y.ndim == 1 and y.dtype.kind in "iu" and len(y):
        row = int(np.argmax(y))
        C, source = max(int(y[row]) + 1, 2), f"label {int(y[row])} in row {row}"
    else:
        raise ValueError(f"y must be (N,) integer labels or (N, C) soft labels, got {y.shape}")
    w2_weights = H * C
    if w2_weights > max_weights:
        reason = (
            f"{C} classes: W2 would have {H} x {C} = {w2_weights} weights, more than "
            f"max_weights = {max_weights}"
        )
        if source is None:
            raise ValueError(reason)
        if labels_file is None:
            raise ValueError(f"{source} makes {reason}")
        raise InputFileError(labels_file, "/y", f"{source} makes {reason}")
    return d, H, C


def data_sha256(X: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 of the bytes of X (as given, C order) followed by those of y."""
    digest = hashlib.sha256(np.ascontiguousarray(X).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()


def _split(n_rows: int, fraction: float, rng: np.random.Generator):
    """Sorted row indices (training, validation): a random ``fraction`` held out."""
    order = rng.permutation(n_rows)
    n_validation = round(fraction * n_rows)
    if n_rows - n_validation < 1:
        raise ValueError(f"{n_rows} rows leave none to train on")
    return np.sort(order[n_validation:]), np.sort(order[:n_validation])


def _batch_gradient(backend, params, grad, X, Y, config: TrainConfig, clip, first_row: int) -> None:
    """grad = gradient of the batch objective (module docstring) without the weight decay."""
    x_min, x_max = clip
    weight = 1.0 / len(X)
    alpha = config.adv_alpha if config.adversarial else 1.0
    fused = config.adversarial and config.adv_method == "fgsm"
    grad.flat[:] = 0.0
    backend.parameter_gradient(
        *(params.network, X, Y, alpha * weight, (1.0 - alpha) * weight if fused else 0.0),
        *(config.adv_eps, x_min, x_max, grad.network),
    )
    if config.adversarial and not fused:
        attack = Attack("pgd", eps=config.adv_eps, steps=config.adv_steps, seed=config.seed)
        classes = np.argmax(Y, axis=1)
        X_adv = perturb(
            Model(*params.network),
            X,
            Labels(Y, classes, classes),
            attack,
            clip,
            first_row=first_row,
            backend=backend,
        )
        backend.parameter_gradient(
            *(params.network, X_adv, Y, (1.0 - alpha) * weight, 0.0),
            *(0.0, x_min, x_max, grad.network),
        )


def train(
    X,
    y,
    config: TrainConfig = TrainConfig(),
    *,
    n_classes: int | None = None,
    clip: tuple[float, float] | None = None,
    progress: Callable[[EpochStats], None] | None = None,
    max_weights: int = MAX_WEIGHTS,
    device: str = "cpu",
) -> TrainResult:
    """Train a two-layer sigmoid network on labelled rows, by mini-batches.

    Weights start Glorot-uniform (biases at 0); a random ``validation_fraction`` of the rows
    is held out; every epoch visits the other rows in a new random order.

    Parameters
    ----------
    X : (N, ...) float array, trailing dimensions flatten to d
    y : (N,) int labels in [0, C), or (N, C) float soft labels
    config : TrainConfig
    n_classes : int, optional
        C; default: the number of columns of soft labels, else max(y) + 1.
    clip : (x_min, x_max), optional
        The valid input range: adversarial rows are clipped to it. None: no clipping.
    progress : callable, optional
        Called with each epoch's ``EpochStats``.
    max_weights : int
        Most elements of W1 (d x H) and of W2 (H x C) (``network_shape``).
    device : str
        "cpu", "cuda" or "auto": where the gradients are computed
        (``advgrad.backend.get_backend``); the parameters stay in host memory.

    Returns
    -------
    TrainResult
        The model is in ``config.dtype``; its metadata holds the hyper-parameters
        (``TrainConfig.describe``), ``training_data_sha256`` (``data_sha256(X, y)``), the
        row counts, ``epochs_run``, ``best_epoch``, and the loss and accuracy on the
        training and validation rows at the best epoch.

    Raises
    ------
    ValueError
        Bad shapes or labels, no rows, a network beyond ``max_weights``, or training
        diverged (non-finite weights).
    """
    started = time.perf_counter()
    backend = get_backend(device)
    dtype = np.dtype(config.dtype)
    y = np.asarray(y)
    shape = np.shape(X)
    if not shape or shape[0] == 0:
        raise ValueError(f"X has no rows (shape {shape}); training needs at least one")
    d, H, C = network_shape(math.prod(shape[1:]), y, config, n_classes, max_weights=max_weights)
    params, grad = _Parameters(d, H, C, dtype), _Parameters(d, H, C, dtype)
    rows = as_rows(Model(*params.network), X)
    Y = label_matrix(Model(*params.network), y, len(rows))
    clip = (-math.inf, math.inf) if clip is None else (float(clip[0]), float(clip[1]))
    rng = np.random.default_rng(config.seed)
    training, validation = _split(len(rows), config.validation_fraction, rng)
    X_train, Y_train, X_val, Y_val = rows[training], Y[training], rows[validation], Y[validation]
    params.W1[...] = rng.uniform(-1.0, 1.0, (d, H)) * math.sqrt(6.0 / (d + H))
    params.W2[...] = rng.uniform(-1.0, 1.0, (H, C)) * math.sqrt(6.0 / (H + C))
    moments = [np.zeros_like(params.flat) for _ in range(2)]

    best = params.flat.copy()
    best_loss, best_epoch, step = math.inf, 0, 0
    history: list[EpochStats] = []
    with blas_threads(1):
        for epoch in range(1, config.epochs + 1):
            shuffled = rng.permutation(len(training))
            for first in range(0, len(training), config.batch_size):
                batch = np.sort(shuffled[first : first + config.batch_size])
                _batch_gradient(
                    backend,
                    params,
                    grad,
                    X_train[batch],
                    Y_train[batch],
                    config,
                    clip,
                    step * config.batch_size,
                )
                step += 1
                if config.optimizer == "adam":
                    backend.adam_update(
                        *(params.flat, grad.flat, *moments, step, config.learning_rate),
                        *(*ADAM_BETAS, ADAM_EPSILON, config.weight_decay, params.n_weights),
                    )
                else:
                    backend.momentum_update(
                        *(params.flat, grad.flat, moments[0], config.learning_rate),
                        *(config.momentum, config.weight_decay, params.n_weights),
                    )
            if not np.isfinite(params.flat).all():
                raise ValueError(f"training diverged in epoch {epoch}; lower the learning rate")
            measured = _evaluate(backend, params, X_train, Y_train)
            validation_stats = (
                _evaluate(backend, params, X_val, Y_val) if len(validation) else (None, None)
            )
            stats = EpochStats(epoch, *measured, *validation_stats)
            history.append(stats)
            if progress is not None:
                progress(stats)
            if not len(validation) or stats.validation_loss < best_loss:
                best[:] = params.flat
                best_loss = stats.validation_loss if len(validation) else math.inf
                best_epoch = epoch
            elif epoch - best_epoch >= config.patience:
                break
    params.flat[:] = best
    final = history[best_epoch - 1]
    metrics = {
        "train_loss": final.train_loss,
        "train_accuracy": final.train_accuracy,
        "validation_loss": final.validation_loss,
        "validation_accuracy": final.validation_accuracy,
    }
    metadata = {
        "trained_with": f"advgrad {advgrad.__version__} train",
        **config.describe(),
        "training_rows": len(training),
        "validation_rows": len(validation),
        "training_data_sha256": data_sha256(X, y),
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        **{name: value for name, value in metrics.items() if value is not None},
    }
    model = Model(*params.network, metadata=metadata)
    seconds = time.perf_counter() - started
    return TrainResult(model, tuple(history), best_epoch, len(history) < config.epochs, seconds)
