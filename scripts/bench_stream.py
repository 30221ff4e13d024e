"""Benchmark file-to-file attacks (HDF5 in, HDF5 out, streamed in blocks) against in memory.

What it measures, on a synthetic MNIST-like float32 dataset (pixels in [0, 1], most of them
exactly 0, so that gzip compresses it as it would real images; written through
``advgrad.io.convert_dataset`` like a user's data) and a random two-layer network, rows per
second of the same attack (``--method``, default FGSM with eps 0.1, against the model's own
predictions) done four ways:

    in memory   ``advgrad.attacks.run`` on the whole array, already loaded, plus
                ``advgrad.predict`` of the result: the same work as a file job (clean
                predictions, X_adv, adversarial predictions) without any I/O
    stream      ``advgrad.jobs.attack_file``, HDF5 -> HDF5, no compression
    gzip        the same, writing the output with gzip (the input stays uncompressed)
    gzip rerun  the same again, as a later run on the same unchanged files: the inputs'
                SHA-256 come from advgrad's digest cache (``advgrad.io.digests``), filled
                once before the timed runs; every other file job starts with an empty cache
                and hashes both inputs, as a first run does
    dask        the same as stream, with ``scheduler=`` a ``LocalCluster`` of ``--workers``
                worker processes (one Dask thread each, the cores split between them through
                NUMBA_NUM_THREADS); this process reads and writes, the workers attack

A file job is timed from the call to its return: that includes hashing both inputs (SHA-256,
for the output's provenance attributes, on a thread while the job works; not for gzip rerun),
one checkpoint per block (flush, fsync of the partial
output, fsync of its JSON), and the final fsync and rename of the output; the "fixed s" column
is the part of it outside the block loop. The input is read from the page cache (it was
written just before), so a cold disk read would add its own time. Each ratio is rows/s of the
variant over rows/s in memory, measured side by side: the repeats go round-robin over the
variants (a short pause before each run, the order rotated every repeat) and each variant
keeps its best. "others" is the share of all cores used by processes other than this one and
its Dask workers while that variant was timed (from /proc/stat); above 10 % it is flagged.

It also runs a streaming job in a fresh child process at --rows rows and at each
--rss-rows size and prints its peak resident memory and the ratio between the sizes: streaming
memory is bounded by --batch-size, not by the number of rows. The peak is the child's VmHWM
(/proc/self/status): its ``ru_maxrss`` would report this process's peak when that is higher,
because subprocess starts children with vfork and Linux carries the parent's peak RSS across
exec.

Run it from the repository root on a quiet machine::

    python scripts/bench_stream.py                                  # 200000 rows; RSS at 2M
    python scripts/bench_stream.py --rows 20000 --rss-rows 100000   # a quick check
    python scripts/bench_stream.py --method pgd --steps 20 --restarts 5   # where Dask pays off

The default run writes about 13 GB of temporary files (the 2 million row input and its output)
in --dir (default: the system's temporary directory) and deletes them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from bench_gradient import (  # this folder's helpers
    ForeignLoad,
    import_advgrad,
    subprocess_env,
)

PAUSE_S = 0.5
BUSY_WARNING = 0.10
CHILD_TIMEOUT_S = 3600
GENERATE_BLOCK_ROWS = 16384
VARIANTS = ("in memory", "stream", "gzip", "gzip rerun", "dask")


# --------------------------------------------------------------------------- setup


def mnist_like_pixels(rng, n_rows: int, d: int) -> np.ndarray:
    """(n_rows, d) uint8 images: blobs of 4 x 4 pixel cells, about 85 % exact zeros, an empty
    border, and most lit pixels saturated, like MNIST digits. A d that is not a square
    gives rows of 4-pixel runs."""
    side = math.isqrt(d)
    height, width = (side, side) if side * side == d else (1, d)
    cell = 4
    coarse = rng.random((n_rows, -(-height // cell), -(-width // cell)), dtype=np.float32)
    lit = coarse.repeat(cell, axis=1)[:, :height].repeat(cell, axis=2)[:, :, :width] > 0.7
    for axis, size in ((1, height), (2, width)):
        border = size // 7
        if border:
            lit[(slice(None),) * axis + (slice(0, border),)] = False
            lit[(slice(None),) * axis + (slice(size - border, size),)] = False
    saturated = rng.random(lit.shape, dtype=np.float32) < 0.6
    values = np.where(saturated, 255, rng.integers(1, 255, lit.shape, dtype=np.uint8))
    return np.where(lit, values, 0).astype(np.uint8).reshape(n_rows, d)


def write_dataset(advgrad, path: Path, n_rows: int, d: int, n_classes: int, seed: int) -> float:
    """An MNIST-like dataset file of n_rows rows, built in bounded memory: uint8 pixels and
    labels go to .npy files block by block, then ``convert_dataset`` scales them to float32
    in [0, 1] (x_min 0, x_max 1) the way ``advgrad convert-data`` would. Returns the share
    of pixels that are exactly 0."""
    rng = np.random.default_rng(seed)
    pixels_path = path.with_suffix(".pixels.npy")
    labels_path = path.with_suffix(".labels.npy")
    try:
        pixels = np.lib.format.open_memmap(
            pixels_path, mode="w+", dtype=np.uint8, shape=(n_rows, d)
        )
        zeros = 0
        for start in range(0, n_rows, GENERATE_BLOCK_ROWS):
            stop = min(start + GENERATE_BLOCK_ROWS, n_rows)
            block = mnist_like_pixels(rng, stop - start, d)
            zeros += int(np.count_nonzero(block == 0))
            pixels[start:stop] = block
        pixels.flush()
        del pixels
        np.save(labels_path, rng.integers(0, n_classes, n_rows))
        advgrad.io.convert_dataset(pixels_path, path, labels=labels_path, overwrite=True)
    finally:
        pixels_path.unlink(missing_ok=True)
        labels_path.unlink(missing_ok=True)
    return zeros / (n_rows * d)


def write_model(advgrad, path: Path, d: int, hidden: int, n_classes: int, seed: int) -> None:
    """A random float32 network whose activations and predictions are not degenerate."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    model = advgrad.Model(
        W1=(rng.standard_normal((d, hidden)) * (2.0 / math.sqrt(d))).astype(f32),
        b1=(rng.standard_normal(hidden) * 0.1).astype(f32),
        W2=(rng.standard_normal((hidden, n_classes)) * (4.0 / math.sqrt(hidden))).astype(f32),
        b2=(rng.standard_normal(n_classes) * 0.1).astype(f32),
        x_min=0.0,
        x_max=1.0,
    )
    advgrad.save_model(model, path)


