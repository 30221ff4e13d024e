"""Fuzzing the readers of untrusted files: every input gives valid data or one InputFileError.

Two kinds of fuzzing:

- hypothesis strategies over what a file can hold (arrays with NaN/inf, odd dtypes and byte
  orders, zero-size and huge shapes; attributes of every kind; the threats of SECURITY.md;
  terminal-hostile strings as attribute names and values and as link targets, shown by the
  command line);
- a mutation fuzzer over small valid model and dataset files (bit flips, overwritten words,
  truncation, moved bytes, spliced headers, names and string values overwritten with
  terminal-hostile bytes). The mutated files are loaded, and shown by ``advgrad info``, in
  child processes, many cases per child, one result line per case, so that a crash (a segfault
  inside HDF5), a hang or a memory spike is caught and pinned to its case instead of killing
  the test run. ``python tests/test_fuzz.py CASE...`` examines the mutated files of the given
  cases in-process, to debug one.
"""

from __future__ import annotations

import hashlib
import math
import operator
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from test_security import MODEL_ATTRS, THREATS, make_model_file
from typer.testing import CliRunner, Result

from advgrad.bundled import MODEL, TEST_DATA, bundled_path
from advgrad.cli import app
from advgrad.errors import InputFileError
from advgrad.io import (
    AdversarialWriter,
    load_dataset,
    load_model,
    open_dataset,
    safe,
    save_dataset,
    save_model,
)
from advgrad.io.datasets import SOFT_LABEL_TOL
from advgrad.model import Model

N_CLASSES = 3
"""Classes of every seed file (labels lie in [0, 3))."""
DEFAULT_CASES = 400
"""Mutated files loaded in the default run; each is also shown by ``advgrad info``
(:func:`examine`). The slow run shows only the cases whose mutation wrote hostile strings,
and loads the others, so that its 10,000 cases stay within a few tens of seconds."""
SLOW_CASES = 10_000
"""Mutated files loaded in the slow run (``-m slow``), split over the CPUs."""
CASE_TIMEOUT_S = 20.0
"""A case that gives no result in this time is reported as a hang."""
CASE_MEMORY_BYTES = 256 * 2**20
"""A case that raises the child's peak memory use by more than this is a failure."""
KNOWN_ISSUE = "known HDF5 issue"
"""Outcome prefix of a case that uses too much memory only because of SECURITY.md's known
issue: a mutation landed on the stored length of a variable-length string attribute, and HDF5
allocates and zeroes that many bytes before it finds the string corrupt (advgrad then leaves
the attribute out). test_security.py::test_corrupt_string_length_costs_no_memory shows it."""

# --------------------------------------------------------------------------- the loaders


def loads_or_refuses(load: Callable[[], object]) -> object | None:
    """What ``load()`` returns, or None when it raises InputFileError; anything else fails."""
    try:
        return load()
    except InputFileError:
        return None


def check_dataset_values(X: np.ndarray, y: np.ndarray | None, *, allow_nonfinite: bool) -> None:
    """Assert what the dataset reader promises of the arrays it returns."""
    assert X.dtype in (np.float32, np.float64) and X.dtype.isnative
    assert X.ndim >= 2
    assert allow_nonfinite or np.isfinite(X).all()
    if y is None:
        return
    assert len(y) == len(X)
    if y.dtype == np.int64:
        assert y.ndim == 1 and ((y >= 0) & (y < N_CLASSES)).all()
    else:
        assert y.dtype in (np.float32, np.float64) and y.shape[1:] == (N_CLASSES,)
        assert np.isfinite(y).all() and (y >= 0).all()
        assert (np.abs(y.sum(axis=1, dtype=np.float64) - 1.0) <= SOFT_LABEL_TOL).all()


def load_everything(path: Path) -> str:
    """Load ``path`` as a model and as a dataset (whole and streamed), checking what comes back.

    Returns
    -------
    str
        ``"model"``, ``"dataset"`` or ``"refused"`` (every loader raised InputFileError).
    """
    model = loads_or_refuses(lambda: load_model(path))
    if model is not None:
        assert isinstance(model, Model)
        return "model"
    loaded = loads_or_refuses(lambda: load_dataset(path, n_classes=N_CLASSES))
    if loaded is not None:
        check_dataset_values(*loaded, allow_nonfinite=False)
        return "dataset"
    try:
        with open_dataset(path, n_classes=N_CLASSES, allow_nonfinite=True) as reader:
            for _, X, y in reader.chunks(3):
                check_dataset_values(X, y, allow_nonfinite=True)
    except InputFileError:
        pass
    return "refused"


# --------------------------------------------------------------------------- the command line

RUNNER = CliRunner()
FORGED_LINE = "advgrad: file accepted"
"""What a newline in a string from a file would forge, if it reached the terminal raw."""


