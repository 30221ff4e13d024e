"""advgrad.evaluate: the in-memory evaluation of attacks over a set of radii."""

from __future__ import annotations

import json

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


def test_totals_resumed_from_their_state_give_the_whole_evaluation(digits_model, digits_test):
    from advgrad.backend import CpuBackend
    from advgrad.evaluate import EvaluationTotals, evaluate_rows, evaluation_settings

    X, y = digits_test
    rows = X.reshape(len(X), -1)
    settings = evaluation_settings(
        digits_model, methods=("fgsm", "deepfool"), eps_values=(0.05, 0.1), clip=(0.0, 1.0)
    )
    first = evaluate_rows(digits_model, rows[:256], y[:256], settings, 0, CpuBackend())
    second = evaluate_rows(digits_model, rows[256:], y[256:], settings, 256, CpuBackend())
    whole = EvaluationTotals(settings)
    whole.add(first)
    whole.add(second)
    interrupted = EvaluationTotals(settings)
    interrupted.add(first)
    resumed = EvaluationTotals(settings, json.loads(json.dumps(interrupted.state)))
    resumed.add(second)
    minimal = {m: (lambda m=m: [first.minimal[m], second.minimal[m]]) for m in settings.searched}
    assert resumed.evaluation(minimal) == whole.evaluation(minimal)
    assert whole.n_rows == len(X)
    expected = evaluate(digits_model, X, y, methods=("fgsm", "deepfool"), eps_values=(0.05, 0.1))
    assert whole.evaluation(minimal).clean_accuracy == expected.clean_accuracy
    assert [p.accuracy for p in whole.evaluation(minimal).points] == [
        p.accuracy for p in expected.points
    ]
