"""advgrad.autoattack: AutoAttack's protocol (each attack on the rows still correct, the
first success kept), its stages in evaluate, its file output, and the CLI's refusals."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
from conftest import random_network
from typer.testing import CliRunner

import advgrad
from advgrad.attacks import Attack, Labels, attack_labels, minimal_eps, perturb
from advgrad.autoattack import (
    CLEAN,
    L1_VERSIONS,
    ROBUST,
    UNTARGETED_RESTARTS,
    VERSIONS,
    auto_attack,
    component_attack,
    components,
    ensemble,
    run_attack,
    version_components,
)
from advgrad.backend import get_backend
from advgrad.bundled import TEST_DATA, bundled_path
from advgrad.cli import app
from advgrad.evaluate import evaluate

BACKEND = get_backend("cpu")
QUICK = {"steps": 10, "queries": 50, "target_classes": 3}


def random_case(seed=4, n_rows=48, d=16, H=12, C=6, dtype=np.float64):
    """A float64 network (each row's results do not depend on the rows beside it) that
    radii of 0.1 break in part, rows in [0, 1] and their labels (90 % the predictions)."""
    rng = np.random.default_rng(seed)
    model = advgrad.Model(*random_network(rng, d, H, C, dtype=dtype, scale=3.0))
    X = rng.uniform(0.0, 1.0, (n_rows, d)).astype(dtype)
    y = advgrad.predict(model, X)
    flip = rng.random(n_rows) < 0.1
    y[flip] = (y[flip] + 1) % C
    return model, X, y


def run_alone(model, X, y, method, eps, norm, restarts=None, large_radii=False):
    """One attack of the ensemble on every row, as ``advgrad.attacks.run`` runs it (with
    ``large_radii``: as AutoAttack's L1 runs APGD)."""
    attack = Attack(method, eps=eps, norm=norm, restarts=restarts, **QUICK)
    labels = attack_labels(model, X, y, attack, backend=BACKEND)
    if large_radii:
        return run_attack(
            *(model, X, labels, attack, (0.0, 1.0)), first_row=0, backend=BACKEND, large_radii=True
        )
    return perturb(model, X, labels, attack, (0.0, 1.0), backend=BACKEND)


@pytest.mark.parametrize(
    ("version", "restarts", "norm", "eps"),
    [
        *(
            (version, restarts, norm, eps)
            for version, restarts in [
                ("standard", None),
                ("rand", None),
                ("plus", None),
                ("plus", 2),
            ]
            for norm, eps in [("inf", 0.1), ("2", 0.4)]
        ),
        ("standard", None, "1", 1.0),
        ("standard", 2, "1", 1.0),
        ("rand", None, "1", 1.0),
    ],
)
def test_the_ensemble_follows_the_protocol(version, restarts, norm, eps):
    """A row is broken by the first attack that breaks it when run alone (the attacks do
    not depend on the batch), with the restarts its version gives it (or those given, for
    the untargeted APGD and FAB), takes that attack's point, and keeps its clean values
    when the model already gets it wrong or no attack breaks it."""
    model, X, y = random_case()
    options = {"norm": norm, "version": version, "restarts": restarts, **QUICK}
    result = auto_attack(model, X, y, eps=eps, clip=(0, 1), **options)
    versions = L1_VERSIONS if norm == "1" else VERSIONS
    assert result.components == tuple(component.method for component in versions[version])
    clean_wrong = advgrad.predict(model, X) != y
    expected = np.where(clean_wrong, CLEAN, ROBUST).astype(np.int8)
    points = X.copy()
    for k, component in enumerate(versions[version], start=1):
        runs = component.restarts
        if restarts is not None and component.method in UNTARGETED_RESTARTS:
            runs = restarts
        alone = run_alone(
            *(model, X, y, component.method, eps, norm),
            restarts=runs,
            large_radii=component.large_radii,
        )
        newly = (expected == ROBUST) & (advgrad.predict(model, alone) != y)
        expected[newly] = k
        points[newly] = alone[newly]
    np.testing.assert_array_equal(result.broken_by, expected)
    np.testing.assert_array_equal(result.X_adv, points)
    broken = result.broken_by >= 1
    assert (advgrad.predict(model, result.X_adv[broken]) != y[broken]).all()
    size = np.linalg.norm(result.X_adv - X, ord=float(norm), axis=1)
    assert (size <= eps * (1 + 1e-9)).all()
    assert result.X_adv.min() >= 0.0 and result.X_adv.max() <= 1.0


def test_robust_accuracy_never_rises_over_the_stages():
    model, X, y = random_case(seed=7)
    result = auto_attack(model, X, y, eps=0.1, clip=(0, 1), **QUICK)
    after = [result.robust_after(k).mean() for k in range(len(result.components) + 1)]
    assert after == sorted(after, reverse=True)
    assert after[-1] == np.mean(result.broken_by == ROBUST)


@pytest.mark.parametrize("n_rows", [1, 17])
def test_the_ensemble_does_not_depend_on_the_batch(n_rows):
    model, X, y = random_case(n_rows=40)
    attack = Attack("autoattack", eps=0.1, **QUICK)
    whole = ensemble(model, X, y, attack, (0.0, 1.0), first_row=np.arange(40), backend=BACKEND)
    for start in range(0, 40, n_rows):
        part = slice(start, start + n_rows)
        piece = ensemble(
            *(model, X[part], y[part], attack, (0.0, 1.0)),
            first_row=np.arange(40)[part],
            backend=BACKEND,
        )
        np.testing.assert_array_equal(piece.broken_by, whole.broken_by[part])
        np.testing.assert_array_equal(piece.X_adv, whole.X_adv[part])


def test_evaluate_reports_each_stage_and_the_ensemble():
    model, X, y = random_case(seed=9, dtype=np.float32)
    settings = {"eps_values": (0.0, 0.1), "clip": (0.0, 1.0), "attack": Attack(**QUICK)}
    result = evaluate(model, X, y, methods=("fgsm", "autoattack"), **settings)
    stages = [*components("standard"), "autoattack"]
    assert list(dict.fromkeys(p.method for p in result.points)) == ["fgsm", *stages]
    for eps in (0.0, 0.1):  # at eps 0 every stage is the clean accuracy
        found = auto_attack(model, X, y, eps=eps, clip=(0, 1), **QUICK)
        accuracies = [result.accuracy(stage, eps) for stage in stages]
        right = [
            (advgrad.predict(model, X) == y) & found.robust_after(k)
            for k in range(1, len(stages) + 1)
        ]
        assert accuracies == [float(r.mean()) for r in right]
    assert [s.method for s in result.minimal_eps] == ["fgsm"]  # no bisection of autoattack


def test_evaluate_refuses_an_attack_listed_twice():
    model, X, y = random_case()
    with pytest.raises(ValueError, match=r"^apgd-ce already run inside autoattack"):
        evaluate(model, X, y, methods=("apgd-ce", "autoattack"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target": 1}, "autoattack is untargeted (apgd-t chooses its own targets)"),
        (
            {"norm": "1", "version": "plus"},
            "autoattack's plus version is for the norms inf and 2; in L1: standard, rand",
        ),
        (
            {"norm": "1", "steps": 4},
            "autoattack in L1 runs APGD's steps at 3 eps, 2 eps, then "
            "eps, which leaves no step at eps of steps=4: take 3 or at least 5",
        ),
        ({"step_size": 0.01}, "autoattack sets its own step size"),
        ({"version": "extra"}, "version must be one of standard, plus, rand, got 'extra'"),
        ({"queries": 0}, "queries must be at least 1"),
    ],
)
def test_refusals(options, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        Attack("autoattack", **{"eps": 0.1, **options})


def test_the_attack_command_writes_broken_by(tmp_path):
    out = tmp_path / "aa.h5"
    options = ["--steps", "5", "--queries", "20", "--target-classes", "2"]
    result = CliRunner().invoke(
        app, ["attack", "--method", "autoattack", "--labels", "--out", str(out), *options]
    )
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        names = list(f.attrs["broken_by_names"])
        broken_by, y = f["broken_by"][:], f["y"][:]
        pred_clean, pred_adv = f["pred_clean"][:], f["pred_adv"][:]
        assert (f.attrs["attack"], f.attrs["version"]) == ("autoattack", "standard")
    assert names == ["clean", *components("standard")]
    np.testing.assert_array_equal(broken_by == CLEAN, pred_clean != y)
    np.testing.assert_array_equal(broken_by == ROBUST, (pred_clean == y) & (pred_adv == y))
    assert (pred_adv[broken_by >= 1] != y[broken_by >= 1]).all()


def test_the_evaluate_command_prints_and_writes_the_stages(tmp_path):
    report = tmp_path / "r.json"
    options = ["--steps", "5", "--queries", "20", "--target-classes", "2", "--eps", "0.1"]
    result = CliRunner().invoke(
        app, ["evaluate", "--method", "autoattack", "--json", str(report), *options]
    )
    assert result.exit_code == 0, result.output
    methods = [p["method"] for p in json.loads(report.read_text())["points"]]
    assert methods == [*components("standard"), "autoattack"]
    words = " ".join(result.output.split())  # rich wraps the caption to the terminal
    for stage in methods:
        assert f"│ {stage} " in words
    assert "the accuracy after each of its attacks in turn" in words


@pytest.mark.parametrize("method", ["square", "fab", "fab-t", "autoattack"])
def test_no_minimal_eps_for_attacks_of_one_eps(tmp_path, method):
    result = CliRunner().invoke(
        app, ["attack", "--method", method, "--min-eps", "0.01", "--out", str(tmp_path / "a.h5")]
    )
    assert result.exit_code == 1
    assert result.output.strip().endswith(
        f"{method} takes one eps for every row, so no minimal eps per row is searched for it "
        "(--min-eps: fgsm, bim, pgd, mifgsm, deepfool, apgd-ce, apgd-dlr, apgd-t, cw)"
    )
    assert list(tmp_path.iterdir()) == []


def test_apgd_has_a_minimal_eps_per_row():
    """APGD takes an eps per row, so its minimal eps is bisected: at each row's minimal eps
    the row is broken (run again, with every other row at its own eps)."""
    model, X, y = random_case(seed=11, n_rows=24)
    attack = Attack("apgd-ce", steps=10)
    labels = attack_labels(model, X, y, attack, backend=BACKEND)
    found = minimal_eps(
        *(model, X, labels, attack, (0.0, 1.0)), eps_max=0.3, tolerance=0.01, backend=BACKEND
    )
    searched = np.flatnonzero(np.isfinite(found) & (found > 0))
    assert 4 <= len(searched) < len(X)  # some rows broken, not all
    part = Labels(labels.Y[searched], labels.reference[searched], labels.predicted[searched])
    X_adv = perturb(
        *(model, X[searched], part, attack, (0.0, 1.0)),
        eps=found[searched],
        first_row=searched,
        backend=BACKEND,
    )
    assert (advgrad.predict(model, X_adv) != y[searched]).all()


def test_the_plus_version_from_the_command_line(tmp_path):
    """--version plus names its six attacks in /broken_by_names and its attributes record
    the restarts it gives apgd-ce, apgd-dlr and fab (5, the reference's), or those given."""
    for restarts, recorded in ((None, 5), ("2", 2)):
        out = tmp_path / f"plus-{restarts}.h5"
        options = ["--steps", "3", "--queries", "10", "--target-classes", "2"]
        options += ["--restarts", restarts] if restarts else []
        result = CliRunner().invoke(
            app,
            ["attack", "--method", "autoattack", "--version", "plus", "--out", str(out), *options],
        )
        assert result.exit_code == 0, result.output
        with h5py.File(out, "r") as f:
            assert list(f.attrs["broken_by_names"]) == ["clean", *components("plus")]
            assert (f.attrs["version"], f.attrs["restarts"]) == ("plus", recorded)
    assert components("plus") == ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")


def test_the_l1_version_from_the_command_line(tmp_path):
    """--norm 1 runs the L1 standard version (its APGD at three radii needs 3 steps at
    least) and writes points within the L1 ball."""
    out = tmp_path / "l1.h5"
    options = ["--steps", "3", "--queries", "10", "--target-classes", "2", "--eps", "1.5"]
    result = CliRunner().invoke(
        app, ["attack", "--method", "autoattack", "--norm", "1", "--out", str(out), *options]
    )
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        assert list(f.attrs["broken_by_names"]) == ["clean", *components("standard", "1")]
        assert list(f.attrs["components"]) == [
            "apgd-ce: 3 steps, 5 restarts, radii 3, 2, 1 x eps",
            "apgd-t: 3 steps, 1 restart, 2 target classes, radii 3, 2, 1 x eps",
            "fab-t: 3 steps, 1 restart, 2 target classes",
            "square: 10 queries",
        ]
        X_adv, broken_by = f["X"][:], f["broken_by"][:]
    X, _ = advgrad.load_dataset(bundled_path(TEST_DATA))
    assert (broken_by >= 1).any()
    size = np.abs(X_adv.astype(np.float64) - X).reshape(len(X), -1).sum(axis=1)
    assert (size <= 1.5 * (1 + 1e-6)).all()
    result = CliRunner().invoke(
        app, ["attack", "--method", "autoattack", "--norm", "1", "--steps", "4", "--out", str(out)]
    )
    assert result.exit_code == 1
    assert "leaves no step at eps of steps=4: take 3 or at least 5" in result.output


def test_the_settings_recorded_are_those_each_attack_ran_with():
    """L1 standard's APGD-T takes 5 target classes and its FAB-T 9, unless told: the
    scalar attributes cannot say so, the ``components`` attribute does."""
    assert Attack("autoattack", eps=1.0, norm="1").describe()["components"] == [
        "apgd-ce: 100 steps, 5 restarts, radii 3, 2, 1 x eps",
        "apgd-t: 100 steps, 1 restart, 5 target classes, radii 3, 2, 1 x eps",
        "fab-t: 100 steps, 1 restart, 9 target classes",
        "square: 5000 queries",
    ]
    told = Attack("autoattack", eps=0.1, version="plus", restarts=2, target_classes=3, steps=7)
    assert told.describe()["components"] == [
        "apgd-ce: 7 steps, 2 restarts",
        "apgd-dlr: 7 steps, 2 restarts",
        "fab: 7 steps, 2 restarts",
        "square: 5000 queries",
        "apgd-t: 7 steps, 1 restart, 3 target classes",
        "fab-t: 7 steps, 1 restart, 3 target classes",
    ]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, {"apgd-ce": (1, 9), "apgd-t": (1, 9), "fab-t": (1, 9), "square": (1, 9)}),
        (
            {"version": "plus"},
            {"apgd-ce": (5, 9), "apgd-dlr": (5, 9), "fab": (5, 9), "square": (1, 9)}
            | {"apgd-t": (1, 9), "fab-t": (1, 9)},
        ),
        (
            {"version": "plus", "restarts": 2, "target_classes": 3},
            {"apgd-ce": (2, 3), "apgd-dlr": (2, 3), "fab": (2, 3), "square": (1, 3)}
            | {"apgd-t": (1, 3), "fab-t": (1, 3)},
        ),
        ({"norm": "1"}, {"apgd-ce": (5, 9), "apgd-t": (1, 5), "fab-t": (1, 9), "square": (1, 9)}),
        (
            {"norm": "1", "restarts": 1, "target_classes": 7},
            {"apgd-ce": (1, 7), "apgd-t": (1, 7), "fab-t": (1, 7), "square": (1, 7)},
        ),
    ],
)
def test_each_attack_of_a_version_runs_with_the_references_restarts_and_targets(options, expected):
    """(restarts, targets) of each attack: the reference's set_version values, or those
    given (restarts for the untargeted APGD and FAB, targets for every targeted attack)."""
    attack = Attack("autoattack", eps=1.0, **options)
    found = {}
    for component in version_components(attack.version, attack.norm):
        run = component_attack(attack, component)
        found[run.method] = (run.n_restarts, run.n_target_classes)
    assert found == expected
