"""advgrad's AutoAttack against torchattacks' on the same network, where torchattacks is
installed (it is no dependency of advgrad: without it these tests skip).

The issue's bar: advgrad's robust accuracy is never more than 0.5 points above that of
torchattacks' ``AutoAttack(version="standard")`` on an equivalent torch module. The full
table (three networks, six radii, each attack of the ensemble) comes from
``scripts/bench_autoattack.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

import advgrad
from advgrad.autoattack import auto_attack
from advgrad.interop import to_torch

torch = pytest.importorskip("torch")
torchattacks = pytest.importorskip("torchattacks")

TOLERANCE_POINTS = 0.5


def torchattacks_robust_accuracy(model, X, y, image_shape, norm: str, eps: float) -> float:
    """The robust accuracy torchattacks' standard AutoAttack leaves, in %."""
    net = torch.nn.Sequential(torch.nn.Flatten(), to_torch(model.astype(np.float32))).eval()
    images = torch.from_numpy(X.reshape(len(X), 1, *image_shape).astype(np.float32))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    attack = torchattacks.AutoAttack(
        net, norm=norm, eps=eps, version="standard", n_classes=model.n_classes, seed=0
    )
    adversarial = attack(images, labels)
    with torch.no_grad():
        return 100.0 * float((net(adversarial).argmax(1) == labels).float().mean())


@pytest.mark.parametrize(("norm", "torch_norm", "eps"), [("inf", "Linf", 0.1), ("2", "L2", 0.5)])
def test_autoattack_is_as_strong_as_torchattacks_on_the_digits(
    digits_model, digits_test, norm, torch_norm, eps
):
    X, y = digits_test
    ours = auto_attack(digits_model, X, y, eps=eps, norm=norm, clip=(0.0, 1.0))
    ours_accuracy = 100.0 * float(np.mean(advgrad.predict(digits_model, ours.X_adv) == y))
    theirs = torchattacks_robust_accuracy(digits_model, X, y, (8, 8), torch_norm, eps)
    assert ours_accuracy <= theirs + TOLERANCE_POINTS, (ours_accuracy, theirs)


def test_autoattack_is_as_strong_as_torchattacks_on_a_random_network():
    """A random (784, 64, 10) network whose margins are like a trained one's, on rows
    uniform in [0, 1] labelled by it, at an L-inf radius that leaves part of them robust."""
    rng = np.random.default_rng(3)
    W1 = (rng.standard_normal((784, 64)) * 0.05).astype(np.float32)
    W2 = rng.standard_normal((64, 10)).astype(np.float32)
    model = advgrad.Model(W1, np.zeros(64, np.float32), W2, np.zeros(10, np.float32))
    X = rng.uniform(0.0, 1.0, (200, 784)).astype(np.float32)
    y = advgrad.predict(model, X)
    ours = auto_attack(model, X, y, eps=0.02, clip=(0.0, 1.0))
    ours_accuracy = 100.0 * float(np.mean(advgrad.predict(model, ours.X_adv) == y))
    theirs = torchattacks_robust_accuracy(model, X, y, (28, 28), "Linf", 0.02)
    assert 0.0 < theirs < 100.0  # the radius decides some rows, not all or none
    assert ours_accuracy <= theirs + TOLERANCE_POINTS, (ours_accuracy, theirs)
