"""File jobs on a Dask cluster: the same datasets and figures as a local run, and the error
paths.

The cluster is a ``LocalCluster`` of two worker processes. They inherit this process's
environment, so a ``NUMBA_CACHE_DIR`` exported before pytest starts reaches them too; each
test runs its local reference first, so the workers find the kernels compiled in that cache.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
import warnings
from dataclasses import astuple

import h5py
import numpy as np
import pytest
from conftest import random_network
from typer.testing import CliRunner

import advgrad
from advgrad.attacks import Attack
from advgrad.bundled import MODEL, bundled_path
from advgrad.cli import app
from advgrad.jobs import attack_file, attack_files

N_ROWS = 1300  # several blocks at every batch size used here, the last one partial
CONNECT_TIMEOUT_S = 1.0  # advgrad waits 10 s for a scheduler; the error tests patch it shorter

runner = CliRunner()


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as local:
        yield local


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(model path, dataset path): the bundled digits network and N_ROWS random 8 x 8 images
    in [0, 1] (a third of the pixels exactly 0) with integer labels."""
    folder = tmp_path_factory.mktemp("dask-inputs")
    rng = np.random.default_rng(6)
    X = rng.random((N_ROWS, 8, 8), dtype=np.float32)
    X[X < 0.33] = 0.0
    y = rng.integers(0, 10, N_ROWS)
    data = folder / "data.h5"
    advgrad.save_dataset(data, X, y, attrs={"x_min": 0.0, "x_max": 1.0})
    return bundled_path(MODEL), data


def assert_same_output(local, remote):
    """Same datasets (bitwise, same layout) and the same attributes but ``created``."""
    with h5py.File(local, "r") as a, h5py.File(remote, "r") as b:
        assert sorted(a) == sorted(b)
        for name in a:
            x, y = a[name], b[name]
            assert (x.dtype, x.shape, x.chunks, x.compression) == (
                y.dtype,
                y.shape,
                y.chunks,
                y.compression,
            ), name
            x, y = x[...], y[...]
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), (
                f"/{name} differs in {np.count_nonzero((x != y).reshape(len(x), -1).any(axis=1))}"
                " rows"
            )
        assert "created" in a.attrs
        assert "created" in b.attrs
        assert a.attrs["complete"]
        assert sorted(a.attrs) == sorted(b.attrs)
        for key in a.attrs:
            if key != "created":
                x, y = a.attrs[key], b.attrs[key]
                assert type(x) is type(y), key
                assert np.array_equal(x, y), (key, x, y)


def same_numbers(local_report, remote_report) -> None:
    """The reports agree exactly, but for the output path and the time taken."""
    skip = {"output", "seconds"}
    fields = type(local_report).__dataclass_fields__
    keep = [i for i, name in enumerate(fields) if name not in skip]
    local_values, remote_values = astuple(local_report), astuple(remote_report)
    assert [local_values[i] for i in keep] == [remote_values[i] for i in keep]


def test_fgsm_on_the_cluster_writes_the_local_bytes(cluster, files, tmp_path):
    options = {"batch_size": 256}  # 6 blocks: more than the 4 the cluster takes at once
    local = attack_file(*files, tmp_path / "local.h5", Attack(eps=0.1), **options)
    remote = attack_file(
        *files,
        tmp_path / "remote.h5",
        Attack(eps=0.1),
        scheduler=cluster.scheduler_address,
        **options,
    )
    assert_same_output(local.output, remote.output)
    same_numbers(local, remote)


def test_pgd_with_restarts_and_random_targets_on_the_cluster(cluster, files, tmp_path):
    attack = Attack("pgd", eps=0.1, steps=5, restarts=2, target="random", seed=3)
    options = {"batch_size": 300, "use_labels": True}  # rounded up to 512: 3 blocks
    local = attack_file(*files, tmp_path / "local.h5", attack, **options)
    remote = attack_file(
        *files, tmp_path / "remote.h5", attack, scheduler=cluster.scheduler_address, **options
    )
    with h5py.File(remote.output, "r") as f:
        assert "target" in f
        assert f.attrs["restarts"] == 2
    assert_same_output(local.output, remote.output)
    same_numbers(local, remote)


def test_several_eps_in_one_pass_on_the_cluster(cluster, files, tmp_path):
    radii = (0.05, 0.1, 0.2)  # FGSM outputs share one gradient per block
    options = {"batch_size": 512, "min_eps_tolerance": 0.05, "compression": "gzip"}  # 3 blocks

    def outputs(stem):
        return [(Attack(eps=eps), tmp_path / f"{stem}-{eps:g}.h5") for eps in radii]

    local = attack_files(*files, outputs("local"), **options)
    remote = attack_files(*files, outputs("remote"), scheduler=cluster.scheduler_address, **options)
    for local_report, remote_report in zip(local, remote, strict=True):
        assert_same_output(local_report.output, remote_report.output)
        same_numbers(local_report, remote_report)