def unsafe_output(result: Result, files: Sequence[Path]) -> str | None:
    """What is wrong with a command's report on untrusted ``files``, in words; None if nothing.

    The report is exit code 0 with nothing on stderr, or exit code 1 with one stderr line
    ``advgrad: error: ...`` naming one of ``files``; never an exception (a traceback). Every
    character printed is printable, ``"\\n"`` between lines, and no line starts like
    ``FORGED_LINE``. (Printable is stricter than "no Cc or Cf character": it also rules out
    line separators and private-use or unassigned characters, which errors.printable escapes.)
    """
    if not isinstance(result.exception, SystemExit | None):
        return "raised " + "".join(traceback.format_exception(result.exception))
    output = result.stdout + result.stderr
    raw = sorted({char for char in output if not char.isprintable()} - {"\n"})
    if raw:
        return f"raw {raw} in {output!r}"
    if any(line.startswith(FORGED_LINE) for line in output.split("\n")):
        return f"a forged line in {output!r}"
    if "Traceback" in output:
        return f"a traceback in {output!r}"
    if result.exit_code == 0:
        return f"exit code 0 with stderr {result.stderr!r}" if result.stderr else None
    line, _, rest = result.stderr.partition("\n")
    one_error = line.startswith("advgrad: error: ") and not rest and result.stderr.endswith("\n")
    if result.exit_code != 1 or not one_error or not any(str(file) in line for file in files):
        return (
            f"exit code {result.exit_code} with stderr {result.stderr!r}; expected 1 with "
            f"one line 'advgrad: error: ...' naming {[str(file) for file in files]}"
        )
    return None


def checked_invoke(args: Sequence[object], files: Sequence[Path]) -> Result:
    """Run ``advgrad ARGS`` in-process, asserting that its report on ``files`` is safe
    (:func:`unsafe_output`)."""
    result = RUNNER.invoke(app, list(map(str, args)))
    problem = unsafe_output(result, files)
    assert problem is None, f"advgrad {' '.join(map(str, args))}: {problem}"
    return result


def examine(path: Path) -> str:
    """:func:`load_everything` of ``path``, after checking what ``advgrad info`` shows of it."""
    checked_invoke(["info", path], [path])
    return load_everything(path)


# --------------------------------------------------------------------------- hypothesis: arrays

FLOAT_DTYPES = (np.dtype("f4"), np.dtype("f8"))
ODD_DTYPES = (
    *(np.dtype(t).newbyteorder() for t in ("f4", "f8", "f2", "i8")),
    *(np.dtype(t) for t in ("f2", "i1", "i4", "u1", "u8", "?", "c8", "S3")),
)
"""Every dtype here is refused for /X; the integers are valid labels (in native byte order)."""


