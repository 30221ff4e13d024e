"""advgrad.apgd: APGD (CE, DLR) and APGD-T equal a float64 per-row reference, stay in the
ball and the box, are at least as strong as PGD, do not depend on the batch, and refuse
bad settings."""

from __future__ import annotations

import re

import numpy as np
import pytest
import reference_apgd
from conftest import random_network
from reference_apgd import network_of as network

import advgrad
from advgrad.apgd import apgd, apgd_targeted, checkpoint_windows, radius_stages
from advgrad.backend import get_backend

BACKEND = get_backend("cpu")
P = {"inf": np.inf, "2": 2.0, "1": 1.0}
RADIUS = {"inf": 0.1, "2": 0.5, "1": 1.0}
PER_ROW = "labels must be one integer class per row, shape (64,)"


def random_case(seed=3, dtype=np.float64, n_rows=64, d=20, H=16, C=10):
    """A random network of scale 3 (so radii of 0.1 break part of the rows), rows in
    [0, 1] and their predicted classes as labels."""
    rng = np.random.default_rng(seed)
    model = advgrad.Model(*random_network(rng, d, H, C, dtype=dtype, scale=3.0))
    X = rng.uniform(0.0, 1.0, (n_rows, d)).astype(dtype)
    return model, X, advgrad.predict(model, X)


def misclassified(model, X, labels):
    return advgrad.predict(model, X) != labels


