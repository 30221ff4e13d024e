"""advgrad.evaluate: the in-memory evaluation of attacks over a set of radii."""

from __future__ import annotations

import numpy as np
import pytest

import advgrad
from advgrad.evaluate import evaluate


def test_evaluate_api_agrees_with_the_attacks(digits_model, digits_test):
    X, y = digits_test
    result = evaluate(
        digits_model,
        X,
        y,
        methods=("fgsm", "deepfool"),
        eps_values=(0.0, 0.1),
        min_eps_tolerance=None,
    )
    assert result.clean_accuracy == pytest.approx(np.mean(advgrad.predict(digits_model, X) == y))
    assert result.accuracy("fgsm", 0.0) == pytest.approx(result.clean_accuracy)
    X_adv = advgrad.fgsm(digits_model, X, y, eps=0.1)
    assert result.accuracy("fgsm", 0.1) == pytest.approx(
        np.mean(advgrad.predict(digits_model, X_adv) == y)
    )
    assert [s.method for s in result.minimal_eps] == ["deepfool"]
