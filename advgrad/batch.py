"""File-to-file attacks: stream a dataset through the kernels into adversarial datasets.

One pass over the input serves every output: each block of rows is read once (by a reader thread,
one block ahead), attacked for each output (outputs that differ only in eps share the labels, and
FGSM outputs share one gradient), and handed to a writer thread that writes it and checkpoints
every output, so reading, computing and writing overlap and memory stays bounded by the block
size. An interrupted job (Ctrl-C, SIGTERM, a kill, a power loss) leaves resumable partial outputs
(``advgrad.io.AdversarialWriter``); the same job run again continues where they stopped and
writes the same files as an uninterrupted run. With a Dask scheduler, blocks are attacked as
tasks on the cluster's workers (the client reads and sends them) and come back in order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import advgrad
from advgrad.attacks import (
    DEFAULT_ATTACK,
    Attack,
    attack_labels,
    check_radius,
    check_search,
    declared_range,
    minimal_eps,
    norm_order,
    perturb,
    success_of,
)
from advgrad.backend import get_backend
from advgrad.errors import AdvgradError, InputFileError
from advgrad.io import AdversarialWriter, load_model, open_dataset, read_column, sha256_file
from advgrad.io.safe import MAX_READ_BYTES
from advgrad.kernels import cpu
from advgrad.kernels.cpu import ROWS_PER_BLOCK
from advgrad.model import MAX_WEIGHTS, Model

DEFAULT_BATCH_SIZE = 8192
BLOCK_WORKING_BYTES = 2**30
"""Bound on one set of a block's working arrays, rows x (d + H + C) values of the compute
dtype (the pipeline holds a few such sets: input and output buffers, hidden activations).
Wide networks get fewer rows per block (``rows_per_block``), never fewer than
``ROWS_PER_BLOCK``: a network whose d + H + C values per row exceed this bound over 256 rows
uses 256-row blocks."""
WRITES_IN_FLIGHT = 2
"""Blocks handed to the writer thread and not yet written, at most (bounds memory)."""
TASKS_PER_WORKER_THREAD = 2
"""With Dask: blocks in flight per worker thread of the cluster."""
SCHEDULER_TIMEOUT_S = 10.0
COMPILE_NOTICE_AFTER_S = 1.0
"""How long the first-row warm-up (``_compile_kernels``) runs before the user is told that
the kernels are compiling: loading them from Numba's cache takes well under this."""
"""With Dask: seconds to wait for the scheduler to answer."""


class NonFiniteResult(ValueError):
    """An attack turned a finite input row into one holding inf or NaN (an eps or step size
    that takes it past the largest value of the data's dtype). Such a row is never written:
    the job's outputs are discarded."""


class Interrupted(AdvgradError):
    """A file-level job stopped between blocks on request; its partial outputs are kept.

    Attributes
    ----------
    rows_done : int
        Rows of every output safely on disk.
    n_rows : int
    """

    def __init__(self, rows_done: int, n_rows: int) -> None:
        self.rows_done = rows_done
        self.n_rows = n_rows
        super().__init__(
            f"stopped after {rows_done} of {n_rows} rows; the partial output is kept: "
            "run the same command again to resume"
        )


@dataclass(frozen=True)
class AttackReport:
    """What ``attack_file`` did for one output.

    ``success_rate`` is the fraction of rows where the attack succeeded: the prediction
    moved off the attacked label (untargeted) or onto the target (targeted). The accuracies
    are None when the dataset has no labels. Perturbation norms are means over rows of
    ||X_adv - X|| on the flattened rows. The rates, accuracies and means are None for a
    dataset of 0 rows. ``eps_min`` holds the per-row minimal eps when it was searched (0
    values for 0 rows). ``seconds`` covers reading, attacking and writing the rows of this run
    (not loading the model or hashing the inputs); ``resumed_rows`` were done by an
    interrupted run before it.
    """

    output: Path
    attack: Attack
    n_rows: int
    labels: str
    clip: tuple[float, float]
    clean_accuracy: float | None
    adversarial_accuracy: float | None
    success_rate: float | None
    mean_linf: float | None
    mean_l2: float | None
    seconds: float
    eps_min: np.ndarray | None = None
    resumed_rows: int = 0

    @property
    def rows_per_second(self) -> float:
        """Rows attacked per second in this run, reading and writing included."""
        rows = self.n_rows - self.resumed_rows
        return rows / self.seconds if self.seconds > 0 else math.inf