def test_checkpoints_are_the_papers():
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), of 100 steps."""
    assert checkpoint_windows(100) == {22: 22, 41: 19, 57: 16, 70: 13, 80: 10, 87: 7, 93: 6, 99: 6}
    # 20 steps, as the reference rounds: windows of 4, 3, 2, then int(0.06 * 20) = 1 step
    assert checkpoint_windows(20) == {4: 4, 7: 3, 9: 2} | {done: 1 for done in range(10, 21)}
    assert checkpoint_windows(1) == {1: 1}
    assert checkpoint_windows(20) == reference_apgd.checkpoints(20)


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
@pytest.mark.parametrize("loss", ["ce", "dlr", "dlr-targeted"])
def test_apgd_equals_the_reference(norm, loss):
    """On the reference's own losses (``ReferenceBackend``), so that both take the same
    decisions where two losses are equal but for rounding: the same points, to the
    rounding of the L2 norms."""
    model, X, labels = random_case()
    settings = {"eps": RADIUS[norm], "steps": 20, "seed": 5, "x_min": 0.0, "x_max": 1.0}
    backend = reference_apgd.ReferenceBackend()
    if loss == "dlr-targeted":
        settings |= {"eps": RADIUS[norm] / 2, "restarts": 2, "target_classes": 3}
        X_adv = apgd_targeted(model, X, labels, norm=norm, backend=backend, **settings)
        expected = reference_apgd.apgd_targeted(X, network(model), labels, p=P[norm], **settings)
    else:
        settings |= {"loss": loss, "restarts": 2}
        X_adv = apgd(model, X, labels, norm=norm, backend=backend, **settings)
        expected = reference_apgd.apgd(X, network(model), labels, p=P[norm], **settings)
    np.testing.assert_allclose(X_adv, expected, rtol=0, atol=1e-12)
    assert 0 < misclassified(model, X_adv, labels).sum() < len(X)


def test_large_radii_stages_are_the_references():
    """3 eps, 2 eps for ceil(0.3 steps) each (the float product, as the reference rounds),
    then eps for the rest."""
    assert radius_stages(100, True) == [(3.0, 30), (2.0, 30), (1.0, 40)]
    assert radius_stages(10, True) == [(3.0, 3), (2.0, 3), (1.0, 4)]
    assert radius_stages(3, True) == [(3.0, 1), (2.0, 1), (1.0, 1)]
    assert radius_stages(10) == [(1.0, 10)]
    for steps in (3, 10, 20, 100, 101):
        assert radius_stages(steps, True) == reference_apgd.large_radii_stages(steps)


@pytest.mark.parametrize("attack", ["ce", "targeted"])
def test_large_radii_equal_the_reference(attack):
    """L1, each run at 3 eps, 2 eps, then eps, each stage from the best point of the one
    before (``reference_apgd.attack``, after the reference's ``decr_eps_pgd``), on the
    reference's losses: the same points; and not those of the runs at eps alone."""
    model, X, labels = random_case()
    settings = {"eps": 0.3, "steps": 10, "seed": 2, "x_min": 0.0, "x_max": 1.0}
    backend = reference_apgd.ReferenceBackend()
    if attack == "targeted":
        settings |= {"restarts": 1, "target_classes": 2}
        run, reference = apgd_targeted, reference_apgd.apgd_targeted
    else:
        settings |= {"loss": "ce", "restarts": 2}
        run, reference = apgd, reference_apgd.apgd
    X_adv = run(model, X, labels, norm="1", backend=backend, large_radii=True, **settings)
    expected = reference(X, network(model), labels, p=1.0, large_radii=True, **settings)
    np.testing.assert_allclose(X_adv, expected, rtol=0, atol=1e-12)
    assert 0 < misclassified(model, X_adv, labels).sum() < len(X)
    assert not np.array_equal(X_adv, run(model, X, labels, norm="1", backend=backend, **settings))


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_on_the_cpu_backend_breaks_the_rows_the_reference_breaks(norm, loss):
    """The kernels' losses differ from the reference's by rounding, which can turn a
    decision between equal losses and so move a point; which rows break does not change."""
    model, X, labels = random_case(seed=5)
    settings = {"eps": RADIUS[norm], "steps": 20, "seed": 5, "x_min": 0.0, "x_max": 1.0}
    X_adv = apgd(model, X, labels, norm=norm, loss=loss, restarts=2, **settings)
    expected = reference_apgd.apgd(
        X, network(model), labels, p=P[norm], loss=loss, restarts=2, **settings
    )
    broken = misclassified(model, X_adv, labels)
    assert np.array_equal(broken, misclassified(model, expected, labels))
    assert 0 < broken.sum() < len(X)


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
@pytest.mark.parametrize("attack", ["ce", "dlr", "targeted"])
def test_results_stay_in_the_ball_and_box_and_never_lose_loss(norm, attack):
    """float32: every row within eps (float32 rounding aside) and in [x_min, x_max]; a row
    not broken has at least its clean loss; misclassified clean rows come back unchanged."""
    model, X, predicted = random_case(seed=7, dtype=np.float32)
    odd = np.arange(len(X)) % 2 == 1
    labels = np.where(odd, (predicted + 1) % model.n_classes, predicted)  # odd rows: wrong
    eps, x_min, x_max = RADIUS[norm] / 4, 0.0, 1.0
    settings = {"eps": eps, "norm": norm, "steps": 20, "x_min": x_min, "x_max": x_max}
    if attack == "targeted":
        X_adv = apgd_targeted(model, X, labels, target_classes=3, **settings)
    else:
        X_adv = apgd(model, X, labels, loss=attack, **settings)
    assert X_adv.dtype == np.float32
    delta = X_adv.astype(np.float64) - X
    assert np.linalg.norm(delta, ord=P[norm], axis=1).max() <= eps * (1 + 1e-6)
    assert X_adv.min() >= x_min
    assert X_adv.max() <= x_max
    assert np.array_equal(X_adv[odd], X[odd])
    held = ~misclassified(model, X_adv, labels)
    assert held.any()
    if attack == "targeted":  # the clean loss against the first target, the largest one
        others = BACKEND.logits(model, X).astype(np.float64)
        others[np.arange(len(X)), labels] = -np.inf
        ranked = np.argsort(-others, axis=1, kind="stable")[:, :3]
        before = targeted_dlr(model, X, labels, ranked[:, 0])
        after = np.max([targeted_dlr(model, X_adv, labels, t) for t in ranked.T], axis=0)
    else:
        before = BACKEND.loss_gradient(model, X, labels, attack)[1]
        after = BACKEND.loss_gradient(model, X_adv, labels, attack)[1]
    assert (after[held] >= before[held]).all()


def targeted_dlr(model, X, labels, targets):
    return BACKEND.loss_gradient(model, X, labels, "dlr-targeted", targets=targets)[1]


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_apgd_is_at_least_as_strong_as_pgd(norm):
    model, X, labels = random_case(seed=11, dtype=np.float32, n_rows=256)
    eps = RADIUS[norm] / 2
    X_pgd = advgrad.pgd(model, X, labels, eps=eps, norm=norm, steps=20, clip=(0.0, 1.0))
    X_apgd = apgd(model, X, labels, eps=eps, norm=norm, steps=20, x_min=0.0, x_max=1.0)
    pgd_held = (~misclassified(model, X_pgd, labels)).sum()
    apgd_held = (~misclassified(model, X_apgd, labels)).sum()
    assert 0 < apgd_held <= pgd_held < len(X)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_apgd_t_breaks_at_least_the_rows_apgd_dlr_breaks(norm):
    model, X, labels = random_case(seed=13, dtype=np.float32, n_rows=256)
    settings = {"eps": RADIUS[norm] / 4, "norm": norm, "steps": 20, "x_min": 0.0, "x_max": 1.0}
    dlr_broken = misclassified(model, apgd(model, X, labels, loss="dlr", **settings), labels)
    t_broken = misclassified(model, apgd_targeted(model, X, labels, **settings), labels)
    assert 0 < dlr_broken.sum() <= t_broken.sum() < len(X)


@pytest.mark.parametrize("attack", ["ce", "targeted"])
def test_results_do_not_depend_on_the_batch(attack):
    """64 rows at once equal 4 slices of 16 given their first_row (an offset, or the index
    of every row), bitwise; without the offsets the starts, so the results, differ."""
    model, X, labels = random_case(seed=17, dtype=np.float32)
    settings = {"eps": 0.1, "steps": 10, "restarts": 2, "seed": 9, "x_min": 0.0, "x_max": 1.0}
    run = apgd if attack == "ce" else apgd_targeted
    whole = run(model, X, labels, **settings)
    parts = [
        run(model, X[i : i + 16], labels[i : i + 16], first_row=i, **settings)
        for i in range(0, 64, 16)
    ]
    assert np.array_equal(whole, np.concatenate(parts))
    # first_row as the index of every row (AutoAttack's rows still correct)
    index = np.arange(16, 32)
    assert np.array_equal(
        run(model, X[index], labels[index], first_row=index, **settings), parts[1]
    )
    unshifted = run(model, X[16:32], labels[16:32], **settings)
    assert not np.array_equal(unshifted, whole[16:32])


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
def test_per_row_eps_equals_each_row_with_its_own_eps(norm):
    """eps (N,): the rows of each radius are bitwise those of a call with that radius for
    every row; and the call equals the reference run on per-row radii."""
    model, X, labels = random_case(seed=19, dtype=np.float32)
    radii = RADIUS[norm] * np.array([0.25, 0.5, 1.0, 2.0])[np.arange(64) % 4]
    settings = {"norm": norm, "steps": 10, "restarts": 2, "seed": 3, "x_min": 0.0, "x_max": 1.0}
    whole = apgd(model, X, labels, eps=radii, **settings)
    for k in range(4):
        rows = np.arange(k, 64, 4)
        alike = apgd(model, X, labels, eps=radii[k], **settings)
        assert np.array_equal(alike[rows], whole[rows])
    assert 0 < misclassified(model, whole, labels).sum() < len(X)
    X64 = X.astype(np.float64)
    model64 = advgrad.Model(*(w.astype(np.float64) for w in network(model)))
    backend = reference_apgd.ReferenceBackend()
    got = apgd(model64, X64, labels, eps=radii, backend=backend, **settings)
    del settings["norm"]
    expected = reference_apgd.apgd(
        X64, network(model64), labels, eps=radii, p=P[norm], loss="ce", **settings
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_the_seed_picks_the_starts_and_inputs_stay_unchanged():
    model, X, labels = random_case(dtype=np.float32)
    kept = X.copy()
    settings = {"eps": 0.1, "steps": 5, "x_min": 0.0, "x_max": 1.0}
    first = apgd(model, X, labels, seed=1, **settings)
    assert np.array_equal(first, apgd(model, X, labels, seed=1, **settings))
    assert not np.array_equal(first, apgd(model, X, labels, seed=2, **settings))
    assert np.array_equal(X, kept)
    images = X.reshape(64, 4, 5)
    assert np.array_equal(apgd(model, images, labels, seed=1, **settings), first.reshape(64, 4, 5))


def test_labels_default_to_the_predictions():
    model, X, labels = random_case(dtype=np.float32)
    settings = {"eps": 0.1, "steps": 5, "x_min": 0.0, "x_max": 1.0}
    assert np.array_equal(apgd(model, X, **settings), apgd(model, X, labels, **settings))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eps": 0.0}, "eps must be > 0"),
        ({"eps": -1.0}, "eps must be >= 0 and finite (at most 1.798e+308 in float64), got -1"),
        ({"eps": np.nan}, "eps must be >= 0 and finite (at most 1.798e+308 in float64), got nan"),
        ({"steps": 0}, "steps must be at least 1 and at most 2147483647, got 0"),
        ({"restarts": 0}, "restarts must be at least 1 and at most 2147483647, got 0"),
        ({"seed": -1}, "seed must be in [0, 2**63), got -1"),
        ({"norm": "3"}, "APGD supports the norms inf, 2, 1, got '3'"),
        ({"loss": "cw"}, "loss must be one of ce, dlr, got 'cw'"),
        ({"x_min": 1.0, "x_max": 0.0}, "clip range (1.0, 0.0) is empty"),
        ({"labels": np.full(64, 10)}, "labels must be classes in [0, 10), got 10 at row 0"),
        ({"labels": np.zeros(63, np.int64)}, f"{PER_ROW}, got shape (63,) of int64"),
        ({"labels": np.zeros(64)}, f"{PER_ROW}, got shape (64,) of float64"),
        ({"first_row": -1}, "first_row must be at least 0 and at most 2147483647, got -1"),
        (
            {"first_row": np.arange(-1, 63)},
            "first_row at row 0 must be at least 0 and at most 2147483647, got -1",
        ),
        (
            {"first_row": np.arange(63)},
            "first_row must be an integer or one integer per row, shape (64,), got shape "
            "(63,) of int64",
        ),
        ({"eps": np.full(64, 0.1) * (np.arange(64) != 5)}, "eps must be > 0, got 0 at row 5"),
        (
            {"eps": np.full(63, 0.1)},
            "eps must be a number or one per row, shape (64,), got shape (63,) of float64",
        ),
        ({"large_radii": True}, "large_radii is for the norm 1 (l1-APGD), got norm 'inf'"),
        (
            {"large_radii": True, "norm": "1", "steps": 4},
            "large_radii runs 2 steps at each of 3 eps and 2 eps, which leaves none at eps "
            "of steps=4: take steps = 3 or at least 5",
        ),
    ],
)
def test_apgd_refuses_bad_settings(options, message):
    """One line each; the labels are checked by the backend's ``loss_arguments``."""
    model, X, labels = random_case()
    arguments = {"labels": labels, "eps": 0.1} | options
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        apgd(model, X, **arguments)


@pytest.mark.parametrize(
    ("attack", "classes", "options", "message"),
    [
        (apgd_targeted, 10, {"target_classes": 0}, "target_classes must be at least 1 and at most"),
        (apgd_targeted, 3, {}, "APGD-T needs a model of at least 4 classes, this one has 3"),
        (apgd, 2, {"loss": "dlr"}, "the dlr loss needs at least 3 classes, the model has 2"),
    ],
)
def test_refusals_for_the_number_of_classes(attack, classes, options, message):
    model, X, labels = random_case(C=classes)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        attack(model, X, labels, eps=0.1, **options)
