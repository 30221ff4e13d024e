"""Benchmark advgrad's fused FGSM step against NumPy, PyTorch and JAX, per row, in float32.

What it measures, for the two-layer sigmoid network of DESIGN.md section 1 at the shapes
(d, H, C) = (64, 32, 10) ("digits") and (784, 256, 10) ("MNIST") and batch sizes N = 1, 32,
1024, 16384 (microseconds per row, best of several rounds):

    roofline  NumPy doing only the four bare products X@W1, A@W2, D2@W2.T, D1@W1.T
              (A, D2, D1 precomputed, outputs preallocated): the BLAS floor of any
              implementation that runs the products through BLAS
    numpy     a plain NumPy implementation of the whole FGSM step
    torch     PyTorch autograd of the summed cross-entropy, then sign and clip (if installed)
    jax       jax.jit of jax.grad of the summed loss plus the sign step (if installed);
              the weights are device arrays, X and Y go in as NumPy and X_adv comes back as NumPy
    advgrad   advgrad's public path ``CpuBackend().fgm_step`` (NumPy in, NumPy out)
    fgsm      the Python API ``advgrad.fgsm(model, X, y, eps=..., clip=(0, 1))``
    direct    the jitted kernel called directly, ``advgrad.kernels.cpu.fgsm_step(X, W1, b1,
              W2, b2, Y, eps, 0, 1)``, with nothing around it (as a user imports it)
    kernel*   diagnostic, no target: ``advgrad.kernels.cpu.fgm_step_into`` into preallocated
              outputs, nothing around it, so that advgrad - kernel* shows the wrapper and
              fresh-output-page cost

Every contender computes X_adv = clip(X + eps * sign(G), 0, 1) and the clean predictions.
It prints the table with the ratios advgrad/peer and marks the performance targets: at the
MNIST shape advgrad within 1.2x of the roofline and faster than NumPy and PyTorch at every N;
at the digits shape faster than every peer; at N = 1 at least 4x faster than PyTorch; at
every shape and N the direct kernel call within 1.1x of ``advgrad.fgsm`` (the kernels pin the
BLAS they call themselves, so a direct call needs nothing wrapped around it).
It also prints the BLAS libraries in use, the Numba threading layer, the kernels' first-call
compile time (cold cache vs warm cache, in subprocesses), and the wall time of
``advgrad --help`` and ``advgrad attack`` when the console script is installed.

Measurement hygiene: OpenBLAS worker threads spin for a while after each call and steal the
cores from Numba's threads, so each contender is timed in its own batch of calls (at least
0.2 s), with a 0.3 s pause before every batch, and the rounds go round-robin over the
contenders so that drift hits all of them alike; the minimum over the rounds is reported.
The "others" column is the share of all cores that other processes used while a row was timed
(from /proc/stat); rows with more than 10 % are flagged, since no minimum survives a busy machine.

Run it from the repository root, with the OpenBLAS tuning variables unset (the script reports
them but never changes them)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_gradient.py
    python scripts/bench_gradient.py --quick              # fewer, shorter rounds
    python scripts/bench_gradient.py --sizes 1 32         # other batch sizes
    python scripts/bench_gradient.py --device cuda        # advgrad's CUDA backend, if present
    python scripts/bench_gradient.py --shapes MNIST --sizes 16384 --table-only

The default run takes a few minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"digits": (64, 32, 10), "MNIST": (784, 256, 10)}
DEFAULT_SIZES = (1, 32, 1024, 16384)
CONTENDERS = ("roofline", "numpy", "torch", "jax", "advgrad", "fgsm", "direct", "kernel")
PEERS = ("numpy", "torch", "jax")
EPS = 0.1
PAUSE_S = 0.3
ROOFLINE_TARGET = 1.2
SINGLE_ROW_TORCH_TARGET = 4.0
DIRECT_TARGET = 1.1
SUBPROCESS_TIMEOUT_S = 600
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
BUSY_WARNING = 0.10

Step = Callable[[], object]


# --------------------------------------------------------------------------- setup


def import_advgrad():
    """Import advgrad, adding the repository root to sys.path only if it is not installed."""
    try:
        return importlib.import_module("advgrad")
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        return importlib.import_module("advgrad")


def optional_module(name: str):
    """The module, or None when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except Exception:  # an optional peer may fail in any way on import
        return None