def test_command_line_scheduler_option(cluster, files, tmp_path):
    model, data = files
    attack = {"method": "bim", "steps": 3, "norm": "2"}
    local = attack_files(
        model,
        data,
        [(Attack(eps=eps, **attack), tmp_path / f"local-{eps:g}.h5") for eps in (0.5, 1.0)],
        batch_size=256,
    )
    result = runner.invoke(
        app,
        [
            *("attack", "--model", str(model), "--data", str(data)),
            *("--method", "bim", "--steps", "3", "--norm", "2", "--eps", "0.5", "--eps", "1"),
            *("--out", str(tmp_path / "adv-{eps}.h5"), "--batch-size", "256"),
            *("--scheduler", cluster.scheduler_address),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "rows per second" in result.output
    for report, eps in zip(local, ("0.5", "1"), strict=True):
        assert_same_output(report.output, tmp_path / f"adv-{eps}.h5")


def test_large_blocks_go_to_the_workers_without_a_warning(cluster, tmp_path):
    rng = np.random.default_rng(7)
    d, n_rows = 784, 4096  # one block of 12.8 MB
    model = advgrad.Model(*(np.asarray(a, np.float32) for a in random_network(rng, d, 8, 10)))
    advgrad.save_model(model, tmp_path / "model.h5")
    X = rng.random((n_rows, d), dtype=np.float32)
    advgrad.save_dataset(tmp_path / "data.h5", X, attrs={"x_min": 0.0, "x_max": 1.0})
    inputs = (tmp_path / "model.h5", tmp_path / "data.h5")
    local = attack_file(*inputs, tmp_path / "local.h5", batch_size=n_rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        remote = attack_file(
            *inputs, tmp_path / "remote.h5", batch_size=n_rows, scheduler=cluster.scheduler_address
        )
    assert_same_output(local.output, remote.output)
    same_numbers(local, remote)


def test_certify_on_the_cluster_writes_the_local_bytes_and_figures(cluster, files, tmp_path):
    from advgrad.jobs.certify import certify_file

    options = {
        "eps_values": (0.01, 0.05),
        "attack": Attack("pgd", steps=2, restarts=2),
        "batch_size": 256,
    }
    local = certify_file(*files, tmp_path / "local.h5", **options)
    remote = certify_file(
        *files, tmp_path / "remote.h5", scheduler=cluster.scheduler_address, **options
    )
    assert_same_output(local.output, remote.output)
    skip = {"output", "certify_seconds", "attack_seconds"}
    names = [name for name in type(local).__dataclass_fields__ if name not in skip]
    assert [getattr(local, n) for n in names] == [getattr(remote, n) for n in names]


def test_evaluate_on_the_cluster_gives_the_local_figures(cluster, files):
    from advgrad.jobs.evaluate import evaluate_file

    options = {
        "methods": ("fgsm", "pgd"),
        "eps_values": (0.05, 0.1),
        "attack": Attack(steps=2, restarts=2),
        "batch_size": 256,
    }
    local = evaluate_file(*files, **options)
    remote = evaluate_file(*files, scheduler=cluster.scheduler_address, **options)
    assert local.n_rows == N_ROWS
    assert remote.to_json() == local.to_json()


# --------------------------------------------------------------------------- errors


def error_line(result) -> str:
    """The one line a failed command printed; no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def attack_with_scheduler(files, out, address):
    model, data = files
    args = ["attack", "--model", str(model), "--data", str(data), "--out", str(out)]
    return runner.invoke(app, [*args, "--scheduler", address])


@pytest.fixture
def quick_connect(monkeypatch):
    """Make advgrad give up on a Dask scheduler after CONNECT_TIMEOUT_S."""
    import advgrad.jobs.pipeline

    monkeypatch.setattr(advgrad.jobs.pipeline, "SCHEDULER_TIMEOUT_S", CONNECT_TIMEOUT_S)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_scheduler_is_one_error_line(files, tmp_path, quick_connect):
    address = f"tcp://127.0.0.1:{closed_port()}"
    result = attack_with_scheduler(files, tmp_path / "adv.h5", address)
    assert result.exit_code == 1
    line = error_line(result)
    assert f"cannot reach the Dask scheduler at {address}" in line
    assert list(tmp_path.iterdir()) == []  # no output, no partial file, no lock


def test_missing_dask_names_the_extra(files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # import fails
    result = attack_with_scheduler(files, tmp_path / "adv.h5", "tcp://127.0.0.1:8786")
    assert result.exit_code == 1
    assert "--scheduler needs dask.distributed: pip install 'advgrad[dask]'" in error_line(result)
    assert list(tmp_path.iterdir()) == []


class FakeServer:
    """A TCP server that is not a Dask scheduler: each connection gets ``greeting`` (then is
    closed) or, with None, silence until ``hold_s`` has passed."""

    def __init__(self, greeting: bytes | None, hold_s: float = 0.0) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.05)  # so that the serving thread sees close() soon
        self._greeting, self._hold_s = greeting, hold_s
        self._done = threading.Event()
        self.address = f"tcp://127.0.0.1:{self._server.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._done.is_set():
            try:
                connection, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with connection:
                if self._greeting is None:
                    self._done.wait(self._hold_s)
                else:
                    connection.sendall(self._greeting)

    def close(self) -> None:
        self._done.set()
        self._server.close()
        self._thread.join()


def test_a_server_that_is_not_a_scheduler_is_one_error_line(files, tmp_path, quick_connect):
    server = FakeServer(b"SSH-2.0-OpenSSH_9.6\r\n")
    try:
        result = attack_with_scheduler(files, tmp_path / "adv.h5", server.address)
    finally:
        server.close()
    assert result.exit_code == 1
    assert "Dask scheduler" in error_line(result)


def test_a_silent_server_times_out(files, tmp_path, quick_connect):
    hold_s = 4.0
    server = FakeServer(None, hold_s=hold_s)  # it hangs up after hold_s, so the test ends
    started = time.perf_counter()
    try:
        result = attack_with_scheduler(files, tmp_path / "adv.h5", server.address)
    finally:
        server.close()
    elapsed = time.perf_counter() - started
    assert result.exit_code == 1
    assert "Dask scheduler" in error_line(result)
    assert elapsed < hold_s - 1.0, f"took {elapsed:.1f} s with a {CONNECT_TIMEOUT_S} s timeout"