def default_output_name(data_path: str | os.PathLike, attack: Attack) -> Path:
    """``<data stem>-<method>-l<norm>-eps<eps>.h5`` (DeepFool: no eps) in the current folder."""
    size = "" if attack.method == "deepfool" else f"-eps{attack.eps:g}"
    return Path(f"{Path(data_path).stem}-{attack.method}-l{attack.norm}{size}.h5")


def clip_range(clip, reader, model) -> tuple[float, float]:
    """The explicit clip, else the dataset's x_min/x_max, else the model's, else none
    (``declared_range``), as a (x_min, x_max) pair with infinite ends for none."""
    if clip is None:
        clip = declared_range(reader, model)
    return (-math.inf, math.inf) if clip is None else (float(clip[0]), float(clip[1]))


def rows_per_block(batch_size: int, model: Model) -> int:
    """Rows in one block of a file job on ``model`` (in its compute dtype).

    ``aligned_batch_size(batch_size)``, capped for a wide network so that one set of a
    block's working arrays, rows x (d + H + C) values, takes at most ``BLOCK_WORKING_BYTES``,
    but never below ``ROWS_PER_BLOCK``: every block size stays a multiple of it, so every
    batch size still gives bitwise the same output.

    Raises
    ------
    ValueError
        The batch size is below 1, or the block's rows take more than the ``MAX_READ_BYTES``
        read at once.
    """
    aligned = aligned_batch_size(batch_size)
    itemsize = model.dtype.itemsize
    values_per_row = model.n_inputs + model.n_hidden + model.n_classes
    widest = BLOCK_WORKING_BYTES // (values_per_row * itemsize) // ROWS_PER_BLOCK
    rows = min(aligned, max(widest, 1) * ROWS_PER_BLOCK)
    row_bytes = model.n_inputs * itemsize
    if rows * row_bytes > MAX_READ_BYTES:
        largest = MAX_READ_BYTES // row_bytes // ROWS_PER_BLOCK * ROWS_PER_BLOCK
        remedy = f"use a batch size of at most {largest}" if largest else "the rows are too wide"
        raise ValueError(
            f"a block of {rows} rows takes {rows * row_bytes} bytes, more than the "
            f"{MAX_READ_BYTES} read at once; {remedy}"
        )
    return rows


def perturbation_norms(X_adv: np.ndarray, rows: np.ndarray, first_row: int, output):
    """L-inf and L2 norms (m,) float64 of each row of X_adv - rows, both (m, d).

    Raises
    ------
    NonFiniteResult
        Naming the first row (absolute index, from ``first_row``) whose adversarial values
        are not finite while its input row is, and ``output``.
    """
    linf, l2 = np.empty(len(rows)), np.empty(len(rows))
    cpu.perturbation_norms_into(X_adv, rows, linf, l2)
    suspects = np.flatnonzero(~np.isfinite(linf))
    if suspects.size:
        made = ~np.isfinite(X_adv[suspects]).all(axis=1) & np.isfinite(rows[suspects]).all(axis=1)
        if made.any():
            raise NonFiniteResult(
                f"{output}: the attack made row {first_row + int(suspects[made][0])} "
                f"non-finite (inf or NaN): its eps or step size goes past the largest "
                f"{X_adv.dtype} value; use a smaller eps or a clip range"
            )
    return linf, l2


