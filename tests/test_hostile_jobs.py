"""Hostile arguments and contents against the jobs (issue 15, classes 2, 4 and 6).

Every search ends (an iteration bound; a tolerance below the float spacing, a non-finite radius
or one beyond the compute dtype refused up front); no job writes a non-finite row; a dataset of 0
rows is legitimate and its undefined report fields are None; labels and counts cannot make a
job allocate without bound; a block's working memory is bounded for wide networks.

Library-level tests assert the refusal and the fields; end-to-end tests run ``python -m advgrad``
in a subprocess with a timeout and assert the exit code, exactly one stderr line, no traceback,
inputs byte-for-byte unchanged and nothing left behind. Memory bounds run under ``ulimit -v``.
The checks of one module's own arguments (Attack's settings and radii, the minimal-eps
search's bounds, certify's finest tolerance, TrainConfig's bounds) are in test_attacks,
test_certify and test_train.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from children import refusal_line, run_advgrad, run_python, snapshot
from conftest import random_network

import advgrad
from advgrad import attacks
from advgrad.attacks import MAX_COUNT, Attack
from advgrad.bundled import MODEL, bundled_path
from advgrad.certify import certify
from advgrad.errors import InputFileError
from advgrad.evaluate import evaluate
from advgrad.jobs import NonFiniteResult, attack_file
from advgrad.jobs.certify import certify_file
from advgrad.jobs.evaluate import evaluate_file
from advgrad.jobs.inputs import BLOCK_WORKING_BYTES, rows_per_block
from advgrad.jobs.train import train_file
from advgrad.kernels.cpu import ROWS_PER_BLOCK
from advgrad.model import MAX_WEIGHTS, Model
from advgrad.train import TrainConfig, train

# --------------------------------------------------------------------------- helpers


def assert_refused(cwd: Path, args, *words: str) -> None:
    """``advgrad *args`` exits 1 with one stderr line holding ``words``, no traceback, and
    leaves every file in ``cwd`` as it was, adding none."""
    before = snapshot(cwd)
    refusal_line(run_advgrad(*args, cwd=cwd), *words)
    assert snapshot(cwd) == before


def assert_succeeds(cwd: Path, args, output: str) -> None:
    """``advgrad *args`` exits 0 with an empty stderr, leaves every input as it was and adds
    exactly ``output``."""
    before = snapshot(cwd)
    result = run_advgrad(*args, cwd=cwd)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
    after = snapshot(cwd)
    assert set(after) == {*before, output}
    assert {name: after[name] for name in before} == before


def write_data(path: Path, X: np.ndarray, y: np.ndarray | None = None, **attrs) -> Path:
    with h5py.File(path, "w") as f:
        f["X"] = X
        if y is not None:
            f["y"] = y
        f.attrs.update(attrs)
    return path


@pytest.fixture
def files(tmp_path, digits_test) -> Path:
    """model.h5 (the bundled digits network), data.h5 (8 labelled rows in [0, 1]) and
    empty.h5 (0 labelled rows) in ``tmp_path``."""
    (tmp_path / "model.h5").write_bytes(bundled_path(MODEL).read_bytes())
    X, y = digits_test
    write_data(tmp_path / "data.h5", X[:8], y[:8], x_min=0.0, x_max=1.0)
    write_data(tmp_path / "empty.h5", X[:0], y[:0], x_min=0.0, x_max=1.0)
    return tmp_path


@pytest.fixture
def overflowing(tmp_path) -> Path:
    """A model and data whose row 2 an FGSM step of eps 3e38 takes past float32's range, and
    some of rows 3 to 11 a PGD start too (W1's first row is tiny, so X[2:, 0] of 1e38 and
    3e38 do not saturate the sigmoids, and the gradient there is not 0)."""
    W1 = np.array([[1e-38, -1e-38, 2e-38], [1.0, -2.0, 0.5]], np.float32)
    b1 = np.array([0.1, -0.2, 0.3], np.float32)
    W2 = np.array([[1.0, -1.0], [-2.0, 1.0], [0.5, 2.0]], np.float32)
    advgrad.save_model(Model(W1, b1, W2, np.zeros(2, np.float32)), tmp_path / "model.h5")
    X = np.full((12, 2), 0.5, np.float32)
    X[2, 0], X[3:, 0] = 1e38, 3e38
    write_data(tmp_path / "data.h5", X, np.zeros(12, np.int64))
    return tmp_path


# --------------------------------------------------------------------------- class 6: searches end


def test_radii_beyond_the_compute_dtype_are_refused(digits_model, digits_test, tmp_path):
    X, y = digits_test
    float32_range = r"at most 3.403e\+38 in float32"
    with pytest.raises(ValueError, match=f"eps must be >= 0 and finite \\({float32_range}"):
        advgrad.fgsm(digits_model, X[:2], eps=1e39)
    with pytest.raises(ValueError, match=f"step size .*{float32_range}"):
        attacks.pgd(digits_model, X[:2], eps=2e38, steps=1)  # step 2.5 eps
    with pytest.raises(ValueError, match=f"eps must be .*{float32_range}"):
        evaluate(digits_model, X[:4], y[:4], eps_values=[0.1, 1e39])
    with pytest.raises(ValueError, match="eps must be >= 0 and finite"):
        evaluate(digits_model, X[:4], y[:4], eps_values=[np.inf])
    with pytest.raises(ValueError, match=f"eps must be .*{float32_range}"):
        certify(digits_model, X[:4], y[:4], eps_values=(1e39,))
    with pytest.raises(ValueError, match=f"the default eps_max .*{float32_range}"):
        certify(digits_model, X[:4], y[:4], eps_values=(1e38,), clip=None)
    with pytest.raises(ValueError, match="eps_max must be >= 0 and finite"):
        certify(digits_model, X[:4], y[:4], eps_max=np.inf)
    with pytest.raises(ValueError, match="tolerance must be finite and at least"):
        certify(digits_model, X[:4], y[:4], tolerance=1e-20)
    with pytest.raises(ValueError, match=r"min_eps_tolerance .*must be finite and at least"):
        evaluate(digits_model, X[:4], y[:4], eps_values=[0.1], min_eps_tolerance=1e-20)
    with pytest.raises(ValueError, match=r"adv_eps must be .*float32"):
        TrainConfig(adv_eps=1e39)


def test_a_non_finite_row_is_never_written(overflowing):
    before = snapshot(overflowing)
    model, data, out = overflowing / "model.h5", overflowing / "data.h5", overflowing / "out.h5"
    with pytest.raises(NonFiniteResult, match="the attack made row 2 non-finite"):
        attack_file(model, data, out, Attack("fgsm", eps=3e38))
    with pytest.raises(NonFiniteResult, match="the attack made row 6 non-finite"):
        certify_file(
            *(model, data, out),
            eps_values=(3e38,),
            eps_max=3e38,
            tolerance=1e23,
            attack=Attack("pgd", steps=1, step_size=3e38),
            use_labels=False,
        )
    assert snapshot(overflowing) == before
    X_adv = advgrad.fgsm(
        advgrad.load_model(model), advgrad.load_dataset(data)[0], eps=3e38, clip=None
    )
    assert np.isinf(X_adv[2]).any()  # the library returns what the arithmetic gives


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ("attack", "--min-eps", "1e-20"),
            ["min_eps_tolerance (--min-eps) must be finite and at least 2.22e-16"],
        ),
        (
            ("attack", "--min-eps", "0.01", "--eps-max", "inf"),
            ["eps_max (--eps-max) must be >= 0 and finite"],
        ),
        (("attack", "--eps-max", "inf"), ["eps_max (--eps-max) must be >= 0 and finite"]),
        (("attack", "--eps", "1e39"), ["eps must be >= 0 and finite", "float32"]),
        (("evaluate", "--eps", "inf"), ["eps must be >= 0 and finite"]),
        (("evaluate", "--eps", "0.1", "--min-eps", "1e-20"), ["must be finite and at least"]),
        (("certify", "--tolerance", "1e-20"), ["tolerance must be finite and at least"]),
        (("certify", "--eps", "1e39"), ["eps must be >= 0 and finite", "float32"]),
    ],
)
def test_cli_refuses_endless_searches_in_time(files, args, words):
    command, *options = args
    out = ["--out", "out.h5"] if command != "evaluate" else []
    assert_refused(
        files, [command, "--model", "model.h5", "--data", "data.h5", *out, *options], *words
    )


def test_cli_refuses_a_non_finite_row_and_writes_nothing(overflowing):
    args = ["attack", "--model", "model.h5", "--data", "data.h5", "--out", "out.h5"]
    assert_refused(overflowing, [*args, "--eps", "3e38"], "out.h5", "row 2 non-finite")


# --------------------------------------------------------------------------- class 2: 0 rows


def test_a_dataset_of_0_rows_gives_none_for_undefined_fields(files):
    model, empty = files / "model.h5", files / "empty.h5"
    report = attack_file(model, empty, files / "a.h5", Attack("pgd"), min_eps_tolerance=0.01)
    assert report.n_rows == 0
    assert report.eps_min is None  # searched, but over no rows
    undefined = ("clean_accuracy", "adversarial_accuracy", "success_rate", "mean_linf", "mean_l2")
    assert [getattr(report, name) for name in undefined] == [None] * 5
    with h5py.File(files / "a.h5", "r") as f:
        assert f.attrs["complete"]
        assert f["X"].shape == (0, 8, 8)

    evaluation = evaluate_file(model, empty, methods=("fgsm", "deepfool"))
    assert evaluation.clean_accuracy is None
    assert {point.accuracy for point in evaluation.points} == {None}
    assert len(evaluation.minimal_eps) == 2
    for summary in evaluation.minimal_eps:
        assert (summary.q25, summary.median, summary.q75, summary.found) == (None,) * 4
    assert '"clean_accuracy": null' in evaluation.to_json()
    in_memory = evaluate(advgrad.load_model(model), np.zeros((0, 64)), np.zeros(0, np.int64))
    assert in_memory.clean_accuracy is None
    assert {summary.median for summary in in_memory.minimal_eps} == {None}

    result = certify_file(model, empty, files / "c.h5", eps_values=(0.01, 0.05))
    assert result.n_rows == 0
    assert result.clean_accuracy is None
    assert result.certified_accuracy == (None, None)
    assert result.robust_accuracy == (None, None)
    assert result.seconds_per_row is None
    assert result.bracket() is None


@pytest.mark.parametrize(
    ("args", "output"),
    [
        (("attack", "--out", "o.h5"), "o.h5"),
        (("attack", "--out", "o.h5", "--min-eps", "0.01"), "o.h5"),
        (("certify", "--out", "o.h5"), "o.h5"),
        (("evaluate", "--json", "o.json"), "o.json"),
    ],
)
def test_cli_accepts_a_dataset_of_0_rows(files, args, output):
    command, *options = args
    assert_succeeds(files, [command, "--model", "model.h5", "--data", "empty.h5", *options], output)


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_train_never_writes_onto_its_input(files, link):
    out = files / "link.h5"
    if link == "hard":
        out.hardlink_to(files / "data.h5")
    else:
        out.symlink_to("data.h5")
    before = snapshot(files)
    for data, test in ((files / "data.h5", None), (files / "empty.h5", files / "data.h5")):
        with pytest.raises(InputFileError, match=re.escape("link.h5: is the input file")):
            train_file(data, out, TrainConfig(epochs=1), test_path=test, overwrite=True)
    assert snapshot(files) == before
    args = ["train", "--data", "data.h5", "--out", "link.h5", "--overwrite", "--epochs", "1"]
    assert_refused(files, args, "link.h5: is the input file")


def test_a_failed_train_leaves_nothing_behind(files):
    # the model file (64 x 4096 float32 weights, 1 MiB) does not fit under the file size limit
    code = """
        from advgrad.errors import InputFileError
        from advgrad.jobs.train import train_file
        from advgrad.train import TrainConfig
        try:
            train_file("data.h5", "m.h5", TrainConfig(epochs=1, hidden=4096))
        except InputFileError as error:
            print(error)
    """
    before = snapshot(files)
    result = run_python(code, files, limits="ulimit -f 512;")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("m.h5: cannot write: File too large"), result.stdout
    assert snapshot(files) == before


def test_train_refuses_0_rows(files):
    with pytest.raises(ValueError, match=r"X has no rows \(shape \(0, 64\)\)"):
        train(np.zeros((0, 64)), np.zeros(0, np.int64))
    with pytest.raises(InputFileError, match=re.escape("empty.h5:/X: has no rows")):
        train_file(files / "empty.h5", files / "m.h5")
    assert_refused(
        files,
        ["train", "--data", "empty.h5", "--out", "m.h5"],
        "empty.h5:/X: has no rows; training needs at least one",
    )


def test_an_empty_test_set_has_no_accuracy(files, tmp_path):
    report = train_file(
        files / "data.h5",
        tmp_path / "m.h5",
        TrainConfig(epochs=1, hidden=4, validation_fraction=0.0),
        test_path=files / "empty.h5",
    )
    assert (report.test_rows, report.test_accuracy) == (0, None)
    assert "test_accuracy" not in advgrad.load_model(tmp_path / "m.h5").metadata


def test_a_huge_label_is_refused_before_allocating(files):
    X = np.zeros((3, 64), np.float32)
    huge = np.array([0, 2**40, 1])
    message = "label 1099511627776 in row 1 makes 1099511627777 classes: W2 would have 64 x"
    with pytest.raises(ValueError, match=message):
        train(X, huge)
    hidden = MAX_WEIGHTS // 64 + 1
    with pytest.raises(ValueError, match=f"W1 would have 64 x {hidden}"):
        train(X, np.array([0, 1, 1]), TrainConfig(hidden=hidden))
    config = TrainConfig(epochs=1, hidden=2)
    assert train(X, np.array([0, 5, 1]), config, max_weights=128).model.n_classes == 6
    with pytest.raises(ValueError, match="W2 would have 2 x 6 = 12 weights, more than max_weig"):
        train(X[:, :2], np.array([0, 5, 1]), config, max_weights=11)
    write_data(files / "huge.h5", X, huge)
    with pytest.raises(InputFileError, match=f"huge.h5:/y: {message}"):
        train_file(files / "huge.h5", files / "m.h5")
    assert_refused(
        files, ["train", "--data", "huge.h5", "--out", "m.h5"], "huge.h5:/y: label 1099511627776"
    )


def test_a_label_is_refused_under_a_memory_limit(tmp_path):
    # label 2**22 with 64 hidden units: W2 alone takes 1 GiB, its optimizer state 3 more
    code = """
        import numpy as np
        from advgrad.train import TrainConfig, train
        try:
            train(np.zeros((3, 8), np.float32), np.array([0, 2**22, 1]), TrainConfig(epochs=1))
        except ValueError as error:
            print(error)
    """
    result = run_python(code, tmp_path, limits="ulimit -v 1500000;")
    assert result.returncode == 0, result.stderr
    assert "label 4194304 in row 1 makes 4194305 classes" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_largest_accepted_settings_are_stored(files):
    attack = Attack("pgd", steps=1, restarts=1, seed=2**63 - 1)
    attack_file(files / "model.h5", files / "data.h5", files / "o.h5", attack)
    with h5py.File(files / "o.h5", "r") as f:
        assert f.attrs["seed"] == 2**63 - 1
    assert Attack("pgd", steps=MAX_COUNT).steps == MAX_COUNT


@pytest.mark.parametrize(
    "args",
    [
        ("attack", "--out", "o.h5", "--seed", str(2**64)),
        ("attack", "--out", "o.h5", "--method", "pgd", "--steps", str(2**64)),
        ("certify", "--out", "o.h5", "--restarts", str(2**64)),
    ],
)
def test_cli_refuses_huge_counts_in_one_line(files, args):
    command, *options = args
    name = options[-2].removeprefix("--")
    assert_refused(files, [command, "--model", "model.h5", "--data", "data.h5", *options], name)


def test_cli_train_refuses_a_huge_seed(files):
    assert_refused(
        files, ["train", "--data", "data.h5", "--out", "m.h5", "--seed", str(2**64)], "seed must"
    )


# --------------------------------------------------------------------------- memory per block


def wide_model(H: int, d: int = 4, C: int = 2) -> Model:
    return Model(*random_network(np.random.default_rng(3), d, H, C, np.float32))


def test_wide_networks_get_fewer_rows_per_block():
    narrow = wide_model(64)
    assert rows_per_block(8192, narrow) == 8192
    assert rows_per_block(1000, narrow) == 1024
    for H in (2**16, 2**18, 2**20):
        model = wide_model(H)
        rows = rows_per_block(8192, model)
        assert rows % ROWS_PER_BLOCK == 0
        row_bytes = (model.n_inputs + H + model.n_classes) * 4
        assert rows * row_bytes <= BLOCK_WORKING_BYTES or rows == ROWS_PER_BLOCK
        assert rows < 8192
        assert rows_per_block(2**40, model) == rows  # a huge batch size is capped too


def test_capped_blocks_give_the_same_output(tmp_path, monkeypatch):
    model = wide_model(600)
    advgrad.save_model(model, tmp_path / "model.h5")
    X = np.random.default_rng(4).random((1100, 4)).astype(np.float32)
    write_data(tmp_path / "data.h5", X, x_min=0.0, x_max=1.0)
    attack = Attack("pgd", eps=0.3, steps=3, restarts=2)
    arguments = (tmp_path / "model.h5", tmp_path / "data.h5")
    attack_file(*arguments, tmp_path / "whole.h5", attack, batch_size=2048)
    monkeypatch.setattr(advgrad.jobs.inputs, "BLOCK_WORKING_BYTES", 512 * 606 * 4)
    assert rows_per_block(2048, model) == 512
    attack_file(*arguments, tmp_path / "capped.h5", attack, batch_size=2048)
    with h5py.File(tmp_path / "whole.h5") as whole, h5py.File(tmp_path / "capped.h5") as capped:
        for name in ("X", "pred_clean", "pred_adv"):
            np.testing.assert_array_equal(whole[name][...], capped[name][...])


def test_a_wide_network_attacks_within_a_memory_limit(tmp_path):
    # H = 2**15: blocks of 8192 rows would hold 1 GiB of hidden activations; capped at
    # 256 rows (a 32 MiB bound) they hold 32 MiB
    code = f"""
        import numpy as np, h5py, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import random_network
        import advgrad, advgrad.jobs, advgrad.jobs.inputs
        from advgrad.model import Model
        rng = np.random.default_rng(5)
        advgrad.save_model(Model(*random_network(rng, 4, 2**15, 2, np.float32)), "m.h5")
        with h5py.File("d.h5", "w") as f:
            f["X"] = rng.random((8192, 4)).astype(np.float32)
        advgrad.jobs.inputs.BLOCK_WORKING_BYTES = 2**25
        report = advgrad.jobs.attack_file("m.h5", "d.h5", "o.h5", batch_size=8192)
        print(report.n_rows)
    """
    result = run_python(code, tmp_path, limits="ulimit -v 1500000;")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["8192"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5", "m.h5", "o.h5"]


def test_bound_workspace_bytes_is_what_the_bound_kernels_allocate():
    from advgrad.backend import bound_workspace_bytes
    from advgrad.kernels import cpu

    rng = np.random.default_rng(3)
    model = Model(*random_network(rng, 7, 5, 3))
    work = cpu.bound_workspace(cpu.ROWS_PER_BLOCK, model.W1, model.W2)
    assert bound_workspace_bytes(model) == sum(array.nbytes for array in work)


@pytest.mark.parametrize(
    ("shape", "command"),
    [
        ((64, 2**17, 10), ["certify", "--eps", "0.1"]),
        ((2**15, 1, 2**14), ["certify", "--eps", "0.1"]),
        ((2**15, 1, 2**14), ["attack", "--method", "deepfool"]),
    ],
)
def test_networks_whose_kernel_scratch_is_unbounded_are_refused_up_front(tmp_path, shape, command):
    # the file stores zeros (a few KB of gzip); certify would need C x (H + d) float64 per row
    # of a 256-row block, DeepFool a (d, C) Jacobian per thread
    d, H, C = shape
    model = tmp_path / "wide.h5"
    with h5py.File(model, "w") as f:
        f.attrs["advgrad_format"] = "two-layer-sigmoid"
        f.attrs["format_version"] = 1
        for name, array_shape in (("W1", (d, H)), ("b1", (H,)), ("W2", (H, C)), ("b2", (C,))):
            f.create_dataset(name, shape=array_shape, dtype="f4", compression="gzip", chunks=True)
            f[name][...] = 0
    data = tmp_path / "data.h5"
    with h5py.File(data, "w") as f:
        f["X"] = np.zeros((4, d), np.float32)
        f["y"] = np.zeros(4, np.int64)
    before = snapshot(tmp_path)
    result = run_advgrad(*command, "--model", model, "--data", data, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "bytes of scratch per block" in result.stderr
    assert snapshot(tmp_path) == before
