#!/usr/bin/env bash
# One-shot check of advgrad's CUDA backend on a GPU machine, in under 10 minutes, offline.
#
#   bash scripts/gpu_check.sh        # from anywhere; logs go to $OUT (default: ./gpu_check_out)
#   STEPS="tests timing" bash scripts/gpu_check.sh   # only the steps named (a rerun)
#
# Needs numba, numba-cuda, numpy, torch (and whatever bench_gradient.py imports); the working
# tree is used in place through PYTHONPATH, not installed. Steps:
#   1. tests/test_cuda.py, test_kernels_apgd.py, test_fab_cuda.py and test_square_cuda.py on
#      the GPU (the simulator switched off): gradients, FGM, forward, BIM / PGD / MI-FGSM,
#      DeepFool, APGD's, FAB's and Square's kernels and whole runs against the CPU kernels
#   2. scripts/bench_gradient.py --device cuda --quick
#   3. scripts/bench_attacks.py --device cuda: FGSM, PGD-20, BIM-20, MI-FGSM-20, APGD-CE-20,
#      DeepFool, FAB-20 and Square-1000
#      through the CUDA backend, then the same rows on the CPU backend for comparison
#   4. FGSM step timing: first the one-launch kernel of small batches against the three tiled
#      launches at N = 1 to 256 (where SMALL_BATCH_ROWS should sit) and with other block
#      shapes (SMALL_GROUP_ROWS, SMALL_COLUMNS, SMALL_SLICES), then advgrad.kernels.cuda
#      against torch autograd and against the four cuBLAS products alone (TF32 off), with the
#      targets of the CUDA issue:
#      N <= 32: >= 10x faster than torch autograd; N >= 16384: >= 0.5x the cuBLAS floor's speed.
#   5. Host arrays through CudaBackend.fgm_step, N = 65536: one lane (copy in, kernels, copy
#      out, in turn) against three (chunks overlapping), from plain and page-locked memory.
# Exit status: 0 when every step ran and passed.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset NUMBA_ENABLE_CUDASIM NUMBA_DISABLE_JIT
PYTHON=${PYTHON:-python}
failed=()

# step NAME SECONDS COMMAND...: run with a time limit, output to stdout and $OUT/NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    [[ -z "${STEPS:-}" || " $STEPS " == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=$?
    echo "=== $name: exit $rc" | tee -a "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PYTHON" -c 'import sys, numpy, numba, numba_cuda, torch
print("python", sys.version.split()[0], "numpy", numpy.__version__, "numba", numba.__version__,
      "numba-cuda", numba_cuda.__version__, "torch", torch.__version__)'
} 2>&1 | tee "$OUT/environment.log"

"$PYTHON" -c 'from advgrad.cuda_backend import cuda_available; print("cuda_available:", *cuda_available())' \
    2>&1 | tee -a "$OUT/environment.log"
step tests 260 "$PYTHON" -m pytest tests/test_cuda.py tests/test_kernels_apgd.py \
    tests/test_fab_cuda.py tests/test_square_cuda.py -q -rs -p no:cacheprovider

step bench 50 "$PYTHON" scripts/bench_gradient.py --device cuda --quick

step attacks 60 "$PYTHON" scripts/bench_attacks.py --device cuda --rows 16384 --rounds 3
step attacks-cpu 50 "$PYTHON" scripts/bench_attacks.py --device cpu --rows 16384 --rounds 1

step timing 120 "$PYTHON" - <<'PY'
"""Microseconds per FGSM step: advgrad CUDA kernels, torch autograd, four cuBLAS products."""

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from advgrad.kernels import cuda as kernels  # before numba.cuda: it aliases numpy.row_stack

cuda = kernels.cuda
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
DEVICE = torch.device("cuda")
EPS = 0.03
CASES = [
    ((784, 256, 10), 1),
    ((784, 256, 10), 32),
    ((784, 256, 10), 16384),
    ((3072, 1024, 10), 16384),
]


def per_step_us(step, steps, repeats=5):
    """Median over repeats of the wall time of `steps` queued steps, per step in us (it counts
    the host's launch overhead whenever the GPU waits for the host)."""
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(times)


@cuda.jit
def noop(x):
    pass


