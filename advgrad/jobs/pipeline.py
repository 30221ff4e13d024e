"""The one streaming pipeline of every file job: read ahead, compute, write behind.

A job streams the rows of one dataset, block by block, through a compute step into its
outputs. A reader thread reads one block ahead into reused buffers; the compute step runs on
up to ``tasks.in_flight`` blocks at once (in this process, or as tasks on a Dask cluster); a
writer thread writes each output's share of a block and checkpoints it, at most
``WRITES_IN_FLIGHT`` blocks behind. So reading, computing and writing overlap, memory is set
by the block size, and a job stopped anywhere resumes from its outputs' checkpoints.

A job is a :class:`Job`: a pure ``compute`` function (module level, so that it runs the
same on a Dask worker), and per output, what to make of its share of a computed block on
the main thread (``account``: running totals, checks) and on the writer thread (``write``).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from advgrad.errors import AdvgradError

WRITES_IN_FLIGHT = 2
"""Blocks handed to the writer thread and not yet written, at most (bounds memory)."""
TASKS_PER_WORKER_THREAD = 2
"""With Dask: blocks in flight per worker thread of the cluster."""
SCHEDULER_TIMEOUT_S = 10.0
"""With Dask: seconds to wait for the scheduler to answer."""


class Interrupted(AdvgradError):
    """A file job stopped between blocks on request; its partial outputs are kept.

    Attributes
    ----------
    rows_done : int
        Rows of every output safely on disk (``kept``), else rows done.
    n_rows : int
    kept : bool
        Whether the job has partial outputs to resume (an evaluation has none, nor a job
        stopped before its first block).
    """

    def __init__(self, rows_done: int, n_rows: int, kept: bool = True) -> None:
        self.rows_done = rows_done
        self.n_rows = n_rows
        self.kept = kept
        outcome = (
            "the partial output is kept: run the same command again to resume"
            if kept
            else "nothing is kept"
        )
        super().__init__(f"stopped after {rows_done} of {n_rows} rows; {outcome}")


class Output(Protocol):
    """What the pipeline needs of one output of a job (e.g. ``advgrad.io.AdversarialWriter``)."""

    rows_written: int


@dataclass(frozen=True)
class Job:
    """A compute step and what becomes of its results, for each output.

    Attributes
    ----------
    compute : callable
        ``compute(model, rows, y, first_row, outputs, out, *arguments)`` -> a list with one
        result per output of the job, None for the outputs not in ``outputs`` (indices of
        the outputs that still need the block). rows (m, d) and y are the block's; ``out``
        is None or, per output, an (m, width) array to fill with the result's rows. Pure
        and defined at module level: with Dask it runs on a worker.
    arguments : tuple
        The job's settings, passed on to ``compute``.
    outputs : sequence of Output
        Where the results go; ``rows_written`` says where each resumes.
    account : callable
        ``account(i, start, offset, rows, y, result)`` on the main thread, block by block
        in order: output i's share of a block, its first ``offset`` rows already written
        (resumed; always 0 for a job of one output, whose blocks start where it resumes).
        Returns the action that writes it (run on the writer thread), or None.
    result_width : int or None
        Width of the per-output result arrays computed in this process into reused
        buffers (``out``), or None when results come as new arrays.
    """

    compute: Callable[..., list]
    arguments: tuple
    outputs: Sequence[Output]
    account: Callable[..., Callable[[], None] | None]
    result_width: int | None = None


def announce(output, name, n_rows: int, notice: Callable[[str], None] | None) -> None:
    """Tell ``notice`` what became of a partial output found for ``output`` (a writer):
    why it was deleted, or where the job resumes it; ``name`` is the output's path."""
    if notice is None:
        return
    if output.notice:
        notice(output.notice)
    if output.resumed_rows:
        notice(f"{name}: resuming after row {output.resumed_rows} of {n_rows}")


class LocalTasks:
    """Runs compute steps in this process, one at a time (the kernels use every core)."""

    in_flight = 1
    in_process = True

    def submit(self, function, model, *args) -> Future:
        future: Future = Future()
        future.set_result(function(model, *args))
        return future

    def close(self) -> None:
        """Nothing to release."""


class DaskTasks:
    """Runs compute steps as tasks on a Dask cluster; the model is sent to every worker once,
    and each block goes straight to a worker and back (not through the scheduler)."""

    in_process = False

    def __init__(self, address: str, model) -> None:
        self._client = dask_client(address)
        self._model = self._client.scatter(model, broadcast=True)
        threads = sum(self._client.nthreads().values())
        self.in_flight = max(1, TASKS_PER_WORKER_THREAD * threads)

    def submit(self, function, model, rows, y, *args):
        rows, y = (None if a is None else self._client.scatter(a, direct=True) for a in (rows, y))
        return self._client.submit(function, self._model, rows, y, *args, pure=False)

    def close(self) -> None:
        self._client.close()