@st.composite
def stored_arrays(draw, dtypes=FLOAT_DTYPES + ODD_DTYPES) -> np.ndarray:
    """Arrays of any of ``dtypes``, zero-size axes included, floats with NaN and inf."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=4).map(tuple))
    return draw(arrays(dtype, shape))


def write_dataset(path: Path, X: np.ndarray, y: np.ndarray | None, layout: dict) -> Path:
    with h5py.File(path, "w") as f:
        for name, data in (("X", X), ("y", y)):
            if data is None:
                continue
            chunked = layout and data.ndim and data.size
            options = layout if chunked else {}
            f.create_dataset(name, data=data, **options)
    return path


LAYOUTS = st.sampled_from(
    [
        {},
        {"chunks": True},
        {"chunks": True, "compression": "gzip", "shuffle": True},
        {"chunks": True, "compression": "lzf", "fletcher32": True},
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(X=stored_arrays(), layout=LAYOUTS, allow_nonfinite=st.booleans())
def test_any_array_as_X_gives_valid_data_or_one_error(tmp_path_factory, X, layout, allow_nonfinite):
    path = write_dataset(tmp_path_factory.mktemp("x") / "d.h5", X, None, layout)
    loaded = loads_or_refuses(lambda: load_dataset(path, allow_nonfinite=allow_nonfinite))
    acceptable = (
        X.dtype in FLOAT_DTYPES and X.ndim >= 2 and (allow_nonfinite or np.isfinite(X).all())
    )
    assert (loaded is not None) == acceptable
    if loaded is not None:
        X_back, y_back = loaded
        assert y_back is None
        assert X_back.dtype == X.dtype and X_back.tobytes() == X.tobytes()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    y=stored_arrays((*FLOAT_DTYPES, *ODD_DTYPES, *map(np.dtype, ("i8", "u4", "i2")))),
    layout=LAYOUTS,
)
@example(y=np.array([np.inf, -np.inf], np.float32), layout={})  # their sum is nan
def test_any_array_as_y_gives_valid_labels_or_one_error(tmp_path_factory, y, layout):
    X = np.zeros((y.shape[0], 2), np.float32)
    path = write_dataset(tmp_path_factory.mktemp("y") / "d.h5", X, y, layout)
    loaded = loads_or_refuses(lambda: load_dataset(path, n_classes=N_CLASSES))
    if y.dtype.kind in "iu" and y.dtype.isnative:
        acceptable = y.ndim == 1 and ((y >= 0) & (y < N_CLASSES)).all()
    elif y.dtype in FLOAT_DTYPES:
        with np.errstate(invalid="ignore"):  # inf - inf: nan, and the row is refused anyway
            sums = y.sum(axis=-1, dtype=np.float64)
        acceptable = (
            y.shape[1:] == (N_CLASSES,)
            and np.isfinite(y).all()
            and (y >= 0).all()
            and (np.abs(sums - 1.0) <= SOFT_LABEL_TOL).all()
        )
    else:
        acceptable = False
    assert (loaded is not None) == acceptable
    if loaded is not None:
        check_dataset_values(*loaded, allow_nonfinite=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 2**40), min_size=2, max_size=9)
    .map(tuple)
    .filter(lambda shape: math.prod(shape) < 2**62),
    chunk_rows=st.integers(1, 64),
    written_rows=st.integers(0, 2),
)
def test_huge_declared_shapes_are_refused_from_metadata(
    tmp_path_factory, shape, chunk_rows, written_rows
):
    path = tmp_path_factory.mktemp("huge") / "d.h5"
    chunks = (min(chunk_rows, shape[0]), *(1,) * (len(shape) - 1))
    rows = range(min(written_rows, shape[0]))
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("X", shape=shape, dtype="f4", chunks=chunks)
        for row in rows:
            dset[(row, *(0,) * (len(shape) - 1))] = 1.0
    stored = len({row // chunks[0] for row in rows}) * math.prod(chunks) * 4
    acceptable = (
        len(shape) <= safe.MAX_NDIM
        and max(shape) <= safe.MAX_DIM
        and math.prod(shape) <= safe.MAX_ELEMENTS
        and math.prod(shape) * 4 <= safe.MAX_COMPRESSION_RATIO * stored
    )
    loaded = loads_or_refuses(lambda: load_dataset(path))
    assert (loaded is not None) == acceptable


# --------------------------------------------------------------------------- hypothesis: attributes

ATTR_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    # h5py cannot store str attributes with NUL characters; bytes cover those
    st.text(st.characters(exclude_characters="\x00", codec="utf-8"), max_size=20),
    st.binary(max_size=20).map(np.bytes_),
    stored_arrays(),
    st.sampled_from(
        [
            h5py.Empty("f8"),
            np.zeros(2, "f4,i4"),
            np.array([1, 2], ">i4"),
            np.zeros((2, 2), "S2"),
            np.zeros(3, np.float16),
            1j,
        ]
    ),
)
SPECIAL_ATTRS = {
    "reference": lambda f, name: f.attrs.create(name, f.ref, dtype=h5py.ref_dtype),
    "region reference": lambda f, name: f.attrs.create(
        name, f["W1"].regionref[0:1], dtype=h5py.regionref_dtype
    ),
    "vlen ints": lambda f, name: f.attrs.create(
        name, np.array([np.arange(3), np.arange(2)], dtype=object), dtype=h5py.vlen_dtype("i4")
    ),
    "enum": lambda f, name: f.attrs.create(
        name, 1, dtype=h5py.enum_dtype({"a": 0, "b": 1}, basetype="i1")
    ),
    "vlen strings": lambda f, name: f.attrs.create(
        name, ["ab", "c" * 1000], dtype=h5py.string_dtype()
    ),
}


ATTR_NAMES = st.text(
    st.characters(exclude_characters="\x00", codec="utf-8"), min_size=1, max_size=8
)
"""Names HDF5 can store (UTF-8, no NUL)."""


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plain=st.dictionaries(ATTR_NAMES, ATTR_VALUES, max_size=6),
    special=st.lists(st.sampled_from(sorted(SPECIAL_ATTRS)), unique=True),
    common=st.dictionaries(
        st.sampled_from(["x_min", "x_max", "input_shape", "class_names"]), ATTR_VALUES
    ),
)
def test_any_attributes_give_a_model_or_one_error(tmp_path_factory, plain, special, common):
    path = make_model_file(tmp_path_factory.mktemp("attrs") / "m.h5", libver="latest")
    with h5py.File(path, "a") as f:
        for name, value in {**plain, **common}.items():
            if name not in MODEL_ATTRS:
                f.attrs[name] = value
        for kind in special:
            SPECIAL_ATTRS[kind](f, f"special {kind}")
    with safe.open_input(path) as f:
        values = safe.read_attrs(f, path=path)
    assert {name for name in values if name.startswith("special")} <= {"special vlen strings"}
    for value in values.values():
        assert isinstance(value, int | float | bool | str | tuple | np.ndarray)
        if isinstance(value, np.ndarray):
            assert value.dtype.kind in "biuf" and value.dtype.isnative
    model = loads_or_refuses(lambda: load_model(path))
    if not {*plain, *common} & {"x_min", "x_max", "input_shape", "class_names"}:
        assert model is not None  # only those four are checked; any other attribute is kept


# --------------------------------------------------------------------------- hypothesis: strings

HOSTILE_PIECES = (
    "\x1b[2J",  # CSI: clear the screen
    "\x1b]0;title\x07",  # OSC: set the window title
    "\x9b2J",  # the same CSI as one C1 control
    "\r",  # back to the start of the line, to overprint it
    f"\n{FORGED_LINE}",
    f"\r\n{FORGED_LINE}\n",
    "\u202e",  # bidi override: the rest of the line shows reversed
    "\u2028",  # line separator
    "\x08\x7f\t",
    "[/oops]",  # a closing tag without an opening one raises inside rich
    "[bold]x",
    "[link=file:///etc/passwd]x[/link]",
    "\\",
)
"""Text that drives a terminal, forges a line, or is rich markup."""
INVALID_UTF8 = (b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\x9b", b"\x00")
"""A stray byte, a cut sequence, an overlong "/", a surrogate, a raw C1 CSI, and NUL."""
HOSTILE_BYTE_PIECES = (*(piece.encode() for piece in HOSTILE_PIECES), *INVALID_UTF8)

SHORT_HOSTILE_TEXT = st.lists(
    st.sampled_from(HOSTILE_PIECES)
    | st.text(st.characters(exclude_characters="\x00", codec="utf-8"), max_size=3),
    min_size=1,
    max_size=6,
).map("".join)
"""Hostile pieces and any other characters HDF5 can store in a name (UTF-8, no NUL)."""
HOSTILE_TEXT = SHORT_HOSTILE_TEXT | st.builds(
    operator.mul, st.sampled_from(HOSTILE_PIECES), st.integers(1_000, 3_000)
)
"""Also very long strings (up to 100,000 characters)."""
HOSTILE_BYTES = st.lists(
    SHORT_HOSTILE_TEXT.map(str.encode) | st.sampled_from(INVALID_UTF8), min_size=1, max_size=4
).map(b"".join)
"""Hostile text as bytes, with invalid UTF-8 and NUL."""
HOSTILE_NAMES = SHORT_HOSTILE_TEXT.filter(bool) | HOSTILE_BYTES.map(
    lambda name: name.replace(b"\x00", b"")
).filter(bool)
"""Names of attributes and link targets: no NUL, which ends a name inside HDF5."""
HOSTILE_VALUES = st.one_of(
    HOSTILE_TEXT,
    HOSTILE_BYTES.map(np.bytes_),
    st.lists(SHORT_HOSTILE_TEXT, min_size=1, max_size=12).map(
        lambda texts: np.array(texts, dtype=h5py.string_dtype())
    ),
    st.lists(HOSTILE_BYTES, min_size=1, max_size=12).map(np.array),
)
"""String attributes: variable-length str and fixed-length bytes, scalars and arrays."""
CHECKED_ATTRS = ("x_min", "x_max", "input_shape", "class_names")
"""The attributes advgrad checks (a string there is refused); any other is shown as it is."""
DIGITS_CLASSES = 10
"""Classes of the bundled digits model."""


@st.composite
def hostile_attributes(draw, n_classes: int) -> dict[str | bytes, object]:
    """Attributes whose names and values are hostile strings; sometimes one of
    ``CHECKED_ATTRS`` too, or ``n_classes`` hostile class names (which are valid)."""
    attrs = draw(st.dictionaries(HOSTILE_NAMES, HOSTILE_VALUES, max_size=4))
    attrs.update(draw(st.dictionaries(st.sampled_from(CHECKED_ATTRS), HOSTILE_VALUES, max_size=1)))
    if draw(st.booleans()):
        names = draw(st.lists(SHORT_HOSTILE_TEXT, min_size=n_classes, max_size=n_classes))
        attrs["class_names"] = np.array(names, dtype=h5py.string_dtype())
    return attrs


def write_file(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, dict]) -> Path:
    """A file of ``arrays`` with ``attrs[where]`` on each object ``where`` ("/", "/X", ...);
    libver "latest", so that attributes may be longer than 64 KiB."""
    with h5py.File(path, "w", libver="latest") as f:
        for name, data in arrays.items():
            f[name] = data
        for where, values in attrs.items():
            f[where].attrs.update(values)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


COMMAND_LINE_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
)
"""Examples that run commands take up to a second each: 50 of them, and no explain phase
(which would rerun a failure hundreds of times before reporting it)."""


@COMMAND_LINE_SETTINGS
@given(
    model_root=hostile_attributes(DIGITS_CLASSES),
    model_W1=hostile_attributes(DIGITS_CLASSES),
    data_root=hostile_attributes(DIGITS_CLASSES),
    data_X=hostile_attributes(DIGITS_CLASSES),
)
def test_hostile_attribute_strings_are_shown_as_text(
    tmp_path_factory, digits_model, digits_test, model_root, model_W1, data_root, data_X
):
    directory = tmp_path_factory.mktemp("strings")
    arrays = {name: getattr(digits_model, name) for name in ("W1", "b1", "W2", "b2")}
    model = write_file(
        directory / "model.h5", arrays, {"/": {**model_root, **MODEL_ATTRS}, "/W1": model_W1}
    )
    X, y = digits_test
    data = write_file(
        directory / "data.h5", {"X": X[:8], "y": y[:8]}, {"/": data_root, "/X": data_X}
    )
    out = directory / "out.h5"
    before = {path: digest(path) for path in (model, data)}
    for path in (model, data):
        event(f"info {path.stem}: exit code {checked_invoke(['info', path], [path]).exit_code}")
    attack = checked_invoke(
        ["attack", "--model", model, "--data", data, "--out", out], [model, data]
    )
    event(f"attack: exit code {attack.exit_code}")
    assert before == {path: digest(path) for path in (model, data)}
    assert set(directory.iterdir()) == {model, data, *([out] if attack.exit_code == 0 else [])}


# --------------------------------------------------------------------------- hypothesis: links


WATCH_FIFO = """
import errno, os, sys, time
while True:
    try:
        os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))
        print("opened", flush=True)
    except OSError as error:
        if error.errno != errno.ENXIO:  # ENXIO: no reader has it open
            raise
    time.sleep(0.01)
