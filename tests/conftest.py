"""Shared fixtures: random networks, a small model, the bundled digits model and test set, a
digest cache of the session's own, and the CUDA simulator run started early."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from advgrad.bundled import MODEL, TEST_DATA, bundled_path
from advgrad.io.digests import CACHE_DIR_VARIABLE

SIMULATOR_TEST = "test_kernels_on_simulator"
"""The test that runs tests/test_cuda.py again on numba's CUDA simulator, in a child process
(minutes, mostly one core): it runs last, and its child starts as soon as collection shows it
will run, beside the rest of the suite."""
SIMULATOR_RUN = pytest.StashKey()


def random_network(rng, d, H, C, dtype=np.float64, scale=1.0):
    """W1, b1, W2, b2 with entries of a few units, so that every part of the math matters."""
    W1 = rng.normal(0.0, scale / np.sqrt(d), size=(d, H))
    b1 = rng.normal(0.0, 0.5, size=H)
    W2 = rng.normal(0.0, 2.0 * scale / np.sqrt(H), size=(H, C))
    b2 = rng.normal(0.0, 0.5, size=C)
    return tuple(a.astype(dtype) for a in (W1, b1, W2, b2))


def one_hot(labels, C, dtype=np.float64):
    return np.eye(C, dtype=dtype)[labels]


@pytest.fixture(scope="session")
def digits_model():
    import advgrad

    return advgrad.load_model(bundled_path(MODEL))


@pytest.fixture(scope="session")
def digits_test():
    import advgrad

    return advgrad.load_dataset(bundled_path(TEST_DATA))


@pytest.fixture
def small_model():
    import advgrad

    rng = np.random.default_rng(20)
    return advgrad.Model(*random_network(rng, 12, 7, 4), input_shape=(3, 4))


def interrupted(job, *args, after_blocks: int, **options):
    """Run the file job ``job(*args, **options)`` with ``stop`` set from its ``progress`` after
    ``after_blocks`` blocks; returns the ``advgrad.jobs.Interrupted`` it raised and the rows
    done at each progress call."""
    from advgrad.jobs import Interrupted

    stop = threading.Event()
    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == after_blocks:
            stop.set()

    with pytest.raises(Interrupted) as caught:
        job(*args, stop=stop, progress=progress, **options)
    return caught.value, calls


@pytest.fixture(autouse=True, scope="session")
def digest_cache(tmp_path_factory):
    """Every test (and every command it starts) keeps its input digests in a cache of the
    session's own, never in the user's (``advgrad.io.digests``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_VARIABLE, str(tmp_path_factory.mktemp("digests")))
        yield


def pytest_collection_modifyitems(config, items):
    """Move the simulator test to the end, so that its child has the whole suite's time, and
    skip the tests marked slow unless CI runs the suite (CI=true) or ``-m`` chooses them."""
    items.sort(key=lambda item: item.name == SIMULATOR_TEST)
    if os.environ.get("CI") or config.option.markexpr:
        return
    skip = pytest.mark.skip(reason="slow: runs in CI (CI=true) or with `-m slow`")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


def pytest_collection_finish(session):
    """Start the simulator test's child now when the test is selected and not skipped."""
    from children import SimulatorRun

    for item in session.items:
        if item.name == SIMULATOR_TEST and not any(
            marker.args[0] for marker in item.iter_markers("skipif")
        ):
            session.config.stash[SIMULATOR_RUN] = SimulatorRun(item.path)


def pytest_sessionfinish(session):
    """Stop a simulator child the session did not wait for (a failure before it, -x)."""
    run = session.config.stash.get(SIMULATOR_RUN, None)
    if run is not None:
        run.stop()


@pytest.fixture
def simulator_run(request):
    """The ``children.SimulatorRun`` started at collection (or now, for a test run alone)."""
    from children import SimulatorRun

    run = request.config.stash.get(SIMULATOR_RUN, None)
    return run if run is not None else SimulatorRun(request.path)