def make_attack(args):
    from advgrad.attacks import Attack

    return Attack(
        args.method,
        eps=args.eps,
        steps=args.steps,
        restarts=args.restarts if args.method == "pgd" else 1,
    )


# --------------------------------------------------------------------------- load


# --------------------------------------------------------------------------- variants


@dataclass
class Timing:
    """Best wall seconds of one variant, the fixed part of that run, and foreign loads."""

    best_s: float = math.inf
    fixed_s: float | None = None
    loads: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def remove_output(path: Path) -> None:
    path.unlink(missing_ok=True)


def file_job(attack_file, model_path, data_path, out, attack, batch_size, **options):
    """One timed run of ``attack_file``: (wall seconds, seconds outside the block loop)."""
    remove_output(out)
    started = time.perf_counter()
    report = attack_file(model_path, data_path, out, attack, batch_size=batch_size, **options)
    wall = time.perf_counter() - started
    return wall, wall - report.seconds


def fill_digest_cache(directory: Path, *paths: Path) -> None:
    """Hash ``paths`` into the digest cache in ``directory``, once they are old enough to be
    remembered (``advgrad.io.digests.RECENT_CHANGE_S``)."""
    from advgrad.io.digests import RECENT_CHANGE_S, DigestCache, FileDigest

    newest = max(path.stat().st_ctime for path in paths)
    time.sleep(max(0.0, newest + RECENT_CHANGE_S + 0.5 - time.time()))
    cache = DigestCache(directory)
    for path in paths:
        FileDigest(path, cache).result()
        if cache.lookup(path.stat()) is None:
            raise RuntimeError(f"{path}: its digest was not cached")


