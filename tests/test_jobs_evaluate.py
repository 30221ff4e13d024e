"""advgrad.jobs.evaluate: the evaluate job on the streaming pipeline."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from children import CHILD_ENV
from conftest import interrupted
from test_resume import checkpoint_rows, wait_for_rows

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
        if expected.wrong_confidence is None:
            assert got.wrong_confidence is None
        else:
            assert got.wrong_confidence == pytest.approx(expected.wrong_confidence, rel=1e-6)
    assert streamed.n_rows == N_ROWS
    assert [s.method for s in streamed.minimal_eps] == ["fgsm", "pgd", "deepfool"]


def test_a_stopped_evaluation_says_that_nothing_is_kept(files):
    stop = threading.Event()
    with pytest.raises(Interrupted) as caught:
        evaluate_file(*files, batch_size=256, stop=stop, progress=lambda *_: stop.set(), **OPTIONS)
    assert (caught.value.rows_done, caught.value.n_rows, caught.value.kept) == (256, N_ROWS, False)
    assert str(caught.value) == f"stopped after 256 of {N_ROWS} rows; nothing is kept"


@pytest.fixture(scope="module")
def reference(files):
    """An uninterrupted evaluation, in blocks of 256 rows."""
    return evaluate_file(*files, batch_size=256, **OPTIONS)


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize("after_blocks", [1, 2])
def test_a_stopped_evaluation_with_a_checkpoint_resumes_to_the_same_figures(
    tmp_path, files, reference, after_blocks
):
    target = tmp_path / "ev.json"
    options = {"batch_size": 256, "checkpoint": target, **OPTIONS}
    stopped, _ = interrupted(evaluate_file, *files, after_blocks=after_blocks, **options)
    assert stopped.kept
    assert stopped.rows_done == 256 * after_blocks
    assert leftovers(tmp_path) == [".ev.json.partial.h5", ".ev.json.partial.json"]
    notices: list[str] = []
    resumed = evaluate_file(*files, notice=notices.append, **options)
    assert notices == [f"{target}: resuming after row {256 * after_blocks} of {N_ROWS}"]
    assert resumed.to_json() == reference.to_json()
    assert leftovers(tmp_path) == []


def test_a_killed_evaluate_command_resumes_to_the_same_json(tmp_path, files, reference):
    target = tmp_path / "ev.json"
    command = [
        *(sys.executable, "-m", "advgrad", "evaluate", "--model", str(files[0])),
        *("--data", str(files[1]), "--json", str(target), "--batch-size", "256"),
        *("--method", "fgsm,pgd,deepfool", "--eps", "0,0.05,0.2", "--steps", "3"),
        *("--restarts", "2"),
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=CHILD_ENV
    )
    try:
        assert wait_for_rows(target, 256, proc), "the job ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = checkpoint_rows(target)
    assert done is not None and 256 <= done < N_ROWS
    rerun = subprocess.run(command, capture_output=True, text=True, env=CHILD_ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming after row {done}" in rerun.stderr
    assert json.loads(target.read_text()) == json.loads(reference.to_json())
    assert leftovers(tmp_path) == ["ev.json"]