def tasks_for(scheduler: str | None, model):
    """``DaskTasks`` on the scheduler at ``scheduler``, else ``LocalTasks``."""
    return DaskTasks(scheduler, model) if scheduler else LocalTasks()


def dask_client(address: str):
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


class BlockBuffers:
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


def stream(
    reader,
    model,
    job: Job,
    tasks,
    rows_per_block: int,
    *,
    empty=np.empty,
    stop: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Read, compute and write every block not yet in every output of ``job``.

    Blocks start at absolute multiples of ``rows_per_block`` from the first row that some
    output still lacks. Blocks are read into, and computed into, reused buffers
    (``BlockBuffers``) made by ``empty(shape, dtype)`` (for compute steps in this process,
    the backend's: the memory it copies fastest from and to). ``progress(rows_done,
    n_rows)`` is called after each block.

    Raises
    ------
    Interrupted
        ``stop`` was set: the job stopped after the blocks in progress, written and
        checkpointed (set before the first block, it stops before it).
    """
    n_rows = reader.n_rows
    outputs = job.outputs
    done = [output.rows_written for output in outputs]
    starts = range(min(done, default=n_rows), n_rows, rows_per_block)
    computed: deque = deque()
    written: deque = deque()
    # The reader fills one buffer while up to in_flight blocks are computed.
    shape = (rows_per_block, *reader.row_shape)
    inputs = BlockBuffers(tasks.in_flight + 1, shape, reader.dtype, empty)
    # One result buffer is computed into while WRITES_IN_FLIGHT are written; tasks in
    # another process (Dask) send back arrays of their own.
    results_of = []
    if tasks.in_process and job.result_width is not None:
        result_shape = (rows_per_block, job.result_width)
        results_of = [
            BlockBuffers(WRITES_IN_FLIGHT + 1, result_shape, reader.dtype, empty) for _ in outputs
        ]
    with (
        ThreadPoolExecutor(1, "advgrad-read") as reads,
        ThreadPoolExecutor(1, "advgrad-write") as writes,
    ):

        def read(start):
            end = min(start + rows_per_block, n_rows)

            def read_into_buffer():
                buffer = inputs.take()
                try:
                    return buffer, *reader.read(start, end, out=buffer[: end - start])
                except BaseException:
                    inputs.give_back(buffer)
                    raise

            return reads.submit(read_into_buffer)

        def write_then_release(action, release) -> None:
            try:
                if action is not None:
                    action()
            finally:
                if release is not None:
                    release()

        def finish_oldest():
            start, buffer, rows, y, needed, out, future = computed.popleft()
            results = future.result()
            for i in needed:
                offset = max(done[i] - start, 0)
                action = job.account(i, start, offset, rows, y, results[i])
                release = _release(results_of[i], out[i]) if out else None
                written.append(writes.submit(write_then_release, action, release))
                while len(written) > WRITES_IN_FLIGHT * max(len(outputs), 1):
                    written.popleft().result()
            inputs.give_back(buffer)
            if progress is not None:
                progress(start + len(rows), n_rows)

        next_read = read(starts[0]) if starts else None
        for k, start in enumerate(starts):
            if stop is not None and stop.is_set():
                break
            buffer, X, y = next_read.result()
            if k + 1 < len(starts):
                next_read = read(starts[k + 1])
            rows = X.reshape(len(X), -1)
            needed = [i for i, rows_done in enumerate(done) if rows_done < start + len(rows)]
            out = {i: results_of[i].take() for i in needed} if results_of else {}
            targets = [out[i][: len(rows)] if i in out else None for i in range(len(outputs))]
            future = tasks.submit(
                job.compute, model, rows, y, start, needed, targets if out else None, *job.arguments
            )
            computed.append((start, buffer, rows, y, needed, out, future))
            if len(computed) >= tasks.in_flight:
                finish_oldest()
        while computed:
            finish_oldest()
        while written:
            written.popleft().result()
    if stop is not None and stop.is_set():
        rows_done = min((output.rows_written for output in outputs), default=n_rows)
        if rows_done < n_rows:
            raise Interrupted(rows_done, n_rows, kept=any(o.rows_written for o in outputs))


def _release(buffers: BlockBuffers, buffer: np.ndarray) -> Callable[[], None]:
    return lambda: buffers.give_back(buffer)
