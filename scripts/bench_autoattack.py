"""AutoAttack in advgrad against torchattacks' on the same networks: strength and speed.

For each case (the bundled digits network on its 450 test rows; random (784, 256, 10)
networks on rows uniform in [0, 1], 28 x 28 images) and each norm and radius, it runs
advgrad's AutoAttack (``advgrad.autoattack.auto_attack``, version standard) and
torchattacks' ``AutoAttack(version="standard")`` on the equivalent torch module
(``advgrad.interop.to_torch``, float32, labels = the dataset's labels, inputs as images
(N, 1, h, w) in [0, 1]), and prints the robust accuracy after each attack of the ensemble
and at its end, side by side, and the difference (advgrad minus torchattacks, in points:
the issue asks it never to exceed 0.5). The torchattacks side runs its four attacks in
turn on the rows still correct, as its ``MultiAttack`` does, to read the accuracy between them.

Settings. torchattacks 3.5's "standard" runs APGD, APGD-T and FAB for 10 steps (its
classes' default), where the reference (fra31/auto-attack) and advgrad run 100; Square
runs 5000 queries in both. The speed section therefore times advgrad twice: with the
reference's settings (its default) and with torchattacks' (``steps=10``), the same work
as torchattacks does.

Speed: the seconds of each attack of the ensemble and of the whole, for advgrad (each
attack on the rows still correct, as the ensemble runs them) and torchattacks, on the
bundled digits (L-inf 0.1) and on --large-rows rows of a random (784, 256, 10) network
(L-inf 0.02, where no attack breaks a row, so that every attack runs on every row), with
torch on every core; and the whole command ``advgrad evaluate --method autoattack`` on the
digits (a subprocess, Python's start included, the kernels already compiled). Each is timed
once (these runs take minutes).

Seeds (``--seeds K``): each attack of the ensemble alone on every digits row, advgrad's
(the reference's settings) and torchattacks' own class (its AutoAttack's settings), from
seeds 0 to K - 1: the mean robust accuracy and its range, as one run's is a draw.

torch and torchattacks are not dependencies of advgrad; without them only advgrad's side
runs::

    /path/to/python-with-torch scripts/bench_autoattack.py [--rows 500] [--large-rows 1000]
        [--seeds 0] [--skip-strength] [--skip-speed]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

import advgrad
from advgrad.attacks import Attack
from advgrad.autoattack import auto_attack, components
from advgrad.bundled import MODEL, TEST_DATA, bundled_path

STAGES = components("standard")
TORCH_NORMS = {"inf": "Linf", "2": "L2"}


def digits_case():
    model = advgrad.load_model(bundled_path(MODEL))
    X, y = advgrad.load_dataset(bundled_path(TEST_DATA))
    return "digits (64, 64, 10)", model, X.reshape(len(X), -1), y, (8, 8)


def random_case(n_rows: int, seed: int):
    """A random (784, 256, 10) network whose predictions carry a margin like a trained
    one's, and rows uniform in [0, 1] labelled by it."""
    rng = np.random.default_rng(seed)
    W1 = (rng.standard_normal((784, 256)) * 0.05).astype(np.float32)
    W2 = (rng.standard_normal((256, 10)) * 1.0).astype(np.float32)
    model = advgrad.Model(W1, np.zeros(256, np.float32), W2, np.zeros(10, np.float32))
    X = rng.uniform(0.0, 1.0, (n_rows, 784)).astype(np.float32)
    return f"random (784, 256, 10) #{seed}", model, X, advgrad.predict(model, X), (28, 28)


def torch_problem(model, X, y, image_shape):
    """torch, torchattacks, the torch module of ``model`` and the rows as images (N, 1, h,
    w) with their labels; None without torch."""
    try:
        import torch
        import torchattacks
    except ImportError:
        return None
    from advgrad.interop import to_torch

    torch.set_num_threads(os.cpu_count())
    net = torch.nn.Sequential(torch.nn.Flatten(), to_torch(model.astype(np.float32))).eval()
    images = torch.from_numpy(X.reshape(len(X), 1, *image_shape).astype(np.float32))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return torch, torchattacks, net, images, labels


