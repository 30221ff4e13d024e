"""Compile every CUDA kernel for a GPU that is not here; print its registers, spills and memory.

    python scripts/kernel_resources.py            # compute capability 9.0 (H100, H200)
    python scripts/kernel_resources.py --cc 8.0   # A100
    python scripts/kernel_resources.py --loops    # and each kernel's loops, from its SASS
    python scripts/kernel_resources.py --only "square_steps_rows float32"   # one kernel

The CUDA simulator runs the kernels' Python, not what the GPU compiles: a kernel can pass every
simulator test and still fail to compile for a GPU, or compile with its per-thread arrays in
local memory. This script runs ``advgrad.kernels.cuda``'s launchers (gradient, FGM steps,
forward, the losses' gradients, the iterative attacks, DeepFool, APGD, FAB, Square,
training, the certified bounds; one-launch, skinny and wide batches; float32 and float64;
every norm) on stand-in arrays in host memory, records each kernel they launch with its
argument types, compiles it to PTX for ``--cc`` and runs ``ptxas -v`` on it. Exit status 1
if a kernel does not compile.

``--loops`` also disassembles each kernel (``cuobjdump -sass``) and lists its loops, each a
backward branch, smallest first: the instructions from the branch's target to the branch (one
trip, counting one trip of any loop inside), how many are FMAs, and its shared loads, global
loads and barriers. Without a GPU to time them, these counts tell two versions of a kernel
apart.

No GPU or driver is needed: numba-cuda's device query is answered with ``--cc``. It needs the
CUDA toolkit's NVVM and ptxas (found through CUDA_HOME or /usr/local/cuda*) and NVRTC, which
numba-cuda asks which architectures exist (``pip install nvidia-cuda-nvrtc``); ``--loops``
needs cuobjdump (the toolkit's, or ``pip install nvidia-cuda-cuobjdump``).
"""

import argparse
import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    sys.exit("kernel_resources.py compiles for a GPU: unset NUMBA_ENABLE_CUDASIM")

from advgrad.kernels import cuda as kernels
from advgrad.kernels.apgd import STATE_FIELDS
from advgrad.kernels.cpu import LOSS_CE, LOSS_CW, LOSS_DLR, LOSS_DLR_TARGETED, LOSS_LOGIT_DIFFERENCE
from advgrad.kernels.cuda import apgd_launchers, fab_launchers
from advgrad.kernels.cuda import square as square_cuda
from advgrad.kernels.square import NORM_CODES

cuda = kernels.cuda
LOSSES = (LOSS_CE, LOSS_DLR, LOSS_DLR_TARGETED, LOSS_CW, LOSS_LOGIT_DIFFERENCE)
NORMS = (np.inf, 2.0, 1.0)
FLOATS = (np.float32, np.float64)
SHAPE = (784, 256, 10)  # d, H, C
BATCHES = (1, 32, 33, 600)  # one launch (1 and 8 rows a block), skinny tiles, wide tiles
LABELS = ("BM", "BN", "BK", "TM", "TN", "b_transposed", "R", "GROUPS")  # shown in the names


class StandIn(np.ndarray):
    """A host array that numba-cuda's launchers take for a device array."""

    __cuda_ndarray__ = True

    @property
    def device_ctypes_pointer(self):
        return ctypes.c_void_p(self.ctypes.data)

    @property
    def _numba_type_(self):
        return numba.typeof(np.asarray(self))

    def copy_to_host(self, stream=0):
        return np.array(self)

    def copy_to_device(self, source, stream=0):
        self[...] = source


def stand_in(shape, dtype=np.float64, stream=0):
    return np.zeros(shape, dtype).view(StandIn)