def start_cluster(n_workers: int):
    """A LocalCluster of worker processes, the cores split between them; (cluster, pids, the
    workers' numba threads) or (None, (), message) when Dask is missing."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        return None, (), "dask.distributed not installed (pip install 'advgrad[dask]')"
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        env={"NUMBA_NUM_THREADS": str(threads)},
    )
    with Client(cluster, set_as_default=False) as client:
        pids = tuple(client.run(os.getpid).values())
        numba_threads = set(client.run(_numba_threads).values())
    return cluster, pids, f"{n_workers} workers x {sorted(numba_threads)} numba threads"


def _numba_threads() -> int:
    import numba

    return numba.get_num_threads()


def check_same(advgrad, out: Path, X_adv: np.ndarray, pred_adv: np.ndarray) -> str:
    X_file, _ = advgrad.load_dataset(out)
    same = np.array_equal(X_file.reshape(X_adv.shape), X_adv)
    same_pred = np.array_equal(advgrad.io.read_column(out, "pred_adv"), pred_adv)
    return "bitwise equal to in memory" if same and same_pred else "DIFFERS from in memory"


def measure(args, advgrad, work: Path, model_path: Path, data_path: Path):
    """{variant: Timing}, the output sizes, output checks and the Dask description."""
    from advgrad.attacks import run
    from advgrad.io.digests import CACHE_DIR_VARIABLE
    from advgrad.jobs import attack_file

    os.environ[CACHE_DIR_VARIABLE] = tempfile.mkdtemp(dir=work)  # never the user's cache
    attack = make_attack(args)
    model = advgrad.load_model(model_path)
    X, _ = advgrad.load_dataset(data_path)
    outs = {name: work / f"out-{name.replace(' ', '-')}.h5" for name in VARIANTS[1:]}
    cluster, worker_pids, dask_label = (None, (), "skipped (--workers 0)")
    if args.workers:
        cluster, worker_pids, dask_label = start_cluster(args.workers)
    options = {
        "stream": {},
        "gzip": {"compression": "gzip"},
        "gzip rerun": {"compression": "gzip"},
        "dask": {"scheduler": cluster.scheduler_address} if cluster else None,
    }
    digests = work / "digests"  # the digest cache of gzip rerun; the others get a new one
    fill_digest_cache(digests, model_path, data_path)
    variants = [name for name in VARIANTS if name == "in memory" or options[name] is not None]
    result: dict = {}

    def in_memory():
        X_adv = run(model, X, None, attack, clip=(0.0, 1.0))
        return X_adv, advgrad.predict(model, X_adv)

    def one_run(name):
        if name == "in memory":
            started = time.perf_counter()
            result["in memory"] = in_memory()
            return time.perf_counter() - started, None, []
        cache = digests if name == "gzip rerun" else Path(tempfile.mkdtemp(dir=work))
        os.environ[CACHE_DIR_VARIABLE] = str(cache)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wall, fixed = file_job(
                attack_file,
                model_path,
                data_path,
                outs[name],
                attack,
                args.batch_size,
                **options[name],
            )
        return wall, fixed, [str(w.message).split("\n")[0] for w in caught]

    print("warming up (kernels load from Numba's cache; Dask workers import advgrad) ...")
    warm = work / "warmup.h5"
    write_dataset(
        advgrad, warm, min(args.rows, 2 * args.batch_size), args.features, args.classes, 1
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted in the timed runs
        for name in variants[1:]:
            file_job(
                attack_file, model_path, warm, outs[name], attack, args.batch_size, **options[name]
            )
    warm.unlink()
    timings = {name: Timing() for name in variants}
    checks = {}
    try:
        for repeat in range(args.repeats):
            shift = repeat % len(variants)
            for name in variants[shift:] + variants[:shift]:
                time.sleep(PAUSE_S)
                load = ForeignLoad(worker_pids if name == "dask" else ())
                wall, fixed, caught = one_run(name)
                share = load.share()
                timing = timings[name]
                if share is not None:
                    timing.loads.append(share)
                timing.warnings += caught
                if wall < timing.best_s:
                    timing.best_s, timing.fixed_s = wall, fixed
                print(f"  repeat {repeat + 1}: {name:<9} {args.rows / wall:>12,.0f} rows/s")
            if repeat == 0:
                X_adv, pred_adv = result["in memory"]
                for name in variants[1:]:
                    checks[name] = check_same(advgrad, outs[name], X_adv, pred_adv)
    finally:
        if cluster is not None:
            cluster.close()
    sizes = {name: outs[name].stat().st_size for name in variants[1:]}
    for out in outs.values():
        remove_output(out)
    return timings, sizes, checks, dask_label


# --------------------------------------------------------------------------- memory


RSS_CHILD = """
import json, sys
from pathlib import Path
model_path, data_path, out, method, eps, steps, restarts, batch_size = sys.argv[1:9]


def status_kib(field):
    return int(Path("/proc/self/status").read_text().split(field + ":")[1].split()[0])