@dataclass
class Problem:
    """One benchmark case: float32 weights, inputs and one-hot labels."""

    shape_name: str
    d: int
    H: int
    C: int
    N: int
    W1: np.ndarray
    b1: np.ndarray
    W2: np.ndarray
    b2: np.ndarray
    X: np.ndarray
    Y: np.ndarray
    labels: np.ndarray


def make_problem(shape_name: str, n_rows: int, seed: int = 0) -> Problem:
    """A random network with non-degenerate activations and a batch of inputs in [0, 1]."""
    d, H, C = SHAPES[shape_name]
    rng = np.random.default_rng(seed)
    f32 = np.float32
    W1 = (rng.standard_normal((d, H)) * (2.0 / math.sqrt(d))).astype(f32)
    b1 = (rng.standard_normal(H) * 0.1).astype(f32)
    W2 = (rng.standard_normal((H, C)) * (4.0 / math.sqrt(H))).astype(f32)
    b2 = (rng.standard_normal(C) * 0.1).astype(f32)
    X = rng.random((n_rows, d), dtype=f32)
    labels = rng.integers(0, C, n_rows)
    Y = np.zeros((n_rows, C), dtype=f32)
    Y[np.arange(n_rows), labels] = 1.0
    return Problem(shape_name, d, H, C, n_rows, W1, b1, W2, b2, X, Y, labels)


# --------------------------------------------------------------------------- contenders


def numpy_forward_backward(p: Problem):
    """A, D2 = P - Y, D1 = (D2 W2^T) * A (1 - A), G and predictions, in plain NumPy."""
    with np.errstate(over="ignore"):
        A = 1.0 / (1.0 + np.exp(-(p.X @ p.W1 + p.b1)))
    Z2 = A @ p.W2 + p.b2
    predicted = Z2.argmax(axis=1)
    E = np.exp(Z2 - Z2.max(axis=1, keepdims=True))
    D2 = E / E.sum(axis=1, keepdims=True) - p.Y
    D1 = (D2 @ p.W2.T) * A * (1.0 - A)
    G = D1 @ p.W1.T
    return A, D2, D1, G, predicted


def make_roofline(p: Problem) -> Step:
    """Only the four products of the step, on precomputed operands, into preallocated outputs."""
    A, D2, D1, _, _ = numpy_forward_backward(p)
    Z1 = np.empty((p.N, p.H), dtype=np.float32)
    Z2 = np.empty((p.N, p.C), dtype=np.float32)
    T1 = np.empty((p.N, p.H), dtype=np.float32)
    G = np.empty((p.N, p.d), dtype=np.float32)
    X, W1, W2, W1T, W2T = p.X, p.W1, p.W2, p.W1.T, p.W2.T

    def step():
        np.matmul(X, W1, out=Z1)
        np.matmul(A, W2, out=Z2)
        np.matmul(D2, W2T, out=T1)
        np.matmul(D1, W1T, out=G)
        return G

    return step


def make_numpy(p: Problem) -> Step:
    """The whole FGSM step in plain NumPy (float32 throughout)."""
    X, Y, W1, b1, W2, b2 = p.X, p.Y, p.W1, p.b1, p.W2, p.b2
    eps = np.float32(EPS)

    def step():
        with np.errstate(over="ignore"):
            A = 1.0 / (1.0 + np.exp(-(X @ W1 + b1)))
        Z2 = A @ W2 + b2
        predicted = Z2.argmax(axis=1)
        E = np.exp(Z2 - Z2.max(axis=1, keepdims=True))
        D2 = E / E.sum(axis=1, keepdims=True) - Y
        G = ((D2 @ W2.T) * A * (1.0 - A)) @ W1.T
        return np.clip(X + eps * np.sign(G), 0.0, 1.0), predicted

    return step


