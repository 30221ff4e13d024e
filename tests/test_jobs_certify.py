"""advgrad.jobs.certify: the certify job on the streaming pipeline (resume, kill, report)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest
from children import CHILD_ENV
from conftest import interrupted
from test_resume import assert_partial_kept, assert_same_output, checkpoint_rows, wait_for_rows
from typer.testing import CliRunner

import advgrad
from advgrad.attacks import Attack
from advgrad.bundled import MODEL, bundled_path
from advgrad.certify import certify
from advgrad.cli import app
from advgrad.jobs import Interrupted
from advgrad.jobs.certify import certify_file

N_ROWS = 1100  # 5 blocks of 256 rows
BLOCK = 256
EPS = (0.0, 0.01, 0.05)
ATTACK = Attack("pgd", steps=3, restarts=1)
OPTIONS = {"eps_values": EPS, "attack": ATTACK, "batch_size": BLOCK}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(model path, dataset path): the bundled digits network and N_ROWS random 8 x 8 images
    in [0, 1] with integer labels."""
    folder = tmp_path_factory.mktemp("certify-inputs")
    rng = np.random.default_rng(8)
    X = rng.random((N_ROWS, 8, 8), dtype=np.float32)
    X[X < 0.4] = 0.0
    y = rng.integers(0, 10, N_ROWS)
    data = folder / "data.h5"
    advgrad.save_dataset(data, X, y, attrs={"x_min": 0.0, "x_max": 1.0})
    return bundled_path(MODEL), data


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """An uninterrupted certify job's output and report."""
    out = tmp_path_factory.mktemp("certify-reference") / "reference.h5"
    report = certify_file(*files, out, **OPTIONS)
    assert report.resumed_rows == 0
    return out, report


def same_figures(report, expected) -> None:
    """Two reports agree exactly but for the output, the times and the resumed rows."""
    skip = {"output", "certify_seconds", "attack_seconds", "resumed_rows"}
    names = type(report).__dataclass_fields__
    keep = [i for i, name in enumerate(names) if name not in skip]
    assert [astuple(report)[i] for i in keep] == [astuple(expected)[i] for i in keep]


def test_the_report_matches_an_in_memory_certification(files, reference):
    _, report = reference
    X, y = advgrad.load_dataset(files[1])
    model = advgrad.load_model(files[0])
    expected = certify(model, X, y, eps_values=EPS, attack=ATTACK)
    assert report.n_rows == N_ROWS
    assert report.clean_accuracy == expected.clean_accuracy
    assert report.certified_accuracy == expected.certified_accuracy
    assert report.robust_accuracy == expected.robust_accuracy
    assert report.contradictions == expected.contradictions
    assert report.bracket() == expected.bracket()
    assert report.certified_accuracy[0] >= report.certified_accuracy[-1]


@pytest.mark.parametrize("after_blocks", [1, 3])
def test_a_stopped_job_resumes_to_the_same_file_and_figures(
    tmp_path, files, reference, after_blocks
):
    out = tmp_path / "c.h5"
    stopped, _ = interrupted(certify_file, *files, out, after_blocks=after_blocks, **OPTIONS)
    assert stopped.rows_done == after_blocks * BLOCK
    assert_partial_kept(out, after_blocks * BLOCK)
    notices: list[str] = []
    report = certify_file(*files, out, notice=notices.append, **OPTIONS)
    assert notices == [f"{out}: resuming after row {after_blocks * BLOCK} of {N_ROWS}"]
    assert report.resumed_rows == after_blocks * BLOCK
    assert_same_output(out, reference[0])
    same_figures(report, reference[1])


def test_restart_discards_the_partial_output(tmp_path, files, reference):
    out = tmp_path / "c.h5"
    stop = threading.Event()
    with pytest.raises(Interrupted):
        certify_file(*files, out, stop=stop, progress=lambda *_: stop.set(), **OPTIONS)
    report = certify_file(*files, out, resume=False, **OPTIONS)
    assert report.resumed_rows == 0
    assert_same_output(out, reference[0])


def test_other_settings_do_not_resume_a_partial_output(tmp_path, files):
    out = tmp_path / "c.h5"
    stop = threading.Event()
    with pytest.raises(Interrupted):
        certify_file(*files, out, stop=stop, progress=lambda *_: stop.set(), **OPTIONS)
    with pytest.raises(advgrad.InputFileError, match="interrupted run with other settings"):
        certify_file(*files, out, **{**OPTIONS, "eps_values": (0.02,)})


def test_a_killed_command_resumes_to_the_same_file(tmp_path, files, reference):
    out = tmp_path / "c.h5"
    command = [
        *(sys.executable, "-m", "advgrad", "certify", "--steps", "3", "--restarts", "1"),
        *("--model", str(files[0]), "--data", str(files[1]), "--out", str(out)),
        *("--eps", "0,0.01,0.05", "--batch-size", str(BLOCK)),
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=CHILD_ENV
    )
    try:
        assert wait_for_rows(out, 2 * BLOCK, proc), "the job ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = checkpoint_rows(out)
    assert done is not None and 2 * BLOCK <= done < N_ROWS
    rerun = subprocess.run(command, capture_output=True, text=True, env=CHILD_ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming after row {done}" in rerun.stderr
    assert_same_output(out, reference[0])


def test_the_command_on_the_cpu_device_writes_the_reference(tmp_path, files, reference):
    args = ["certify", "--model", str(files[0]), "--data", str(files[1]), "--steps", "3"]
    args += ["--restarts", "1", "--eps", "0,0.01,0.05", "--batch-size", str(BLOCK)]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--out", str(tmp_path / "o.h5")])
    assert result.exit_code == 0, result.output
    assert "resumed after row" not in result.output
    assert_same_output(tmp_path / "o.h5", reference[0])


def test_cuda_without_a_gpu_is_one_line(tmp_path, files):
    from advgrad.cuda_backend import cuda_available

    if cuda_available()[0]:
        pytest.skip("a CUDA device is usable here")
    result = CliRunner().invoke(
        app, ["certify", "--data", str(files[1]), "--device", "cuda", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "--device cuda is not usable here" in lines[0]
    assert list(Path(tmp_path).iterdir()) == []