def aligned_batch_size(batch_size: int) -> int:
    """``batch_size`` rounded up to a multiple of ``ROWS_PER_BLOCK``.

    Kernel blocks and random draws are aligned to absolute row indices in groups of this
    size, so every aligned batch size gives bitwise the same output.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return -(-batch_size // ROWS_PER_BLOCK) * ROWS_PER_BLOCK


@contextmanager
def open_for_model(
    model_path, data_path, *, allow_nonfinite: bool = False, max_weights: int = MAX_WEIGHTS
):
    """Load a model and open a dataset it can read; yields (model, reader).

    Refuses a model with more than ``max_weights`` elements in W1 or W2 (before reading it),
    and data whose rows do not flatten to the model's d; the model comes back in the
    dataset's dtype, the compute dtype of every file-level job (a float64 weight beyond
    float32's range is refused rather than turned into inf).
    """
    model = load_model(model_path, max_weights=max_weights)
    with open_dataset(
        data_path, n_classes=model.n_classes, allow_nonfinite=allow_nonfinite
    ) as reader:
        width = math.prod(reader.row_shape)
        if width != model.n_inputs:
            raise InputFileError(
                data_path,
                "/X",
                f"rows have shape {reader.row_shape} ({width} features); "
                f"the model expects {model.n_inputs}",
            )
        if model.dtype != reader.dtype:
            model = load_model(model_path, as_dtype=reader.dtype, max_weights=max_weights)
        yield model, reader


def provenance(model_path, data_path) -> dict:
    """Output attributes naming the inputs (file names and SHA-256), version and time."""
    return {
        "model_sha256": sha256_file(model_path),
        "data_sha256": sha256_file(data_path),
        "model_file": Path(model_path).name,
        "data_file": Path(data_path).name,
        "advgrad_version": advgrad.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class Plan:
    """What turns a block of rows into adversarial rows, for each output of a job."""

    attacks: tuple[Attack, ...]
    use_labels: bool
    clip: tuple[float, float]
    min_eps_tolerance: float | None
    eps_max: tuple[float, ...]
    device: str


@dataclass(frozen=True)
class BlockResult:
    """One output's share of an attacked block: what its writer stores, and the reference
    classes success is measured against."""

    X_adv: np.ndarray
    pred_clean: np.ndarray
    pred_adv: np.ndarray
    reference: np.ndarray
    columns: dict[str, np.ndarray]

    def rows_from(self, offset: int) -> BlockResult:
        """The result without its first ``offset`` rows."""
        return BlockResult(
            self.X_adv[offset:],
            self.pred_clean[offset:],
            self.pred_adv[offset:],
            self.reference[offset:],
            {name: values[offset:] for name, values in self.columns.items()},
        )


def attack_block(
    model,
    rows: np.ndarray,
    y,
    plan: Plan,
    first_row: int,
    outputs: Sequence[int],
    out: Sequence[np.ndarray] | None = None,
) -> list[BlockResult | None]:
    """Attack one block of rows (m, d) for the outputs listed in ``outputs`` (indices into
    ``plan.attacks``); the others get None. A pure function of its arguments, so it runs
    the same in this process or on a Dask worker. ``out[i]`` (m, d), when given, receives
    output i's adversarial rows.

    Outputs with the same targets share the labels; FGSM outputs with the same targets share
    one gradient (``fgm_from_gradient`` steps it bitwise as ``fgm_step`` would).
    """
    backend = get_backend(plan.device)

    def labels_key(attack: Attack):
        return (attack.target, attack.seed) if attack.targeted else None

    labels_of, gradient_of = {}, {}
    fgsm_sharing = Counter(
        labels_key(plan.attacks[i]) for i in outputs if plan.attacks[i].method == "fgsm"
    )
    results: list[BlockResult | None] = [None] * len(plan.attacks)
    for i in outputs:
        attack = plan.attacks[i]
        key = labels_key(attack)
        if key not in labels_of:
            labels_of[key] = attack_labels(
                model, rows, y if plan.use_labels else None, attack, first_row, backend
            )
        labels = labels_of[key]
        if attack.method == "fgsm" and fgsm_sharing[key] > 1:
            if key not in gradient_of:
                gradient_of[key] = backend.input_gradient(model, rows, labels.Y)[0]
            sign = -1.0 if attack.targeted else 1.0
            X_adv = backend.fgm_from_gradient(
                *(rows, gradient_of[key], sign * attack.eps, norm_order(attack.norm)),
                *plan.clip,
                out=None if out is None else out[i],
            )
        else:
            X_adv = perturb(
                *(model, rows, labels, attack, plan.clip),
                first_row=first_row,
                backend=backend,
                out=None if out is None else out[i],
            )
        columns = {}
        if attack.targeted:
            columns["target"] = labels.reference
        if plan.min_eps_tolerance is not None:
            columns["eps_min"] = minimal_eps(
                *(model, rows, labels, attack, plan.clip),
                eps_max=plan.eps_max[i],
                tolerance=plan.min_eps_tolerance,
                first_row=first_row,
                backend=backend,
            )
        pred_adv = backend.forward(model, X_adv, labels.Y[:0])[2]
        results[i] = BlockResult(X_adv, labels.predicted, pred_adv, labels.reference, columns)
    return results


@dataclass
class _Totals:
    """Running sums of one output's report; saved in its checkpoints."""

    clean_correct: int = 0
    adversarial_correct: int = 0
    succeeded: int = 0
    linf_total: float = 0.0
    l2_total: float = 0.0

    def add(self, norms, result: BlockResult, classes, targeted: bool) -> None:
        """Count a block: ``norms`` (linf, l2) of its rows (``perturbation_norms``)."""
        linf, l2 = norms
        self.linf_total += float(linf.sum())
        self.l2_total += float(l2.sum())
        self.succeeded += int(success_of(result.reference, result.pred_adv, targeted).sum())
        if classes is not None:
            self.clean_correct += int((result.pred_clean == classes).sum())
            self.adversarial_correct += int((result.pred_adv == classes).sum())


