"""The attack job: stream a dataset through the attacks into adversarial datasets.

One pass over the input serves every output: each block of rows is read once, attacked for
each output (outputs that differ only in eps share the labels, and FGSM outputs share one
gradient), and written and checkpointed for every output, on the streaming pipeline
(``advgrad.jobs.pipeline``): reading, attacking and writing overlap, memory stays bounded
by the block size, an interrupted job (Ctrl-C, SIGTERM, a kill, a power loss) resumes where
its outputs' checkpoints stopped and writes the same files as an uninterrupted run, and with
a Dask scheduler the blocks are attacked on the cluster's workers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from advgrad.attacks import (
    DEFAULT_ATTACK,
    MINIMAL_NORM_METHODS,
    Attack,
    attack_labels,
    check_radius,
    check_search,
    check_searchable,
    minimal_eps,
    norm_order,
    perturb,
    perturbation_sizes,
    success_of,
)
from advgrad.autoattack import broken_by_names, ensemble
from advgrad.backend import SERIAL_BLOCKS, get_backend
from advgrad.errors import InputFileError
from advgrad.io import AdversarialWriter
from advgrad.jobs.inputs import (
    DEFAULT_BATCH_SIZE,
    NonFiniteResult,
    clip_range,
    column_values,
    open_for_model,
    perturbation_norms,
    provenance,
    rows_per_block,
)
from advgrad.jobs.pipeline import Job, announce, stream, tasks_for
from advgrad.kernels.cpu import ROWS_PER_BLOCK
from advgrad.model import MAX_WEIGHTS
from advgrad.quantiles import Spread, spread_of

COMPILE_NOTICE_AFTER_S = 1.0
"""How long the warm-up (``_compile_kernels``) runs before the user is told that
the kernels are compiling: loading them from Numba's cache takes well under this."""


