"""Crash safety and scale of file-level attacks (issues #6 and #7).

An interrupted attack keeps a resumable partial output and the same job, run again, writes the
file an uninterrupted run writes; a kill never leaves a half-written target; one output per eps
comes from one pass; memory does not grow with the number of rows.

The CLI runs in subprocesses where signals, kills and peak memory are concerned. They use a
private Numba cache (``NUMBA_CACHE_DIR``, default ``<tmp>/numba-resume-tests``) so that they
neither read nor corrupt a cache that other processes are writing. The kill trials draw their
timings from ``ADVGRAD_KILL_SEED`` (random when unset; printed, and named in every failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from children import CHILD_ENV
from conftest import interrupted, random_network
from typer.testing import CliRunner

import advgrad
from advgrad.attacks import Attack
from advgrad.cli import app
from advgrad.io.checkpoint import OutputLock, checkpoint_path, lock_path, partial_path
from advgrad.jobs import Interrupted, attack_file, attack_files
from advgrad.kernels.cpu import ROWS_PER_BLOCK

BLOCK = ROWS_PER_BLOCK
KILL_SEED = int(os.environ.get("ADVGRAD_KILL_SEED") or secrets.randbelow(2**31))
runner = CliRunner()


# --------------------------------------------------------------------------- comparing outputs


@dataclass(frozen=True)
class Output:
    """The datasets and root attributes of an HDF5 file."""

    datasets: dict[str, np.ndarray]
    attrs: dict[str, object]


def output_of(path: Path) -> Output:
    with h5py.File(path, "r") as f:
        return Output({name: f[name][...] for name in f}, dict(f.attrs))


def same_value(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b)
        )
    return type(a) is type(b) and a == b


def differences(actual: Output, expected: Output) -> list[str]:
    """How ``actual`` differs from ``expected``: datasets bitwise (dtype and shape included),
    root attributes by value and type, except ``created``."""
    found = []
    if actual.datasets.keys() != expected.datasets.keys():
        found.append(f"datasets {sorted(actual.datasets)}, expected {sorted(expected.datasets)}")
    for name in sorted(actual.datasets.keys() & expected.datasets.keys()):
        a, e = actual.datasets[name], expected.datasets[name]
        if (a.dtype, a.shape) != (e.dtype, e.shape):
            found.append(f"/{name} is {a.dtype} {a.shape}, expected {e.dtype} {e.shape}")
        elif a.tobytes() != e.tobytes():
            rows = a.reshape(len(a), -1).view(np.uint8) != e.reshape(len(e), -1).view(np.uint8)
            bad = np.flatnonzero(rows.any(axis=1))
            found.append(f"/{name} differs in {len(bad)} rows, first {bad[:5].tolist()}")
    a_attrs = {k: v for k, v in actual.attrs.items() if k != "created"}
    e_attrs = {k: v for k, v in expected.attrs.items() if k != "created"}
    if a_attrs.keys() != e_attrs.keys():
        found.append(f"attributes {sorted(a_attrs)}, expected {sorted(e_attrs)}")
    for name in sorted(a_attrs.keys() & e_attrs.keys()):
        if not same_value(a_attrs[name], e_attrs[name]):
            found.append(f"attribute {name} is {a_attrs[name]!r}, expected {e_attrs[name]!r}")
    if "created" not in actual.attrs:
        found.append("attribute created is missing")
    return found


def assert_same_output(path: Path, expected: Path | Output, context: str = "") -> None:
    """``path`` is a complete output equal to ``expected`` (see ``differences``)."""
    actual = output_of(path)
    assert actual.attrs.get("complete") is np.True_, f"{context}: {path} is not complete"
    if isinstance(expected, Path):
        expected = output_of(expected)
    found = differences(actual, expected)
    assert not found, f"{context}: {path} differs from the reference: {found}"


def checkpoint_rows(target: Path) -> int | None:
    """Rows claimed by the checkpoint beside ``target``; None without a readable one."""
    try:
        blocks = json.loads(checkpoint_path(target).read_text())["blocks"]
    except (OSError, ValueError, KeyError):
        return None
    return blocks[-1][1] if blocks else 0


def leftovers(target: Path) -> list[str]:
    """Partial, checkpoint and lock files of ``target`` still beside it."""
    return sorted(p.name for p in target.parent.glob(f".{target.name}*"))


def assert_partial_kept(target: Path, rows: int) -> None:
    """An interrupted job left ``target``'s resumable partial output (and released the lock)."""
    assert not target.exists()
    assert partial_path(target).name == f".{target.name}.partial.h5"
    assert checkpoint_path(target).name == f".{target.name}.partial.json"
    assert partial_path(target).is_file()
    assert checkpoint_rows(target) == rows
    assert not lock_path(target).exists()
    with h5py.File(partial_path(target), "r") as f:
        assert f.attrs["complete"] is np.False_