def problem(d, H, C, n_rows):
    """Random torch tensors X, W1, b1, W2, b2, y, and advgrad's FGSM step on them."""
    torch.manual_seed(0)
    X = torch.rand(n_rows, d, device=DEVICE)
    W1 = torch.randn(d, H, device=DEVICE) * (3.0 / d**0.5)
    b1, W2, b2 = (torch.randn(*shape, device=DEVICE) for shape in ((H,), (H, C), (C,)))
    y = torch.randint(0, C, (n_rows,), device=DEVICE)
    net = [cuda.as_cuda_array(t) for t in (X, W1, b1, W2, b2, F.one_hot(y, C).float())]
    X_adv = torch.empty_like(X)
    predicted = torch.empty(n_rows, dtype=torch.int64, device=DEVICE)
    out = [cuda.as_cuda_array(t) for t in (X_adv, predicted)]
    workspace = kernels.Workspace()

    def ours(p=np.inf):
        kernels.fgm_step_into(*net, EPS, p, 0.0, 1.0, *out, workspace=workspace)

    return (X, W1, b1, W2, b2, y), net, X_adv, predicted, workspace, ours


def one_launch_against_three():
    """us per FGSM step, (784, 256, 10): small_batch_kernel against the three tiled launches."""
    print("(784, 256, 10) FGSM step, us: one launch / three launches (SMALL_BATCH_ROWS decides)")
    default = kernels.SMALL_BATCH_ROWS
    for n_rows in (1, 8, 32, 64, 256):
        ours = problem(784, 256, 10, n_rows)[-1]
        kernels.SMALL_BATCH_ROWS = n_rows
        one = per_step_us(ours, 300)
        kernels.SMALL_BATCH_ROWS = 0
        three = per_step_us(ours, 300)
        print(f"  N={n_rows:>4}: {one:8.1f} / {three:8.1f}  ({three / one:.2f}x)")
    kernels.SMALL_BATCH_ROWS = default
    print("small_batch_kernel's constants (rows a block, hidden units a thread, slices), us:")
    shipped = (kernels.SMALL_GROUP_ROWS, kernels.SMALL_COLUMNS, kernels.SMALL_SLICES)
    steps = {n_rows: problem(784, 256, 10, n_rows)[-1] for n_rows in (1, 32)}
    for config in ((4, 8, 8), (8, 8, 8), (2, 8, 8), (4, 4, 8), (4, 8, 4), (4, 8, 16)):
        kernels.SMALL_GROUP_ROWS, kernels.SMALL_COLUMNS, kernels.SMALL_SLICES = config
        times = "  ".join(f"N={n}: {per_step_us(f, 300):7.1f}" for n, f in steps.items())
        print(f"  {config}{' (shipped)' if config == shipped else ''}: {times}")
    kernels.SMALL_GROUP_ROWS, kernels.SMALL_COLUMNS, kernels.SMALL_SLICES = shipped


def time_case(d, H, C, n_rows):
    """(advgrad, autograd, cuBLAS) us per step and the fraction of equal X_adv elements."""
    (X, W1, b1, W2, b2, y), net, X_adv, predicted, workspace, ours = problem(d, H, C, n_rows)
    steps = 300 if n_rows <= 32 else (20 if d < 1000 else 5)

    def autograd():
        Xg = X.detach().requires_grad_(True)
        logits = torch.addmm(b2, torch.sigmoid(torch.addmm(b1, Xg, W1)), W2)
        (G,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), Xg)
        return torch.clamp(Xg.detach() + EPS * G.sign(), 0.0, 1.0)

    Z1, Z2, D1, G = (torch.empty(n_rows, k, device=DEVICE) for k in (H, C, H, d))

    def four_gemms():
        torch.mm(X, W1, out=Z1)
        torch.mm(Z1, W2, out=Z2)
        torch.mm(Z2, W2.t(), out=D1)
        torch.mm(D1, W1.t(), out=G)

    times = [per_step_us(f, steps) for f in (ours, autograd, four_gemms)]
    if n_rows <= 32:
        start = time.perf_counter()
        for _ in range(100):
            ours()
        host = (time.perf_counter() - start) / 100 * 1e6
        torch.cuda.synchronize()
        print(f"{(d, H, C)} N={n_rows}: advgrad FGSM step queued in {host:.1f} us of host time")
    ours()
    agree = (X_adv == autograd()).float().mean().item()
    if n_rows > 32:
        A, P = torch.empty(n_rows, H, device=DEVICE), torch.empty(n_rows, C, device=DEVICE)
        losses = torch.empty(n_rows, device=DEVICE)
        fwd = [cuda.as_cuda_array(t) for t in (A, P, losses, predicted)]
        t_fwd = per_step_us(lambda: kernels.forward_into(*net, *fwd, workspace=workspace), steps)
        t_l2 = per_step_us(lambda: ours(2.0), steps)
        flops = 2 * n_rows * (2 * d * H + 2 * H * C)
        print(
            f"{(d, H, C)} N={n_rows}: forward (X W1 product + row kernel) {t_fwd:.0f} us, FGSM "
            f"{times[0]:.0f} us (G product + step: {times[0] - t_fwd:.0f} us), L2 step "
            f"{t_l2:.0f} us; FGSM at {flops / times[0] / 1e6:.1f} TFLOP/s"
        )
    return (*times, agree)


