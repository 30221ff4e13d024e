"""Regenerate the bundled default: the digits dataset and a two-layer sigmoid network.

Run from the repository root::

    python scripts/make_default_data.py

It writes ``data/digits_train.h5``, ``data/digits_test.h5`` and ``data/digits_model.h5``.
The data are scikit-learn's copy of the UCI "Optical Recognition of Handwritten Digits"
set (1797 images, 8 x 8, 17 grey levels 0..16; CC BY 4.0), scaled to [0, 1] float32 and
split 75/25, stratified, with a fixed seed; each file records which source rows it holds.
The network is scikit-learn's ``MLPClassifier(activation="logistic")`` with one hidden
layer: exactly advgrad's architecture (softmax output, log-loss), ``coefs_[0]`` being W1.
The same scikit-learn version gives bitwise the same files.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import sklearn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from advgrad import Model, save_dataset, save_model

SEED = 0
HIDDEN = 64
TEST_FRACTION = 0.25
SOURCE = (
    "UCI Optical Recognition of Handwritten Digits (scikit-learn load_digits), CC BY 4.0, "
    "https://doi.org/10.24432/C50P49"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)

    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)  # (1797, 8, 8)
    y = digits.target.astype(np.int64)
    rows = np.arange(len(X))
    train_rows, test_rows = train_test_split(
        rows, test_size=TEST_FRACTION, stratify=y, random_state=SEED
    )
    common = {
        "x_min": 0.0,
        "x_max": 1.0,
        "input_shape": np.array([8, 8]),
        "class_names": [str(k) for k in range(10)],
        "source": SOURCE,
        "split_seed": SEED,
    }
    for name, split_rows in (("train", train_rows), ("test", test_rows)):
        split_rows = np.sort(split_rows)
        save_dataset(
            out / f"digits_{name}.h5",
            X[split_rows],
            y[split_rows],
            attrs={**common, "split": name, "source_rows": split_rows},
        )

    classifier = MLPClassifier(
        hidden_layer_sizes=(HIDDEN,),
        activation="logistic",
        solver="adam",
        alpha=1e-4,
        learning_rate_init=1e-2,
        max_iter=2000,
        tol=1e-6,
        n_iter_no_change=50,
        random_state=SEED,
    )
    train, test = np.sort(train_rows), np.sort(test_rows)
    flat = X.reshape(len(X), -1)
    classifier.fit(flat[train], y[train])
    accuracy = float(classifier.score(flat[test], y[test]))
    train_hash = hashlib.sha256(X[train].tobytes() + y[train].tobytes()).hexdigest()
    model = Model(
        classifier.coefs_[0],
        classifier.intercepts_[0],
        classifier.coefs_[1],
        classifier.intercepts_[1],
        input_shape=(8, 8),
        class_names=tuple(str(k) for k in range(10)),
        x_min=0.0,
        x_max=1.0,
        metadata={
            "trained_with": f"scikit-learn {sklearn.__version__} MLPClassifier(logistic)",
            "training_data": "digits_train.h5",
            "training_data_sha256": train_hash,
            "hidden_units": HIDDEN,
            "seed": SEED,
            "test_accuracy": accuracy,
        },
    ).astype(np.float32)
    save_model(model, out / "digits_model.h5")
    print(f"wrote {out}/digits_{{train,test,model}}.h5; test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
