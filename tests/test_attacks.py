"""The public array API: advgrad.input_gradient, fgsm, predict, loss, gradcheck."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from conftest import one_hot, random_network

import advgrad
from advgrad.gradient_check import finite_difference_gradient


@pytest.fixture
def small_model():
    rng = np.random.default_rng(20)
    return advgrad.Model(*random_network(rng, 12, 7, 4), input_shape=(3, 4))


def test_fgsm_raises_the_loss_on_the_bundled_test_set(digits_model, digits_test):
    """Pins the sign of P - Y: with the seed's (Y - P) the loss would fall on most rows."""
    X, y = digits_test
    X_adv = advgrad.fgsm(digits_model, X, y, eps=0.05)
    for model in (digits_model, digits_model.astype(np.float64)):
        before = advgrad.loss(model, X, y)
        after = advgrad.loss(model, X_adv, y)
        assert np.mean(after > before) >= 0.99
    assert np.mean(advgrad.predict(digits_model, X) == y) >= 0.95


def test_bundled_model_is_accurate_and_fgsm_hurts_it(digits_model, digits_test):
    X, y = digits_test
    assert X.shape == (450, 8, 8)
    assert np.mean(advgrad.predict(digits_model, X) == y) >= 0.95
    X_adv = advgrad.fgsm(digits_model, X, eps=0.1)
    assert np.mean(advgrad.predict(digits_model, X_adv) == y) < 0.8
    assert np.abs(X_adv - X).max() <= 0.1 + 1e-6
    assert X_adv.min() >= 0.0
    assert X_adv.max() <= 1.0


def test_input_gradient_keeps_the_shape_and_matches_the_reference(small_model):
    rng = np.random.default_rng(21)
    X = rng.uniform(size=(9, 3, 4))
    y = rng.integers(0, 4, 9)
    G = advgrad.input_gradient(small_model, X, y)
    assert G.shape == X.shape
    m = small_model
    expected = reference.input_gradient(X.reshape(9, 12), m.W1, m.b1, m.W2, m.b2, one_hot(y, 4))
    np.testing.assert_allclose(G.reshape(9, 12), expected, rtol=1e-12)


def test_labels_none_means_predictions(small_model):
    rng = np.random.default_rng(22)
    X = rng.uniform(size=(30, 12))
    predicted = advgrad.predict(small_model, X)
    np.testing.assert_array_equal(
        advgrad.input_gradient(small_model, X), advgrad.input_gradient(small_model, X, predicted)
    )
    np.testing.assert_array_equal(
        advgrad.fgsm(small_model, X, eps=0.1), advgrad.fgsm(small_model, X, predicted, eps=0.1)
    )


def test_soft_labels_give_the_soft_gradient(small_model):
    rng = np.random.default_rng(23)
    X = rng.uniform(size=(10, 12))
    Y = rng.dirichlet(np.ones(4), size=10)
    m = small_model
    np.testing.assert_allclose(
        advgrad.input_gradient(m, X, Y),
        reference.input_gradient(X, m.W1, m.b1, m.W2, m.b2, Y),
        rtol=1e-12,
    )


@pytest.mark.parametrize(("norm", "p"), [("inf", np.inf), ("2", 2.0), ("1", 1.0), (2, 2.0)])
def test_fgsm_norms_match_the_reference(small_model, norm, p):
    rng = np.random.default_rng(24)
    X = rng.uniform(size=(15, 12))
    y = rng.integers(0, 4, 15)
    m = small_model
    expected = reference.fgm_step(X, m.W1, m.b1, m.W2, m.b2, one_hot(y, 4), 0.2, p, 0.0, 1.0)
    X_adv = advgrad.fgsm(m, X, y, eps=0.2, norm=norm, clip=(0.0, 1.0))
    np.testing.assert_allclose(X_adv, expected, rtol=1e-12)


def test_targeted_fgsm_lowers_the_loss_toward_the_target(small_model):
    rng = np.random.default_rng(25)
    X = rng.uniform(0.3, 0.7, size=(40, 12))
    target = rng.integers(0, 4, 40)
    X_adv = advgrad.fgsm(small_model, X, target, eps=0.01, targeted=True)
    assert (advgrad.loss(small_model, X_adv, target) < advgrad.loss(small_model, X, target)).all()


def test_clip_none_leaves_the_range_open(small_model):
    X = np.full((3, 12), 0.99)
    X_adv = advgrad.fgsm(small_model, X, eps=0.5, clip=None)
    assert X_adv.max() > 1.0
    assert advgrad.fgsm(small_model, X, eps=0.5, clip=(0.0, 1.0)).max() <= 1.0
    # the model declares no range, so the default clips nothing either
    np.testing.assert_array_equal(advgrad.fgsm(small_model, X, eps=0.5), X_adv)