def one_line(text: str) -> str:
    """``text`` with line wrapping undone (rich wraps long messages at the console width)."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- library level


N_SMALL = 2000  # 8 blocks of 256 rows, the last one short


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> tuple[Path, Path]:
    """A float32 model (100 -> 16 -> 10) and a labelled dataset of N_SMALL rows in [0, 1]."""
    return save_synthetic(tmp_path_factory.mktemp("small"), N_SMALL, seed=60, d=100, hidden=16)


def library_case(name: str, seed: int) -> tuple[Attack, dict]:
    """The attack and the attack_files options of a named library-level job."""
    if name == "fgsm-l2":
        return Attack("fgsm", eps=0.5, norm="2", seed=seed), {}
    if name == "pgd-restarts-random-target":
        return Attack("pgd", eps=0.1, restarts=2, target="random", seed=seed), {}
    if name == "bim-labels-min-eps":
        return Attack("bim", eps=0.05, steps=5, seed=seed), {
            "use_labels": True,
            "min_eps_tolerance": 0.01,
        }
    raise ValueError(name)


LIBRARY_CASES = ["fgsm-l2", "pgd-restarts-random-target", "bim-labels-min-eps"]


@pytest.fixture(scope="module")
def library_reference(small_files, tmp_path_factory):
    """``reference(name, seed, batch_size)``: the uninterrupted output and report, made once."""
    folder = tmp_path_factory.mktemp("references")
    made = {}

    def reference(name: str, seed: int, batch_size: int):
        key = (name, seed, batch_size)
        if key not in made:
            attack, options = library_case(name, seed)
            out = folder / f"{name}-{seed}-{batch_size}.h5"
            report = attack_file(*small_files, out, attack, batch_size=batch_size, **options)
            assert report.resumed_rows == 0
            made[key] = out, report
        return made[key]

    return reference


def interrupt(files, outputs, after_blocks: int, **options) -> tuple[Interrupted, list[int]]:
    """``attack_files`` stopped after ``after_blocks`` blocks (``conftest.interrupted``)."""
    return interrupted(attack_files, *files, outputs, after_blocks=after_blocks, **options)


TOTALS = ("clean_accuracy", "adversarial_accuracy", "success_rate", "mean_linf", "mean_l2")


@pytest.mark.parametrize("seed", [0, 11])
@pytest.mark.parametrize("after_blocks", [1, 3, 7])
@pytest.mark.parametrize("name", LIBRARY_CASES)
def test_resumed_job_equals_an_uninterrupted_one(
    tmp_path, small_files, library_reference, name, after_blocks, seed
):
    attack, options = library_case(name, seed)
    out = tmp_path / "adv.h5"
    stopped, calls = interrupt(
        small_files, [(attack, out)], after_blocks, batch_size=256, **options
    )
    rows = after_blocks * BLOCK
    assert (stopped.rows_done, stopped.n_rows) == (rows, N_SMALL)
    assert calls == [BLOCK * (k + 1) for k in range(after_blocks)]
    assert f"stopped after {rows} of {N_SMALL} rows" in str(stopped)
    assert_partial_kept(out, rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".adv.h5.partial.h5",
        ".adv.h5.partial.json",
    ]

    notices: list[str] = []
    report = attack_file(
        *small_files, out, attack, batch_size=256, notice=notices.append, **options
    )
    assert report.resumed_rows == rows
    assert notices == [f"{out}: resuming after row {rows} of {N_SMALL}"]
    assert [p.name for p in tmp_path.iterdir()] == ["adv.h5"]
    expected_path, expected = library_reference(name, seed, 256)
    assert_same_output(out, expected_path)
    # the running totals come back from the checkpoint: the report is the uninterrupted one
    for field in TOTALS:
        assert getattr(report, field) == getattr(expected, field), field
    assert report.eps_min == expected.eps_min


@pytest.mark.parametrize("slow", ["reads", "writes", "both"])
@pytest.mark.parametrize("name", ["fgsm-l2", "pgd-restarts-random-target"])
def test_slow_reads_or_writes_leave_the_output_unchanged(
    tmp_path, monkeypatch, small_files, library_reference, name, slow
):
    """Blocks are read and attacked into reused buffers: however reading, attacking and
    writing happen to overlap, no buffer is refilled before its rows are written."""
    from advgrad.io import AdversarialWriter, DatasetReader

    rng = np.random.default_rng(len(name) + len(slow))
    for cls, method in ((DatasetReader, "read"), (AdversarialWriter, "write")):
        if slow in (method + "s", "both"):
            original = getattr(cls, method)

            def delayed(self, *args, _original=original, **kwargs):
                time.sleep(float(rng.choice([0.0, 0.002, 0.02])))
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, method, delayed)
    attack, options = library_case(name, 0)
    out = tmp_path / "adv.h5"
    attack_file(*small_files, out, attack, batch_size=256, **options)
    assert_same_output(out, library_reference(name, 0, 256)[0])


@pytest.mark.parametrize(("first", "then", "after_blocks"), [(256, 1024, 3), (1024, 256, 1)])
def test_resuming_with_another_batch_size_gives_the_same_data(
    tmp_path, small_files, library_reference, first, then, after_blocks
):
    name, seed = "pgd-restarts-random-target", 3
    attack, options = library_case(name, seed)
    out = tmp_path / "adv.h5"
    stopped, _ = interrupt(small_files, [(attack, out)], after_blocks, batch_size=first)
    assert stopped.rows_done == after_blocks * first
    assert_partial_kept(out, after_blocks * first)
    report = attack_file(*small_files, out, attack, batch_size=then, **options)
    assert report.resumed_rows == after_blocks * first
    for batch_size in (first, then):
        expected_path, expected = library_reference(name, seed, batch_size)
        assert_same_output(out, expected_path, f"batch size {first}, then {then}")
        for field in TOTALS:  # summed in other groups of rows: equal up to rounding
            assert getattr(report, field) == pytest.approx(getattr(expected, field), rel=1e-12)


def test_stop_after_the_last_block_completes_the_job(tmp_path, small_files, library_reference):
    attack, _ = library_case("fgsm-l2", 0)
    out = tmp_path / "adv.h5"
    stop = threading.Event()

    def progress(done: int, total: int) -> None:
        if done == total:
            stop.set()

    attack_file(*small_files, out, attack, batch_size=256, stop=stop, progress=progress)
    assert stop.is_set()
    assert [p.name for p in tmp_path.iterdir()] == ["adv.h5"]
    assert_same_output(out, library_reference("fgsm-l2", 0, 256)[0])


def test_stop_set_before_the_job_attacks_no_block(tmp_path, small_files, library_reference):
    """A Ctrl-C during the warm-up (a first run compiles for seconds) stops the job before
    its first block, which might otherwise run for long."""
    attack, _ = library_case("pgd-restarts-random-target", 0)
    out = tmp_path / "adv.h5"
    stop = threading.Event()
    stop.set()
    nothing_kept = r"stopped after 0 of \d+ rows; nothing is kept$"
    with pytest.raises(Interrupted, match=nothing_kept) as caught:
        attack_file(*small_files, out, attack, batch_size=256, stop=stop)
    assert caught.value.rows_done == 0
    assert not out.exists()
    assert leftovers(out) == []
    report = attack_file(*small_files, out, attack, batch_size=256)
    assert report.resumed_rows == caught.value.rows_done
    assert_same_output(out, library_reference("pgd-restarts-random-target", 0, 256)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["adv.h5"]


def test_outputs_of_one_pass_resume_from_different_rows(tmp_path, small_files, library_reference):
    """Two outputs interrupted together; one loses its partial: it starts afresh while the
    other resumes, in the same pass, and both equal their single-output runs."""
    pgd, _ = library_case("pgd-restarts-random-target", 5)
    fgsm, _ = library_case("fgsm-l2", 5)
    outputs = [(pgd, tmp_path / "pgd.h5"), (fgsm, tmp_path / "fgsm.h5")]
    stopped, _ = interrupt(small_files, outputs, 2, batch_size=256)
    assert stopped.rows_done == 2 * BLOCK
    for _, path in outputs:
        assert_partial_kept(path, 2 * BLOCK)
    partial_path(outputs[1][1]).unlink()
    checkpoint_path(outputs[1][1]).unlink()
    reports = attack_files(*small_files, outputs, batch_size=256)
    assert [r.resumed_rows for r in reports] == [2 * BLOCK, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fgsm.h5", "pgd.h5"]
    assert_same_output(outputs[0][1], library_reference("pgd-restarts-random-target", 5, 256)[0])
    assert_same_output(outputs[1][1], library_reference("fgsm-l2", 5, 256)[0])


# --------------------------------------------------------------------------- CLI, in process


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def pgd_args(files, out, *extra):
    """The CLI command of ``Attack("pgd")`` (eps 0.1) on ``files`` into ``out``."""
    model, data = files
    return ("attack", "--model", model, "--data", data, "--out", out, "--method", "pgd", *extra)


@pytest.fixture(scope="module")
def pgd_reference(small_files, tmp_path_factory) -> Path:
    """The uninterrupted output of ``pgd_args`` (written by the library)."""
    out = tmp_path_factory.mktemp("pgd") / "reference.h5"
    attack_file(*small_files, out, Attack("pgd"))
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_locked_output_is_refused_until_released(tmp_path, small_files, pgd_reference):
    out = tmp_path / "adv.h5"
    interrupt(small_files, [(Attack("pgd"), out)], 2, batch_size=256)  # another run's partial
    lock = OutputLock(out)
    try:
        before = snapshot(tmp_path)
        assert sorted(before) == [".adv.h5.lock", ".adv.h5.partial.h5", ".adv.h5.partial.json"]
        result = run_cli(*pgd_args(small_files, out))
        assert result.exit_code == 1
        line = error_line(result)
        assert str(out) in line
        assert "another advgrad run is writing it" in line
        assert snapshot(tmp_path) == before  # the holder's partial output is untouched
    finally:
        lock.release()
    result = run_cli(*pgd_args(small_files, out))
    assert result.exit_code == 0, result.output
    assert f"resuming after row {2 * BLOCK} of {N_SMALL}" in one_line(result.output)
    assert [p.name for p in tmp_path.iterdir()] == ["adv.h5"]
    assert_same_output(out, pgd_reference)


def test_a_locked_fresh_output_is_refused_and_nothing_is_created(
    tmp_path, small_files, pgd_reference
):
    out = tmp_path / "adv.h5"
    lock = OutputLock(out)
    try:
        result = run_cli(*pgd_args(small_files, out))
        assert result.exit_code == 1
        assert "another advgrad run is writing it" in error_line(result)
        assert [p.name for p in tmp_path.iterdir()] == [".adv.h5.lock"]
    finally:
        lock.release()
    assert list(tmp_path.iterdir()) == []
    assert run_cli(*pgd_args(small_files, out)).exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["adv.h5"]
    assert_same_output(out, pgd_reference)


def test_a_refused_output_does_not_cost_another_output_its_partial(tmp_path, small_files):
    """With several --eps, one output being locked must not delete the resumable partial
    of another output of the same command (no rows lost)."""
    outputs = [(Attack("fgsm", eps=eps), tmp_path / f"adv-{eps:g}.h5") for eps in (0.05, 0.1)]
    interrupt(small_files, outputs, 2, batch_size=256)
    model, data = small_files
    command = ("attack", "--model", model, "--data", data, "--eps", 0.05, "--eps", 0.1)
    command += ("--out", tmp_path / "adv-{eps}.h5", "--batch-size", 256)
    lock = OutputLock(outputs[1][1])
    try:
        before = snapshot(tmp_path)
        result = run_cli(*command)
        assert result.exit_code == 1
        assert "Traceback" not in result.output
        assert f"{outputs[1][1]}: another advgrad run is writing it" in one_line(result.output)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
        assert snapshot(tmp_path) == before
    finally:
        lock.release()
    result = run_cli(*command)
    assert result.exit_code == 0, result.output
    for _, path in outputs:
        assert f"{path}: resuming after row {2 * BLOCK} of {N_SMALL}" in one_line(result.output)


def test_a_partial_of_another_job_needs_restart(tmp_path, small_files, pgd_reference):
    out = tmp_path / "adv.h5"
    interrupt(small_files, [(Attack("pgd", eps=0.2), out)], 2, batch_size=256)
    before = snapshot(tmp_path)
    result = run_cli(*pgd_args(small_files, out))
    assert result.exit_code == 1
    line = error_line(result)
    assert str(out) in line
    assert "holds an interrupted run with other settings" in line
    assert "--restart" in line
    assert snapshot(tmp_path) == before
    # --resume does not resume another job either
    result = run_cli(*pgd_args(small_files, out, "--resume"))
    assert result.exit_code == 1
    assert "--restart" in error_line(result)
    assert snapshot(tmp_path) == before

    result = run_cli(*pgd_args(small_files, out, "--restart"))
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["adv.h5"]
    assert_same_output(out, pgd_reference)

    other = tmp_path / "other.h5"
    result = run_cli(*pgd_args(small_files, other, "--resume"))
    assert result.exit_code == 1
    line = error_line(result)
    assert str(other) in line
    assert "has no interrupted run to resume" in line
    assert [p.name for p in tmp_path.iterdir()] == ["adv.h5"]


def flip_byte_in_chunk(path: Path, dataset: str, row: int) -> None:
    """Invert one byte in the middle of the stored chunk of ``dataset`` holding ``row``."""
    with h5py.File(path, "r") as f:
        dset = f[dataset]
        assert dset.compression is None
        info = dset.id.get_chunk_info_by_coord((row,) + (0,) * (dset.ndim - 1))
    with path.open("r+b") as handle:
        handle.seek(info.byte_offset + info.size // 2)
        byte = handle.read(1)[0]
        handle.seek(info.byte_offset + info.size // 2)
        handle.write(bytes([byte ^ 0xFF]))


@pytest.mark.parametrize("damage", ["none", "X", "pred_adv", "crc"])
def test_a_corrupted_partial_is_not_resumed(tmp_path, small_files, pgd_reference, damage):
    out = tmp_path / "adv.h5"
    interrupt(small_files, [(Attack("pgd"), out)], 3, batch_size=256)
    assert_partial_kept(out, 3 * BLOCK)
    if damage in ("X", "pred_adv"):
        flip_byte_in_chunk(partial_path(out), damage, BLOCK)
    elif damage == "crc":
        payload = json.loads(checkpoint_path(out).read_text())
        payload["blocks"][1][2] ^= 1
        checkpoint_path(out).write_text(json.dumps(payload))
    result = run_cli(*pgd_args(small_files, out, "--batch-size", 256))
    assert result.exit_code == 0, result.output
    text = one_line(result.output)
    if damage == "none":
        assert f"resuming after row {3 * BLOCK} of {N_SMALL}" in text
        assert "cannot be resumed" not in text
    else:
        assert (
            f".adv.h5.partial.h5 cannot be resumed (rows {BLOCK}:{2 * BLOCK} do not match "
            "their checksum); starting afresh"
        ) in text
        assert "resuming" not in text
    assert "Traceback" not in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["adv.h5"]
    assert_same_output(out, pgd_reference)


MULTI_EPS = ("0.05", "0.1", "0.2")


@pytest.mark.parametrize(
    "options",
    [
        ("--method", "fgsm", "--norm", "inf"),
        ("--method", "fgsm", "--norm", "2"),
        ("--method", "fgsm", "--norm", "1", "--target", "random", "--seed", "4"),
        ("--method", "bim", "--steps", "5"),
    ],
    ids=["fgsm-linf", "fgsm-l2", "fgsm-l1-random-target", "bim"],
)
def test_several_eps_in_one_pass_equal_separate_runs(tmp_path, small_files, options):
    model, data = small_files
    common = ("attack", "--model", model, "--data", data, "--batch-size", 512, *options)
    radii = [arg for eps in MULTI_EPS for arg in ("--eps", eps)]
    result = run_cli(*common, *radii, "--out", tmp_path / "adv-{eps}.h5")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"adv-{eps}.h5" for eps in MULTI_EPS]
    single = tmp_path / "single"
    single.mkdir()
    for eps in MULTI_EPS:
        result = run_cli(*common, "--eps", eps, "--out", single / f"adv-{eps}.h5")
        assert result.exit_code == 0, result.output
        assert_same_output(tmp_path / f"adv-{eps}.h5", single / f"adv-{eps}.h5", f"eps {eps}")
    assert output_of(tmp_path / "adv-0.05.h5").attrs["eps"] == 0.05


def test_several_eps_need_an_out_with_eps(tmp_path, small_files):
    model, data = small_files
    result = run_cli(
        *("attack", "--model", model, "--data", data, "--eps", 0.05, "--eps", 0.1),
        *("--out", tmp_path / "adv.h5"),
    )
    assert result.exit_code == 1
    assert "{eps}" in error_line(result)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- CLI, in subprocesses


N_KILL = 4096  # 16 blocks of 256 rows, 784 features: pgd takes about a second
KILL_TRIALS = 10


@dataclass
class KillJob:
    """A pgd job on a synthetic dataset, its uninterrupted output and how long it takes."""

    folder: Path
    model: Path
    data: Path
    reference: Output
    first_checkpoint_s: float
    finish_s: float

    def command(self, out: Path) -> list[str]:
        return [
            *(sys.executable, "-m", "advgrad", "attack", "--method", "pgd"),
            *("--model", str(self.model), "--data", str(self.data), "--out", str(out)),
            *("--batch-size", "256"),
        ]

    def run(self, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(out), capture_output=True, text=True, env=CHILD_ENV, timeout=300
        )

    def start(self, out: Path, stderr) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(out), stdout=subprocess.DEVNULL, stderr=stderr, env=CHILD_ENV
        )


def wait_for_rows(target: Path, rows: int, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll until the checkpoint beside ``target`` claims ``rows`` rows (True) or the process
    ends (False)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        done = checkpoint_rows(target)
        if done is not None and done >= rows:
            return True
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target}: {rows} rows not checkpointed in {timeout} s")
        time.sleep(0.001)
    return False


def save_synthetic(
    folder: Path, n_rows: int, seed: int, d: int = 784, hidden: int = 32
) -> tuple[Path, Path]:
    """A float32 model d -> hidden -> 10 and a labelled dataset of ``n_rows`` rows in [0, 1]."""
    rng = np.random.default_rng(seed)
    model = advgrad.Model(*random_network(rng, d, hidden, 10, dtype=np.float32))
    X = rng.uniform(0.0, 1.0, size=(n_rows, d)).astype(np.float32)
    y = rng.integers(0, 10, size=n_rows)
    advgrad.save_model(model, folder / "model.h5")
    advgrad.save_dataset(folder / "data.h5", X, y, attrs={"x_min": 0.0, "x_max": 1.0})
    return folder / "model.h5", folder / "data.h5"


@pytest.fixture(scope="module")
def kill_job(tmp_path_factory) -> KillJob:
    warm_up = tmp_path_factory.mktemp("warm-up")
    model, data = save_synthetic(warm_up, 300, seed=1)
    job = KillJob(warm_up, model, data, Output({}, {}), 0.0, 0.0)
    done = job.run(warm_up / "out.h5")  # compiles into the cache when it is cold
    assert done.returncode == 0, done.stderr

    folder = tmp_path_factory.mktemp("kill")
    model, data = save_synthetic(folder, N_KILL, seed=2)
    job = KillJob(folder, model, data, Output({}, {}), 0.0, 0.0)
    out = folder / "reference.h5"
    started = time.monotonic()
    proc = job.start(out, subprocess.PIPE)
    assert wait_for_rows(out, 1, proc)
    job.first_checkpoint_s = time.monotonic() - started
    _, stderr = proc.communicate(timeout=300)
    job.finish_s = time.monotonic() - started
    assert proc.returncode == 0, stderr
    job.reference = output_of(out)
    print(
        f"\nkill job: {N_KILL} rows, first checkpoint after {job.first_checkpoint_s:.2f} s, "
        f"done after {job.finish_s:.2f} s"
    )
    return job


@dataclass
class Trial:
    """One run signalled at a random moment: how, and what happened."""

    context: str
    out: Path
    returncode: int
    stderr: str
    checkpointed: int | None  # rows the checkpoint claimed right after the signal
    partial: bool  # .<name>.partial.h5 existed right after the signal


def signalled_run(job: KillJob, signum: int, trial: int) -> Trial:
    """Start the job and send ``signum`` at a moment drawn from the trial's seed: every other
    trial shortly after the k-th checkpoint (near a block boundary, or within the next block),
    else at a random time from the middle of start-up to shortly after the end."""
    name = signal.Signals(signum).name
    seed = KILL_SEED + 1000 * signum + trial
    rng = np.random.default_rng(seed)
    out = job.folder / f"{name}-{trial}.h5"
    n_blocks = -(-N_KILL // BLOCK)
    log = job.folder / f"{name}-{trial}.stderr"
    with log.open("w") as stderr:
        proc = job.start(out, stderr)
        started = time.monotonic()
        try:
            if trial % 2 == 0:
                blocks = int(rng.integers(1, n_blocks - 1))
                delay = float(rng.choice([rng.uniform(0, 0.004), rng.uniform(0, 0.06)]))
                how = f"{delay * 1000:.1f} ms after checkpoint {blocks}"
                if wait_for_rows(out, blocks * BLOCK, proc):
                    time.sleep(delay)
            else:
                at = float(rng.uniform(job.first_checkpoint_s / 2, job.finish_s + 0.3))
                how = f"at {at:.3f} s"
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(at - (time.monotonic() - started), 0))
            sent = proc.poll() is None
            if sent:
                proc.send_signal(signum)
            returncode = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    checkpointed, partial = checkpoint_rows(out), partial_path(out).exists()
    context = (
        f"{name} trial {trial} (seed {seed}, ADVGRAD_KILL_SEED={KILL_SEED}; {how}"
        f"{'' if sent else ', after the process ended'}; exit code {returncode})"
    )
    return Trial(context, out, returncode, log.read_text(), checkpointed, partial)


def rerun_and_check(job: KillJob, trial: Trial) -> str:
    """Run the job again after an interruption: it must resume from the checkpoint (or start
    afresh without one) and write the reference output, leaving nothing else behind.
    Returns "resumed", "not resumable" or "afresh"."""
    done = job.run(trial.out)
    assert done.returncode == 0, f"{trial.context}: rerun failed: {done.stderr}"
    text = one_line(done.stderr)
    if "cannot be resumed" in text:
        outcome = "not resumable"
    elif trial.partial and trial.checkpointed:
        assert f"resuming after row {trial.checkpointed} of {N_KILL}" in text, trial.context
        outcome = "resumed"
    else:
        assert "resuming" not in text, f"{trial.context}: {done.stderr}"
        outcome = "afresh"
    assert_same_output(trial.out, job.reference, f"{trial.context}, rerun")
    assert leftovers(trial.out) == [], trial.context
    return outcome


def after_sigkill(job: KillJob, trial: Trial) -> str:
    """Check the state a SIGKILL left, and the rerun; returns what happened."""
    assert trial.returncode in (-signal.SIGKILL, 0), f"{trial.context}: {trial.stderr}"
    if trial.out.exists():
        # the kill came after the rename: the target is whole
        assert_same_output(trial.out, job.reference, trial.context)
        assert not trial.partial, trial.context
        return "complete output found (killed after the rename, or not at all)"
    assert trial.returncode == -signal.SIGKILL, trial.context  # exit 0 without the output?
    if trial.checkpointed:
        assert lock_path(trial.out).exists(), trial.context  # stale: must not block the rerun
        return {
            "resumed": "killed mid-job: rerun resumed from the checkpoint",
            "not resumable": "killed mid-job: partial not resumable, rerun started afresh",
        }[rerun_and_check(job, trial)]
    had_files = bool(leftovers(trial.out))
    assert rerun_and_check(job, trial) == "afresh", trial.context
    if had_files:
        return "killed before the first checkpoint: rerun started afresh"
    return "killed before any output existed: rerun started afresh"


def after_sigterm(job: KillJob, trial: Trial) -> str:
    """Check the state a SIGTERM left, and the rerun; returns what happened."""
    text = one_line(trial.stderr)
    assert "Traceback" not in trial.stderr, trial.context
    if trial.returncode == 128 + signal.SIGTERM:
        found = re.search(r"stopped after (\d+) of (\d+) rows", text)
        assert found, f"{trial.context}: {trial.stderr}"
        rows, total = int(found[1]), int(found[2])
        assert total == N_KILL, trial.context
        assert 0 <= rows < N_KILL and rows % BLOCK == 0, trial.context
        assert "stopping after the block in progress" in text, trial.context
        if rows == 0:  # the signal came before the first block started (during the warm-up)
            assert "nothing is kept" in text, trial.context
            assert leftovers(trial.out) == [], trial.context
            assert rerun_and_check(job, trial) == "afresh", trial.context
            return "stopped before its first block (exit 143): rerun started afresh"
        assert_partial_kept(trial.out, rows)
        assert rerun_and_check(job, trial) == "resumed", trial.context
        return "stopped mid-job (exit 143): rerun resumed from the checkpoint"
    if trial.returncode == 0:
        # the signal came during the last block, or once the job was done
        assert_same_output(trial.out, job.reference, trial.context)
        assert leftovers(trial.out) == [], trial.context
        return "finished anyway (exit 0): complete output"
    assert trial.returncode == -signal.SIGTERM, f"{trial.context}: {trial.stderr}"
    # the default action: the signal came before advgrad watched for it, or after
    if trial.out.exists():
        assert_same_output(trial.out, job.reference, trial.context)
        return "killed on the way out (exit -15): complete output"
    assert leftovers(trial.out) == [], trial.context
    assert rerun_and_check(job, trial) == "afresh", trial.context
    return "killed during start-up (exit -15): no output, rerun started afresh"


KILL_WORKERS = 2
"""Trials running at once: start-up (imports) is single-threaded, so two overlap well."""


def kill_trials(job: KillJob, signum: int, check) -> Counter:
    """Run KILL_TRIALS signalled runs, ``check`` each; count the outcomes and print them."""

    def trial(number: int) -> str:
        return check(job, signalled_run(job, signum, number))

    with ThreadPoolExecutor(KILL_WORKERS) as pool:
        outcomes = Counter(pool.map(trial, range(KILL_TRIALS)))
    name = signal.Signals(signum).name
    print(f"\n{name}: {KILL_TRIALS} trials (ADVGRAD_KILL_SEED={KILL_SEED})")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {count:3d}  {outcome}")
    return outcomes


def test_sigkill_at_random_moments_never_leaves_a_half_written_output(kill_job):
    outcomes = kill_trials(kill_job, signal.SIGKILL, after_sigkill)
    mid_job = {o: n for o, n in outcomes.items() if o.startswith("killed mid-job")}
    assert sum(mid_job.values()) >= 3, outcomes
    # a kill is not a power loss: the checkpointed rows are always there to resume
    assert list(mid_job) == ["killed mid-job: rerun resumed from the checkpoint"], outcomes


def test_sigterm_at_random_moments_stops_cleanly_and_resumes(kill_job):
    outcomes = kill_trials(kill_job, signal.SIGTERM, after_sigterm)
    assert outcomes["stopped mid-job (exit 143): rerun resumed from the checkpoint"] >= 3, outcomes


@pytest.fixture(scope="module")
def ctrl_c(kill_job) -> tuple[Trial, subprocess.CompletedProcess]:
    """The job sent SIGINT after two checkpoints, then run again."""
    out = kill_job.folder / "ctrl-c.h5"
    log = kill_job.folder / "ctrl-c.stderr"
    with log.open("w") as stderr:
        proc = kill_job.start(out, stderr)
        try:
            assert wait_for_rows(out, 2 * BLOCK, proc)
            proc.send_signal(signal.SIGINT)
            returncode = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    trial = Trial(
        f"SIGINT (exit code {returncode})",
        out,
        returncode,
        log.read_text(),
        checkpoint_rows(out),
        partial_path(out).exists(),
    )
    assert_partial_kept(out, trial.checkpointed)
    return trial, kill_job.run(out)


def test_ctrl_c_exits_130_keeps_the_partial_and_resumes(kill_job, ctrl_c):
    trial, rerun = ctrl_c
    assert trial.returncode == 130, trial.stderr
    assert "Traceback" not in trial.stderr
    text = one_line(trial.stderr)
    rows = trial.checkpointed
    assert rows >= 2 * BLOCK
    assert (
        f"advgrad: interrupted: stopped after {rows} of {N_KILL} rows; the partial output is "
        "kept: run the same command again to resume"
    ) in text
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming after row {rows} of {N_KILL}" in one_line(rerun.stderr)
    (summary,) = [line for line in rerun.stdout.splitlines() if "resumed after row" in line]
    assert summary.split()[-2] == str(rows), rerun.stdout
    assert_same_output(trial.out, kill_job.reference, "after Ctrl-C")
    assert leftovers(trial.out) == []


def test_ctrl_c_messages_are_single_lines(ctrl_c):
    trial, _ = ctrl_c
    lines = [line for line in trial.stderr.splitlines() if line.strip()]
    assert lines, trial.stderr
    assert all(line.startswith("advgrad: ") for line in lines), trial.stderr


def peak_rss_kib(args: list[str]) -> int:
    """Peak resident memory of ``python -m advgrad *args``, measured by a parent process."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, sys.executable, "-m", "advgrad", *args],
        capture_output=True,
        text=True,
        env=CHILD_ENV,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def save_rows(path: Path, n_rows: int, seed: int) -> None:
    """A float32 dataset (n_rows, 784) in [0, 1], written in slices (little test memory)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("X", (n_rows, 784), np.float32, chunks=(1024, 784))
        for start in range(0, n_rows, 8000):
            stop = min(start + 8000, n_rows)
            dset[start:stop] = rng.uniform(0.0, 1.0, size=(stop - start, 784))
        f.attrs["x_min"], f.attrs["x_max"] = 0.0, 1.0


def test_peak_memory_does_not_grow_with_the_rows(tmp_path):
    rng = np.random.default_rng(70)
    model = tmp_path / "model.h5"
    advgrad.save_model(advgrad.Model(*random_network(rng, 784, 32, 10, dtype=np.float32)), model)
    peaks = {}
    # The first run of a fresh install compiles the kernels (and fills Numba's cache), which
    # takes more memory than the job itself: warm up first, unmeasured.
    for n_rows in (1024, 8_000, 80_000):
        data = tmp_path / f"data-{n_rows}.h5"
        save_rows(data, n_rows, seed=n_rows)
        out = tmp_path / f"adv-{n_rows}.h5"
        args = ["attack", "--model", str(model), "--data", str(data), "--out", str(out)]
        peaks[n_rows] = peak_rss_kib([*args, "--batch-size", "1024"])
        with h5py.File(out, "r") as f:
            assert f["X"].shape == (n_rows, 784)
            assert f.attrs["complete"]
        out.unlink()
        data.unlink()
    small, large = peaks[8_000], peaks[80_000]
    print(f"\npeak RSS: {small / 1024:.1f} MiB for 8k rows, {large / 1024:.1f} MiB for 80k rows")
    # 72k more rows of 784 float32 are 215 MiB: holding them would show plainly
    assert abs(large - small) < 0.1 * small, peaks