def main():
    dummy = cuda.device_array(1)
    empty = per_step_us(lambda: noop[1, 32](dummy), 2000)
    print(f"numba-cuda launch of an empty kernel: {empty:.1f} us")
    one_launch_against_three()
    results = [(shape, n_rows, *time_case(*shape, n_rows)) for shape, n_rows in CASES]
    print()
    print(
        f"{'(d, H, C)':>16} {'N':>6} {'advgrad us':>11} {'autograd us':>12} {'cuBLAS us':>10} "
        f"{'vs autograd':>12} {'vs cuBLAS':>10} {'same X_adv':>10}  target"
    )
    met = 0
    for shape, n_rows, t_ours, t_torch, t_blas, agree in results:
        speedup, fraction = t_torch / t_ours, t_blas / t_ours
        if n_rows <= 32:
            ok, target = speedup >= 10.0, "autograd/advgrad >= 10"
        else:
            ok, target = fraction >= 0.5, "cuBLAS/advgrad >= 0.5"
        met += ok
        print(
            f"{shape!s:>16} {n_rows:>6} {t_ours:>11.1f} {t_torch:>12.1f} {t_blas:>10.1f} "
            f"{speedup:>11.2f}x {fraction:>10.2f} {agree:>10.5f}  {target}: "
            f"{'met' if ok else 'MISSED'}"
        )
    print(f"{met} of {len(results)} targets met")


main()
PY

step stream 40 "$PYTHON" - <<'PY'
"""Milliseconds per CudaBackend.fgm_step on host arrays: one lane against three."""

import statistics
import time

import numpy as np

from advgrad.cuda_backend import CudaBackend
from advgrad.model import Model

d, H, C, N = 784, 256, 10, 65536
rng = np.random.default_rng(0)
shapes = ((d, H), (H,), (H, C), (C,))
model = Model(*(0.05 * rng.standard_normal(shape, dtype=np.float32) for shape in shapes))
X = rng.random((N, d), dtype=np.float32)
Y = np.eye(C, dtype=np.float32)[rng.integers(0, C, N)]


def ms(backend, X, Y, out):
    """Median of 5 calls, after one to warm up, in ms."""
    times = []
    for _ in range(6):
        start = time.perf_counter()
        backend.fgm_step(model, X, Y, 0.03, np.inf, 0.0, 1.0, out=out)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


locked = [CudaBackend.empty(a.shape, a.dtype) for a in (X, Y, X)]
locked[0][:], locked[1][:] = X, Y
for memory, arrays in (("plain", (X, Y, np.empty_like(X))), ("page-locked", locked)):
    one, three = (ms(CudaBackend(lanes=lanes), *arrays) for lanes in (1, 3))
    moved = 2 * X.nbytes / three / 1e6
    print(
        f"N={N} {memory:>11} memory: 1 lane {one:7.2f} ms, 3 lanes {three:7.2f} ms "
        f"({one / three:.2f}x); X in and X_adv out at {moved:.1f} GB/s with 3 lanes"
    )
PY

echo "=== failed steps: ${failed[*]:-none}" | tee "$OUT/summary.log"
[ ${#failed[@]} -eq 0 ]
