"""Speed of the iterative attacks against the single fused FGSM step, measured side by side.

On the bundled digits model (d, H, C) = (64, 64, 10), float32, the test set tiled to
``--rows`` rows, it times one FGSM step, PGD-20 (one restart), BIM-20, MI-FGSM-20, APGD-CE-20,
DeepFool (L2 and L-inf), FAB-20, Square with 1000 queries, and one FGM step and APGD-CE-20
in L2 (eps 1) and L1 (eps 5), all through ``advgrad.attacks.perturb`` (what the CLI runs),
and prints rows per second and the ratios of PGD-20 and APGD-CE-20 to 20 FGSM steps, APGD's
in each norm to 20 FGM steps of that norm (an iterative attack that allocated or re-entered
Python per step would show here). ``--device cuda`` runs them on the GPU
(``advgrad.cuda_backend``), host arrays in and out as the CLI does. ``--one-slice`` also
times each attack with all its steps in one kernel call (as before the iterative kernels
ran in slices of steps) and prints the time ratio, sliced / one slice::

    python scripts/bench_attacks.py [--rows 16384] [--rounds 5] [--device cpu|cuda|auto]
        [--one-slice] [--autoattack LARGE_ROWS]

``--autoattack LARGE_ROWS`` then runs ``bench_autoattack.py``'s speed section in the same
run: AutoAttack's whole command on the digits and each of its attacks on a (784, 256, 10)
network with LARGE_ROWS rows, against torchattacks' (run it with a Python that has torch).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import advgrad.backend
from advgrad import attacks, load_dataset, load_model
from advgrad.attacks import Attack
from advgrad.backend import DEVICES, get_backend
from advgrad.bundled import MODEL, TEST_DATA, bundled_path

OTHER_NORMS = {"2": 1.0, "1": 5.0}
"""The norms besides inf whose APGD iteration is timed against their FGM step, with eps."""


def best_time(function, rounds: int, warm: bool = False) -> float:
    if not warm:
        function()
    best = np.inf
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


@contextmanager
def one_slice(device: str):
    """The iterative attacks of ``device`` run all their steps in one slice."""
    settings = [(advgrad.backend, "SLICE_MULTIPLY_ADDS")]
    if device == "cuda":
        from advgrad import cuda_backend

        settings += [(cuda_backend, "SLICE_MULTIPLY_ADDS"), (cuda_backend, "MAX_SLICE_STEPS")]
    saved = [getattr(module, name) for module, name in settings]
    for module, name in settings:
        setattr(module, name, sys.maxsize)
    try:
        yield
    finally:
        for (module, name), value in zip(settings, saved, strict=True):
            setattr(module, name, value)


def best_times_sliced_and_not(function, rounds: int, device: str) -> tuple[float, float]:
    """Best times of ``function`` in slices and in one slice, the two alternating."""
    function()
    with one_slice(device):
        function()
    best = [np.inf, np.inf]
    for _ in range(rounds):
        best[0] = min(best[0], best_time(function, 1, warm=True))
        with one_slice(device):
            best[1] = min(best[1], best_time(function, 1, warm=True))
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--one-slice", action="store_true", help="compare with one slice")
    parser.add_argument(
        "--autoattack",
        type=int,
        metavar="LARGE_ROWS",
        help="then time AutoAttack against torchattacks' (bench_autoattack.py's speed "
        "section, with this many rows in its large case)",
    )
    args = parser.parse_args()
    model = load_model(bundled_path(MODEL))
    X, y = load_dataset(bundled_path(TEST_DATA))
    repeat = -(-args.rows // len(X))
    rows = np.ascontiguousarray(np.tile(X.reshape(len(X), -1), (repeat, 1))[: args.rows])
    labels_y = np.tile(y, repeat)[: args.rows]
    backend = get_backend(args.device)
    configs = {
        "fgsm (1 step)": Attack("fgsm"),
        "pgd-20": Attack("pgd", steps=20),
        "bim-20": Attack("bim", steps=20),
        "mifgsm-20": Attack("mifgsm", steps=20),
        "apgd-ce-20": Attack("apgd-ce", steps=20),
        "deepfool-l2": Attack("deepfool", norm="2"),
        "deepfool-linf": Attack("deepfool", norm="inf"),
        "fab-20": Attack("fab", steps=20),
        "square-1000": Attack("square", queries=1000),
    }
    for norm, eps in OTHER_NORMS.items():
        configs[f"fgm-l{norm} (1 step)"] = Attack("fgsm", norm=norm, eps=eps)
        configs[f"apgd-ce-20-l{norm}"] = Attack("apgd-ce", norm=norm, eps=eps, steps=20)
    seconds, unsliced = {}, {}
    for name, attack in configs.items():
        labels = attacks.attack_labels(model, rows, labels_y, attack, backend=backend)

        def run(a=attack, l=labels):
            attacks.perturb(model, rows, l, a, (0.0, 1.0), backend=backend)

        if args.one_slice:
            seconds[name], unsliced[name] = best_times_sliced_and_not(
                run, args.rounds, backend.name
            )
        else:
            seconds[name] = best_time(run, args.rounds)
    print(
        f"bundled digits model, float32, {args.rows} rows, best of {args.rounds}, "
        f"device {backend.name}"
    )
    print(f"{'attack':<16}{'rows/s':>14}{'us/row':>10}" + ("  sliced / one slice" * bool(unsliced)))
    for name, value in seconds.items():
        ratio = f"{value / unsliced[name]:>20.3f}" if unsliced else ""
        print(f"{name:<16}{args.rows / value:>14,.0f}{1e6 * value / args.rows:>10.3f}{ratio}")
    ratio = seconds["pgd-20"] / (20 * seconds["fgsm (1 step)"])
    print(f"PGD-20 time / (20 x FGSM step time) = {ratio:.2f}  (target <= 1.3)")
    ratio = seconds["apgd-ce-20"] / (20 * seconds["fgsm (1 step)"])
    print(f"APGD-CE-20 time / (20 x FGSM step time) = {ratio:.2f}  (target <= 1.3)")
    for norm in OTHER_NORMS:
        ratio = seconds[f"apgd-ce-20-l{norm}"] / (20 * seconds[f"fgm-l{norm} (1 step)"])
        print(f"L{norm}: APGD-CE-20 time / (20 x FGM step time) = {ratio:.2f}  (target <= 1.3)")
    if args.autoattack is not None:
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_autoattack

        bench_autoattack.speed(args.autoattack)


if __name__ == "__main__":
    main()