def record_launches():
    """Run every launcher on stand-in arrays; {(kernel, argument types): dtype name}."""
    launched = {}

    def record(kernel, grid, threads, stream, *args):
        signature = tuple(kernel.typeof_pyval(arg) for arg in args)
        floats = [arg.dtype.name for arg in args if getattr(arg, "dtype", None) in FLOATS]
        launched.setdefault((kernel, signature), floats[0] if floats else "-")

    def configured(kernel, configuration):  # kernel[grid, threads, stream](*args)
        return lambda *args: record(kernel, *configuration, *args)

    cuda.device_array = stand_in
    kernels.launchers._multiprocessors = lambda: 132
    for module in (kernels.internals, kernels.launchers, kernels.bound_launchers):
        module.launch = record
    type(apgd_launchers.apgd_start_rows).__getitem__ = configured
    d, H, C = SHAPE
    for dtype in (np.float32, np.float64):
        W1, b1, W2, b2 = (stand_in(s, dtype) for s in ((d, H), (H,), (H, C), (C,)))
        network = (W1, b1, W2, b2)
        for n_rows in BATCHES:
            X, Y, G = (stand_in(s, dtype) for s in ((n_rows, d), (n_rows, C), (n_rows, d)))
            net = (X, *network, Y)
            predicted, labels = stand_in(n_rows, np.int64), stand_in(n_rows, np.int64)
            eps, values = stand_in(n_rows), stand_in(n_rows, dtype)
            kernels.input_gradient_into(*net, G, predicted)
            for loss in LOSSES:
                kernels.loss_gradient_into(
                    *(X, *network, labels, labels, loss, 0.0, G, values, predicted)
                )
            kernels.logits_into(X, *network, stand_in((n_rows, C), dtype))
            for p in NORMS:
                kernels.fgm_step_into(*net, 0.1, p, 0.0, 1.0, G, predicted, q=2)
                kernels.fgm_from_gradient_into(X, G, 0.1, p, 0.0, 1.0, G, q=2)
                kernels.deepfool_into(*net[:5], p, 0.02, 2, 0.0, 1.0, G, predicted)
            A, P, losses = (stand_in(s, dtype) for s in ((n_rows, H), (n_rows, C), n_rows))
            kernels.forward_into(*net, A, P, losses, predicted)
            for p, decay in ((np.inf, 0.0), (2.0, 1.0), (1.0, 0.0)):
                kernels.iterate_into(*net, X, eps, eps, 1, p, decay, 0.0, 1.0, G, q=2)
            kernels.parameter_gradient_into(
                *net, 1.0, 1.0, 0.1, 0.0, 1.0, *(stand_in(w.shape, dtype) for w in network)
            )
            record_attack_launches(X, network, labels, eps, values, predicted, G)
    for n_rows in BATCHES:  # the bounds run in float64
        W1, b1, W2, b2 = (stand_in(s) for s in ((d, H), (H,), (H, C), (C,)))
        X, classes, eps = stand_in((n_rows, d)), stand_in(n_rows, np.int64), stand_in(n_rows)
        for p in NORMS:
            kernels.margin_bounds_into(
                X, classes, eps, p, 0.0, 1.0, W1, b1, W2, b2, True, 8, stand_in(n_rows)
            )
            kernels.certified_radius_into(
                *(X, classes, stand_in(4), p, 0.0, 1.0, W1, b1, W2, b2, True, 8, 1e-3),
                *(stand_in(n_rows), stand_in((n_rows, 4), np.bool_)),
            )
    return launched