class _LocalTasks:
    """Runs block attacks in this process, one at a time (the kernels use every core)."""

    in_flight = 1
    in_process = True

    def submit(self, function, model, *args) -> Future:
        future: Future = Future()
        future.set_result(function(model, *args))
        return future

    def close(self) -> None:
        """Nothing to release."""


class _DaskTasks:
    """Runs block attacks as tasks on a Dask cluster; the model is sent to every worker once,
    and each block goes straight to a worker and back (not through the scheduler)."""

    in_process = False

    def __init__(self, address: str, model) -> None:
        self._client = _dask_client(address)
        self._model = self._client.scatter(model, broadcast=True)
        threads = sum(self._client.nthreads().values())
        self.in_flight = max(1, TASKS_PER_WORKER_THREAD * threads)

    def submit(self, function, model, rows, y, *args):
        rows, y = (None if a is None else self._client.scatter(a, direct=True) for a in (rows, y))
        return self._client.submit(function, self._model, rows, y, *args, pure=False)

    def close(self) -> None:
        self._client.close()


def _dask_client(address: str):
    """A Dask client of the scheduler at ``address``, or AdvgradError with one line within
    ``SCHEDULER_TIMEOUT_S`` (a peer that is not a scheduler, or stays silent, included)."""
    try:
        from dask.distributed import Client
    except ImportError as exc:
        raise AdvgradError(
            "--scheduler needs dask.distributed: pip install 'advgrad[dask]'"
        ) from exc
    outcome: dict = {}

    def connect() -> None:
        try:
            outcome["client"] = Client(
                address, set_as_default=False, timeout=SCHEDULER_TIMEOUT_S, direct_to_workers=True
            )
        except Exception as exc:  # distributed raises many kinds on a bad peer
            outcome["error"] = exc

    # The handshake after connecting has no timeout of its own: wait for it in a thread.
    thread = threading.Thread(target=connect, name="advgrad-dask-connect", daemon=True)
    thread.start()
    thread.join(SCHEDULER_TIMEOUT_S + 1.0)
    if "client" in outcome:
        return outcome["client"]
    if "error" in outcome:
        error = outcome["error"]
        reason = " ".join(str(error).split()) or type(error).__name__
    else:
        reason = f"no answer within {SCHEDULER_TIMEOUT_S:g} s"
    raise AdvgradError(f"cannot reach the Dask scheduler at {address}: {reason}")


def attack_file(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    out_path: str | os.PathLike,
    attack: Attack = DEFAULT_ATTACK,
    **options,
) -> AttackReport:
    """Attack every row of a dataset file and write the adversarial dataset.

    ``attack_files`` with one output; the options are the same.
    """
    return attack_files(model_path, data_path, [(attack, out_path)], **options)[0]


