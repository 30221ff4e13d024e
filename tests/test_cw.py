"""advgrad.cw: Carlini & Wagner L2 equals a float64 per-row reference, returns points that
meet its goal at the distance it reports, inside the box, with the margin asked for, no
farther than DeepFool's on most rows, whatever the batch, and refuses bad settings."""

from __future__ import annotations

import re

import numpy as np
import pytest
import reference_cw
from conftest import random_network
from reference_cw import network_of as network

import advgrad
from advgrad.backend import get_backend
from advgrad.cw import carlini_wagner_l2

BACKEND = get_backend("cpu")
BOX = {"x_min": 0.0, "x_max": 1.0}
QUICK = {"steps": 60, "search_steps": 5, **BOX}


def random_case(seed=3, dtype=np.float64, n_rows=32, d=20, H=16, C=10):
    """A random network of scale 3 (its decision boundaries lie within the unit box), rows
    in [0, 1] and their predicted classes as labels."""
    rng = np.random.default_rng(seed)
    model = advgrad.Model(*random_network(rng, d, H, C, dtype=dtype, scale=3.0))
    X = rng.uniform(0.0, 1.0, (n_rows, d)).astype(dtype)
    return model, X, advgrad.predict(model, X)


def margins(model, X, labels, targets=None):
    """The logit margin of each row in float64: max_{i != y} z_i - z_y, targeted
    z_t - max_{i != t} z_i, from the backend's logits (those the attack saw)."""
    Z = BACKEND.logits(model, np.ascontiguousarray(X)).astype(np.float64)
    wanted = labels if targets is None else targets
    rows = np.arange(len(Z))
    own = Z[rows, wanted]
    Z[rows, wanted] = -np.inf
    rival = Z.max(axis=1)
    return rival - own if targets is None else own - rival


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"abort_early": False, "search_steps": 3},
        {"confidence": 0.5},
        {"targets": "next", "steps": 150},
        {"targets": "next", "steps": 150, "confidence": 0.3, "c_init": 0.1},
    ],
    ids=["untargeted", "no-abort", "confidence", "targeted", "targeted-confidence"],
)
def test_cw_equals_the_reference(settings):
    """float64: the same rows succeed, at the same points and distances to rounding;
    two rows are misclassified already (labels not the predictions)."""
    model, X, labels = random_case()
    labels[-2:] = (labels[-2:] + 5) % model.n_classes
    X[:4] = np.clip(X[:4] * 1.2 - 0.1, -0.1, 1.1)  # rows partly outside the box
    settings = QUICK | settings
    if settings.get("targets") == "next":
        settings["targets"] = (labels + 1) % model.n_classes
    X_adv, l2 = carlini_wagner_l2(model, X, labels, **settings)
    expected, expected_l2 = reference_cw.carlini_wagner_l2(X, network(model), labels, **settings)
    found = np.isfinite(l2)
    assert np.array_equal(found, np.isfinite(expected_l2))
    assert found.sum() >= 3
    np.testing.assert_allclose(l2[found], expected_l2[found], rtol=1e-12)
    np.testing.assert_allclose(X_adv, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("confidence", [0.0, 1.0])
def test_returned_points_meet_the_goal_at_the_distance_reported(targeted, confidence):
    """float32: rows with a finite l2 are misclassified (targeted: as the target) with the
    margin kappa, inside the box, at distance l2; the others are unchanged."""
    model, X, labels = random_case(seed=5, dtype=np.float32, n_rows=48)
    kept = X.copy()
    targets = (labels + 3) % model.n_classes if targeted else None
    settings = {"steps": 200, "confidence": confidence, "targets": targets, **BOX}
    X_adv, l2 = carlini_wagner_l2(model, X, labels, **settings)
    assert np.array_equal(X, kept)
    assert X_adv.dtype == np.float32 and l2.dtype == np.float64
    found = np.isfinite(l2)
    assert 0 < found.sum() <= len(X)
    predicted = advgrad.predict(model, X_adv)
    if targeted:
        assert np.array_equal(predicted[found], targets[found])
    else:
        assert (predicted[found] != labels[found]).all()
    # m(x) >= kappa in float32: the margin is kappa to float32's rounding of kappa
    reached = float(np.float32(confidence)) - float(np.spacing(np.float32(confidence)))
    assert (margins(model, X_adv, labels, targets)[found] >= reached).all()
    distance = np.linalg.norm(X_adv.astype(np.float64) - X, axis=1)
    np.testing.assert_allclose(distance[found], l2[found], rtol=1e-12)
    assert (X_adv[found] >= 0.0).all() and (X_adv[found] <= 1.0).all()
    assert np.array_equal(X_adv[~found], X[~found])
    assert (l2[found] > 0.0).all()


def test_confidence_buys_a_margin_at_a_cost():
    """Without confidence most points sit just over the boundary; kappa = 1 puts every
    successful point at least 1 past it, farther away."""
    model, X, labels = random_case(seed=7, dtype=np.float32, n_rows=48)
    _, near = carlini_wagner_l2(model, X, labels, **QUICK)
    X_far, far = carlini_wagner_l2(model, X, labels, confidence=1.0, **QUICK)
    both = np.isfinite(near) & np.isfinite(far)
    assert both.sum() >= len(X) // 2
    assert (margins(model, X_far, labels)[both] >= 1.0 - 1e-6).all()
    assert (far[both] > near[both]).all()


def test_more_search_steps_never_give_a_larger_l2():
    model, X, labels = random_case(seed=11, dtype=np.float32, n_rows=48)
    l2 = [
        carlini_wagner_l2(model, X, labels, search_steps=count, steps=60, **BOX)[1]
        for count in (1, 3, 6)
    ]
    assert (l2[1] <= l2[0]).all() and (l2[2] <= l2[1]).all()
    assert (l2[2] < l2[0]).any()


def test_rows_that_already_meet_the_goal_stay_unchanged():
    """Labels other than the predictions: those rows are adversarial as they are (l2 = 0);
    labels default to the predictions."""
    model, X, predicted = random_case(seed=13, dtype=np.float32)
    labels = predicted.copy()
    labels[::4] = (labels[::4] + 1) % model.n_classes
    X_adv, l2 = carlini_wagner_l2(model, X, labels, **QUICK)
    assert np.array_equal(l2[::4], np.zeros(8)) and (l2[1::4] > 0.0).all()
    assert np.array_equal(X_adv[::4], X[::4])
    default = carlini_wagner_l2(model, X, **QUICK)
    explicit = carlini_wagner_l2(model, X, predicted, **QUICK)
    assert np.array_equal(default[0], explicit[0]) and np.array_equal(default[1], explicit[1])


def test_cw_is_no_farther_than_deepfool_on_most_rows():
    """With its defaults, on a small random network: C&W breaks every row DeepFool-L2
    breaks, at a distance within a small factor of DeepFool's, and below it on most rows
    and in the median."""
    model, X, labels = random_case(seed=0, dtype=np.float32, n_rows=64)
    X_fool = advgrad.deepfool(model, X, norm="2", clip=(0.0, 1.0))
    fooled = advgrad.predict(model, X_fool) != labels
    fool_l2 = np.linalg.norm(X_fool.astype(np.float64) - X, axis=1)[fooled]
    _, l2 = carlini_wagner_l2(model, X, labels, **BOX)
    assert fooled.sum() >= 60 and np.isfinite(l2[fooled]).all()
    ratio = l2[fooled] / fool_l2
    assert ratio.max() < 2.0
    assert (ratio <= 1.0).mean() >= 0.75
    assert np.median(ratio) < 1.0


def test_results_do_not_depend_on_the_batch():
    """64 rows at once equal 4 slices of 16 bitwise, and rows one at a time (another BLAS
    path, rounding apart) to float64 rounding."""
    model, X, labels = random_case(seed=17, dtype=np.float32, n_rows=64)
    settings = {"confidence": 0.2, **QUICK}
    whole = carlini_wagner_l2(model, X, labels, **settings)
    parts = [
        carlini_wagner_l2(model, X[i : i + 16], labels[i : i + 16], **settings)
        for i in range(0, 64, 16)
    ]
    for result, pieces in zip(whole, zip(*parts, strict=True), strict=True):
        assert np.array_equal(result, np.concatenate(pieces))
    model, X, labels = random_case(seed=17, dtype=np.float64, n_rows=8)
    whole = carlini_wagner_l2(model, X, labels, **settings)
    alone = [
        carlini_wagner_l2(model, X[i : i + 1], labels[i : i + 1], **settings) for i in range(8)
    ]
    np.testing.assert_allclose(np.concatenate([l2 for _, l2 in alone]), whole[1], rtol=1e-9)


def test_shapes_and_empty_batches():
    model, X, labels = random_case(dtype=np.float32, n_rows=6)
    X_adv, l2 = carlini_wagner_l2(model, X, labels, **QUICK)
    images, image_l2 = carlini_wagner_l2(model, X.reshape(6, 4, 5), labels, **QUICK)
    assert images.shape == (6, 4, 5) and np.array_equal(images.reshape(6, 20), X_adv)
    assert np.array_equal(image_l2, l2)
    empty, empty_l2 = carlini_wagner_l2(model, X[:0], **QUICK)
    assert empty.shape == (0, 20) and empty_l2.shape == (0,)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"x_min": -np.inf}, "C&W needs a box x_min < x_max of finite width in float32"),
        (
            {"x_min": 1.0},
            "C&W needs a box x_min < x_max of finite width in float32 (tanh maps onto it), "
            "got (1, 1)",
        ),
        ({"x_max": 1e39}, "C&W needs a box x_min < x_max of finite width"),
        ({"confidence": -1.0}, "confidence must be >= 0 and finite"),
        ({"confidence": np.nan}, "confidence must be >= 0 and finite"),
        ({"c_init": 0.0}, "c_init must be > 0"),
        ({"learning_rate": np.inf}, "learning_rate must be >= 0 and finite"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"search_steps": 2.5}, "search_steps must be an integer"),
        ({"targets": np.full(8, 10)}, "targets must be classes in [0, 10), got 10 at row 0"),
        (
            {"targets": np.zeros(7, dtype=int)},
            "targets must be one integer class per row, shape (8,)",
        ),
        ({"labels": np.zeros(8)}, "labels must be one integer class per row, shape (8,)"),
        ({"X": np.zeros((8, 21))}, "X rows have 21 features"),
    ],
)
def test_refusals(settings, message):
    model, X, labels = random_case(dtype=np.float32, n_rows=8)
    arguments = {"X": X, "labels": labels, **BOX, "steps": 2} | settings
    with pytest.raises(ValueError, match="^" + re.escape(message)) as raised:
        carlini_wagner_l2(model, **arguments)
    assert "\n" not in str(raised.value)