def record_attack_launches(X, network, labels, eps, values, predicted, G):
    """APGD's, FAB's and Square's launchers, every norm, on stand-in rows X (N, d)."""
    n_rows, d = X.shape
    W1, b1, W2, b2 = network
    W2T = stand_in(W2.shape[::-1])
    search = (stand_in(n_rows), stand_in(n_rows, np.int64), stand_in((n_rows, 2, W1.shape[1])))
    for norm in NORM_CODES.values():  # one kernel: the norm is an argument
        square_cuda.square_steps_into(
            *(X, stand_in(W1.shape), b1, W2T, b2, labels),
            *(labels, 0, 1, norm, *X.dtype.type((0.1, 0.0, 1.0)), (1, 28, d // 28, 0)),
            *(stand_in(100, np.int64), 0, 10, stand_in(X.shape, X.dtype), *search, eps),
        )
    rows = [stand_in(X.shape, X.dtype) for _ in range(5)]
    state = stand_in((n_rows, STATE_FIELDS))
    windows = stand_in(4, np.int64)
    for p in NORMS:
        fab_launchers.hyperplane_projection_into(p, X, G, eps, 0.0, 1.0, stand_in(X.shape))
        apgd_launchers.apgd_start_into(X, X, eps, p, 0.0, 1.0, rows[0])
        apgd_launchers.apgd_update_into(
            *(X, eps, p, 0.0, 1.0, windows, 1, labels, G, values, predicted),
            *(*rows, state),
        )
        for targets in (labels, stand_in(0, np.int64)):
            fab_launchers.fab_start_into(X, X, rows[0], rows[1], eps)
            fab_launchers.fab_steps_into(
                *(X, *network, labels, targets, p, 0.0, 1.0, 2, 0, 3, rows[0], rows[1], eps)
            )


def describe(kernel) -> str:
    """The kernel's name and the constants that tell its configurations apart."""
    function = kernel.py_func
    cells = zip(function.__code__.co_freevars, function.__closure__ or (), strict=True)
    constants = {name: cell.cell_contents for name, cell in cells}
    shown = [f"{name}={constants[name]}" for name in LABELS if name in constants]
    return f"{function.__name__}({', '.join(shown)})" if shown else function.__name__


def find_tool(name: str, source: str) -> str:
    """The path of a CUDA toolkit program, or exit with one line saying where to get it."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [shutil.which(name)]
    candidates += [str(Path(home) / "bin" / name)] if home else []
    candidates += sorted(map(str, Path("/usr/local").glob(f"cuda*/bin/{name}")), reverse=True)
    wheels = importlib.util.find_spec("nvidia")  # pip's nvidia-cuda-* wheels
    for folder in wheels.submodule_search_locations if wheels else ():
        candidates += sorted(map(str, Path(folder).glob(f"*/bin/{name}")), reverse=True)
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    sys.exit(f"{name} not found: set CUDA_HOME to a CUDA toolkit, or {source}")


def check_toolchain() -> None:
    """Exit with one line unless NVVM and NVRTC load (numba-cuda compiles through them)."""
    from cuda.pathfinder import load_nvidia_dynamic_lib

    for library, source in (("nvvm", "a CUDA toolkit"), ("nvrtc", "pip install nvidia-cuda-nvrtc")):
        try:
            load_nvidia_dynamic_lib(library)
        except Exception as error:  # the finder's own error names every place it looked
            sys.exit(f"kernel_resources.py needs lib{library} ({source}): {error}")


def resources(kernel, signature, cc, ptxas, cuobjdump=None) -> dict:
    """ptxas -v's registers, stack, spills and shared memory of one compiled kernel, and its
    SASS under "sass" if a cuobjdump is given."""
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc)
    cap = kernel.targetoptions.get("max_registers")
    with tempfile.TemporaryDirectory() as folder:
        source, binary = str(Path(folder) / "kernel.ptx"), str(Path(folder) / "kernel.cubin")
        Path(source).write_text(ptx)
        command = [ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", source, "-o", binary]
        command += ["-maxrregcount", str(cap)] if cap else []
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode:
            raise RuntimeError(result.stderr.strip())
        sass = (
            cuobjdump
            and subprocess.run(
                [cuobjdump, "-sass", binary], capture_output=True, text=True, check=True
            ).stdout
        )
    numbers = {}
    for key, pattern in (
        ("registers", r"Used (\d+) registers"),
        ("stack", r"(\d+) bytes stack frame"),
        ("spill stores", r"(\d+) bytes spill stores"),
        ("spill loads", r"(\d+) bytes spill loads"),
        ("shared", r"(\d+) bytes smem"),
    ):
        found = re.search(pattern, result.stderr)
        numbers[key] = int(found.group(1)) if found else 0
    numbers["cap"] = cap or "-"
    numbers["sass"] = sass
    return numbers


SASS_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def loops(sass: str) -> list[str]:
    """One line per loop (a backward branch) of a kernel's SASS, smallest first."""
    code = [(int(at, 16), op, operands) for at, op, operands in SASS_INSTRUCTION.findall(sass)]
    found = []
    for at, op, operands in code:
        target = re.match(r"\s*0x([0-9a-f]+)", operands) if op == "BRA" else None
        if target and int(target.group(1), 16) < at:
            start = int(target.group(1), 16)
            kinds = [op.split(".")[0] for where, op, _ in code if start <= where <= at]
            fma = kinds.count("FFMA") + kinds.count("DFMA")
            found.append(
                (
                    len(kinds),
                    f"loop {start:#06x}-{at:#06x}: {len(kinds)} instructions, {fma} FMA "
                    f"({fma / len(kinds):.0%}), {kinds.count('LDS')} shared loads, "
                    f"{kinds.count('LDG')} global loads, {kinds.count('BAR')} barriers",
                )
            )
    return [line for _, line in sorted(found)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0 or 8.0")
    parser.add_argument("--loops", action="store_true", help="list each kernel's loops (SASS)")
    parser.add_argument(
        "--only",
        metavar="TEXT",
        help="compile only the kernels whose 'name dtype' contains TEXT, e.g. "
        "'square_steps_rows float32'",
    )
    args = parser.parse_args()
    cc = tuple(int(part) for part in args.cc.split("."))
    ptxas = find_tool("ptxas", "install a CUDA toolkit")
    cuobjdump = find_tool("cuobjdump", "pip install nvidia-cuda-cuobjdump") if args.loops else None
    check_toolchain()
    import numba.cuda.dispatcher as dispatcher

    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    launched = {
        key: dtype
        for key, dtype in record_launches().items()
        if args.only is None or args.only in f"{describe(key[0])} {dtype}"
    }
    columns = ("registers", "cap", "stack", "spill stores", "spill loads", "shared")
    print(f"{len(launched)} kernels launched; compiled for sm_{cc[0]}{cc[1]} ({ptxas})")
    print(f"{'kernel':<58} {'dtype':<8}" + "".join(f"{c:>13}" for c in columns))
    failed = spilled = 0
    rows = sorted(launched.items(), key=lambda item: (describe(item[0][0]), item[1]))
    for (kernel, signature), dtype in rows:
        try:
            numbers = resources(kernel, signature, cc, ptxas, cuobjdump)
        except Exception as error:  # reported; the exit status says so
            print(f"{describe(kernel):<58} {dtype:<8} FAILED: {error}".splitlines()[0])
            failed += 1
            continue
        spills = numbers["spill stores"] or numbers["spill loads"]
        spilled += bool(spills)
        cells = "".join(f"{numbers[c]!s:>13}" for c in columns)
        print(f"{describe(kernel):<58} {dtype:<8}{cells}{'  spills' if spills else ''}")
        for line in loops(numbers["sass"]) if cuobjdump else ():
            print(f"    {line}")
    print(f"{failed} of {len(launched)} kernels failed to compile; {spilled} spill registers")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