def test_float32_model_computes_in_float32(small_model):
    X = np.random.default_rng(26).uniform(size=(5, 12))
    assert advgrad.fgsm(small_model.astype(np.float32), X, eps=0.1).dtype == np.float32
    assert advgrad.input_gradient(small_model, X.astype(np.float32)).dtype == np.float64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"X": np.zeros((2, 5))}, "the model expects d = 12"),
        ({"y": np.array([0, 4])}, r"label 4 at row 1 is outside \[0, 4\)"),
        ({"y": np.array([0, -1])}, r"label -1 at row 1"),
        ({"y": np.array([0, 1, 2])}, "y has"),
        ({"y": np.array([0.5, 1.0])}, "integer labels expected"),
        ({"y": np.full((2, 4), 0.5)}, "must sum to 1"),
        ({"y": np.full((2, 3), 1 / 3)}, r"soft labels must be float \(N, 4\)"),
        ({"eps": -0.1}, "eps must be >= 0"),
        ({"norm": "3"}, "norm must be one of"),
        ({"clip": (1.0, 0.0)}, "clip range"),
        ({"targeted": True}, "targeted attack needs the target"),
    ],
)
def test_bad_arguments_raise_clear_errors(small_model, kwargs, message):
    arguments = {"X": np.zeros((2, 12)), "y": None, "eps": 0.1, **kwargs}
    X, y = arguments.pop("X"), arguments.pop("y")
    with pytest.raises(ValueError, match=message):
        advgrad.fgsm(small_model, X, y, **arguments)


def test_gradcheck_passes_on_the_bundled_model(digits_model, digits_test):
    result = advgrad.gradcheck(digits_model, digits_test[0][:8])
    assert result.passed()
    assert result.relative_error < 1e-7
    assert (result.n_rows, result.n_inputs) == (8, 64)


def test_finite_differences_catch_a_wrong_sign(small_model):
    """The check itself can fail: the seed's sign, (Y - P), is far from the differences."""
    rng = np.random.default_rng(27)
    X = rng.uniform(size=(6, 12))
    Y = one_hot(rng.integers(0, 4, 6), 4)
    numeric = finite_difference_gradient(small_model, X, Y)
    analytic = advgrad.input_gradient(small_model, X, Y)
    assert np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric) < 1e-7
    assert np.linalg.norm(-analytic - numeric) / np.linalg.norm(numeric) > 1.9


def test_model_validates_shapes_and_values():
    rng = np.random.default_rng(28)
    W1, b1, W2, b2 = random_network(rng, 4, 3, 2)
    with pytest.raises(ValueError, match="b1 must have shape"):
        advgrad.Model(W1, b2, W2, b2)
    with pytest.raises(ValueError, match="W2 must have 3 rows"):
        advgrad.Model(W1, b1, W2.T, b2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        advgrad.Model(W1, b1, W2[:, :1], b2[:1])
    with pytest.raises(ValueError, match="non-finite"):
        advgrad.Model(W1, b1 * np.nan, W2, b2)
    with pytest.raises(ValueError, match="input_shape"):
        advgrad.Model(W1, b1, W2, b2, input_shape=(3, 3))
    model = advgrad.Model(W1, b1, W2, b2)
    with pytest.raises(ValueError, match="read-only"):
        model.W1[0, 0] = 1.0


def test_the_attack_api_is_exported_at_the_top_level():
    from advgrad import attacks

    for name in ("fgsm", "bim", "pgd", "mi_fgsm", "deepfool", "Attack", "run"):
        assert getattr(advgrad, name) is getattr(attacks, name)
        assert name in dir(advgrad)


@pytest.mark.parametrize("declared", [(-1.0, 1.0), (-0.5, 0.25), None])
def test_default_clip_is_the_models_declared_range_else_none(declared):
    rng = np.random.default_rng(5)
    W1, b1, W2, b2 = random_network(rng, 6, 5, 3, dtype=np.float32)
    x_min, x_max = declared or (None, None)
    model = advgrad.Model(W1, b1, W2, b2, x_min=x_min, x_max=x_max)
    X = rng.uniform(-1.0, 1.0, size=(40, 6)).astype(np.float32)
    expected_clip = declared  # None: no clipping at all
    for attack in (
        lambda clip: advgrad.fgsm(model, X, eps=0.3, **clip),
        lambda clip: advgrad.bim(model, X, eps=0.3, steps=3, **clip),
        lambda clip: advgrad.pgd(model, X, eps=0.3, steps=3, **clip),
        lambda clip: advgrad.mi_fgsm(model, X, eps=0.3, steps=3, **clip),
        lambda clip: advgrad.deepfool(model, X, **clip),
    ):
        default = attack({})
        np.testing.assert_array_equal(default, attack({"clip": "model"}))
        np.testing.assert_array_equal(default, attack({"clip": expected_clip}))
    if declared is None:
        # negative inputs are not zeroed as the old (0, 1) default did
        assert (advgrad.fgsm(model, X, eps=0.3) < -1.0).any()
    else:
        X_adv = advgrad.fgsm(model, X, eps=0.3)
        assert X_adv.min() >= declared[0] and X_adv.max() <= declared[1]


def test_a_clip_name_other_than_model_is_refused(digits_model, digits_test):
    with pytest.raises(ValueError, match="clip must be"):
        advgrad.fgsm(digits_model, digits_test[0][:2], eps=0.1, clip="data")