@dataclass(frozen=True)
class AttackReport:
    """What ``attack_file`` did for one output.

    ``success_rate`` is the fraction of rows where the attack succeeded: the prediction
    moved off the attacked label (untargeted) or onto the target (targeted). The accuracies
    are None when the dataset has no labels. Perturbation norms are means over rows of
    ||X_adv - X|| on the flattened rows. The rates, accuracies and means are None for a
    dataset of 0 rows. ``eps_min`` is the spread (quartiles, fraction found) of the per-row
    minimal eps written as ``/eps_min``, when it was searched (None for 0 rows). ``seconds``
    covers reading, attacking and writing the rows of this run
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
    eps_min: Spread | None = None
    resumed_rows: int = 0

    @property
    def rows_per_second(self) -> float:
        """Rows attacked per second in this run, reading and writing included."""
        rows = self.n_rows - self.resumed_rows
        return rows / self.seconds if self.seconds > 0 else math.inf


def default_output_name(data_path: str | os.PathLike, attack: Attack) -> Path:
    """``<data stem>-<method>-l<norm>-eps<eps>.h5`` (DeepFool, C&W: no eps) in the current
    folder."""
    size = "" if attack.method in MINIMAL_NORM_METHODS else f"-eps{attack.eps:g}"
    return Path(f"{Path(data_path).stem}-{attack.method}-l{attack.norm}{size}.h5")


@dataclass(frozen=True)
class Plan:
    """What turns a block of rows into adversarial rows, for each output of a job."""

    attacks: tuple[Attack, ...]
    use_labels: bool
    clip: tuple[float, float]
    min_eps_tolerance: float | None
    eps_max: tuple[float, ...]
    device: str
    image_shape: tuple[int, ...] | None = None


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
    first_row: int,
    outputs: Sequence[int],
    out: Sequence[np.ndarray] | None,
    plan: Plan,
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
                l1_coordinates=attack.l1_step_coordinates(rows.shape[1], plan.clip),
            )
        elif attack.method == "autoattack":
            found = ensemble(
                *(model, rows, labels.reference, attack, plan.clip),
                first_row=first_row,
                backend=backend,
                image_shape=plan.image_shape,
            )
            X_adv = found.X_adv
            if out is not None:
                X_adv = out[i]
                X_adv[...] = found.X_adv
        else:
            X_adv = perturb(
                *(model, rows, labels, attack, plan.clip),
                first_row=first_row,
                backend=backend,
                out=None if out is None else out[i],
                image_shape=plan.image_shape,
            )
        columns = {}
        if attack.method == "autoattack":
            columns["broken_by"] = found.broken_by
        if attack.targeted:
            columns["target"] = labels.reference
        pred_adv = backend.forward(model, X_adv, labels.Y[:0])[2]
        if plan.min_eps_tolerance is not None and attack.method in MINIMAL_NORM_METHODS:
            hit = success_of(labels.reference, pred_adv, attack.targeted)
            columns["eps_min"] = perturbation_sizes(rows, X_adv, hit, attack.norm)
        elif plan.min_eps_tolerance is not None:
            columns["eps_min"] = minimal_eps(
                *(model, rows, labels, attack, plan.clip),
                eps_max=plan.eps_max[i],
                tolerance=plan.min_eps_tolerance,
                first_row=first_row,
                backend=backend,
            )
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
            image_shape=reader.info.input_shape or model.input_shape,
        )
        if min_eps_tolerance is not None:
            for attack in attacks:
                check_searchable(attack)
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
            **stack.enter_context(provenance(model_path, data_path)),
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
            if attack.method == "autoattack":
                columns["broken_by"] = np.int8
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
                    "broken_by_names": broken_by_names(attack),
                },
                rows_per_chunk=min(chunk_rows, max(reader.n_rows, 1)),
                compression=compression,
                overwrite=overwrite,
                inputs=(model_path, data_path),
                columns=columns,
                resume=resume,
            )
            writers.append(stack.enter_context(writer))
            announce(writer, path, reader.n_rows, notice)
        tasks = tasks_for(scheduler, model)
        stack.callback(tasks.close)
        totals = [_Totals(**writer.resumed_state) for writer in writers]

        def account(i, start, offset, rows, y, result: BlockResult):
            result = result.rows_from(offset)
            writer = writers[i]
            norms = perturbation_norms(result.X_adv, rows[offset:], start + offset, writer.target)
            classes = None if y is None else (y if y.ndim == 1 else np.argmax(y, axis=1))
            part = None if classes is None else classes[offset:]
            totals[i].add(norms, result, part, attacks[i].targeted)
            y_part = None if y is None else y[offset:]
            state = dataclasses.asdict(totals[i])
            X_adv = result.X_adv.reshape(len(result.X_adv), *writer.row_shape)

            def write() -> None:
                writer.write(
                    start + offset,
                    X_adv,
                    y_part,
                    result.pred_clean,
                    result.pred_adv,
                    **result.columns,
                )
                writer.checkpoint(state)

            return write

        job = Job(attack_block, (plan,), writers, account, math.prod(reader.row_shape))
        empty = get_backend(device).empty if tasks.in_process else np.empty
        try:
            if tasks.in_process and reader.n_rows:
                _compile_kernels(reader, model, plan, writers, notice, block)
            started = time.perf_counter()
            stream(reader, model, job, tasks, block, empty=empty, stop=stop, progress=progress)
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
        eps_min = None
        if min_eps_tolerance is not None:
            eps_min = spread_of(column_values(writer.target, "eps_min"))
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


def _compile_kernels(reader, model, plan: Plan, writers, notice, block: int) -> None:
    """Attack the first row, and the first block's rows up to one more than the CPU backend
    runs block by block (``advgrad.backend.SERIAL_BLOCKS``), with one step (one restart, one
    DeepFool iteration, one query, one target class) of each attack, and throw the results
    away: the kernels the job uses, serial and parallel, are then compiled, or loaded from
    Numba's cache, before the rows-per-second clock starts, whatever the job's step count.
    When that takes longer than ``COMPILE_NOTICE_AFTER_S`` (a first run on this machine),
    ``notice`` says so while it happens."""
    timer = None
    if notice is not None:
        message = "compiling the kernels for this machine (first run only)"
        timer = threading.Timer(COMPILE_NOTICE_AFTER_S, notice, [message])
        timer.daemon = True
        timer.start()
    try:
        largest = min(reader.n_rows, block, SERIAL_BLOCKS * ROWS_PER_BLOCK + 1)
        X, y = reader.read(0, largest)
        attacks = tuple(
            dataclasses.replace(
                attack,
                steps=attack.fewest_steps,
                restarts=1,
                max_iter=1,
                queries=1,
                target_classes=1,
            )
            for attack in plan.attacks
        )
        one_step = dataclasses.replace(plan, attacks=attacks)
        for n_rows in sorted({1, largest}):
            rows = X[:n_rows].reshape(n_rows, -1)
            labels = None if y is None else y[:n_rows]
            results = attack_block(model, rows, labels, 0, range(len(attacks)), None, one_step)
            for writer, result in zip(writers, results, strict=True):
                perturbation_norms(result.X_adv, rows, 0, writer.target)
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()  # no thread of ours may print while the command exits
