"""Certified robustness: sound bounds, radii near the truth, CROWN vs IBP, the command."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import reference
from conftest import random_network
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import advgrad
from advgrad.attacks import Attack, attack_labels, minimal_eps_of, perturb, random_in_ball
from advgrad.certify import LINE_STEPS, certify, margin_bounds
from advgrad.cli import app
from advgrad.kernels import cpu

STRONG_PGD = Attack("pgd", steps=40, restarts=20, seed=3)


@given(
    low=st.floats(-40.0, 40.0),
    width=st.sampled_from([0.0, 1e-9, 1e-4, 0.1, 1.0, 4.0, 30.0]),
    steps=st.sampled_from([0, 3, 20]),
)
@settings(max_examples=300, deadline=None)
def test_sigmoid_lines_hold_over_their_interval(low, width, steps):
    high = low + width
    z = np.concatenate([np.linspace(low, high, 4001), [low, high]])
    s = 1.0 / (1.0 + np.exp(-z))
    a_up, b_up = cpu.sigmoid_upper_line(low, high, steps)
    a_low, b_low = cpu.sigmoid_lower_line(low, high, steps)
    assert (a_up * z + b_up >= s).all()
    assert (a_low * z + b_low <= s).all()


def sample_region(rng, x, radius, norm, clip, count):
    """Points of the radius-ball around x (corners and surface included), in the clip box."""
    d = len(x)
    p = np.inf if norm == "inf" else 2.0
    inside = random_in_ball(int(rng.integers(2**31)), 0, np.arange(count), d, p)
    if norm == "inf":
        edge = np.sign(rng.uniform(-1, 1, size=(count, d)))
    else:
        edge = rng.normal(size=(count, d))
        edge /= np.linalg.norm(edge, axis=1, keepdims=True)
    points = x + radius * np.concatenate([inside, edge])
    return points if clip is None else np.clip(points, *clip)


def kernel_bounds(X, labels, eps, p, clip, network, crown):
    """``cpu.margin_bounds_into`` on float64 arrays: the worst-margin lower bound per row."""
    worst = np.empty(len(X))
    cpu.margin_bounds_into(X, labels, eps, p, *clip, *network, crown, LINE_STEPS, worst)
    return worst


def rounding_allowance(X, eps, network):
    """An upper bound of how far the bound kernels lower a bound to cover float64 rounding:
    ``cpu.BOUND_ROUNDING`` (2**-32) times the magnitude of the terms they sum, the
    pre-activations' (at most (|x| + eps) ||W1[:, j]||_1 + |b1_j|, each carried through a
    sigmoid of slope <= 1/4) weighted by |W2_jy - W2_jk| <= 2 max |W2|, and the output
    terms themselves; a factor 4 covers the several places each is counted."""
    W1, b1, W2, b2 = network
    reach = (np.abs(X).max() + eps.max()) * np.abs(W1).sum(axis=0) + np.abs(b1)
    weights = 2 * np.abs(W2).max(axis=1)
    magnitude = 2 * np.abs(b2).max() + (weights * (1 + reach)).sum()
    return 4 * cpu.BOUND_ROUNDING * magnitude


@st.composite
def bound_problems(draw):
    """A float64 network, rows (some outside [0, 1]), labels (not always the predicted
    class), radii (some 0), a norm and a clip range."""
    n_rows = draw(st.sampled_from([1, 7, cpu.ROWS_PER_BLOCK + 3]))
    d, H, C = draw(st.integers(1, 12)), draw(st.integers(1, 8)), draw(st.integers(2, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    network = random_network(rng, d, H, C, scale=draw(st.sampled_from([0.5, 2.0, 6.0])))
    X = rng.uniform(-0.2, 1.2, size=(n_rows, d))
    labels = rng.integers(0, C, n_rows)
    p = draw(st.sampled_from([np.inf, 2.0]))
    eps = rng.uniform(0.0, 0.3, n_rows) * (1.0 if p == np.inf else 3.0)
    eps[::3] = 0.0
    clip = draw(st.sampled_from([(0.0, 1.0), (-np.inf, np.inf)]))
    return X, labels, eps, p, clip, network


@given(bound_problems())
@settings(max_examples=60, deadline=None)
def test_interval_bounds_match_the_reference(problem):
    """The IBP bound is the exact interval bound of ``reference.interval_margin_bound``,
    lowered by no more than its rounding allowance, and never above it (soundness)."""
    X, labels, eps, p, clip, network = problem
    got = kernel_bounds(X, labels, eps, p, clip, network, crown=False)
    want = reference.interval_margin_bound(X, labels, eps, p, *clip, *network)
    gap = want - got
    assert (gap >= 0.0).all()
    assert (gap <= rounding_allowance(X, eps, network)).all(), gap.max()
    # the region of eps = 0 is the row alone when clipping leaves it where it is: its
    # interval bound is then its margin
    point = (eps == 0.0) & (np.clip(X, *clip) == X).all(axis=1)
    np.testing.assert_allclose(
        want[point], reference.worst_margin(X[point], labels[point], *network), atol=1e-12
    )


@pytest.mark.parametrize("n_rows", [1, 7, cpu.ROWS_PER_BLOCK + 3, 2 * cpu.ROWS_PER_BLOCK + 45])
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_margin_bounds_of_a_float32_model_match_the_reference(n_rows, norm):
    """``margin_bounds(method="ibp")`` bounds a float32 model exactly: in float64, from the
    float32 weights and rows, as the reference does."""
    rng = np.random.default_rng(n_rows)
    model = advgrad.Model(*random_network(rng, 12, 7, 4, dtype=np.float32, scale=2.0))
    X = rng.random((n_rows, 12)).astype(np.float32)
    y = rng.integers(0, 4, n_rows)
    p = np.inf if norm == "inf" else 2.0
    eps = rng.uniform(0.0, 0.3, n_rows) * (1.0 if norm == "inf" else 3.0)
    got = margin_bounds(model, X, y, eps=eps, norm=norm, method="ibp", clip=(0.0, 1.0))
    network = tuple(a.astype(np.float64) for a in (model.W1, model.b1, model.W2, model.b2))
    want = reference.interval_margin_bound(X, y, eps, p, 0.0, 1.0, *network)
    gap = want - got
    assert (gap >= 0.0).all()
    assert (gap <= rounding_allowance(X.astype(np.float64), eps, network)).all()


@given(bound_problems(), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_crown_bound_is_at_least_ibp_and_below_every_sampled_margin(problem, seed):
    """CROWN keeps, per margin, the larger of its linear bound and the interval bound, so
    its worst margin is >= IBP's; being sound, it is <= the true worst margin at every
    point of the region (sampled: inside, on the surface, at corners, clipped)."""
    X, labels, eps, p, clip, network = problem
    crown = kernel_bounds(X, labels, eps, p, clip, network, crown=True)
    ibp = kernel_bounds(X, labels, eps, p, clip, network, crown=False)
    assert (crown >= ibp).all()
    rng = np.random.default_rng(seed)
    norm = "inf" if p == np.inf else "2"
    box = None if clip == (-np.inf, np.inf) else clip
    for n in range(min(len(X), 20)):
        points = np.concatenate([X[n : n + 1], sample_region(rng, X[n], eps[n], norm, box, 100)])
        margins = reference.worst_margin(points, np.full(len(points), labels[n]), *network)
        assert crown[n] <= margins.min(), (n, crown[n], margins.min())


@given(
    seed=st.integers(0, 2**32 - 1),
    d=st.integers(1, 6),
    H=st.integers(1, 8),
    C=st.integers(2, 4),
    norm=st.sampled_from(["inf", "2"]),
    method=st.sampled_from(["crown", "ibp"]),
    scale=st.sampled_from([0.5, 2.0, 6.0]),
    clipped=st.booleans(),
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_no_attack_or_sample_beats_a_certificate(seed, d, H, C, norm, method, scale, clipped):
    rng = np.random.default_rng(seed)
    model = advgrad.Model(*random_network(rng, d, H, C, scale=scale))
    clip = (0.0, 1.0) if clipped else None
    X = rng.uniform(-0.2, 1.2, size=(6, d))  # some rows outside the clip box
    y = advgrad.predict(model, X)
    y[0] = (y[0] + 1) % C  # a misclassified row: no certificate
    eps_max = 1.0 if norm == "inf" else np.sqrt(d)
    result = certify(
        model, X, y, norm=norm, eps_values=(0.05,), method=method, clip=clip, eps_max=eps_max
    )
    radius = result.radius
    assert radius[0] == 0.0
    assert not result.certified[0].any()
    # PGD with many restarts, at each row's certified radius
    labels = attack_labels(model, X, y, STRONG_PGD)
    attack = Attack("pgd", eps=1.0, norm=norm, steps=40, restarts=20, seed=seed % 1000)
    X_adv = perturb(model, X, labels, attack, clip or (-np.inf, np.inf), eps=radius)
    certified = radius > 0
    assert (advgrad.predict(model, X_adv)[certified] == y[certified]).all()
    # dense random sampling inside the certified ball
    for n in np.flatnonzero(certified):
        points = sample_region(rng, X[n], radius[n], norm, clip, 3000)
        assert (advgrad.predict(model, points) == y[n]).all()
    # the certified radius never exceeds the smallest adversarial eps an attack finds
    found = minimal_eps_of(
        model,
        X,
        y,
        Attack("pgd", norm=norm, steps=30, restarts=5, seed=1),
        eps_max=eps_max,
        tolerance=1e-3,
        clip=clip,
    )
    assert (radius <= found).all()


def true_radius(model, X, y, grid, norm):
    """Distance from each row to the nearest misclassified point of a fine grid (an upper
    bound of the true radius, within about the grid spacing of it)."""
    wrong = advgrad.predict(model, grid)
    p = np.inf if norm == "inf" else 2
    out = np.full(len(X), np.inf)
    for n in range(len(X)):
        bad = grid[wrong != y[n]]
        if bad.size:
            out[n] = np.linalg.norm(bad - X[n], ord=p, axis=1).min()
    return out


@pytest.mark.parametrize(
    ("d", "norm", "median", "quartile"), [(1, "inf", 0.8, 0.7), (2, "2", 0.9, 0.8)]
)
def test_radius_is_below_the_true_radius_and_crown_is_close(d, norm, median, quartile):
    """Measured on these seeds (rows with a misclassified grid point: 40 in 1-D, 80 in 2-D):
    radius / true radius has median 0.86 (lower quartile 0.79) for CROWN and 0.67 for IBP in
    1-D L-inf, 0.94 (0.90) for CROWN and 0.79 for IBP in 2-D L2."""
    rng = np.random.default_rng(2024 + d)
    axis = np.linspace(0.0, 1.0, 200001 if d == 1 else 801)
    grid = np.stack(np.meshgrid(*[axis] * d, indexing="ij"), axis=-1).reshape(-1, d)
    ratios = {"crown": [], "ibp": []}
    for _ in range(10):
        model = advgrad.Model(*random_network(rng, d, int(rng.integers(2, 9)), 3, scale=5.0))
        X = rng.uniform(0.0, 1.0, size=(20, d))
        y = advgrad.predict(model, X)
        truth = true_radius(model, X, y, grid, norm)
        known = np.isfinite(truth)
        for method in ratios:
            radius = certify(model, X, y, norm=norm, method=method, tolerance=1e-5).radius
            assert (radius[known] <= truth[known]).all()
            ratios[method].append(radius[known] / truth[known])
    crown, ibp = (np.concatenate(ratios[m]) for m in ("crown", "ibp"))
    assert len(crown) >= 30
    assert np.median(crown) >= median
    assert np.quantile(crown, 0.25) >= quartile
    assert (crown >= ibp - 1e-4).all()
    assert np.median(crown) >= np.median(ibp) + 0.1


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_crown_is_never_looser_than_interval_bounds(digits_model, digits_test, norm):
    X, y = digits_test
    X, y = X[:200], y[:200]
    scale = 1.0 if norm == "inf" else 4.0
    for eps in (0.0, 0.01, 0.03, 0.1):
        crown = margin_bounds(digits_model, X, y, eps=scale * eps, norm=norm, method="crown")
        ibp = margin_bounds(digits_model, X, y, eps=scale * eps, norm=norm, method="ibp")
        assert (crown >= ibp).all()
        if eps == 0.0:  # a point: both bounds are the exact margin, less a rounding allowance
            np.testing.assert_allclose(crown, ibp, atol=1e-6)
    options = {"norm": norm, "eps_values": (0.02 * scale,), "tolerance": 1e-4}
    tight = certify(digits_model, X, y, method="crown", **options)
    loose = certify(digits_model, X, y, method="ibp", **options)
    assert (tight.radius >= loose.radius - 1e-4).all()
    assert tight.radius.mean() > 1.2 * loose.radius.mean()
    assert (tight.certified >= loose.certified).all()


runner = CliRunner()


def run(*args, cwd):
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, ["certify", *(str(a) for a in args)])
    finally:
        os.chdir(previous)


def test_certify_command_on_the_bundled_default(tmp_path, digits_model, digits_test):
    result = run("--steps", 5, "--restarts", 1, "--eps", "0.01,0.05", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    for words in ("certified (crown)", "median gap", "ms per row", "digits_test-certify-linf"):
        assert words in result.output
    X, y = digits_test
    with h5py.File(tmp_path / "digits_test-certify-linf.h5", "r") as f:
        assert f.attrs["complete"]
        assert f.attrs["norm"] == "inf"
        assert f.attrs["certify_method"] == "crown"
        radius, attack_eps = f["radius"][...], f["attack_eps"][...]
        np.testing.assert_array_equal(f["y"][...], y)
    assert radius.shape == attack_eps.shape == (450,)
    assert (radius <= attack_eps).all()
    expected = certify(digits_model, X, y, eps_values=(0.01, 0.05))
    np.testing.assert_array_equal(radius, expected.radius)


def test_a_missing_file_is_one_line(tmp_path):
    result = run("--data", "missing.h5", cwd=tmp_path)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "no such file" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("--norm", "1"), "--norm"),
        (("--eps", "0.1,x"), "--eps"),
        (("--method", "exact"), "--method"),
    ],
)
def test_bad_options_are_refused_by_the_parser(tmp_path, args, option):
    result = run(*args, cwd=tmp_path)
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []


def test_the_finest_certify_tolerance_ends(digits_model, digits_test):
    X, y = digits_test
    result = certify(digits_model, X[:8], y[:8], eps_values=(0.05,), tolerance=np.spacing(1.0))
    assert result.n_rows == 8
    assert (result.radius >= 0).all()