"""
"""Report each time a reader opens the FIFO ``argv[1]``, and let it through (it reads an empty
file) instead of blocking forever."""


@contextmanager
def watched_fifo(path: bytes) -> Iterator[list[str]]:
    """A FIFO at ``path`` that nothing may open; after the block, the list yielded holds one
    line for each time something opened it. The watcher is another process, because h5py
    holds the GIL while HDF5 blocks in open()."""
    os.mkfifo(path)
    opened: list[str] = []
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCH_FIFO, path], stdout=subprocess.PIPE, text=True
    )
    try:
        yield opened
    finally:
        watcher.kill()
        opened += watcher.communicate()[0].splitlines()


LINK_KINDS = {"soft link": "create_soft", "external link": "create_external"}
LINKED = {"/X": "data", "/y": "data", "/W1": "model", "/g/X": "data"}
"""Where a link stands in for a dataset, or (/g) for a group on the dataset's path, and in which
file."""
FILE_NAMES = (
    HOSTILE_NAMES.map(lambda name: name if isinstance(name, bytes) else name.encode())
    .map(lambda name: name.replace(b"/", b"")[:200])
    .filter(lambda name: name not in (b"", b".", b".."))
)
"""External link targets: names a file in a directory can have (no "/", at most 200 bytes)."""


@COMMAND_LINE_SETTINGS
@given(
    kind=st.sampled_from(sorted(LINK_KINDS)),
    linked=st.sampled_from(sorted(LINKED)),
    object_name=HOSTILE_NAMES,
    file_name=FILE_NAMES,
)
def test_hostile_link_targets_are_refused_unfollowed(
    tmp_path_factory, digits_model, digits_test, kind, linked, object_name, file_name
):
    directory = tmp_path_factory.mktemp("links")
    (directory / "targets").mkdir()
    target = os.fsencode(directory / "targets") + b"/" + file_name
    object_name = object_name if isinstance(object_name, bytes) else object_name.encode()
    link_target = (target, object_name) if kind == "external link" else (object_name,)
    X, y = digits_test
    role = LINKED[linked]
    arrays = {
        "model": {name: getattr(digits_model, name) for name in ("W1", "b1", "W2", "b2")},
        "data": {"X": X[:8], "y": y[:8]},
    }[role]
    link_name = linked.split("/")[1]
    path = directory / f"{role}.h5"
    with h5py.File(path, "w") as f:
        for name, data in arrays.items():
            if name != link_name:
                f[name] = data
        if role == "model":
            f.attrs.update(MODEL_ATTRS)
        getattr(f.id.links, LINK_KINDS[kind])(link_name.encode(), *link_target)
    before = digest(path)
    model, data = (
        (path, bundled_path(TEST_DATA)) if role == "model" else (bundled_path(MODEL), path)
    )
    with watched_fifo(target) as opened:
        if linked == "/g/X":  # no command reads below the root: ask the reader itself
            with safe.open_input(path) as f, pytest.raises(InputFileError) as error:
                safe.checked_dataset(f, linked, kind="float")
            assert (error.value.path, error.value.dataset) == (str(path), linked)
            assert error.value.reason.startswith("/g is a") and kind in error.value.reason
        else:
            for args in (
                ["info", path],
                ["attack", "--model", model, "--data", data, "--out", directory / "o.h5"],
            ):
                result = checked_invoke(args, [path])
                assert result.exit_code == 1
                assert f"{linked} is a" in result.stderr and kind in result.stderr
    assert not opened, f"{target!r}, the target of an {kind}, was opened"
    assert digest(path) == before
    assert set(directory.iterdir()) == {path, directory / "targets"}


# --------------------------------------------------------------------------- hypothesis: threats


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(threat=st.sampled_from(sorted(THREATS)), data=st.data())
def test_every_threat_is_one_error_naming_file_and_dataset(tmp_path_factory, threat, data):
    build = THREATS[threat]
    target = data.draw(st.sampled_from(build.targets), label="target")
    path = tmp_path_factory.mktemp("threat") / "t.h5"
    build.write(path, target)
    with pytest.raises(InputFileError) as error:
        build.load(path, target)
    assert (error.value.path, error.value.dataset) == (str(path), target)
    assert error.value.reason


# --------------------------------------------------------------------------- mutation fuzzer


def write_seeds(directory: Path) -> list[Path]:
    """Small valid model and dataset files, in every layout and chunk index the reader meets.

    The same bytes on every run (no timestamps, fixed random numbers), so that a case number
    names one mutated file for good.
    """
    rng = np.random.default_rng(0)
    W1, b1, W2, b2 = (rng.standard_normal(s) for s in ((4, 3), (3,), (3, N_CLASSES), N_CLASSES))
    X = rng.random((12, 2, 2))
    y = np.arange(12) % N_CLASSES
    soft = np.full((12, N_CLASSES), 1 / N_CLASSES)
    directory.mkdir(parents=True, exist_ok=True)
    seeds = {}

    def raw(name: str, libver: str | None = None, **datasets: tuple[np.ndarray, dict]) -> None:
        seeds[name] = directory / f"{name}.h5"
        with h5py.File(seeds[name], "w", libver=libver) as f:
            for key, (data, options) in datasets.items():
                f.create_dataset(key, data=data, **options)
            if "W1" in datasets:
                f.attrs.update(MODEL_ATTRS)
            f.attrs["x_min"], f.attrs["x_max"] = 0.0, 1.0
            f.attrs["class_names"] = ["a", "b", "c"]

    seeds["model"] = directory / "model.h5"
    model = Model(W1.astype("f4"), b1.astype("f4"), W2.astype("f4"), b2.astype("f4"))
    save_model(model, seeds["model"])
    chunked = {"chunks": True, "maxshape": (None, None)}
    raw("model-latest", "latest", W1=(W1, chunked), b1=(b1, {}), W2=(W2, chunked), b2=(b2, {}))
    seeds["dataset"] = directory / "dataset.h5"
    save_dataset(seeds["dataset"], X.astype("f4"), y, attrs={"input_shape": (2, 2)})
    gzip = {"chunks": (4, 2, 2), "compression": "gzip", "shuffle": True}
    lzf = {"chunks": (5, 3), "compression": "lzf", "fletcher32": True}
    raw("dataset-gzip", X=(X, gzip), y=(y.astype("u1"), {"chunks": (4,), "fletcher32": True}))
    raw("dataset-soft-lzf", "latest", X=(X.reshape(12, 4), {"chunks": (5, 4)}), y=(soft, lzf))
    extensible = {"chunks": (4, 2, 2), "maxshape": (None, 2, 2), "compression": "gzip"}
    raw("dataset-latest", "latest", X=(X.astype("f4"), extensible), y=(y, {"chunks": (12,)}))
    raw("dataset-earliest", "earliest", X=(X, {}), y=(y.astype("i2"), {}))
    seeds["adversarial"] = directory / "adversarial.h5"
    with AdversarialWriter(
        seeds["adversarial"],
        n_rows=12,
        row_shape=(2, 2),
        dtype=np.float32,
        y_template=((), np.int64),
        attrs={"attack": "fgsm", "eps": 0.1},
        rows_per_chunk=5,
        compression="lzf",
        overwrite=True,
    ) as writer:
        writer.write(0, X.astype("f4"), y, y, y)
    return seed_files(directory)


def seed_files(directory: Path) -> list[Path]:
    """The seed files in ``directory``, in the order that case numbers index."""
    return sorted(directory.glob("*.h5"))


INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**63]
MUTATIONS = (
    *("flip", "flip", "word", "word", "truncate", "splice", "header", "move"),
    *("string", "string"),
)
"""The kinds of mutation, as often as each is drawn."""


def stored_strings(path: Path) -> list[bytes]:
    """The names of the links and attributes in ``path`` and the values of its string
    attributes, as stored (UTF-8), sorted: what the ``string`` mutation overwrites."""
    with h5py.File(path, "r") as f:
        strings = {name.encode() for name in f}
        for obj in (f, *f.values()):
            for name in obj.attrs:
                strings.add(name.encode())
                if h5py.check_string_dtype(obj.attrs.get_id(name).dtype):
                    values = np.atleast_1d(obj.attrs[name]).ravel()
                    strings.update(v.encode() if isinstance(v, str) else bytes(v) for v in values)
    return sorted(strings)


def string_sites(data: bytes | bytearray, strings: Iterable[bytes]) -> list[slice]:
    """Every place in ``data`` that holds one of ``strings``. A string of one or two bytes
    counts only between NULs (as HDF5 pads names and heap objects) or after its length (as in
    a link message), not wherever those bytes happen to be."""
    sites = []
    for string in strings:
        pattern = re.escape(string)
        if len(string) <= 2:
            length = re.escape(bytes([len(string)]))
            pattern = b"(?<=\\x00)%s(?=\\x00)|(?<=%s)%s" % (pattern, length, pattern)
        sites += [slice(*match.span()) for match in re.finditer(pattern, data)]
    return sites


def hostile_bytes(length: int, rng: random.Random) -> bytes:
    """``length`` bytes of ``HOSTILE_BYTE_PIECES`` drawn one after another."""
    pieces = b""
    while len(pieces) < length:
        pieces += rng.choice(HOSTILE_BYTE_PIECES)
    return pieces[:length]


def mutate(
    data: bytes, donor: bytes, rng: random.Random, strings: Sequence[bytes] = ()
) -> tuple[bytes, str]:
    """``data`` with one to three random mutations; and what they were, in words.

    The ``string`` mutation overwrites one of ``strings`` (names and string values stored in
    ``data``, see :func:`stored_strings`) with hostile bytes of the same length.
    """
    data = bytearray(data)
    done = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        kind = rng.choice(MUTATIONS)
        at = rng.randrange(len(data) or 1)
        if kind == "flip":
            bits = [rng.randrange(8 * len(data)) for _ in range(rng.randint(1, 8))]
            for bit in bits:
                data[bit // 8] ^= 1 << bit % 8
            done.append(f"flip bits {bits}")
        elif kind == "word":
            width = rng.choice((1, 2, 4, 8))
            at -= at % width
            value = rng.choice([*INTERESTING, len(data), rng.getrandbits(8 * width)])
            value = (value + rng.choice((0, 0, -1, 1))) % 2 ** (8 * width)
            data[at : at + width] = value.to_bytes(width, "little")[: len(data) - at]
            done.append(f"word {value:#x} ({width} bytes) at {at}")
        elif kind == "truncate":
            del data[at:]
            done.append(f"truncate to {at}")
        elif kind in ("splice", "header"):
            start = 0 if kind == "header" else rng.randrange(len(donor))
            length = rng.randint(1, 512)
            data[at : at + length] = donor[start : start + length]
            done.append(f"{kind}: donor[{start}:{start + length}] at {at}")
        elif kind == "move":
            length = rng.randint(1, 64)
            piece = data[at : at + length]
            del data[at : at + length]
            target = rng.randrange(len(data) + 1)
            data[target:target] = piece
            done.append(f"move {length} bytes from {at} to {target}")
        elif sites := string_sites(data, strings):  # kind == "string"
            site = rng.choice(sites)
            before, data[site] = bytes(data[site]), hostile_bytes(site.stop - site.start, rng)
            done.append(f"string {before!r} at {site.start} now {bytes(data[site])!r}")
        else:
            done.append("string: none left to overwrite")
    return bytes(data), "; ".join(done)


def mutated_case(seeds: list[Path], case: int) -> tuple[bytes, str]:
    """The mutated file of case number ``case``: its bytes and how it was made."""
    rng = random.Random(case)
    seed = seeds[case % len(seeds)]
    donor = seeds[rng.randrange(len(seeds))]
    data, how = mutate(seed.read_bytes(), donor.read_bytes(), rng, stored_strings(seed))
    return data, f"{seed.name} (donor {donor.name}): {how}"


def memory_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:", 1)[1].split()[0])


def costly_string_attribute(path: Path) -> str | None:
    """The root attribute of ``path``, a variable-length string, whose reading alone fails and
    takes more than ``CASE_MEMORY_BYTES`` (SECURITY.md's known HDF5 issue); or None."""
    try:
        with safe.open_input(path) as f:
            names = [n for n in f.attrs if h5py.check_string_dtype(f.attrs.get_id(n).dtype)]
            for name in names:
                Path("/proc/self/clear_refs").write_text("5")
                before = memory_kib("VmRSS")
                try:
                    f.attrs[name]
                except (OSError, ValueError):
                    if (memory_kib("VmHWM") - before) << 10 > CASE_MEMORY_BYTES:
                        return name
    except (InputFileError, OSError, KeyError, RuntimeError, ValueError, TypeError):
        pass
    return None


def child(seeds_dir: Path, work_dir: Path, first: int, stop: int) -> None:
    """Load cases ``first:stop``, printing ``<case> <outcome>`` for each as it finishes."""
    seeds = seed_files(seeds_dir)
    path = work_dir / f"case-{os.getpid()}.h5"
    for case in range(first, stop):
        data, how = mutated_case(seeds, case)
        path.write_bytes(data)
        shown = case < DEFAULT_CASES or any(
            step.startswith("string ") for step in how.split(": ", 1)[1].split("; ")
        )
        if os.environ.get("ADVGRAD_FUZZ_CRASH") == str(case):
            os.kill(os.getpid(), signal.SIGSEGV)  # the harness test: a crash must be caught
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) drops to the current use
        before = memory_kib("VmRSS")
        try:
            outcome = examine(path) if shown else load_everything(path)
        except Exception as exc:
            outcome = f"BUG {type(exc).__name__}: {exc}"
        grown = (memory_kib("VmHWM") - before) >> 10
        if grown > CASE_MEMORY_BYTES >> 20:
            cause = costly_string_attribute(path)
            outcome = (
                f"{KNOWN_ISSUE}: string attribute {cause!r} ({outcome})"
                if cause
                else f"BUG memory: {grown} MiB more at the peak ({outcome})"
            )
        print(case, outcome.replace("\n", " "), flush=True)
    path.unlink(missing_ok=True)