def torch_autoattack(model, X, y, image_shape, norm: str, eps: float):
    """torchattacks' robust accuracy after each attack of its standard AutoAttack and the
    seconds each attack took, or None without torch."""
    problem = torch_problem(model, X, y, image_shape)
    if problem is None:
        return None
    torch, torchattacks, net, images, labels = problem
    attack = torchattacks.AutoAttack(
        net, norm=TORCH_NORMS[norm], eps=eps, version="standard", n_classes=model.n_classes, seed=0
    )
    robust = (net(images).argmax(1) == labels).numpy()
    accuracies, seconds = [], []
    for component in attack._autoattack.attacks:
        todo = np.flatnonzero(robust)
        started = time.perf_counter()
        if todo.size:
            adversarial = component(images[todo], labels[todo])
            with torch.no_grad():
                broken = (net(adversarial).argmax(1) != labels[todo]).numpy()
            robust[todo[broken]] = False
        seconds.append(time.perf_counter() - started)
        accuracies.append(robust.mean())
    return accuracies, seconds


def advgrad_autoattack(model, X, y, image_shape, norm: str, eps: float):
    """advgrad's robust accuracy after each attack of AutoAttack standard, and its seconds."""
    started = time.perf_counter()
    result = auto_attack(model, X.reshape(len(X), *image_shape), y, eps=eps, norm=norm, clip=(0, 1))
    seconds = time.perf_counter() - started
    accuracies = [result.robust_after(k).mean() for k in range(1, len(STAGES) + 1)]
    return accuracies, seconds


def advgrad_stage_seconds(model, X, y, eps: float, steps: int | None) -> list[float]:
    """The seconds of each attack of advgrad's AutoAttack standard (L-inf), each run on
    the rows the ones before it left correct, as the ensemble runs them."""
    robust = advgrad.predict(model, X) == y
    seconds = []
    for method in STAGES:
        todo = np.flatnonzero(robust)
        started = time.perf_counter()
        if todo.size:
            attack = Attack(method, eps=eps, steps=steps)
            X_adv = advgrad.run(model, X[todo], y[todo], attack, clip=(0.0, 1.0))
            robust[todo[advgrad.predict(model, X_adv) != y[todo]]] = False
        seconds.append(time.perf_counter() - started)
    return seconds


def timing_table(name: str, model, X, y, shape, eps: float) -> None:
    """The seconds of each attack and of the whole, advgrad (both settings) and torchattacks."""
    rows = {
        "advgrad, reference settings (100 steps)": advgrad_stage_seconds(model, X, y, eps, None),
        "advgrad, torchattacks' settings (10 steps)": advgrad_stage_seconds(model, X, y, eps, 10),
    }
    theirs = torch_autoattack(model, X, y, shape, "inf", eps)
    if theirs is not None:
        rows["torchattacks 3.5 (10 steps)"] = theirs[1]
    print(f"\n  {name}, {len(X)} rows, L-inf eps {eps}: seconds")
    print(f"  {'':44} " + " ".join(f"{stage:>8}" for stage in STAGES) + f" {'total':>8}")
    for label, seconds in rows.items():
        cells = " ".join(f"{s:8.2f}" for s in seconds)
        print(f"  {label:44} {cells} {sum(seconds):8.2f}")
    if theirs is not None:
        total = sum(theirs[1])
        for label, seconds in list(rows.items())[:2]:
            print(f"  torchattacks / {label}: {total / sum(seconds):.1f}x")


def strength(cases, radii) -> None:
    print("Robust accuracy (%) after each attack of AutoAttack standard: advgrad | torchattacks")
    header = " | ".join(f"{stage:>15}" for stage in STAGES)
    print(f"{'case':32} {'norm':>4} {'eps':>6} | {header} | worst diff")
    for name, model, X, y, shape in cases:
        for norm, values in radii.items():
            for eps in values:
                ours, _ = advgrad_autoattack(model, X, y, shape, norm, eps)
                theirs = torch_autoattack(model, X, y, shape, norm, eps)
                cells, diffs = [], []
                for k in range(len(STAGES)):
                    if theirs is None:
                        cells.append(f"{100 * ours[k]:6.1f} |      -")
                    else:
                        cells.append(f"{100 * ours[k]:6.1f} | {100 * theirs[0][k]:6.1f}")
                        diffs.append(100 * (ours[k] - theirs[0][k]))
                worst = f"{max(diffs):+.1f}" if diffs else "-"
                print(f"{name:32} {norm:>4} {eps:>6g} | {' | '.join(cells)} | {worst}")


TORCH_COMPONENTS = {
    "apgd-ce": ("APGD", {"loss": "ce"}),
    "apgd-t": ("APGDT", {}),
    "fab-t": ("FAB", {"multi_targeted": True}),
    "square": ("Square", {}),
}
"""Each attack of the standard ensemble, and torchattacks' class for it with its settings
in torchattacks' AutoAttack standard (its classes' defaults otherwise)."""