from advgrad.attacks import Attack
from advgrad.jobs import attack_file
attack = Attack(method, eps=float(eps), steps=int(steps), restarts=int(restarts))
after_imports = status_kib("VmRSS")
attack_file(model_path, data_path, out, attack, batch_size=int(batch_size))
print(json.dumps({"peak_kib": status_kib("VmHWM"), "after_imports_kib": after_imports}))
"""
"""The child's own peak RSS is VmHWM, not ru_maxrss: subprocess starts children with vfork,
and Linux carries the parent's peak RSS into the child's ru_maxrss across exec."""


def peak_rss(args, advgrad, model_path: Path, data_path: Path, out: Path) -> dict | str:
    """Peak RSS (KiB) of a streaming job in a fresh child process, or why it failed.

    The timed runs have filled Numba's cache, so the child loads the kernels instead of
    compiling them (the compiler would take more memory than the job)."""
    attack = make_attack(args)
    command = [
        *(sys.executable, "-c", RSS_CHILD, str(model_path), str(data_path), str(out)),
        *(attack.method, str(attack.eps), str(attack.steps), str(attack.restarts)),
        str(args.batch_size),
    ]
    remove_output(out)
    done = subprocess.run(
        command,
        env=subprocess_env(advgrad),
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    remove_output(out)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return f"child failed (exit {done.returncode}): {lines[-1] if lines else ''}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_report(args, advgrad, work: Path, model_path: Path, data_path: Path) -> None:
    sizes = sorted({args.rows, *args.rss_rows})
    print(
        f"== peak RSS of a streaming job (fresh child process, VmHWM; batch {args.batch_size} rows)"
    )
    print(f"{'rows':>10}  {'input MB':>9}  {'peak RSS MiB':>12}  {'after imports MiB':>17}")
    peaks = {}
    for n_rows in sizes:
        path = data_path
        if n_rows != args.rows:
            print(f"  writing a {n_rows:,}-row dataset ...", flush=True)
            path = work / f"data-{n_rows}.h5"
            write_dataset(advgrad, path, n_rows, args.features, args.classes, 2)
        input_mb = path.stat().st_size / 1e6
        rss = peak_rss(args, advgrad, model_path, path, work / "out-rss.h5")
        if path != data_path:
            path.unlink()
        if isinstance(rss, str):
            print(f"{n_rows:>10,}  {input_mb:>9,.0f}  {rss}")
            continue
        peaks[n_rows] = rss["peak_kib"]
        print(
            f"{n_rows:>10,}  {input_mb:>9,.0f}  {rss['peak_kib'] / 1024:>12,.0f}  "
            f"{rss['after_imports_kib'] / 1024:>17,.0f}"
        )
    if len(peaks) >= 2:
        low, high = min(peaks), max(peaks)
        print(
            f"peak RSS at {high:,} rows / at {low:,} rows: {peaks[high] / peaks[low]:.2f}x "
            f"for {high / low:g}x the rows"
        )


# --------------------------------------------------------------------------- report


def environment_report(advgrad, dask_label: str) -> None:
    import h5py
    import numba

    print("== environment")
    print(
        f"python {platform.python_version()}  numpy {np.__version__}  numba {numba.__version__}"
        f"  h5py {h5py.__version__}  advgrad {advgrad.__version__}"
    )
    from advgrad.io import fastzlib

    isal = importlib.import_module("isal") if fastzlib.isal_zlib is not None else None
    print(
        "gzip deflate and CRC-32: "
        + (f"ISA-L (isal {isal.__version__})" if isal else f"zlib {fastzlib.zlib.ZLIB_VERSION}")
    )
    try:
        dask = importlib.import_module("dask")
        print(f"dask {dask.__version__}; cluster: {dask_label}")
    except ImportError:
        print(f"dask not installed; cluster: {dask_label}")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
        f"{affinity} usable; numba threads here: {numba.get_num_threads()}"
    )


def print_table(args, timings: dict[str, Timing], sizes, checks, input_bytes, zeros) -> None:
    memory = args.rows / timings["in memory"].best_s
    head = ["variant", "rows/s", "vs in memory", "fixed s", "others", "output MB", "output"]
    lines = []
    for name, timing in timings.items():
        rate = args.rows / timing.best_s
        load = max(timing.loads) if timing.loads else None
        lines.append(
            [
                name,
                f"{rate:,.0f}",
                f"{rate / memory:.2f}x",
                "-" if timing.fixed_s is None else f"{timing.fixed_s:.2f}",
                "-" if load is None else f"{load:.0%}",
                f"{sizes[name] / 1e6:,.0f}" if name in sizes else "-",
                checks.get(name, "-"),
            ]
        )
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]

    def render(cells):
        return "  ".join(
            c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(render(head))
    print(render(["-" * w for w in widths]))
    for cells in lines:
        print(render(cells))
    print(f"input: {input_bytes / 1e6:,.0f} MB of float32, uncompressed; {zeros:.0%} exact zeros")
    print(
        "rows/s: wall time of the whole call, best of the repeats. For the file jobs it "
        "includes\n  SHA-256 of both inputs (gzip rerun: cached), a checkpoint per block "
        "(fsync of the partial\n  output and its JSON) and the final fsync and rename; "
        "'fixed s' is the part outside the\n  block loop (opening, waiting for the hashes, "
        "the final fsync and rename).\n  In memory: attacks.run + predict on the loaded array."
    )
    print("others: largest share of all cores used by other processes during that variant's runs")
    busy = [name for name, t in timings.items() if t.loads and max(t.loads) > BUSY_WARNING]
    if busy:
        print(
            f"  warning: other processes used over {BUSY_WARNING:.0%} of the cores while "
            f"{', '.join(busy)} ran; their timings are suspect, rerun on a quiet machine"
        )
    for name, timing in timings.items():
        if timing.warnings:
            distinct = sorted(set(timing.warnings))
            print(f"  {name}: {len(timing.warnings)} warnings, e.g. {distinct[0]!r}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the dataset timed")
    parser.add_argument("--features", type=int, default=784, help="d (784: 28 x 28 images)")
    parser.add_argument("--hidden", type=int, default=256, help="H, hidden units")
    parser.add_argument("--classes", type=int, default=10, help="C")
    parser.add_argument(
        "--batch-size", type=int, default=8192, help="rows per block of the file jobs"
    )
    parser.add_argument(
        "--method",
        default="fgsm",
        choices=("fgsm", "bim", "pgd", "mifgsm", "deepfool"),
        help="the attack (L-inf, against the model's predictions)",
    )
    parser.add_argument("--eps", type=float, default=0.1, help="radius")
    parser.add_argument("--steps", type=int, default=10, help="bim, pgd, mifgsm iterations")
    parser.add_argument("--restarts", type=int, default=1, help="pgd random starts")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant")
    parser.add_argument(
        "--workers", type=int, default=2, help="Dask worker processes (0: skip Dask)"
    )
    parser.add_argument(
        "--rss-rows",
        type=int,
        nargs="*",
        default=[2_000_000],
        metavar="N",
        help="dataset sizes at which to measure peak RSS besides --rows (none: only --rows)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to write the temporary files (default: the system's temporary "
        "directory)%(default).0s",
    )
    args = parser.parse_args(argv)
    positive = ("rows", "features", "hidden", "batch_size", "steps", "restarts", "repeats")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.classes < 2:
        parser.error("--classes must be at least 2")
    if args.workers < 0 or any(n < 1 for n in args.rss_rows):
        parser.error("--workers must be >= 0 and --rss-rows positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    advgrad = import_advgrad()
    importlib.import_module("advgrad.io")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir)))
        model_path, data_path = work / "model.h5", work / "data.h5"
        print(f"writing a {args.rows:,}-row dataset and a random model to {work} ...", flush=True)
        write_model(advgrad, model_path, args.features, args.hidden, args.classes, 0)
        zeros = write_dataset(advgrad, data_path, args.rows, args.features, args.classes, 0)
        timings, sizes, checks, dask_label = measure(args, advgrad, work, model_path, data_path)
        input_bytes = args.rows * args.features * 4
        print()
        environment_report(advgrad, dask_label)
        print()
        attack = make_attack(args)
        details = "" if attack.method in ("fgsm", "deepfool") else f", {attack.steps} steps"
        if attack.method == "pgd":
            details += f", {attack.restarts} restarts"
        print(
            f"== {attack.method} (L{attack.norm}, eps {attack.eps:g}{details}), float32, "
            f"{args.rows:,} rows x {args.features} features, H={args.hidden}, "
            f"C={args.classes}, batch {args.batch_size}; best of {args.repeats}, interleaved"
        )
        print_table(args, timings, sizes, checks, input_bytes, zeros)
        print()
        memory_report(args, advgrad, work, model_path, data_path)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
