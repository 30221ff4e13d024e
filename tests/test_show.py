"""``advgrad show``: which rows it picks, what their titles say, the PNG it writes, and every
refusal (one line, exit 1, nothing left behind, the inputs unchanged)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import random_network
from typer.testing import CliRunner

import advgrad
from advgrad.attacks import Attack
from advgrad.bundled import MODEL, TEST_DATA, bundled_path
from advgrad.cli import app
from advgrad.figures import (
    COLUMN_GAP_PX,
    PANEL_PX,
    PERTURBATION_COLORMAP,
    ROW_GAP_PX,
    TITLE_PX,
    class_label,
    figure_text,
    grid_figure,
    grid_pixels,
    panel_titles,
    save_grid,
)
from advgrad.jobs import attack_file
from advgrad.jobs.show import MAX_SHOWN_ROWS, shown_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(*args, cwd=None):
    """Invoke the CLI in-process, in ``cwd``."""
    previous = Path.cwd()
    os.chdir(cwd or previous)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(previous)


def error_line(result) -> str:
    """The one line a failed command printed (exit 1, no traceback)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def names(folder: Path) -> list[str]:
    """The names in ``folder``, sorted."""
    return sorted(path.name for path in folder.iterdir())


def digests(*paths: Path) -> list[str]:
    return [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in paths]


@pytest.fixture(scope="module")
def fgsm_output(tmp_path_factory) -> Path:
    """``advgrad attack`` with no arguments (bundled model and data), FGSM eps 0.1."""
    folder = tmp_path_factory.mktemp("fgsm")
    result = run("attack", "--out", "adv.h5", cwd=folder)
    assert result.exit_code == 0, result.output
    return folder / "adv.h5"


@pytest.fixture(scope="module")
def rows_of(fgsm_output, digits_model, digits_test):
    """Clean rows, labels, adversarial rows and both predictions, as numpy computes them."""
    X, y = digits_test
    X_adv, _ = advgrad.load_dataset(fgsm_output)
    P_clean = advgrad.predict_proba(digits_model, X)
    P_adv = advgrad.predict_proba(digits_model, X_adv)
    return X, y, X_adv, P_clean, P_adv