@dataclass
class FuzzRun:
    """Outcome of every case: "model", "dataset", "refused", SECURITY.md's known HDF5 issue
    (``KNOWN_ISSUE``), or a failure ("BUG ...", "crash ...", "hang"); ``how``: how each
    failing case's file was made."""

    outcomes: dict[int, str]
    how: dict[int, str]

    @property
    def failures(self) -> dict[int, str]:
        return {
            case: outcome
            for case, outcome in self.outcomes.items()
            if outcome not in ("model", "dataset", "refused")
            and not outcome.startswith(KNOWN_ISSUE)
        }

    def report(self) -> str:
        return "\n".join(
            f"case {case}: {outcome}\n    file: {self.how[case]}"
            for case, outcome in sorted(self.failures.items())
        )


def _pump(stream, lines: queue.Queue) -> None:
    """Put each line of ``stream`` into ``lines``, then None."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_children(
    seeds_dir: Path, work_dir: Path, cases: range, timeout_s: float, env: dict | None = None
) -> dict[int, str]:
    """Load ``cases`` in child processes, a new child after each crash or hang."""
    outcomes: dict[int, str] = {}
    first, stop = cases.start, cases.stop
    while first < stop:
        stderr_path = work_dir / f"stderr-{first}.txt"
        with stderr_path.open("w") as stderr:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    *map(str, (seeds_dir, work_dir, first, stop)),
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env={**os.environ, **(env or {})},
            )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines)).start()
        next_case = first
        while True:
            try:
                line = lines.get(timeout=timeout_s)
            except queue.Empty:
                proc.kill()
                outcomes[next_case] = "hang"
                break
            if line is None:
                break
            case, outcome = line.rstrip("\n").split(" ", 1)
            outcomes[int(case)] = outcome
            next_case = int(case) + 1
        returncode = proc.wait()
        proc.stdout.close()
        if next_case not in outcomes and next_case < stop:
            tail = stderr_path.read_text()[-300:].strip()
            outcomes[next_case] = f"crash (exit code {returncode}) {tail}"
        first = next_case + 1 if next_case in outcomes else next_case
    return outcomes


def fuzz(tmp_path: Path, cases: range, timeout_s: float = CASE_TIMEOUT_S, env=None) -> FuzzRun:
    """Run ``cases``, split over up to 4 CPUs; write each failing case's file into ``tmp_path``."""
    seeds = write_seeds(tmp_path / "seeds")
    workers = min(os.cpu_count() or 1, 4)
    step = -(-len(cases) // workers)
    parts = [range(start, min(start + step, cases.stop)) for start in cases[::step]]
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(
            lambda part: run_children(tmp_path / "seeds", tmp_path, part, timeout_s, env), parts
        )
        run = FuzzRun({case: o for part in results for case, o in part.items()}, {})
    for case in run.failures:
        data, run.how[case] = mutated_case(seeds, case)
        (tmp_path / f"failing-case-{case}.h5").write_bytes(data)
    return run


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="measures memory with Linux's /proc"
)


