"""Conversions between ``Model`` and scikit-learn's and PyTorch's versions of the network.

scikit-learn: a fitted ``MLPClassifier(activation="logistic")`` with one hidden layer is
exactly advgrad's network (``coefs_[0]`` is W1). With more than two classes its output is a
softmax; with two it is a single logistic unit z, which becomes the two-class softmax of
logits [0, z] (probabilities [1 - sigmoid(z), sigmoid(z)]), and back.

PyTorch: ``nn.Sequential(nn.Linear(d, H), nn.Sigmoid(), nn.Linear(H, C))``, whose output is
the logits Z2; ``nn.Linear`` stores ``weight`` as (out, in), the transpose of W1 and W2.

scikit-learn and torch are imported only by the functions that need them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from advgrad.model import FLOAT_DTYPES, Model

TORCH_KEYS = ("0.weight", "0.bias", "2.weight", "2.bias")
"""The state_dict keys of ``nn.Sequential(nn.Linear, nn.Sigmoid, nn.Linear)``."""


def _float_dtype(*arrays: np.ndarray) -> np.dtype:
    """float64 unless every array is float32."""
    if all(np.asarray(a).dtype == np.float32 for a in arrays):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def from_sklearn(classifier) -> Model:
    """The network of a fitted scikit-learn ``MLPClassifier``.

    Parameters
    ----------
    classifier : sklearn.neural_network.MLPClassifier
        Fitted, with ``activation="logistic"``, one hidden layer, and a softmax output
        (three or more classes) or a single logistic output (two classes).

    Returns
    -------
    Model
        In the classifier's dtype (float32 if it was fitted on float32, else float64);
        ``class_names`` are ``str`` of ``classifier.classes_``. A binary classifier gives
        W2 = [0, w] (H, 2) and b2 = [0, b]: the same probabilities, exactly.

    Raises
    ------
    ValueError
        Not an MLPClassifier, not fitted, another activation, more than one hidden layer,
        or a multi-label classifier.
    """
    from sklearn.neural_network import MLPClassifier

    if not isinstance(classifier, MLPClassifier):
        raise ValueError(f"expected an sklearn MLPClassifier, got {type(classifier).__name__}")
    if not hasattr(classifier, "coefs_"):
        raise ValueError("the MLPClassifier is not fitted; call fit() first")
    if classifier.activation != "logistic":
        raise ValueError(
            f"the MLPClassifier uses activation={classifier.activation!r}; advgrad's network "
            "is a sigmoid network: use activation='logistic'"
        )
    if len(classifier.coefs_) != 2:
        raise ValueError(
            f"the MLPClassifier has {len(classifier.coefs_) - 1} hidden layers; advgrad's "
            "network has exactly one"
        )
    W1, W2 = classifier.coefs_
    b1, b2 = classifier.intercepts_
    classes = np.asarray(classifier.classes_)
    if classifier.out_activation_ == "logistic":
        if W2.shape[1] != 1 or len(classes) != 2:
            raise ValueError("multi-label MLPClassifiers are not supported (one label per row)")
        W2 = np.concatenate([np.zeros_like(W2), W2], axis=1)
        b2 = np.concatenate([np.zeros_like(b2), b2])
    elif classifier.out_activation_ != "softmax":
        raise ValueError(f"unsupported output activation {classifier.out_activation_!r}")
    dtype = _float_dtype(W1, b1, W2, b2)
    return Model(
        *(np.asarray(a, dtype=dtype) for a in (W1, b1, W2, b2)),
        class_names=tuple(str(c) for c in classes),
    )


def to_sklearn(model: Model, classes=None):
    """A fitted scikit-learn ``MLPClassifier(activation="logistic")`` computing ``model``.

    Parameters
    ----------
    model : Model
    classes : (C,) array, optional
        ``classes_`` of the classifier (what ``predict`` returns), distinct and sorted as
        scikit-learn keeps them; default: 0 .. C-1, the classes of ``advgrad.predict``.

    Returns
    -------
    sklearn.neural_network.MLPClassifier
        Ready for ``predict`` and ``predict_proba`` (``coefs_`` in the model's dtype). A
        two-class model becomes scikit-learn's single logistic unit z = A (w_1 - w_0) +
        (b_1 - b_0), whose probabilities equal the softmax ones.
    """
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import LabelBinarizer

    classes = np.arange(model.n_classes) if classes is None else np.asarray(classes)
    if classes.shape != (model.n_classes,):
        raise ValueError(f"{len(classes)} classes given for a model with {model.n_classes} classes")
    W2, b2 = model.W2, model.b2
    binary = model.n_classes == 2
    if binary:
        W2 = W2[:, 1:] - W2[:, :1]
        b2 = b2[1:] - b2[:1]
    classifier = MLPClassifier(hidden_layer_sizes=(model.n_hidden,), activation="logistic")
    classifier.coefs_ = [model.W1.copy(), np.array(W2)]
    classifier.intercepts_ = [model.b1.copy(), np.array(b2)]
    classifier.n_layers_ = 3
    classifier.n_outputs_ = W2.shape[1]
    classifier.out_activation_ = "logistic" if binary else "softmax"
    classifier.n_features_in_ = model.n_inputs
    classifier._label_binarizer = LabelBinarizer().fit(classes)
    classifier.classes_ = classifier._label_binarizer.classes_
    if not np.array_equal(classifier.classes_, classes):
        raise ValueError("classes must be distinct and sorted, as scikit-learn keeps them")
    return classifier


def from_torch(module) -> Model:
    """The network of ``nn.Sequential(nn.Linear(d, H), nn.Sigmoid(), nn.Linear(H, C))``.

    Parameters
    ----------
    module : torch.nn.Sequential, or its state_dict (a mapping with exactly the keys
        ``TORCH_KEYS`` to tensors or arrays)

    Returns
    -------
    Model
        In the tensors' dtype when float32 or float64 (other float dtypes become float32).

    Raises
    ------
    ValueError
        Another architecture (layer types, count, missing biases), or tensors whose shapes
        do not chain.
    """
    if isinstance(module, Mapping):
        state = dict(module)
        if set(state) != set(TORCH_KEYS):
            raise ValueError(
                f"expected a state_dict with keys {', '.join(TORCH_KEYS)}, got "
                f"{', '.join(sorted(map(str, state))) or 'none'}"
            )
    else:
        import torch
        from torch import nn

        layers = list(module) if isinstance(module, nn.Sequential) else []
        kinds = [type(layer) for layer in layers]
        if kinds != [nn.Linear, nn.Sigmoid, nn.Linear]:
            names = ", ".join(kind.__name__ for kind in kinds) or type(module).__name__
            raise ValueError(
                f"expected nn.Sequential(nn.Linear, nn.Sigmoid, nn.Linear), got {names}"
            )
        if layers[0].bias is None or layers[2].bias is None:
            raise ValueError("both nn.Linear layers need a bias")
        with torch.no_grad():
            state = module.state_dict()
    arrays = [_as_numpy(state[key]) for key in TORCH_KEYS]
    dtype = arrays[0].dtype if arrays[0].dtype in FLOAT_DTYPES else np.dtype(np.float32)
    weight1, bias1, weight2, bias2 = (a.astype(dtype) for a in arrays)
    if weight1.ndim != 2 or weight2.ndim != 2:
        raise ValueError(f"nn.Linear weights must be 2-D, got {weight1.shape} and {weight2.shape}")
    return Model(weight1.T, bias1, weight2.T, bias2)


def _as_numpy(value) -> np.ndarray:
    """A tensor (any device) or array as a numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise ValueError(f"expected float tensors, got dtype {array.dtype}")
    return array


def to_torch(model: Model):
    """``nn.Sequential(nn.Linear(d, H), nn.Sigmoid(), nn.Linear(H, C))`` computing the logits
    of ``model``, with parameters in the model's dtype (float32 or float64), on the CPU."""
    import torch
    from torch import nn

    dtype = torch.float32 if model.dtype == np.float32 else torch.float64
    module = nn.Sequential(
        nn.Linear(model.n_inputs, model.n_hidden, dtype=dtype),
        nn.Sigmoid(),
        nn.Linear(model.n_hidden, model.n_classes, dtype=dtype),
    )
    with torch.no_grad():
        for layer, W, b in ((module[0], model.W1, model.b1), (module[2], model.W2, model.b2)):
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(W.T)))
            layer.bias.copy_(torch.from_numpy(b.copy()))
    return module