def attack_files(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    outputs: Sequence[tuple[Attack, str | os.PathLike]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    use_labels: bool = False,
    clip: tuple[float, float] | None = None,
    min_eps_tolerance: float | None = None,
    eps_max: float | None = None,
    compression: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    allow_nonfinite: bool = False,
    max_weights: int = MAX_WEIGHTS,
    resume: bool | None = None,
    scheduler: str | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    notice: Callable[[str], None] | None = None,
) -> list[AttackReport]:
    """Attack every row of a dataset file once for each ``(attack, output path)``, in one pass.

    Rows stream from ``data_path`` in blocks of ``rows_per_block(batch_size, model)``, so
    memory does not grow with the number of rows; each output is written beside its path
    and renamed into place once complete (DESIGN.md sections 3 and 4). Computation runs in
    the dataset's dtype. Labels are the model's predictions unless ``use_labels``, which
    takes the dataset's ``/y``. ``clip`` defaults to the dataset's (else the model's)
    x_min/x_max, else no clipping. With ``min_eps_tolerance``, the per-row minimal eps in
    [0, eps_max] is searched too and written as ``/eps_min`` (eps_max defaults to
    x_max - x_min, or 10 eps without a clip range; both are refused up front unless every
    search ends: ``advgrad.attacks.check_search``). Targeted attacks write their per-row
    targets as ``/target``. ``allow_nonfinite`` accepts NaN and inf in ``/X`` (they pass
    through to the output); ``max_weights`` bounds the model (``open_for_model``); an attack
    that makes a finite row non-finite (an eps or step size too large for the data's dtype)
    raises ``NonFiniteResult`` and discards the outputs.

    Crash safety: every block is checkpointed. ``resume`` None continues the partial outputs
    of an interrupted run of the same job (same inputs and settings), else starts afresh;
    True insists on resuming; False discards partial outputs. Setting ``stop`` makes the
    job stop after the block in progress and raise ``Interrupted`` (partial outputs kept).

    ``scheduler`` is the address of a Dask scheduler: blocks are then attacked on its
    workers (the output is the same). ``progress(rows_done, n_rows)`` is called after each
    block; ``notice(message)`` with anything the user should know (a partial output
    resumed or discarded).

    Returns
    -------
    list of AttackReport
        One per output, in order.
    """
    if not outputs:
        raise ValueError("at least one output is needed")
    paths = [Path(path) for _, path in outputs]
    if len({path.resolve() for path in paths}) < len(paths):
        raise ValueError("two outputs have the same path")
    get_backend(device)
    attacks = tuple(attack for attack, _ in outputs)
    with (
        open_for_model(
            model_path, data_path, allow_nonfinite=allow_nonfinite, max_weights=max_weights
        ) as (model, reader),
        ExitStack() as stack,
    ):
        if use_labels and not reader.has_labels:
            raise InputFileError(data_path, "/y", "is missing; attack the predictions instead")
        block = rows_per_block(batch_size, model)
        for attack in attacks:
            attack.check_range(reader.dtype)
        if eps_max is not None:
            check_radius("eps_max (--eps-max)", eps_max, reader.dtype)
        x_min, x_max = clip_range(clip, reader, model)
        if not x_min <= x_max:
            raise ValueError(f"clip range ({x_min}, {x_max}) is empty")
        finite_range = math.isfinite(x_max - x_min)
        plan = Plan(
            attacks=attacks,
            use_labels=use_labels,
            clip=(x_min, x_max),
            min_eps_tolerance=min_eps_tolerance,
            eps_max=tuple(
                eps_max if eps_max is not None else x_max - x_min if finite_range else 10 * a.eps
                for a in attacks
            ),
            device=device,
        )
        if min_eps_tolerance is not None:
            for limit in plan.eps_max:
                check_search(
                    limit,
                    min_eps_tolerance,
                    reader.dtype,
                    names=("eps_max (--eps-max)", "min_eps_tolerance (--min-eps)"),
                )
        shared = {
            "labels": "dataset" if use_labels else "predictions",
            "x_min": x_min if math.isfinite(x_min) else None,  # None: not stored
            "x_max": x_max if math.isfinite(x_max) else None,
            "min_eps_tolerance": min_eps_tolerance,
            **provenance(model_path, data_path),
        }
        # Compressed outputs get chunks of one aligned row group, so that every block writes
        # whole chunks, compressed in parallel (AdversarialWriter), at any batch size.
        chunk_rows = ROWS_PER_BLOCK if compression else block
        writers = []
        for attack, path, limit in zip(attacks, paths, plan.eps_max, strict=True):
            columns = {}
            if attack.targeted:
                columns["target"] = np.int64
            if min_eps_tolerance is not None:
                columns["eps_min"] = np.float64
            writer = AdversarialWriter(
                path,
                n_rows=reader.n_rows,
                row_shape=reader.row_shape,
                dtype=reader.dtype,
                y_template=reader.y_template,
                attrs={
                    **attack.describe(),
                    **shared,
                    "eps_max": limit if min_eps_tolerance is not None else None,
                },
                rows_per_chunk=min(chunk_rows, max(reader.n_rows, 1)),
                compression=compression,
                overwrite=overwrite,
                inputs=(model_path, data_path),
                columns=columns,
                resume=resume,
            )
            writers.append(stack.enter_context(writer))
            if notice is not None and writer.notice:
                notice(writer.notice)
            if notice is not None and writer.resumed_rows:
                notice(f"{path}: resuming after row {writer.resumed_rows} of {reader.n_rows}")
        tasks = _DaskTasks(scheduler, model) if scheduler else _LocalTasks()
        stack.callback(tasks.close)
        try:
            if tasks.in_process and reader.n_rows:
                _compile_kernels(reader, model, plan, writers, notice)
            started = time.perf_counter()
            totals = _stream(reader, model, plan, writers, tasks, block, stop, progress)
        except NonFiniteResult:
            for writer in writers:
                writer.discard()
            raise
        seconds = time.perf_counter() - started
        n_rows, labelled = reader.n_rows, reader.has_labels

    def mean(total: float, labels_needed: bool = False) -> float | None:
        return None if n_rows == 0 or (labels_needed and not labelled) else total / n_rows

    reports = []
    for attack, writer, total in zip(attacks, writers, totals, strict=True):
        eps_min = read_column(writer.target, "eps_min") if min_eps_tolerance is not None else None
        reports.append(
            AttackReport(
                output=writer.target,
                attack=attack,
                n_rows=n_rows,
                labels=shared["labels"],
                clip=(x_min, x_max),
                clean_accuracy=mean(total.clean_correct, labels_needed=True),
                adversarial_accuracy=mean(total.adversarial_correct, labels_needed=True),
                success_rate=mean(total.succeeded),
                mean_linf=mean(total.linf_total),
                mean_l2=mean(total.l2_total),
                seconds=seconds,
                eps_min=eps_min,
                resumed_rows=writer.resumed_rows,
            )
        )
    return reports


def _compile_kernels(reader, model, plan: Plan, writers, notice) -> None:
    """Attack the first row with one step (one restart, one DeepFool iteration) of each
    attack and throw the result away: the kernels the job uses are then compiled (or loaded
    from Numba's cache) before the rows-per-second clock starts, whatever the job's step
    count. When that takes longer than ``COMPILE_NOTICE_AFTER_S`` (a first run on this
    machine), ``notice`` says so while it happens."""
    timer = None
    if notice is not None:
        message = "compiling the kernels for this machine (first run only)"
        timer = threading.Timer(COMPILE_NOTICE_AFTER_S, notice, [message])
        timer.daemon = True
        timer.start()
    try:
        X, y = reader.read(0, 1)
        rows = X.reshape(1, -1)
        attacks = tuple(
            dataclasses.replace(attack, steps=1, restarts=1, max_iter=1) for attack in plan.attacks
        )
        one_step = dataclasses.replace(plan, attacks=attacks)
        results = attack_block(model, rows, y, one_step, 0, range(len(attacks)))
        for writer, result in zip(writers, results, strict=True):
            perturbation_norms(result.X_adv, rows, 0, writer.target)
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()  # no thread of ours may print while the command exits


class _BlockBuffers:
    """A fixed set of block-sized arrays, used in turn: a job's large arrays are allocated
    once, so its memory is set by the block size from the first blocks on, whatever the
    overlap of reading, computing and writing turns out to be. ``take`` waits for a free one.
    """

    def __init__(self, count: int, shape: tuple[int, ...], dtype: np.dtype, empty=np.empty) -> None:
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(empty(shape, dtype))

    def take(self) -> np.ndarray:
        return self._free.get()

    def give_back(self, buffer: np.ndarray) -> None:
        self._free.put(buffer)


def _stream(reader, model, plan: Plan, writers, tasks, rows_per_block, stop, progress):
    """Read, attack and write every block not yet in every output; returns the totals.

    A reader thread reads one block ahead; ``tasks`` attack up to ``tasks.in_flight``
    blocks at once; a writer thread writes and checkpoints, at most ``WRITES_IN_FLIGHT``
    blocks behind. Blocks are read into, and attacked into, reused buffers
    (``_BlockBuffers``). Raises ``Interrupted`` when ``stop`` is set.
    """
    n_rows = reader.n_rows
    done = [writer.rows_written for writer in writers]
    totals = [_Totals(**writer.resumed_state) for writer in writers]
    starts = range(min(done, default=n_rows), n_rows, rows_per_block)
    attacked: deque = deque()
    written: deque = deque()
    # The reader fills one buffer while up to in_flight blocks are attacked. Attacked here,
    # the blocks live in memory the backend copies fastest from and to (a GPU's: page-locked).
    empty = get_backend(plan.device).empty if tasks.in_process else np.empty
    shape = (rows_per_block, *reader.row_shape)
    inputs = _BlockBuffers(tasks.in_flight + 1, shape, reader.dtype, empty)
    # One output buffer is attacked into while WRITES_IN_FLIGHT are written; tasks in
    # another process (Dask) send back arrays of their own.
    width = math.prod(reader.row_shape)
    results_of = [
        _BlockBuffers(WRITES_IN_FLIGHT + 1, (rows_per_block, width), reader.dtype, empty)
        for _ in writers
        if tasks.in_process
    ]
    with (
        ThreadPoolExecutor(1, "advgrad-read") as reads,
        ThreadPoolExecutor(1, "advgrad-write") as writes,
    ):

        def read(start):
            stop = min(start + rows_per_block, n_rows)

            def read_into_buffer():
                buffer = inputs.take()
                try:
                    return buffer, *reader.read(start, stop, out=buffer[: stop - start])
                except BaseException:
                    inputs.give_back(buffer)
                    raise

            return reads.submit(read_into_buffer)

        def finish_oldest_attack():
            start, buffer, rows, y, outputs, out, future = attacked.popleft()
            results = future.result()
            classes = None if y is None else (y if y.ndim == 1 else np.argmax(y, axis=1))
            for i in outputs:
                offset = max(done[i] - start, 0)
                result = results[i].rows_from(offset)
                part = None if classes is None else classes[offset:]
                norms = perturbation_norms(
                    result.X_adv, rows[offset:], start + offset, writers[i].target
                )
                totals[i].add(norms, result, part, plan.attacks[i].targeted)
                y_part = None if y is None else y[offset:]
                state = dataclasses.asdict(totals[i])
                release = functools.partial(results_of[i].give_back, out[i]) if out else None
                written.append(
                    writes.submit(
                        _write_block, writers[i], start + offset, result, y_part, state, release
                    )
                )
                while len(written) > WRITES_IN_FLIGHT * len(writers):
                    written.popleft().result()
            inputs.give_back(buffer)
            if progress is not None:
                progress(start + len(rows), n_rows)

        next_read = read(starts[0]) if starts else None
        for k, start in enumerate(starts):
            buffer, X, y = next_read.result()
            if k + 1 < len(starts):
                next_read = read(starts[k + 1])
            rows = X.reshape(len(X), -1)
            outputs = [i for i, rows_done in enumerate(done) if rows_done < start + len(rows)]
            out = {i: results_of[i].take() for i in outputs} if results_of else {}
            targets = [out[i][: len(rows)] if i in out else None for i in range(len(writers))]
            future = tasks.submit(
                attack_block, model, rows, y, plan, start, outputs, targets if out else None
            )
            attacked.append((start, buffer, rows, y, outputs, out, future))
            if len(attacked) >= tasks.in_flight:
                finish_oldest_attack()
            if stop is not None and stop.is_set():
                break
        while attacked:
            finish_oldest_attack()
        while written:
            written.popleft().result()
    if stop is not None and stop.is_set():
        rows_done = min(writer.rows_written for writer in writers)
        if rows_done < n_rows:
            raise Interrupted(rows_done, n_rows)
    return totals


def _write_block(
    writer: AdversarialWriter, start: int, result: BlockResult, y, state, release
) -> None:
    """Write one output's rows of a block and checkpoint them (on the writer thread), then
    call ``release`` (when given) to hand the block's buffer back."""
    try:
        X_adv = result.X_adv.reshape(len(result.X_adv), *writer.row_shape)
        writer.write(start, X_adv, y, result.pred_clean, result.pred_adv, **result.columns)
        writer.checkpoint(state)
    finally:
        if release is not None:
            release()
