"""advgrad.jobs.evaluate: the evaluate job on the streaming pipeline."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import advgrad
from advgrad.attacks import Attack
from advgrad.bundled import MODEL, bundled_path
from advgrad.evaluate import evaluate
from advgrad.jobs import Interrupted
from advgrad.jobs.evaluate import evaluate_file

N_ROWS = 700  # 3 blocks of 256 rows
OPTIONS = {
    "methods": ("fgsm", "pgd", "deepfool"),
    "eps_values": (0.0, 0.05, 0.2),
    "attack": Attack(steps=3, restarts=2),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate-inputs")
    rng = np.random.default_rng(9)
    X = rng.random((N_ROWS, 64), dtype=np.float32)
    y = rng.integers(0, 10, N_ROWS)
    advgrad.save_dataset(folder / "data.h5", X, y, attrs={"x_min": 0.0, "x_max": 1.0})
    return bundled_path(MODEL), folder / "data.h5"


def test_streamed_blocks_give_the_in_memory_evaluation(files):
    calls: list[tuple[int, int]] = []
    streamed = evaluate_file(
        *files, batch_size=256, progress=lambda *call: calls.append(call), **OPTIONS
    )
    assert calls == [(256, N_ROWS), (512, N_ROWS), (N_ROWS, N_ROWS)]
    X, y = advgrad.load_dataset(files[1])
    model = advgrad.load_model(files[0])
    whole = evaluate(model, X, y, clip=(0.0, 1.0), **OPTIONS)
    # counts and minimal eps are exact; the mean confidences add float32 sums of blocks
    assert streamed.clean_accuracy == whole.clean_accuracy
    assert streamed.minimal_eps == whole.minimal_eps
    for got, expected in zip(streamed.points, whole.points, strict=True):
        assert got.accuracy == expected.accuracy
        assert got.wrong_confidence == pytest.approx(expected.wrong_confidence, rel=1e-6)
    assert streamed.n_rows == N_ROWS
    assert [s.method for s in streamed.minimal_eps] == ["fgsm", "pgd", "deepfool"]


def test_a_stopped_evaluation_says_that_nothing_is_kept(files):
    stop = threading.Event()
    with pytest.raises(Interrupted) as caught:
        evaluate_file(*files, batch_size=256, stop=stop, progress=lambda *_: stop.set(), **OPTIONS)
    assert (caught.value.rows_done, caught.value.n_rows, caught.value.kept) == (256, N_ROWS, False)
    assert str(caught.value) == f"stopped after 256 of {N_ROWS} rows; nothing is kept"