def make_torch(p: Problem, torch, device: str) -> Step:
    """PyTorch autograd: summed cross-entropy, gradient w.r.t. X, sign step, clip."""
    functional = importlib.import_module("torch.nn.functional")
    on = {"device": device}
    W1, b1, W2, b2 = (torch.as_tensor(a, **on) for a in (p.W1, p.b1, p.W2, p.b2))
    labels = torch.as_tensor(p.labels, **on)  # class indices: torch's fast cross-entropy path
    X_host = p.X
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        X = torch.as_tensor(X_host, **on).requires_grad_(True)
        Z2 = torch.sigmoid(torch.addmm(b1, X, W1)) @ W2 + b2
        loss = functional.cross_entropy(Z2, labels, reduction="sum")
        (G,) = torch.autograd.grad(loss, X)
        with torch.no_grad():
            X_adv = torch.clamp(X + EPS * torch.sign(G), 0.0, 1.0)
            predicted = Z2.argmax(dim=1)
        synchronize()
        return X_adv.cpu().numpy(), predicted.cpu().numpy()

    return step


_JAX_STEP = None


def jax_step_function(jax):
    """The jitted JAX FGSM step (built once; jit caches one compilation per shape)."""
    global _JAX_STEP
    if _JAX_STEP is None:
        jnp = jax.numpy

        def loss(X, Y, W1, b1, W2, b2):
            Z2 = jax.nn.sigmoid(X @ W1 + b1) @ W2 + b2
            total = jnp.sum(jax.nn.logsumexp(Z2, axis=1) - jnp.sum(Y * Z2, axis=1))
            return total, Z2

        def fgsm(X, Y, W1, b1, W2, b2):
            G, Z2 = jax.grad(loss, has_aux=True)(X, Y, W1, b1, W2, b2)
            return jnp.clip(X + EPS * jnp.sign(G), 0.0, 1.0), jnp.argmax(Z2, axis=1)

        _JAX_STEP = jax.jit(fgsm)
    return _JAX_STEP


def make_jax(p: Problem, jax) -> Step:
    """jax.jit(grad of the summed loss + sign step); weights resident, X and Y from NumPy."""
    fgsm = jax_step_function(jax)
    W1, b1, W2, b2 = (jax.device_put(a) for a in (p.W1, p.b1, p.W2, p.b2))
    X, Y = p.X, p.Y

    def step():
        X_adv, predicted = fgsm(X, Y, W1, b1, W2, b2)
        return np.asarray(X_adv), np.asarray(predicted)

    return step


def make_kernel(p: Problem, model, cpu) -> Step:
    """Diagnostic: the kernel ``fgm_step_into`` into preallocated outputs, nothing around it;
    the gap to ``advgrad`` is the wrapper plus fresh output pages."""
    X, Y, W1, b1, W2, b2 = p.X, p.Y, model.W1, model.b1, model.W2, model.b2
    X_adv = np.empty_like(X)
    predicted = np.empty(p.N, dtype=np.int64)

    def step():
        cpu.fgm_step_into(X, W1, b1, W2, b2, Y, EPS, np.inf, 0.0, 1.0, X_adv, predicted)
        return X_adv, predicted

    return step


def make_direct(p: Problem, model, cpu) -> Step:
    """The allocating kernel ``fgsm_step`` called directly, nothing around it; its
    predictions come from the ``fgsm`` contender's check (it returns X_adv only)."""
    X, Y, W1, b1, W2, b2 = p.X, p.Y, model.W1, model.b1, model.W2, model.b2

    def step():
        return cpu.fgsm_step(X, W1, b1, W2, b2, Y, EPS, 0.0, 1.0), None

    return step


def make_fgsm(p: Problem, advgrad, model) -> Step:
    """The Python API ``advgrad.fgsm`` on integer labels, clipped to (0, 1)."""
    X, labels = p.X, p.labels

    def step():
        return advgrad.fgsm(model, X, labels, eps=EPS, clip=(0.0, 1.0)), None

    return step


def make_advgrad(p: Problem, backend, model) -> Step:
    """advgrad's public fused step, the backend's ``fgm_step`` with p = inf."""
    X, Y = p.X, p.Y

    def step():
        return backend.fgm_step(model, X, Y, EPS, np.inf, 0.0, 1.0)

    return step


# --------------------------------------------------------------------------- timing


