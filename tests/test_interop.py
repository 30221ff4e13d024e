"""Model interop: scikit-learn's MLPClassifier and PyTorch's nn.Sequential, both ways."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import reference
from conftest import random_network

import advgrad
from advgrad import Model

PARAMETERS = ("W1", "b1", "W2", "b2")


def same_weights(a: Model, b: Model) -> bool:
    return all(np.array_equal(getattr(a, name), getattr(b, name)) for name in PARAMETERS)


def fit_mlp(X, y, **options):
    from sklearn.neural_network import MLPClassifier

    options = {"hidden_layer_sizes": (12,), "activation": "logistic", "max_iter": 30} | options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a few iterations are enough
        return MLPClassifier(random_state=0, **options).fit(X, y)


@pytest.fixture(scope="module")
def digits_rows(digits_test):
    X, y = digits_test
    return X.reshape(len(X), -1).astype(np.float64), y


# --------------------------------------------------------------------------- scikit-learn


def test_multiclass_sklearn_converts_exactly(digits_rows):
    X, y = digits_rows
    classifier = fit_mlp(X, y)
    model = Model.from_sklearn(classifier)
    assert (model.n_inputs, model.n_hidden, model.n_classes) == (64, 12, 10)
    assert model.dtype == np.float64
    assert model.class_names == tuple(str(k) for k in range(10))
    np.testing.assert_allclose(
        advgrad.predict_proba(model, X), classifier.predict_proba(X), rtol=0, atol=1e-12
    )
    back = model.to_sklearn(classes=classifier.classes_)
    np.testing.assert_array_equal(back.predict_proba(X), classifier.predict_proba(X))
    np.testing.assert_array_equal(back.predict(X), classifier.predict(X))
    assert same_weights(Model.from_sklearn(back), model)


def test_binary_sklearn_becomes_a_two_class_softmax(digits_rows):
    X, y = digits_rows
    labels = np.where(y >= 5, "high", "low")
    classifier = fit_mlp(X, labels)
    assert classifier.out_activation_ == "logistic"
    model = Model.from_sklearn(classifier)
    assert model.n_classes == 2
    assert model.class_names == ("high", "low")
    np.testing.assert_array_equal(model.W2[:, 0], 0.0)
    np.testing.assert_allclose(
        advgrad.predict_proba(model, X), classifier.predict_proba(X), rtol=0, atol=1e-6
    )
    back = model.to_sklearn(classes=classifier.classes_)
    assert back.out_activation_ == "logistic"
    np.testing.assert_array_equal(back.predict(X), classifier.predict(X))
    np.testing.assert_allclose(back.predict_proba(X), classifier.predict_proba(X), atol=1e-12)


def test_any_two_class_model_exports_to_sklearn():
    rng = np.random.default_rng(0)
    model = Model(*random_network(rng, 5, 4, 2))
    X = rng.random((50, 5))
    classifier = model.to_sklearn()
    np.testing.assert_allclose(
        classifier.predict_proba(X), advgrad.predict_proba(model, X), rtol=0, atol=1e-6
    )
    np.testing.assert_array_equal(classifier.predict(X), advgrad.predict(model, X))


def test_float32_sklearn_stays_float32(digits_rows):
    X, y = digits_rows
    model = Model.from_sklearn(fit_mlp(X.astype(np.float32), y))
    assert model.dtype == np.float32


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"activation": "relu"}, "activation='logistic'"),
        ({"hidden_layer_sizes": (8, 8)}, "2 hidden layers"),
    ],
)
def test_unsupported_sklearn_networks_are_refused(digits_rows, options, message):
    X, y = digits_rows
    with pytest.raises(ValueError, match=message):
        Model.from_sklearn(fit_mlp(X, y, **options))


def test_unfitted_multilabel_and_foreign_estimators_are_refused(digits_rows):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    X, y = digits_rows
    with pytest.raises(ValueError, match="not fitted"):
        Model.from_sklearn(MLPClassifier(activation="logistic"))
    with pytest.raises(ValueError, match="multi-label"):
        Model.from_sklearn(fit_mlp(X, np.stack([y % 2, y % 3 == 0], axis=1)))
    with pytest.raises(ValueError, match="MLPClassifier"):
        Model.from_sklearn(LogisticRegression())
    model = Model(*random_network(np.random.default_rng(1), 3, 2, 3))
    with pytest.raises(ValueError, match="2 classes given for a model with 3 classes"):
        model.to_sklearn(classes=[0, 1])
    with pytest.raises(ValueError, match="sorted"):
        model.to_sklearn(classes=["c", "b", "a"])


# --------------------------------------------------------------------------- PyTorch


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_logits_match_and_round_trip(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    model = Model(*random_network(rng, 6, 5, 4, dtype=dtype))
    X = rng.random((40, 6)).astype(dtype)
    module = model.to_torch()
    with torch.no_grad():
        logits = module(torch.from_numpy(X)).numpy()
    assert logits.dtype == dtype
    _, expected, _ = reference.forward(X, model.W1, model.b1, model.W2, model.b2)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-6)
    assert same_weights(Model.from_torch(module), model)
    assert same_weights(Model.from_torch(module.state_dict()), model)
    assert Model.from_torch(module).dtype == dtype


def test_torch_module_converts_to_the_same_function():
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(7, 5), nn.Sigmoid(), nn.Linear(5, 3))
    X = np.random.default_rng(3).random((30, 7)).astype(np.float32)
    with torch.no_grad():
        probabilities = torch.softmax(module(torch.from_numpy(X)), dim=1).numpy()
    model = Model.from_torch(module)
    np.testing.assert_allclose(advgrad.predict_proba(model, X), probabilities, atol=1e-6)


def test_other_torch_architectures_are_refused():
    torch = pytest.importorskip("torch")
    from torch import nn

    with pytest.raises(ValueError, match=r"got Linear, ReLU, Linear"):
        Model.from_torch(nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="got Linear"):
        Model.from_torch(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="bias"):
        Model.from_torch(nn.Sequential(nn.Linear(3, 2, bias=False), nn.Sigmoid(), nn.Linear(2, 2)))
    state = nn.Sequential(nn.Linear(3, 2), nn.Sigmoid(), nn.Linear(2, 2)).state_dict()
    with pytest.raises(ValueError, match="keys"):
        Model.from_torch({**state, "4.weight": torch.zeros(1)})
    state["2.weight"] = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="W2 must have 2 rows"):
        Model.from_torch(state)