@needs_proc
def test_mutated_files_load_or_refuse(tmp_path):
    run = fuzz(tmp_path, range(DEFAULT_CASES))
    assert len(run.outcomes) == DEFAULT_CASES
    assert not run.failures, run.report()
    assert {"model", "dataset", "refused"} <= set(run.outcomes.values())


@pytest.mark.slow
@needs_proc
def test_many_mutated_files_load_or_refuse(tmp_path):
    run = fuzz(tmp_path, range(DEFAULT_CASES, DEFAULT_CASES + SLOW_CASES))
    assert len(run.outcomes) == SLOW_CASES
    assert not run.failures, run.report()


@needs_proc
def test_fuzzer_catches_a_crash_and_goes_on(tmp_path):
    run = fuzz(tmp_path, range(10), env={"ADVGRAD_FUZZ_CRASH": "3"})
    assert len(run.outcomes) == 10
    assert list(run.failures) == [3]
    assert run.failures[3].startswith(f"crash (exit code {-signal.SIGSEGV})")
    assert (tmp_path / "failing-case-3.h5").read_bytes() == mutated_case(
        write_seeds(tmp_path / "again"), 3
    )[0]


def test_seeds_are_the_same_bytes_every_time(tmp_path):
    first, second = write_seeds(tmp_path / "a"), write_seeds(tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert [load_everything(p) for p in first] == ["dataset"] * 6 + ["model"] * 2


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            seeds = write_seeds(Path(scratch) / "seeds")
            for number in map(int, sys.argv[1:]):
                data, how = mutated_case(seeds, number)
                print(f"case {number}: {how}", flush=True)
                (Path(scratch) / "case.h5").write_bytes(data)
                print("   ", examine(Path(scratch) / "case.h5"), flush=True)