def test_show_writes_a_png_of_the_grid_size_and_leaves_nothing_else(fgsm_output, tmp_path):
    before = digests(fgsm_output, bundled_path(MODEL), bundled_path(TEST_DATA))
    result = run("show", fgsm_output, "--out", "grid.png", "--rows", 5, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output == "wrote grid.png: rows 0, 1, 2, 3, 4\n"
    assert names(tmp_path) == ["grid.png"]
    width, height = png_size(tmp_path / "grid.png")
    assert (width, height) == grid_pixels(5)
    # 3 columns of panels; each further row adds a title, a panel and a gap
    assert width > 3 * PANEL_PX + 2 * COLUMN_GAP_PX
    assert grid_pixels(6) == (width, height + TITLE_PX + PANEL_PX + ROW_GAP_PX)
    assert digests(fgsm_output, bundled_path(MODEL), bundled_path(TEST_DATA)) == before


def test_the_default_png_is_named_after_the_output(fgsm_output, tmp_path):
    result = run("show", fgsm_output, "--rows", 1, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "adv.png") == grid_pixels(1)


def test_titles_show_the_true_class_and_the_model_predictions(fgsm_output, rows_of, digits_model):
    X, y, X_adv, P_clean, P_adv = rows_of
    shown = shown_rows(fgsm_output, rows=8)
    index = np.arange(8)
    np.testing.assert_array_equal(shown.index, index)
    np.testing.assert_array_equal(shown.true_class, y[index])
    np.testing.assert_array_equal(shown.pred_clean, advgrad.predict(digits_model, X[index]))
    np.testing.assert_array_equal(shown.pred_adv, advgrad.predict(digits_model, X_adv[index]))
    np.testing.assert_array_equal(shown.clean, X[index])
    np.testing.assert_array_equal(shown.adversarial, X_adv[index])
    for i in index:
        clean_title, adversarial_title, perturbation_title = panel_titles(shown, i)
        pred_clean, pred_adv = P_clean[i].argmax(), P_adv[i].argmax()
        assert clean_title == (
            f"row {i}, true {y[i]}\nclean: {pred_clean} ({100 * P_clean[i, pred_clean]:.1f}%)"
        )
        assert adversarial_title == f"adversarial\n{pred_adv} ({100 * P_adv[i, pred_adv]:.1f}%)"
        change = (X_adv[i] - X[i]).astype(np.float64)
        assert perturbation_title == (
            f"perturbation\nL\N{INFINITY} {np.abs(change).max():.3g}, "
            f"L2 {np.linalg.norm(change):.3g}"
        )


@pytest.mark.parametrize("rows", [1, 7, 100])
def test_each_selection_picks_the_rows_numpy_picks(fgsm_output, rows_of, rows):
    X, y, X_adv, P_clean, P_adv = rows_of
    pred_clean, pred_adv = P_clean.argmax(axis=1), P_adv.argmax(axis=1)
    at = np.arange(len(y))
    drop = P_clean[at, y].astype(np.float64) - P_adv[at, y].astype(np.float64)
    expected = {
        "first": at[:rows],
        # the attack ran on the predictions: success moves the prediction off the clean one
        "successful": np.flatnonzero(pred_adv != pred_clean)[:rows],
        "confidence-drop": np.lexsort((at, -drop))[:rows],
    }
    for select, index in expected.items():
        # blocks of 256 rows: the 450 rows stream in two blocks
        shown = shown_rows(fgsm_output, rows=rows, select=select, batch_size=256)
        np.testing.assert_array_equal(shown.index, index, err_msg=select)
        np.testing.assert_array_equal(shown.clean, X[index])
        np.testing.assert_array_equal(shown.adversarial, X_adv[index])
        np.testing.assert_array_equal(shown.true_class, y[index])


def test_successful_rows_of_a_targeted_attack_reach_the_target(tmp_path, digits_model):
    out = tmp_path / "targeted.h5"
    result = run("attack", "--target", "3", "--labels", "--eps", "0.2", "--out", out)
    assert result.exit_code == 0, result.output
    X_adv, _ = advgrad.load_dataset(out)
    reached = np.flatnonzero(advgrad.predict(digits_model, X_adv) == 3)
    assert 10 < len(reached) < len(X_adv)  # rows already predicted 3 count too
    shown = shown_rows(out, rows=10, select="successful")
    np.testing.assert_array_equal(shown.index, reached[:10])
    np.testing.assert_array_equal(shown.pred_adv, 3)


def test_the_perturbation_scale_is_symmetric_and_shared(fgsm_output, rows_of):
    X, _, X_adv, _, _ = rows_of
    shown = shown_rows(fgsm_output, rows=4, select="confidence-drop")
    limit = np.abs(X_adv[shown.index] - X[shown.index].astype(np.float64)).max()
    figure = grid_figure(shown)
    images = [axes.images[0] for axes in figure.axes if axes.images]
    assert len(images) == 3 * 4
    for row in range(4):
        clean, adversarial, perturbation = images[3 * row : 3 * row + 3]
        assert clean.get_clim() == adversarial.get_clim() == (0.0, 1.0)  # the data's range
        assert perturbation.get_clim() == (-limit, limit)
        assert perturbation.get_cmap().name == PERTURBATION_COLORMAP
    assert limit == pytest.approx(0.1, rel=1e-6)


def test_image_layouts_of_colour_data(tmp_path):
    rng = np.random.default_rng(5)
    X = rng.uniform(0.0, 1.0, size=(20, 3, 4, 5)).astype(np.float32)
    model = advgrad.Model(*random_network(rng, 60, 6, 3, dtype=np.float32))
    advgrad.save_model(model, tmp_path / "model.h5")
    for name, data, layout in (
        ("chw", X, (3, 4, 5)),
        ("hwc", np.ascontiguousarray(np.moveaxis(X, 1, -1)), (4, 5, 3)),
    ):
        advgrad.save_dataset(tmp_path / f"{name}.h5", data, attrs={"x_min": 0.0, "x_max": 1.0})
        out = tmp_path / f"{name}-adv.h5"
        attack_file(tmp_path / "model.h5", tmp_path / f"{name}.h5", out, Attack(eps=0.05))
        shown = shown_rows(out, rows=3)
        assert data.shape[1:] == layout
        np.testing.assert_array_equal(shown.clean, np.moveaxis(X[:3], 1, -1))
        assert shown.true_class is None
        assert panel_titles(shown, 0)[0].startswith("row 0, no label\nclean: ")
        assert shown.perturbation.shape == (3, 4, 5)
        assert np.abs(shown.perturbation).max() == pytest.approx(0.05, rel=1e-5)
        save_grid(shown, io.BytesIO())


def test_strings_from_files_are_drawn_literally():
    assert figure_text("a$b$\x1b[2J\n", 40) == r"a\$b\$\x1b[2J\n"
    assert figure_text("abcdefghij", 5) == "abcd\N{HORIZONTAL ELLIPSIS}"
    assert class_label(1, ("cat", "$\\frac{dog")) == r"\$\\frac{dog"
    assert class_label(1, None) == "1"


def refusal_cases(tmp_path, digits_model, digits_test):
    """A flat dataset and model (no input shape anywhere), attacked."""
    X, y = digits_test
    flat = advgrad.Model(digits_model.W1, digits_model.b1, digits_model.W2, digits_model.b2)
    advgrad.save_model(flat, tmp_path / "flat-model.h5")
    advgrad.save_dataset(tmp_path / "flat.h5", X.reshape(len(X), -1), y)
    out = tmp_path / "flat-adv.h5"
    attack_file(tmp_path / "flat-model.h5", tmp_path / "flat.h5", out)
    return out


def test_refuses_data_without_an_image_shape(tmp_path, digits_model, digits_test):
    out = refusal_cases(tmp_path, digits_model, digits_test)
    result = run("show", out, "--out", tmp_path / "grid.png")
    assert error_line(result) == (
        f"advgrad: error: {out}: has no image shape (input_shape (64,); an image is (h, w), "
        "(h, w, c) or (c, h, w) with c 1 or 3); show draws images only"
    )
    assert not (tmp_path / "grid.png").exists()
    assert names(tmp_path) == ["flat-adv.h5", "flat-model.h5", "flat.h5"]


def test_refuses_without_matplotlib(fgsm_output, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = run("show", fgsm_output, "--out", "grid.png", cwd=tmp_path)
    assert error_line(result) == (
        "advgrad: error: advgrad show needs matplotlib: pip install 'advgrad[plot]'"
    )
    assert names(tmp_path) == []


@pytest.mark.parametrize("rows", [0, -3, MAX_SHOWN_ROWS + 1])
def test_refuses_a_bad_number_of_rows(fgsm_output, tmp_path, rows):
    result = run("show", fgsm_output, "--out", "grid.png", "--rows", rows, cwd=tmp_path)
    assert error_line(result) == (
        f"advgrad: error: rows (--rows) must be between 1 and {MAX_SHOWN_ROWS}, got {rows}"
    )
    assert names(tmp_path) == []


def test_refuses_other_pictures_and_keeps_existing_ones(fgsm_output, tmp_path):
    result = run("show", fgsm_output, "--out", "grid.jpg", cwd=tmp_path)
    assert error_line(result) == (
        "advgrad: error: grid.jpg: show writes PNG images; give a name ending in .png"
    )
    (tmp_path / "grid.png").write_bytes(b"precious")
    result = run("show", fgsm_output, "--out", "grid.png", cwd=tmp_path)
    assert error_line(result) == "advgrad: error: grid.png: exists; pass --overwrite"
    assert (tmp_path / "grid.png").read_bytes() == b"precious"
    shutil.copy(fgsm_output, tmp_path / "adv.png")  # an output named like a picture
    before = digests(tmp_path / "adv.png")
    result = run("show", "adv.png", "--out", "adv.png", "--overwrite", cwd=tmp_path)
    assert error_line(result) == (
        "advgrad: error: adv.png: is the input file adv.png; choose another output path"
    )
    assert digests(tmp_path / "adv.png") == before
    assert names(tmp_path) == ["adv.png", "grid.png"]


def test_finds_a_moved_data_file_only_when_told(tmp_path):
    made = tmp_path / "made"
    made.mkdir()
    shutil.copy(bundled_path(TEST_DATA), made / "digits.h5")
    result = run("attack", "--data", "digits.h5", "--out", "adv.h5", cwd=made)
    assert result.exit_code == 0, result.output
    assert run("show", "adv.h5", "--rows", 2, cwd=made).exit_code == 0  # found beside it
    moved = tmp_path / "moved.h5"
    (made / "digits.h5").rename(moved)
    (made / "adv.png").unlink()
    result = run("show", "adv.h5", "--rows", 2, cwd=made)
    assert error_line(result) == (
        "advgrad: error: adv.h5: was made from the data file 'digits.h5', which is not beside "
        "it (nor bundled) as it was; pass --data with that file"
    )
    result = run("show", "adv.h5", "--rows", 2, "--data", bundled_path(MODEL), cwd=made)
    assert error_line(result) == (
        f"advgrad: error: {bundled_path(MODEL)}: is not the data file that adv.h5 was made "
        "from (its SHA-256 differs from the recorded data_sha256)"
    )
    assert names(made) == ["adv.h5"]
    result = run("show", "adv.h5", "--rows", 2, "--data", moved, cwd=made)
    assert result.exit_code == 0, result.output
    assert png_size(made / "adv.png") == grid_pixels(2)


def test_refuses_a_dataset_that_is_no_attack_output(tmp_path):
    result = run("show", bundled_path(TEST_DATA), "--out", tmp_path / "grid.png")
    assert error_line(result) == (
        f"advgrad: error: {bundled_path(TEST_DATA)}: has no model_sha256 attribute; show "
        "reads outputs of advgrad attack"
    )


def test_help_explains_every_option_with_an_example():
    result = CliRunner().invoke(app, ["show", "--help"], env={"COLUMNS": "2000"})
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.replace("│", " ").replace("`", "").split())
    assert shown.startswith("Usage: advgrad show [OPTIONS]")
    for words in (
        "Draw some rows of an attack's output: clean image, adversarial image, perturbation.",
        "(a diverging colour scale, symmetric around 0 and shared by every row)",
        "--rows",
        "Rows of the grid, one example each: 1 to 100.",
        "--select",
        "first|successful|confidence-drop",
        "successful (the first ones the attack succeeded on, as its success rate counts them)",
        "--model",
        "The model the attack used, when it is no longer where the output says",
        "--data",
        "The dataset the attack read, when it is no longer where the output says",
        "--out",
        "The PNG to write. Default: <output name>.png in the current directory.",
        "--overwrite",
        "pip install 'advgrad[plot]'",
        "Example: advgrad show digits_test-fgsm-linf-eps0.1.h5 --out grid.png --rows 4 "
        "--select successful",
    ):
        assert words in shown
    assert f"1 to {MAX_SHOWN_ROWS}." in shown