def time_batch(step: Step, calls: int) -> float:
    """Seconds per call of ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls


def calls_for(step: Step, min_batch_s: float) -> int:
    """Number of calls that make one timed batch last at least ``min_batch_s``."""
    per_call = min(time_batch(step, 1) for _ in range(3))
    if per_call < min_batch_s / 20:  # short calls: measure more precisely before sizing
        per_call = time_batch(step, max(1, int(min_batch_s / 20 / max(per_call, 1e-7))))
    return max(1, math.ceil(min_batch_s / max(per_call, 1e-9)))


def benchmark(steps: dict[str, Step], rounds: int, min_batch_s: float) -> dict[str, float]:
    """Best seconds per call of each step: round-robin rounds, a pause before every batch."""
    calls = {}
    for name, step in steps.items():
        time.sleep(PAUSE_S)
        calls[name] = calls_for(step, min_batch_s)
    best = dict.fromkeys(steps, math.inf)
    names = list(steps)
    for round_index in range(rounds):
        shift = round_index % len(names)  # rotate who goes first, so no one always follows X
        for name in names[shift:] + names[:shift]:
            time.sleep(PAUSE_S)
            best[name] = min(best[name], time_batch(steps[name], calls[name]))
    return best


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc), 0 when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class ForeignLoad:
    """Share of the machine's CPU time spent outside this process and ``helpers`` (the Dask
    worker processes), from Linux /proc/stat."""

    def __init__(self, helpers: tuple[int, ...] = ()) -> None:
        self.helpers = helpers
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
            ticks = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
        busy = (sum(values) - values[3] - values[4]) / ticks  # all but idle and iowait
        own = os.times()
        mine = own.user + own.system + sum(process_cpu_seconds(pid) for pid in self.helpers)
        return busy, mine, time.perf_counter()

    def share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, mine, wall = (b - a for a, b in zip(self.start, end, strict=True))
        return max(0.0, (busy - mine) / (wall * (os.cpu_count() or 1)))


def mismatch(reference, result) -> tuple[float, float]:
    """Fractions of X_adv elements (off by more than 1e-5) and of predictions that differ."""
    X_ref, pred_ref = reference
    X_adv, predicted = result
    X_adv = np.asarray(X_adv)
    bad_x = float(np.mean(np.abs(X_adv.astype(np.float64) - X_ref) > 1e-5))
    bad_pred = 0.0 if predicted is None else float(np.mean(np.asarray(predicted) != pred_ref))
    return bad_x, bad_pred


# --------------------------------------------------------------------------- reporting


@dataclass
class Row:
    shape_name: str
    N: int
    us_per_row: dict[str, float | None] = field(default_factory=dict)
    others: float | None = None  # share of the machine's CPU that other processes used

    def ratio(self, peer: str, mine: str = "advgrad") -> float | None:
        """Time per row of ``mine`` over that of ``peer``; None when either was not run."""
        ours, theirs = self.us_per_row.get(mine), self.us_per_row.get(peer)
        return None if ours is None or theirs is None else ours / theirs

    def targets(self) -> list[tuple[str, bool]]:
        """(label, met) of each target that applies to this row."""
        checks = []
        if self.shape_name == "MNIST":
            roof = self.ratio("roofline")
            if roof is not None:
                checks.append((f"<={ROOFLINE_TARGET}x roof", roof <= ROOFLINE_TARGET))
            for peer in ("numpy", "torch"):
                r = self.ratio(peer)
                if r is not None:
                    checks.append((f"<{peer}", r < 1.0))
        if self.shape_name == "digits":
            ratios = [self.ratio(peer) for peer in PEERS if self.ratio(peer) is not None]
            if ratios:
                checks.append(("<all peers", max(ratios) < 1.0))
        if self.N == 1:
            r = self.ratio("torch")
            if r is not None:
                checks.append(
                    (f">={SINGLE_ROW_TORCH_TARGET:g}x torch", r <= 1 / SINGLE_ROW_TORCH_TARGET)
                )
        direct = self.ratio("fgsm", mine="direct")
        if direct is not None:
            checks.append((f"direct<={DIRECT_TARGET:g}x fgsm", direct <= DIRECT_TARGET))
        return checks


def fmt_us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_table(rows: list[Row], advgrad_label: str) -> None:
    head = ["shape", "N", "roofline", "numpy", "torch", "jax", advgrad_label, "fgsm", "direct"]
    head += ["kernel*", "/roof", "/numpy", "/torch", "/jax", "direct/fgsm", "others", "targets"]
    lines = []
    for row in rows:
        cells = [row.shape_name, str(row.N)]
        cells += [fmt_us(row.us_per_row.get(name)) for name in CONTENDERS]
        cells += [fmt_ratio(row.ratio(name)) for name in ("roofline", *PEERS)]
        cells.append(fmt_ratio(row.ratio("fgsm", mine="direct")))
        cells.append("-" if row.others is None else f"{row.others:.0%}")
        checks = row.targets()
        cells.append(
            "  ".join(f"{label} {'ok' if met else 'MISS'}" for label, met in checks) or "-"
        )
        lines.append(cells)
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]

    def render(cells: list[str]) -> str:
        parts = [
            c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    print("microseconds per row (best of the rounds); ratios are advgrad / column, < 1 is faster")
    print("fgsm: advgrad.fgsm (the Python API); direct: advgrad.kernels.cpu.fgsm_step called")
    print("        directly with nothing around it; direct/fgsm: their ratio, side by side")
    print("kernel* (diagnostic, no target): advgrad.kernels.cpu.fgm_step_into into preallocated")
    print(
        "        outputs; advgrad - kernel* = the backend wrapper plus first-touch of fresh X_adv"
    )
    print("others: share of all cores busy with other processes while that row was timed")
    print(render(head))
    print(render(["-" * w for w in widths]))
    previous = None
    for row, cells in zip(rows, lines, strict=True):
        if previous is not None and row.shape_name != previous:
            print()
        previous = row.shape_name
        print(render(cells))
    missed = [(row, label) for row in rows for label, met in row.targets() if not met]
    total = sum(len(row.targets()) for row in rows)
    print(f"\ntargets met: {total - len(missed)} of {total}")
    busy = [row for row in rows if row.others is not None and row.others > BUSY_WARNING]
    if busy:
        print(
            f"  warning: other processes used over {BUSY_WARNING:.0%} of the cores during "
            f"{len(busy)} row(s); their timings are suspect, rerun on a quiet machine"
        )
    for peer in PEERS:
        if all(row.us_per_row.get(peer) is None for row in rows):
            print(f"  {peer} not available: the targets against it were not checked")
    for row, label in missed:
        print(f"  MISS {row.shape_name} N={row.N}: advgrad {label}")


def blas_report(numba_layer: str) -> None:
    """Every BLAS / OpenMP pool loaded in this process, and who uses it."""
    from threadpoolctl import threadpool_info

    importlib.import_module("scipy.linalg.cython_blas")  # the BLAS numba's np.dot binds to
    print("thread pools (threadpoolctl):")
    for info in threadpool_info():
        path = info.get("filepath", "")
        users = []
        if f"{os.sep}numpy" in path:
            users.append("numpy")
        if f"{os.sep}scipy" in path:
            users.append("scipy = numba np.dot")
        if f"{os.sep}torch" in path:
            users.append("torch")
        if f"{os.sep}jax" in path:
            users.append("jax")
        if not users and info.get("user_api") == "openmp" and numba_layer == "omp":
            users.append("numba prange, omp layer")
        print(
            f"  [{', '.join(users) or '?'}] {info.get('internal_api')}"
            f" {info.get('version') or ''} arch={info.get('architecture', '-')}"
            f" threads={info.get('num_threads')}\n      {path}"
        )


def pinning_report() -> None:
    """Which BLAS the kernels pin to one thread while their row blocks run in parallel."""
    try:
        blas = importlib.import_module("advgrad.kernels.blas")
    except ImportError:
        print("kernels pin the BLAS themselves: no (this advgrad has no advgrad.kernels.blas)")
        return
    print(f"kernels pin the BLAS themselves: {blas.PINNED_LIBRARY or 'no OpenBLAS found: none'}")


def environment_report(numba, torch, jax, backend_label: str) -> None:
    print("== environment")
    print(f"python {platform.python_version()}  numpy {np.__version__}  numba {numba.__version__}")
    print(
        f"torch {getattr(torch, '__version__', 'not installed')}  "
        f"jax {getattr(jax, '__version__', 'not installed')}"
    )
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
        f"{affinity} usable"
    )
    for name in OPENBLAS_VARS:
        value = os.environ.get(name)
        print(f"{name} = {value!r}" if value is not None else f"{name} unset")
    if any(name in os.environ for name in OPENBLAS_VARS):
        print(
            "  note: the benchmark is meant to run with both unset: "
            "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench_gradient.py"
        )
    else:
        print("  (meant to be unset; this script never changes them)")
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "not initialised yet"
    print(
        f"numba threading layer: {layer}, threads: {numba.get_num_threads()} "
        f"(NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS})"
    )
    if torch is not None:
        print(f"torch intra-op threads: {torch.get_num_threads()}")
    if jax is not None:
        print(f"jax devices: {jax.devices()}")
    print(f"advgrad contender: {backend_label}")
    blas_report(layer)
    pinning_report()


# --------------------------------------------------------------------------- subprocesses


COMPILE_PROBE = """
import json, time
t0 = time.perf_counter()
import numpy as np
from advgrad.kernels import cpu
t1 = time.perf_counter()
f = np.float32
X = np.full((2, 4), 0.5, f); W1 = np.full((4, 3), 0.1, f); b1 = np.zeros(3, f)
W2 = np.full((3, 2), 0.2, f); b2 = np.zeros(2, f); Y = np.eye(2, dtype=f)
X_adv = np.empty_like(X); predicted = np.empty(2, np.int64)
t2 = time.perf_counter()
cpu.fgm_step_into(X, W1, b1, W2, b2, Y, 0.1, np.inf, 0.0, 1.0, X_adv, predicted)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_call_s": t3 - t2}))
"""


def subprocess_env(advgrad, cache_dir: str | None = None) -> dict[str, str]:
    """This process's environment, with the imported advgrad first on PYTHONPATH."""
    env = dict(os.environ)
    package_root = str(Path(advgrad.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    return env


def run_timed(command: list[str], env: dict[str, str], cwd: str) -> tuple[float, object]:
    """Wall seconds and the CompletedProcess of one subprocess run."""
    start = time.perf_counter()
    done = subprocess.run(
        command,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    return time.perf_counter() - start, done


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def compile_report(advgrad) -> None:
    print("== kernel compile time (fgm_step_into, float32, fresh NUMBA_CACHE_DIR)")
    with tempfile.TemporaryDirectory(prefix="advgrad-numba-cache-") as cache_dir:
        env = subprocess_env(advgrad, cache_dir)
        for label in ("cold", "warm"):
            wall, done = run_timed([sys.executable, "-c", COMPILE_PROBE], env, str(REPO_ROOT))
            if done.returncode != 0:
                print(f"  {label}: probe failed (exit {done.returncode}): {last_line(done.stderr)}")
                return
            probe = json.loads(last_line(done.stdout))
            print(
                f"  {label}: first call {probe['first_call_s']:7.2f} s   import "
                f"{probe['import_s']:5.2f} s   process wall {wall:6.2f} s"
            )


def cli_report(advgrad) -> None:
    print("== command line")
    beside_python = Path(sys.executable).with_name("advgrad")  # not a pyenv shim, if there
    exe = str(beside_python) if beside_python.is_file() else shutil.which("advgrad")
    if exe is None:
        print("advgrad CLI not installed, skipped")
        return
    with tempfile.TemporaryDirectory(prefix="advgrad-bench-") as work:
        env = subprocess_env(advgrad, str(Path(work) / "numba-cache"))
        for label in ("first", "second"):
            wall, done = run_timed([exe, "--help"], env, work)
            print(f"  advgrad --help ({label}): {wall:.2f} s, exit {done.returncode}")
        out = str(Path(work) / "adversarial.h5")
        walls = []
        for label in ("cold (fresh NUMBA_CACHE_DIR)", "warm"):
            wall, done = run_timed([exe, "attack", "--out", out, "--overwrite"], env, work)
            walls.append(wall)
            status = f"exit {done.returncode}"
            if done.returncode != 0:
                status += f": {last_line(done.stderr) or last_line(done.stdout)}"
            print(f"  advgrad attack, {label}: {wall:.2f} s, {status}")
        if walls[1] > 0.5 * walls[0]:
            print(
                "  note: the warm run was not much faster, so the Numba cache was not reused"
                " (kernel sources changed meanwhile?)"
            )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="advgrad backend to time (default cpu)",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_SIZES),
        metavar="N",
        help=f"batch sizes (default {DEFAULT_SIZES})",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds per contender (default 5, --quick 3)"
    )
    parser.add_argument(
        "--shapes",
        choices=list(SHAPES),
        nargs="+",
        default=list(SHAPES),
        help="network shapes (default all)",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="skip the compile-time and command-line timings after the table",
    )
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.sizes):
        parser.error("--sizes must be positive")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    min_batch_s = 0.05 if args.quick else 0.2

    advgrad = import_advgrad()
    backend_module = importlib.import_module("advgrad.backend")
    model_module = importlib.import_module("advgrad.model")
    try:
        backend = backend_module.get_backend(args.device)
    except Exception as error:
        print(f"advgrad backend {args.device!r} unavailable: {error}")
        return 1
    numba = importlib.import_module("numba")
    cpu = importlib.import_module("advgrad.kernels.cpu")
    torch = optional_module("torch")
    jax = optional_module("jax")
    torch_device = (
        "cuda" if args.device == "cuda" and torch and torch.cuda.is_available() else "cpu"
    )
    backend_label = f"advgrad {type(backend).__name__}.fgm_step ({args.device})"

    started = time.perf_counter()
    rows = []
    for shape_name in args.shapes:
        for n_rows in args.sizes:
            problem = make_problem(shape_name, n_rows)
            model = model_module.Model(problem.W1, problem.b1, problem.W2, problem.b2)
            model = model.astype(np.float32)
            steps = {
                "roofline": make_roofline(problem),
                "numpy": make_numpy(problem),
            }
            if torch is not None:
                steps["torch"] = make_torch(problem, torch, torch_device)
            if jax is not None:
                steps["jax"] = make_jax(problem, jax)
            steps["advgrad"] = make_advgrad(problem, backend, model)
            if args.device == "cpu":
                steps["fgsm"] = make_fgsm(problem, advgrad, model)
                steps["direct"] = make_direct(problem, model, cpu)
                steps["kernel"] = make_kernel(problem, model, cpu)

            _, _, _, _, pred_ref = numpy_forward_backward(problem)
            reference = (np.asarray(steps["numpy"]()[0], dtype=np.float64), pred_ref)
            for name, step in steps.items():
                for _ in range(3):  # warm-up: JIT compilation, allocator, thread pools
                    result = step()
                if name != "roofline":
                    bad_x, bad_pred = mismatch(reference, result)
                    if bad_x > 1e-3 or bad_pred > 1e-3:
                        print(
                            f"  warning: {name} differs from numpy at {shape_name} N={n_rows}"
                            f" on {bad_x:.2%} of X_adv and {bad_pred:.2%} of predictions"
                        )
            print(f"timing {shape_name} {SHAPES[shape_name]} N={n_rows} ...", flush=True)
            load = ForeignLoad()
            best = benchmark(steps, rounds, min_batch_s)
            us = {name: best[name] / n_rows * 1e6 if name in best else None for name in CONTENDERS}
            rows.append(Row(shape_name, n_rows, us, load.share()))
    elapsed = time.perf_counter() - started

    print()
    environment_report(numba, torch, jax, backend_label)
    print()
    print(
        f"== FGSM step, float32, eps={EPS}; {rounds} rounds, batches >= {min_batch_s} s, "
        f"{PAUSE_S} s pause before each ({elapsed:.0f} s)"
    )
    print_table(rows, "advgrad")
    if not args.table_only:
        print()
        compile_report(advgrad)
        print()
        cli_report(advgrad)
    return 0


if __name__ == "__main__":
    sys.exit(main())
