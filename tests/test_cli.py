"""The command line, end to end: the attack job, its output file, and every error path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import typer
from conftest import random_network
from typer.testing import CliRunner

import advgrad
from advgrad.attacks import Attack
from advgrad.bundled import MODEL, TEST_DATA, bundled_path
from advgrad.cli import app
from advgrad.jobs import attack_file

runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands


def run(*args, cwd=None):
    """Invoke the CLI in-process, in ``cwd``."""
    if cwd is None:
        return runner.invoke(app, [str(a) for a in args])
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        os.chdir(previous)


def test_attack_with_no_arguments_writes_the_default_output(tmp_path, digits_model, digits_test):
    result = run("attack", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    out = tmp_path / "digits_test-fgsm-linf-eps0.1.h5"
    assert out.name in result.output
    for words in ("clean accuracy", "adversarial accuracy", "attack success rate", "rows per"):
        assert words in result.output
    X, y = digits_test
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"]
        assert f.attrs["eps"] == 0.1
        assert f.attrs["norm"] == "inf"
        assert f.attrs["model_sha256"] == advgrad.io.sha256_file(bundled_path(MODEL))
        assert f.attrs["data_sha256"] == advgrad.io.sha256_file(bundled_path(TEST_DATA))
        X_adv = f["X"][...]
        np.testing.assert_array_equal(f["y"][...], y)
        pred_clean, pred_adv = f["pred_clean"][...], f["pred_adv"][...]
    assert X_adv.shape == X.shape
    assert X_adv.dtype == X.dtype
    np.testing.assert_array_equal(X_adv, advgrad.fgsm(digits_model, X, eps=0.1))
    np.testing.assert_array_equal(pred_clean, advgrad.predict(digits_model, X))
    np.testing.assert_array_equal(pred_adv, advgrad.predict(digits_model, X_adv))
    # the output is itself a valid dataset
    assert run("info", out).exit_code == 0


def test_attack_file_report_matches_the_output(tmp_path, digits_model, digits_test):
    out = tmp_path / "adv.h5"
    report = attack_file(
        bundled_path(MODEL), bundled_path(TEST_DATA), out, Attack(eps=0.5, norm="2"), batch_size=37
    )
    X, y = digits_test
    X_adv, _ = advgrad.load_dataset(out)
    # batches are rounded up to whole 256-row kernel blocks: bitwise equal to one call
    np.testing.assert_array_equal(X_adv, advgrad.fgsm(digits_model, X, eps=0.5, norm="2"))
    delta = (X_adv - X).reshape(len(X), -1).astype(np.float64)
    assert report.n_rows == 450
    assert report.mean_l2 == pytest.approx(np.linalg.norm(delta, axis=1).mean(), rel=1e-9)
    assert report.mean_linf == pytest.approx(np.abs(delta).max(axis=1).mean(), rel=1e-9)
    assert np.linalg.norm(delta, axis=1).max() <= 0.5 + 1e-5
    predicted = advgrad.predict(digits_model, X_adv)
    assert report.adversarial_accuracy == pytest.approx(np.mean(predicted == y))
    assert report.clean_accuracy == pytest.approx(np.mean(advgrad.predict(digits_model, X) == y))


def test_labels_option_attacks_the_dataset_labels(tmp_path, digits_model, digits_test):
    out = tmp_path / "adv.h5"
    assert run("attack", "--labels", "--out", out, "--eps", 0.05).exit_code == 0
    X, y = digits_test
    np.testing.assert_array_equal(
        advgrad.load_dataset(out)[0], advgrad.fgsm(digits_model, X, y, eps=0.05)
    )
    with h5py.File(out, "r") as f:
        assert f.attrs["labels"] == "dataset"


def test_float64_unlabelled_data_and_explicit_clip(tmp_path):
    rng = np.random.default_rng(30)
    model = advgrad.Model(*random_network(rng, 6, 4, 3))
    X = rng.uniform(-2, 2, size=(100, 2, 3))
    advgrad.save_model(model, tmp_path / "m.h5")
    advgrad.save_dataset(tmp_path / "d.h5", X)
    out = tmp_path / "o.h5"
    args = ("--model", tmp_path / "m.h5", "--data", tmp_path / "d.h5", "--out", out)
    result = run("attack", *args, "--clip-min", -1, "--clip-max", 1, "--compression", "gzip")
    assert result.exit_code == 0, result.output
    X_adv, y = advgrad.load_dataset(out)
    assert y is None
    assert X_adv.dtype == np.float64
    np.testing.assert_array_equal(X_adv, advgrad.fgsm(model, X, eps=0.1, clip=(-1.0, 1.0)))
    # no clip given and no x_min/x_max attributes anywhere: no clipping
    assert run("attack", *args, "--overwrite").exit_code == 0
    np.testing.assert_array_equal(
        advgrad.load_dataset(out)[0], advgrad.fgsm(model, X, eps=0.1, clip=None)
    )


def error_line(result):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_refuses_to_overwrite_an_existing_output(tmp_path):
    out = tmp_path / "adv.h5"
    out.write_bytes(b"precious")
    result = run("attack", "--out", out)
    assert result.exit_code == 1
    assert "exists; pass --overwrite" in error_line(result)
    assert out.read_bytes() == b"precious"
    assert run("attack", "--out", out, "--overwrite").exit_code == 0
    assert list(tmp_path.iterdir()) == [out]


def test_refuses_to_write_onto_an_input(tmp_path):
    data = tmp_path / "data.h5"
    shutil.copy(bundled_path(TEST_DATA), data)
    before = data.read_bytes()
    result = run("attack", "--data", data, "--out", data, "--overwrite")
    assert result.exit_code == 1
    assert "is the input file" in error_line(result)
    assert data.read_bytes() == before


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no such file"),
        ("not_hdf5", "not an HDF5 file"),
        ("wrong_width", "the model expects 64"),
        ("bad_label", "outside"),
        ("nan", "non-finite"),
        ("labels_missing", "/y: is missing"),
    ],
)
def test_bad_inputs_give_one_line_and_exit_1(tmp_path, setup, message):
    data = tmp_path / "data.h5"
    extra = []
    if setup == "not_hdf5":
        data.write_text("X,y\n1,2\n")
    elif setup == "wrong_width":
        advgrad.save_dataset(data, np.zeros((4, 7), np.float32))
    elif setup == "bad_label":
        advgrad.save_dataset(data, np.zeros((4, 64), np.float32), np.array([0, 1, 10, 2]))
    elif setup == "nan":
        X = np.zeros((4, 64), np.float32)
        X[2, 5] = np.nan
        with h5py.File(data, "w") as f:
            f["X"] = X
    elif setup == "labels_missing":
        advgrad.save_dataset(data, np.zeros((4, 64), np.float32))
        extra = ["--labels"]
    result = run("attack", "--data", data, "--out", tmp_path / "o.h5", *extra)
    assert result.exit_code == 1
    line = error_line(result)
    assert message in line
    assert str(data) in line
    assert not (tmp_path / "o.h5").exists()
    assert [p.name for p in tmp_path.iterdir()] == ([] if setup == "missing" else ["data.h5"])


def test_info_reports_models_datasets_and_refusals(tmp_path):
    result = run("info", bundled_path(MODEL))
    assert result.exit_code == 0
    assert "two-layer-sigmoid" in result.output
    assert "valid" in result.output
    result = run("info", bundled_path(TEST_DATA))
    assert result.exit_code == 0
    assert "450" in result.output
    with h5py.File(tmp_path / "linked.h5", "w") as f:
        f["X"] = np.zeros((2, 3), np.float32)
        f["labels"] = np.zeros(2, np.int64)
        f["y"] = h5py.SoftLink("/labels")
    result = run("info", tmp_path / "linked.h5")
    assert result.exit_code == 1
    line = error_line(result)
    assert str(tmp_path / "linked.h5") in line
    assert "soft link" in line


def test_gradcheck_command(tmp_path):
    result = run("gradcheck", "--rows", 4)
    assert result.exit_code == 0, result.output
    assert "passed" in result.output
    result = run("gradcheck", "--rows", 4, "--tolerance", 0)
    assert result.exit_code == 1
    assert "FAILED" in result.output


def parsed(command: str, *args: str) -> dict:
    """The values the parser hands ``command`` for ``args``; the command does not run."""
    return COMMANDS[command].make_context(command, list(args)).params


def usage_error(*args, cwd):
    """The message of the usage error that ``advgrad *args`` stops with (exit 2), on one
    line; ``cwd`` is left empty."""
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "500"})
    finally:
        os.chdir(previous)
    assert result.exit_code == 2, result.output
    assert list(cwd.iterdir()) == []
    [message] = [line for line in result.output.splitlines() if "Invalid value" in line]
    return " ".join(message.strip("│ ").split())


EPS_DEFAULTS = {
    "attack": [0.1],
    "evaluate": [0.0, 0.05, 0.1, 0.15, 0.2, 0.25],
    "certify": [0.01, 0.02, 0.05, 0.1],
}


@pytest.mark.parametrize("command", list(EPS_DEFAULTS))
def test_eps_is_repeatable_and_comma_separated_in_every_command(command, tmp_path):
    assert parsed(command)["eps"] == EPS_DEFAULTS[command]
    assert parsed(command, "--eps", "0.05", "--eps", "0.1")["eps"] == [0.05, 0.1]
    assert parsed(command, "--eps", "0.05,0.1")["eps"] == [0.05, 0.1]
    assert parsed(command, "--eps", "0,0.05", "--eps", " 1e-3 ,")["eps"] == [0.0, 0.05, 1e-3]
    assert parsed(command, "--eps", "inf")["eps"] == [np.inf]  # refused by the job, exit 1
    for value, reason in [
        ("x", "'x' is not a number"),
        ("0.1,-0.2", "-0.2 is negative; a radius is >= 0"),
        ("0.1,x", "'x' is not a number"),
        (",", "no value given"),
    ]:
        message = usage_error(command, "--eps", value, cwd=tmp_path)
        assert message == f"Invalid value for '--eps': {reason}"


def test_evaluate_methods_are_repeatable_comma_separated_and_checked(tmp_path):
    assert parsed("evaluate")["method"] == ["fgsm", "pgd"]
    methods = parsed("evaluate", "--method", "bim", "--method", "deepfool,mifgsm")["method"]
    assert methods == ["bim", "deepfool", "mifgsm"]
    assert usage_error("evaluate", "--method", "fgsm,nope", cwd=tmp_path) == (
        "Invalid value for '--method': 'nope' is not one of "
        "'fgsm', 'bim', 'pgd', 'mifgsm', 'deepfool', 'apgd-ce', 'apgd-dlr', 'apgd-t', "
        "'fab', 'fab-t', 'square', 'autoattack', 'cw'."
    )


def test_both_eps_and_method_spellings_evaluate_the_same(tmp_path):
    common = ("evaluate", "--steps", 2, "--min-eps", 0)
    separate = (*common, "--eps", 0, "--eps", 0.1, "--method", "fgsm", "--method", "bim")
    assert run(*separate, "--json", tmp_path / "a.json").exit_code == 0
    joined = (*common, "--eps", "0,0.1", "--method", "fgsm,bim", "--json", tmp_path / "b.json")
    assert run(*joined).exit_code == 0
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert '"method": "bim"' in (tmp_path / "a.json").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--norm", "1"), "Invalid value for '--norm': Value error, '1' is not one of 'inf', '2'."),
        (
            ("--method", "exact"),
            "Invalid value for '--method': Value error, 'exact' is not one of 'crown', 'ibp'.",
        ),
    ],
)
def test_certify_norm_and_method_choices_are_checked_by_the_parser(tmp_path, args, message):
    assert usage_error("certify", *args, cwd=tmp_path) == message
    assert parsed("certify", "--norm", "2", "--method", "ibp")["norm"] == "2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("convert-data", "a.npy", "b.h5", "--x-min", "0"), "give both --x-min and --x-max"),
        (("convert-data", "a.npy", "b.h5", "--x-max", "1"), "give both --x-min and --x-max"),
        (("attack", "--clip-max", "1"), "give both --clip-min and --clip-max"),
    ],
)
def test_a_half_given_range_is_refused_naming_the_options_typed(tmp_path, args, message):
    result = run(*args, cwd=tmp_path)
    assert result.exit_code == 2
    assert error_line(result) == f"advgrad: error: {message}, or neither"
    assert list(tmp_path.iterdir()) == []


def test_several_eps_for_deepfool_write_one_output(tmp_path):
    """DeepFool has no eps: several --eps write one output, so --out needs no {eps}."""
    args = ("--method", "deepfool", "--eps", "0.1,0.2", "--out", "o.h5")
    result = run("attack", *args, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert [path.name for path in tmp_path.iterdir()] == ["o.h5"]


def test_installed_console_script_runs_in_a_fresh_process(tmp_path):
    executable = shutil.which("advgrad")
    command = [executable] if executable else [sys.executable, "-m", "advgrad"]
    completed = subprocess.run(
        [*command, "attack", "--eps", "0.2"], cwd=tmp_path, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    assert "digits_test-fgsm-linf-eps0.2.h5" in completed.stdout
    assert (tmp_path / "digits_test-fgsm-linf-eps0.2.h5").is_file()
    completed = subprocess.run(
        [*command, "attack", "--eps", "0.2"], cwd=tmp_path, capture_output=True, text=True
    )
    assert completed.returncode == 1
    assert completed.stderr.strip().count("\n") == 0
    assert "exists; pass --overwrite" in completed.stderr


def test_allow_nonfinite_lets_nan_rows_through(tmp_path):
    X = np.random.default_rng(31).uniform(size=(10, 64)).astype(np.float32)
    X[3, 4] = np.nan
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f["X"] = X
    args = ("--data", tmp_path / "nan.h5", "--out", tmp_path / "o.h5")
    assert "non-finite" in error_line(run("attack", *args))
    assert run("info", tmp_path / "nan.h5").exit_code == 1
    assert run("info", tmp_path / "nan.h5", "--allow-nonfinite").exit_code == 0
    assert run("attack", *args, "--allow-nonfinite").exit_code == 0
    X_adv = advgrad.load_dataset(tmp_path / "o.h5", allow_nonfinite=True)[0]
    assert np.isnan(X_adv[3]).any()
    np.testing.assert_array_equal(np.isfinite(X_adv).all(axis=1), np.arange(10) != 3)


@pytest.mark.parametrize("command", ["attack", "evaluate", "certify"])
def test_float64_weights_overflowing_float32_data_are_refused(tmp_path, command):
    W1, b1, W2, b2 = random_network(np.random.default_rng(1), d=6, H=4, C=3)
    W1[2, 1] = 1e39  # finite in float64, inf in float32
    model_path = tmp_path / "model.h5"
    advgrad.save_model(advgrad.Model(W1, b1, W2, b2), model_path)
    data_path = tmp_path / "data.h5"
    advgrad.save_dataset(data_path, np.random.default_rng(0).random((20, 6), dtype=np.float32))
    result = run(command, "--model", model_path, "--data", data_path, cwd=tmp_path)
    assert result.exit_code == 1, result.output
    assert "/W1: 1 values that overflow float32" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5", "model.h5"]


def test_a_block_larger_than_a_read_is_refused_with_the_batch_size_to_use(tmp_path, monkeypatch):
    import advgrad.jobs.inputs

    monkeypatch.setattr(advgrad.jobs.inputs, "MAX_READ_BYTES", 64 * 256 * 4 * 3)
    result = run("attack", "--batch-size", "1024", cwd=tmp_path)
    assert result.exit_code == 1, result.output
    assert "use a batch size of at most 768" in result.output
    assert list(tmp_path.iterdir()) == []


def test_device_cuda_without_a_gpu_is_one_line(tmp_path):
    from advgrad.cuda_backend import cuda_available

    if cuda_available()[0]:
        pytest.skip("a CUDA device (or the simulator) is usable here")
    result = run("attack", "--device", "cuda", cwd=tmp_path)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--device cuda is not usable here:" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_evaluate_command_writes_json_and_png(tmp_path):
    json_path, png = tmp_path / "r.json", tmp_path / "curve.png"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--eps",
            "0,0.1,0.2",
            "--method",
            "fgsm,pgd",
            "--steps",
            "5",
            "--json",
            str(json_path),
            "--plot",
            str(png),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(json_path.read_text())
    assert data["n_rows"] == 450
    assert {(p["method"], p["eps"]) for p in data["points"]} == {
        (m, e) for m in ("fgsm", "pgd") for e in (0.0, 0.1, 0.2)
    }
    for point in data["points"]:
        assert f"{100 * point['accuracy']:.1f} %" in result.output
    assert [s["method"] for s in data["minimal_eps"]] == ["fgsm", "pgd"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000


def test_attack_command_methods_and_min_eps(tmp_path):
    out = tmp_path / "pgd.h5"
    result = CliRunner().invoke(
        app,
        [
            "attack",
            "--method",
            "pgd",
            "--steps",
            "5",
            "--target",
            "least-likely",
            "--min-eps",
            "0.01",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "minimal eps" in result.output
    with h5py.File(out, "r") as f:
        assert f.attrs["attack"] == "pgd"
        assert f.attrs["targeted"]
        assert f.attrs["steps"] == 5
        assert f["eps_min"].shape == (450,)
        assert f["target"].shape == (450,)
    result = CliRunner().invoke(app, ["attack", "--method", "deepfool", "--target", "3"])
    assert result.exit_code == 1
    assert "deepfool is untargeted" in result.output
    result = CliRunner().invoke(app, ["attack", "--target", "x"])
    assert result.exit_code == 1
    assert "--target must be a class index" in result.output
