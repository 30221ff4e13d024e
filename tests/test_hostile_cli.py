"""Hostile files and paths at the command line: whatever a file holds or a path is called,
the terminal shows it as text on the lines it belongs to, a refusal is one stderr line with
exit code 1, and no input is touched.

The commands run in a child process (``python -m advgrad``), as a user runs them: stdout and
stderr are separate and not a terminal, so any control character in them came from a file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from children import refusal_line, run_advgrad

from advgrad.bundled import MODEL, TEST_DATA, bundled_path

# Strings a file may hold to drive a terminal or to forge output: a window title, a screen
# clear, a carriage return that overprints, a newline that starts a line of our own, a bidi
# override, and rich markup (a closing tag without an opening one raises inside rich).
HOSTILE = (
    "\x1b]0;pwned\x07",
    "\x1b[2J\x1b[H",
    "safe\rforged",
    "ok\nadvgrad: file accepted",
    "abc\u202edcba",
    "[/oops]",
    "[bold red]shouted[/]",
)
CONTROL = ("\x1b", "\x07", "\r", "\u202e")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_inert(text: str) -> None:
    """No terminal control and no forged line in what a command printed."""
    for char in CONTROL:
        assert char not in text, repr(text)
    assert not any(line.startswith("advgrad: file accepted") for line in text.splitlines())


def hostile_model(path: Path) -> None:
    shutil.copy(bundled_path(MODEL), path)
    with h5py.File(path, "r+") as f:
        names = [f"{i} {HOSTILE[i % len(HOSTILE)]}" for i in range(10)]
        f.attrs["class_names"] = np.array(names, dtype=h5py.string_dtype())
        for i, text in enumerate(HOSTILE):
            f.attrs[f"note{i}"] = text
            f.attrs[f"{text} name{i}"] = i


def test_info_shows_hostile_attribute_names_and_values_as_text(tmp_path):
    model, data = tmp_path / "model.h5", tmp_path / "data.h5"
    hostile_model(model)
    shutil.copy(bundled_path(TEST_DATA), data)
    with h5py.File(data, "r+") as f:
        for i, text in enumerate(HOSTILE):
            f.attrs[f"note{i}"] = text
            f.attrs[f"{text} name{i}"] = text
    before = {path: digest(path) for path in (model, data)}
    for path in (model, data):
        result = run_advgrad("info", path, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert_inert(result.stdout)
        # markup is shown, not interpreted; escapes are shown as escapes
        assert "[/oops]" in result.stdout
        assert "[bold red]shouted[/]" in result.stdout
        assert "\\x1b]0;pwned\\x07" in result.stdout
        assert "ok\\nadvgrad: file accepted" in result.stdout
    assert before == {path: digest(path) for path in (model, data)}


def test_attack_and_evaluate_show_hostile_class_and_file_names_as_text(tmp_path):
    model = tmp_path / "model.h5"
    hostile_model(model)
    data = tmp_path / "data[red]x.h5"
    shutil.copy(bundled_path(TEST_DATA), data)
    out = tmp_path / "out [red]x.h5"
    result = run_advgrad("attack", "--model", model, "--data", data, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_inert(result.stdout + result.stderr)
    assert "[red]x.h5" in result.stdout
    assert out.exists()
    result = run_advgrad("evaluate", "--model", model, "--data", data, "--eps", "0.1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_inert(result.stdout + result.stderr)


@pytest.mark.parametrize(
    "name", ["bad \x1b[2J.h5", "bad\nadvgrad: file accepted.h5", "bad [red]x.h5"]
)
def test_refusal_of_a_hostile_file_name_is_one_escaped_line(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not an HDF5 file at all")
    result = run_advgrad("info", path, cwd=tmp_path)
    line = refusal_line(result)
    assert_inert(result.stderr)
    assert "not an HDF5 file" in line
    assert path.read_bytes() == b"not an HDF5 file at all"


def test_hostile_link_target_is_refused_in_one_escaped_line(tmp_path):
    data = tmp_path / "linked.h5"
    with h5py.File(data, "w") as f:
        f["real"] = np.zeros((4, 64), np.float32)
        f["X"] = h5py.SoftLink("/\x1b]0;pwned\x07\nadvgrad: file accepted")
    before = digest(data)
    result = run_advgrad("attack", "--data", data, "--out", tmp_path / "o.h5", cwd=tmp_path)
    line = refusal_line(result)
    assert_inert(result.stderr)
    assert "soft link" in line
    assert digest(data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linked.h5"]


def test_a_truncated_file_is_refused_in_one_line(tmp_path):
    data = tmp_path / "cut.h5"
    raw = bundled_path(TEST_DATA).read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    result = run_advgrad("info", data, cwd=tmp_path)
    line = refusal_line(result)
    assert str(data) in line


@pytest.mark.parametrize(
    "command",
    [
        ["attack", "--data", "DIR"],
        ["attack", "--model", "DIR"],
        ["evaluate", "--data", "DIR"],
        ["certify", "--data", "DIR"],
        ["gradcheck", "--model", "DIR"],
        ["train", "--data", "DIR", "--epochs", "1"],
        ["info", "DIR"],
        ["convert-data", "DIR.npy", "out.h5"],
        ["convert-model", "DIR.npz", "out.h5"],
    ],
)
def test_a_directory_as_an_input_is_one_line_and_exit_1(tmp_path, command):
    for name in ("DIR", "DIR.npy", "DIR.npz"):
        (tmp_path / name).mkdir()
    result = run_advgrad(*command, cwd=tmp_path)
    line = refusal_line(result)
    assert "DIR" in line
    assert "directory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DIR", "DIR.npy", "DIR.npz"]


def evaluate_args(model: Path, data: Path) -> list:
    return ["evaluate", "--model", model, "--data", data, "--eps", "0.1", "--method", "fgsm"]


@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize("clash", ["data", "model", "hard link", "symlink"])
def test_side_outputs_never_replace_an_input(tmp_path, option, clash):
    model, data = tmp_path / "model.h5", tmp_path / "data.h5"
    shutil.copy(bundled_path(MODEL), model)
    shutil.copy(bundled_path(TEST_DATA), data)
    side = {"data": data, "model": model}.get(clash, tmp_path / "side.png")
    if clash == "hard link":
        side.hardlink_to(data)
    elif clash == "symlink":
        side.symlink_to(model)
    before = {path: digest(path) for path in (model, data)}
    listing = sorted(p.name for p in tmp_path.iterdir())
    result = run_advgrad(*evaluate_args(model, data), option, side, "--overwrite", cwd=tmp_path)
    line = refusal_line(result)
    assert "is the input file" in line
    assert before == {path: digest(path) for path in (model, data)}
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_side_outputs_follow_the_overwrite_rule_and_appear_whole(tmp_path):
    model, data = bundled_path(MODEL), bundled_path(TEST_DATA)
    report, curves = tmp_path / "report.json", tmp_path / "curves.png"
    report.write_text("precious")
    result = run_advgrad(
        *evaluate_args(model, data), "--json", report, "--plot", curves, cwd=tmp_path
    )
    assert "exists; pass --overwrite" in refusal_line(result)
    assert report.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    result = run_advgrad(
        *evaluate_args(model, data), "--json", report, "--plot", curves, "--overwrite", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["n_rows"] == 450
    assert curves.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "report.json"]
    result = run_advgrad(
        *evaluate_args(model, data), "--json", report, "--plot", report, cwd=tmp_path
    )
    assert "the same file" in refusal_line(result)


@pytest.mark.parametrize(
    ("command", "exit_code"),
    [
        (["gradcheck", "--step", "1e300"], 1),
        (["gradcheck", "--step", "1e-300"], 1),
        (["gradcheck", "--step", "0"], 1),
        (["attack", "--method", "mifgsm", "--decay", "1e300", "--out", "o.h5"], 0),
        (["attack", "--method", "pgd", "--step-size", "1e300", "--out", "o.h5"], 1),
        (["certify", "--eps", "1e30", "--steps", "2", "--restarts", "1", "--out", "o.h5"], 0),
        (["train", "--adv-eps", "1e30", "--epochs", "1", "--out", "m.h5"], 0),
    ],
)
def test_absurd_arguments_print_no_warning(tmp_path, command, exit_code):
    result = run_advgrad(*command, cwd=tmp_path)
    assert result.returncode == exit_code, result.stderr
    assert "Warning" not in result.stderr
    assert "Traceback" not in result.stderr
    if exit_code:
        assert len(result.stderr.splitlines()) <= 1, result.stderr
    else:
        assert result.stderr == ""
