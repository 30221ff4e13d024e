"""``advgrad.backend`` and ``advgrad.backend_common``: the CPU backend's bound, training and
optimiser methods against the kernels they wrap, and where the shared names live.

The CUDA twins of these methods are compared with these in tests/test_cuda.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import reference
from children import run_python
from conftest import one_hot, random_network

import advgrad
from advgrad import attacks, backend, backend_common, cuda_backend
from advgrad.backend import CpuBackend, get_backend
from advgrad.cuda_backend import CudaBackend
from advgrad.kernels import cpu
from advgrad.model import Model

N_ROWS = cpu.ROWS_PER_BLOCK + 37  # two row blocks, run in parallel
LINE_STEPS = 20


def assert_bitwise_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()


def bound_problem(dtype=np.float32, n_rows=N_ROWS, seed=3):
    """A model of ``dtype``, rows in [0, 1] (one a little outside), their predicted classes
    and radii (the first 0)."""
    rng = np.random.default_rng(seed)
    model = Model(*random_network(rng, 7, 6, 3, dtype, scale=3.0))
    X = rng.random((n_rows, 7))
    X[1, 2] = 1.02  # outside the clip box: the L2 ball is not used there
    classes = reference.forward(X, model.W1, model.b1, model.W2, model.b2)[1].argmax(axis=1)
    eps = rng.random(n_rows) * 0.1
    eps[0] = 0.0
    return model, X, classes.astype(np.int64), eps


def float64_network(model):
    return [np.asarray(w, dtype=np.float64) for w in (model.W1, model.b1, model.W2, model.b2)]


def test_public_names_stay_where_users_import_them():
    from advgrad.backend import (  # noqa: F401
        WORKSPACE_BYTES,
        blas_threads,
        check_workspace,
        get_backend,
        output_rows,
        step_slices,
    )
    from advgrad.cuda_backend import cuda_available, shared_backend  # noqa: F401

    assert backend.output_rows is backend_common.output_rows
    assert backend.check_workspace is backend_common.check_workspace
    assert backend.WORKSPACE_BYTES == backend_common.WORKSPACE_BYTES == 2**30
    assert isinstance(backend.get_backend("cpu"), CpuBackend)


def module_level_imports(module) -> set[str]:
    """The modules a module's top level imports (not those inside its functions)."""
    tree = ast.parse(Path(module.__file__).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_backends_do_not_import_each_other():
    """The CUDA backend takes the shared helpers from ``backend_common``, which imports
    neither backend; ``backend`` imports the CUDA backend only inside ``get_backend``."""
    assert "advgrad.backend" not in module_level_imports(cuda_backend)
    assert "advgrad.cuda_backend" not in module_level_imports(backend)
    shared = module_level_imports(backend_common)
    assert not shared & {"advgrad.backend", "advgrad.cuda_backend", "numba"}
    assert {"advgrad.backend_common"} <= module_level_imports(cuda_backend)


@pytest.mark.parametrize("p", [np.inf, 2.0])
@pytest.mark.parametrize("crown", [False, True])
def test_margin_bounds_are_the_kernel_bitwise(p, crown):
    model, X, classes, eps = bound_problem()
    worst = CpuBackend().margin_bounds(model, X, classes, eps, p, 0.0, 1.0, crown, LINE_STEPS)
    expected = np.empty(len(X))
    cpu.margin_bounds_into(
        *(X, classes, eps, p, 0.0, 1.0, *float64_network(model), crown, LINE_STEPS, expected)
    )
    assert_bitwise_equal(worst, expected)
    assert (worst <= reference.worst_margin(X, classes, *float64_network(model))).all()
    assert (worst[:1] > 0.0).all()  # eps = 0 at the row's own prediction: certified


@pytest.mark.parametrize("p", [np.inf, 2.0])
def test_certified_radius_is_the_kernel_bitwise(p):
    model, X, classes, _ = bound_problem()
    grid = np.array([0.0, 0.01, 0.05, 0.2])
    radius, certified = CpuBackend().certified_radius(
        model, X, classes, grid, p, 0.0, 1.0, True, LINE_STEPS, 1e-4
    )
    expected_radius = np.empty(len(X))
    expected_certified = np.empty((len(X), len(grid)), dtype=np.bool_)
    cpu.certified_radius_into(
        *(X, classes, grid, p, 0.0, 1.0, *float64_network(model), True, LINE_STEPS, 1e-4),
        *(expected_radius, expected_certified),
    )
    assert_bitwise_equal(radius, expected_radius)
    assert_bitwise_equal(certified, expected_certified)
    assert (~np.isin(radius, grid)).any()  # some rows are bisected between grid values
    np.testing.assert_array_equal(certified, radius[:, None] >= grid[None, :])


def test_bound_methods_refuse_a_network_past_the_workspace(monkeypatch):
    model, X, classes, eps = bound_problem(n_rows=3)
    monkeypatch.setattr(backend_common, "WORKSPACE_BYTES", 1000)
    message = (
        r"^certification needs \d+ bytes of scratch per block for this network, more than "
        r"the 1000 allowed \(advgrad\.backend\.WORKSPACE_BYTES\)$"
    )
    with pytest.raises(ValueError, match=message):
        CpuBackend().margin_bounds(model, X, classes, eps, np.inf, 0.0, 1.0, True, LINE_STEPS)
    with pytest.raises(ValueError, match=message):
        CpuBackend().certified_radius(
            model, X, classes, np.array([0.1]), np.inf, 0.0, 1.0, True, LINE_STEPS, 1e-3
        )


def training_problem(dtype, n_rows=N_ROWS, seed=5):
    rng = np.random.default_rng(seed)
    network = random_network(rng, 9, 8, 4, dtype, scale=2.0)
    X = rng.random((n_rows, 9)).astype(dtype)
    Y = one_hot(rng.integers(0, 4, n_rows), 4, dtype)
    return network, X, Y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("adv_weight", [0.0, 0.4])
def test_parameter_gradient_is_the_kernel_bitwise(dtype, adv_weight):
    network, X, Y = training_problem(dtype)
    settings = (0.6, adv_weight, 0.05, 0.0, 1.0)
    start = [np.full_like(w, 0.25) for w in network]  # the gradient is added to these
    gradient = [g.copy() for g in start]
    CpuBackend().parameter_gradient(network, X, Y, *settings, gradient)
    expected = [g.copy() for g in start]
    cpu.parameter_gradient_into(X, *network, Y, *settings, *expected)
    for actual, wanted in zip(gradient, expected, strict=True):
        assert_bitwise_equal(actual, wanted)


def test_parameter_gradient_matches_the_reference_and_finite_differences():
    """The clean gradient is the reference's; with the FGSM pass, a central difference of
    the whole objective (X' held fixed where no sign of dJ/dX flips, as here)."""
    network, X, Y = training_problem(np.float64, n_rows=6)
    gradient = [np.zeros_like(w) for w in network]
    CpuBackend().parameter_gradient(network, X, Y, 1.0, 0.0, 0.0, 0.0, 1.0, gradient)
    for actual, wanted in zip(gradient, reference.parameter_gradient(X, *network, Y), strict=True):
        np.testing.assert_allclose(actual, wanted, rtol=1e-12, atol=1e-12)

    eps, x_min, x_max = 0.05, 0.0, 1.0

    def objective(weights):
        G = reference.input_gradient(X, *weights, Y)
        assert np.abs(G).min() > 1e-9 * np.abs(G).max()  # no sign within rounding of 0
        X_adv = np.clip(X + eps * np.sign(G), x_min, x_max)
        clean, adversarial = reference.loss(X, *weights, Y), reference.loss(X_adv, *weights, Y)
        return 0.7 * clean.sum() + 0.3 * adversarial.sum()

    gradient = [np.zeros_like(w) for w in network]
    CpuBackend().parameter_gradient(network, X, Y, 0.7, 0.3, eps, x_min, x_max, gradient)
    h = 1e-6
    for which, (weights, grad) in enumerate(zip(network, gradient, strict=True)):
        for index in [(0,) * weights.ndim, tuple(s - 1 for s in weights.shape)]:
            shifted = [[w.copy() for w in network] for _ in range(2)]
            shifted[0][which][index] += h
            shifted[1][which][index] -= h
            difference = (objective(shifted[0]) - objective(shifted[1])) / (2 * h)
            np.testing.assert_allclose(grad[index], difference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend_type", [CpuBackend, CudaBackend])
def test_optimiser_updates_are_the_kernels_bitwise(backend_type):
    """Both backends update host parameters with the CPU kernels (no GPU needed)."""
    rng = np.random.default_rng(7)
    theta, grad, m, v = (rng.normal(size=50) for _ in range(4))
    v = np.abs(v)
    ours, theirs = [a.copy() for a in (theta, m, v)], [a.copy() for a in (theta, m, v)]
    adam = (3, 0.01, 0.9, 0.999, 1e-8, 0.1, 30)
    backend_type.adam_update(ours[0], grad, ours[1], ours[2], *adam)
    cpu.adam_update(theirs[0], grad, theirs[1], theirs[2], *adam)
    for actual, wanted in zip(ours, theirs, strict=True):
        assert_bitwise_equal(actual, wanted)
    assert not np.array_equal(ours[0], theta)
    ours, theirs = [a.copy() for a in (theta, m)], [a.copy() for a in (theta, m)]
    backend_type.momentum_update(ours[0], grad, ours[1], 0.01, 0.9, 0.1, 30)
    cpu.momentum_update(theirs[0], grad, theirs[1], 0.01, 0.9, 0.1, 30)
    for actual, wanted in zip(ours, theirs, strict=True):
        assert_bitwise_equal(actual, wanted)


def test_get_backend_refuses_an_unknown_device():
    expected = r"^unknown device 'tpu'; expected one of cpu, cuda, auto$"
    with pytest.raises(ValueError, match=expected):
        advgrad.backend.get_backend("tpu")


def test_backend_output_arrays_are_checked(digits_model, digits_test):
    rows = attacks.as_rows(digits_model, digits_test[0][:10])
    Y = attacks.label_matrix(digits_model, None, len(rows))
    backend = get_backend("cpu")
    G, _ = backend.input_gradient(digits_model, rows, Y)
    expected = backend.fgm_from_gradient(rows, G, 0.1, np.inf, 0.0, 1.0)
    out = np.empty_like(rows)
    assert backend.fgm_from_gradient(rows, G, 0.1, np.inf, 0.0, 1.0, out=out) is out
    np.testing.assert_array_equal(out, expected)
    wide = np.empty((len(rows), 2 * rows.shape[1]), rows.dtype)
    for bad in (out[:5], out.astype(np.float64), wide[:, ::2]):
        with pytest.raises(ValueError, match="out must be a C-contiguous"):
            backend.fgm_step(digits_model, rows, Y, 0.1, np.inf, 0.0, 1.0, out=bad)
    with pytest.raises(ValueError, match="out must not overlap the input rows"):
        backend.fgm_step(digits_model, rows, Y, 0.1, np.inf, 0.0, 1.0, out=rows)


@pytest.mark.parametrize("n_rows", [0, 1, 256, 300, 512, 513, 1000, 5000])
def test_small_calls_run_block_by_block_bitwise_as_the_parallel_kernels(n_rows):
    rng = np.random.default_rng(n_rows)
    model = Model(*random_network(rng, 30, 12, 4, dtype=np.float32))
    X = rng.random((n_rows, 30), dtype=np.float32)
    Y = one_hot(rng.integers(0, 4, n_rows), 4).astype(np.float32)
    network = (model.W1, model.b1, model.W2, model.b2)
    for labels in (Y, Y[:0]):
        X_adv, predicted = CpuBackend().fgm_step(model, X, labels, 0.1, np.inf, 0.0, 1.0)
        expected = np.empty_like(X), np.empty(n_rows, dtype=np.int64)
        cpu.fgm_step_into(X, *network, labels, 0.1, np.inf, 0.0, 1.0, *expected)
        np.testing.assert_array_equal(X_adv, expected[0])
        np.testing.assert_array_equal(predicted, expected[1])
        P, losses, predicted = CpuBackend().forward(model, X, labels)
        A = np.empty((n_rows, 12), np.float32)
        expected = np.empty_like(P), np.empty_like(losses), np.empty_like(predicted)
        cpu.forward_into(X, *network, labels, A, *expected)
        for got, want in zip((P, losses, predicted), expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_an_attack_on_the_bundled_test_set_compiles_no_parallel_kernel(tmp_path):
    code = """
        import numpy as np
        import advgrad
        from advgrad.bundled import MODEL, bundled_path
        from advgrad.kernels import cpu
        model = advgrad.load_model(bundled_path(MODEL))
        X = np.random.default_rng(0).random((450, 64), np.float32)  # the bundled test set's size
        advgrad.predict(model, advgrad.fgsm(model, X, eps=0.1))
        print(len(cpu.fgm_step_into.signatures), len(cpu.forward_into.signatures))
        print(len(cpu.fgm_block.signatures) > 0, len(cpu.forward_block.signatures) > 0)
    """
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "0", "True", "True"]


def loss_problem(n_rows, dtype=np.float32, C=5, seed=12):
    """A model with C classes, rows, true labels and target classes."""
    rng = np.random.default_rng(seed)
    model = Model(*random_network(rng, 11, 7, C, dtype, scale=2.0))
    X = rng.random((n_rows, 11)).astype(dtype)
    labels = rng.integers(0, C, n_rows)
    return model, X, labels, (labels + 1) % C


def test_losses_are_in_the_order_of_the_kernels_codes():
    assert backend.LOSSES is backend_common.LOSSES
    codes = [cpu.LOSS_CE, cpu.LOSS_DLR, cpu.LOSS_DLR_TARGETED, cpu.LOSS_CW]
    codes.append(cpu.LOSS_LOGIT_DIFFERENCE)
    names = ("ce", "dlr", "dlr-targeted", "cw", "logit-difference")
    assert [backend_common.LOSSES.index(name) for name in names] == codes


@pytest.mark.parametrize("n_rows", [0, 1, 255, 257, 513, 1000])
@pytest.mark.parametrize(
    ("loss", "targeted", "kappa"),
    [("ce", False, 0.0), ("dlr", False, 0.0), ("dlr-targeted", True, 0.0), ("cw", True, 0.5)],
)
def test_loss_gradient_and_logits_are_the_kernels_bitwise(n_rows, loss, targeted, kappa):
    """Small calls block by block, large ones in parallel: bitwise the kernels' results."""
    model, X, labels, targets = loss_problem(n_rows, seed=n_rows)
    network = (model.W1, model.b1, model.W2, model.b2)
    targets = targets.astype(np.int32) if targeted else None  # any integer type
    G, values, predicted = CpuBackend().loss_gradient(
        model, X, labels, loss, targets=targets, kappa=kappa
    )
    chosen = labels[:0] if targets is None else targets.astype(np.int64)
    code = backend_common.LOSSES.index(loss)
    expected = cpu.loss_gradient(X, *network, labels, chosen, code, kappa)
    for got, want in zip((G, values, predicted), expected, strict=True):
        assert_bitwise_equal(got, want)
    assert_bitwise_equal(CpuBackend().logits(model, X), cpu.logits(X, *network))


def test_loss_gradient_of_ce_is_the_input_gradient_bitwise():
    model, X, labels, _ = loss_problem(700)
    G, values, predicted = CpuBackend().loss_gradient(model, X, labels, "ce")
    expected_G, expected_predicted = CpuBackend().input_gradient(
        model, X, one_hot(labels, 5, np.float32)
    )
    assert_bitwise_equal(G, expected_G)
    assert_bitwise_equal(predicted, expected_predicted)
    np.testing.assert_allclose(
        values, reference.loss_value(X, *float64_network(model), labels, "ce"), rtol=1e-5
    )


@pytest.mark.parametrize(
    ("C", "loss", "labels", "targets", "kappa", "message"),
    [
        (
            5,
            "hinge",
            [0, 1],
            None,
            0.0,
            "unknown loss 'hinge'; expected one of ce, dlr, dlr-targeted, cw, logit-difference",
        ),
        (2, "dlr", [0, 1], None, 0.0, "the dlr loss needs at least 3 classes, the model has 2"),
        (
            3,
            "dlr-targeted",
            [0, 1],
            [1, 2],
            0.0,
            "the dlr-targeted loss needs at least 4 classes, the model has 3",
        ),
        (
            5,
            "dlr-targeted",
            [0, 1],
            None,
            0.0,
            "the dlr-targeted loss needs targets, the target class of each row",
        ),
        (
            5,
            "logit-difference",
            [0, 1],
            None,
            0.0,
            "the logit-difference loss needs targets, the target class of each row",
        ),
        (
            5,
            "ce",
            [0, 1],
            [1, 2],
            0.0,
            "the ce loss takes no targets (targeted: dlr-targeted, cw or logit-difference)",
        ),
        (
            5,
            "dlr",
            [0, 1],
            [1, 2],
            0.0,
            "the dlr loss takes no targets (targeted: dlr-targeted, cw or logit-difference)",
        ),
        (5, "cw", [0, 5], None, 0.0, "labels must be classes in [0, 5), got 5 at row 1"),
        (5, "cw", [-1, 0], None, 0.0, "labels must be classes in [0, 5), got -1 at row 0"),
        (5, "cw", [0, 1], [0, 7], 0.0, "targets must be classes in [0, 5), got 7 at row 1"),
        (
            5,
            "ce",
            [0, 1, 2],
            None,
            0.0,
            "labels must be one integer class per row, shape (2,), got shape (3,) of int64",
        ),
        (
            5,
            "ce",
            [0.0, 1.0],
            None,
            0.0,
            "labels must be one integer class per row, shape (2,), got shape (2,) of float64",
        ),
        (
            5,
            "cw",
            [0, 1],
            [[1, 2]],
            0.0,
            "targets must be one integer class per row, shape (2,), got shape (1, 2) of int64",
        ),
        (5, "cw", [0, 1], None, np.nan, "kappa must be a number, got nan"),
    ],
)
def test_loss_gradient_refuses_bad_arguments_in_one_line(C, loss, labels, targets, kappa, message):
    model, X, _, _ = loss_problem(2, C=C)
    targets = None if targets is None else np.array(targets)
    with pytest.raises(ValueError) as caught:
        CpuBackend().loss_gradient(model, X, np.array(labels), loss, targets=targets, kappa=kappa)
    assert str(caught.value) == message