def torch_component(model, X, y, image_shape, method: str, norm: str, eps: float, seed: int):
    """The rows torchattacks' own attack for ``method`` leaves correct (N,) bool, or None
    without torch."""
    problem = torch_problem(model, X, y, image_shape)
    if problem is None:
        return None
    torch, torchattacks, net, images, labels = problem
    name, settings = TORCH_COMPONENTS[method]
    if name in ("APGDT", "FAB"):
        settings = settings | {"n_classes": model.n_classes}
    settings = settings | {"norm": TORCH_NORMS[norm], "eps": eps, "seed": seed}
    attack = getattr(torchattacks, name)(net, **settings)
    with torch.no_grad():
        return (net(attack(images, labels)).argmax(1) == labels).numpy()


def component_seeds(cases, radii, seeds: int) -> None:
    """Each attack of the ensemble alone, on every row, from seeds 0 to ``seeds`` - 1:
    advgrad's robust accuracy (its defaults: the reference's) and torchattacks' own class
    (its defaults), mean and range over the seeds, in points."""
    print(f"\nEach attack alone, robust accuracy (%) over seeds 0-{seeds - 1}: mean [min, max]")
    header = f"{'advgrad':>20} | {'torchattacks':>20}"
    print(f"{'case':32} {'norm':>4} {'eps':>6} {'attack':>8} | {header}")
    for name, model, X, y, shape in cases:
        rows = X.reshape(len(X), *shape)
        for norm, values in radii.items():
            for eps in values:
                for method in TORCH_COMPONENTS:
                    ours, theirs = [], []
                    for seed in range(seeds):
                        attack = Attack(method, eps=eps, norm=norm, seed=seed)
                        X_adv = advgrad.run(model, rows, y, attack, clip=(0.0, 1.0))
                        ours.append(100 * np.mean(advgrad.predict(model, X_adv) == y))
                        robust = torch_component(model, X, y, shape, method, norm, eps, seed)
                        if robust is not None:
                            theirs.append(100 * robust.mean())
                    cells = [
                        f"{np.mean(v):6.1f} [{min(v):5.1f}, {max(v):5.1f}]" if v else f"{'-':>20}"
                        for v in (ours, theirs)
                    ]
                    print(f"{name:32} {norm:>4} {eps:>6g} {method:>8} | {' | '.join(cells)}")


def speed(large_rows: int) -> None:
    print("\nSpeed (seconds, one run each; torch on", os.cpu_count(), "threads)")
    name, model, X, y, shape = digits_case()
    for steps in (None, 10):
        command = [
            *(sys.executable, "-m", "advgrad", "evaluate", "--method", "autoattack"),
            *("--eps", "0.1", "--min-eps", "0"),
            *(() if steps is None else ("--steps", str(steps))),
        ]
        subprocess.run(command, check=True, capture_output=True)  # compile, fill the caches
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        print(
            f"  `{' '.join(command[2:])}` on {name}, 450 rows: "
            f"{time.perf_counter() - started:.2f} s (Python's start included)"
        )
    if torch_autoattack(model, X[:2], y[:2], shape, "inf", 0.1) is not None:
        script = (
            "import sys; sys.path.insert(0, 'scripts'); import bench_autoattack as b; "
            "_, m, X, y, s = b.digits_case(); b.torch_autoattack(m, X, y, s, 'inf', 0.1)"
        )
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
        print(
            f"  torchattacks' AutoAttack on {name}, 450 rows, in a script of its own: "
            f"{time.perf_counter() - started:.2f} s (Python's start and torch's import included)"
        )
    auto_attack(model, X[:8], y[:8], eps=0.1, clip=(0, 1))  # compile outside the clock
    timing_table(name, model, X, y, shape, 0.1)
    timing_table(*random_case(large_rows, seed=0), 0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500, help="rows of the random networks")
    parser.add_argument("--networks", type=int, default=2, help="random networks compared")
    parser.add_argument("--large-rows", type=int, default=1000, help="rows of the speed case")
    parser.add_argument("--skip-strength", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument(
        "--seeds",
        type=int,
        default=0,
        help="also run each attack alone from this many seeds, on the digits (0: not)",
    )
    args = parser.parse_args()
    radii = {"inf": (0.02, 0.05, 0.1), "2": (0.25, 0.5, 1.0)}
    if not args.skip_strength:
        cases = [digits_case()]
        cases += [random_case(args.rows, seed) for seed in range(1, args.networks + 1)]
        strength(cases, radii)
    if args.seeds:
        component_seeds([digits_case()], radii, args.seeds)
    if not args.skip_speed:
        speed(args.large_rows)


if __name__ == "__main__":
    main()
