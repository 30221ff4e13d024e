"""The show job: draw some rows of an attack's output beside the clean rows they came from.

The output of ``advgrad attack`` names the model and the dataset it was made from (their file
names and SHA-256); the job finds them (beside the output, or bundled), checks their
fingerprints, picks rows, predicts them with the model on the CPU backend, and writes the
picture (``advgrad.figures``) crash-safely. Every file is read through the safe readers and
nothing read is trusted: names, shapes and attributes are checked before use, and strings are
drawn escaped.

Only the picked rows are kept: ``first`` reads just those rows, ``successful`` streams the
rows in blocks until it has found enough, and ``confidence-drop`` streams every row, keeping
the best rows so far (memory: one block and the picked rows).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from advgrad.attacks import as_rows, declared_range, label_matrix, success_of
from advgrad.backend import get_backend
from advgrad.bundled import MODEL, TEST_DATA, TRAIN_DATA, bundled_path
from advgrad.errors import InputFileError
from advgrad.figures import ShownRows, require_matplotlib, save_grid
from advgrad.io import open_dataset, read_column, sha256_file
from advgrad.io.atomic import atomic_file
from advgrad.io.safe import regular_input
from advgrad.jobs.inputs import DEFAULT_BATCH_SIZE, open_for_model, rows_per_block
from advgrad.model import MAX_WEIGHTS, Model

SELECTIONS = ("first", "successful", "confidence-drop")
MAX_SHOWN_ROWS = 100
"""The most rows one picture shows (each is 214 pixels high)."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


def show_file(
    output_path: str | os.PathLike,
    image_path: str | os.PathLike,
    *,
    rows: int = 8,
    select: str = "first",
    model_path: str | os.PathLike | None = None,
    data_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_weights: int = MAX_WEIGHTS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ShownRows:
    """Draw ``rows`` rows of an attack's output as a PNG grid (needs matplotlib).

    The image is written beside ``image_path`` and renamed onto it once complete; it never
    replaces an input, nor an existing file without ``overwrite``. The arguments are those of
    :func:`shown_rows`.

    Returns
    -------
    ShownRows
        What the picture shows.

    Raises
    ------
    ValueError
        matplotlib is missing, ``image_path`` does not end in ``.png``, or an argument of
        :func:`shown_rows` is bad.
    InputFileError
        As :func:`shown_rows`, or the image cannot be written.
    """
    require_matplotlib("advgrad show")
    target = Path(image_path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"{target}: show writes PNG images; give a name ending in .png")
    check_choice(rows, select)
    model_path, data_path = recorded_inputs(output_path, model_path, data_path)
    with atomic_file(
        target, overwrite=overwrite, inputs=(output_path, model_path, data_path)
    ) as handle:
        shown = _picked(output_path, model_path, data_path, rows, select, max_weights, batch_size)
        save_grid(shown, handle)
    return shown


def check_choice(rows: int, select: str) -> None:
    """Refuse a number of rows outside [1, ``MAX_SHOWN_ROWS``] or an unknown selection.

    Raises
    ------
    ValueError
    """
    if not 1 <= rows <= MAX_SHOWN_ROWS:
        raise ValueError(f"rows (--rows) must be between 1 and {MAX_SHOWN_ROWS}, got {rows}")
    if select not in SELECTIONS:
        raise ValueError(
            f"select (--select) must be one of {', '.join(SELECTIONS)}, got {select!r}"
        )


def recorded_inputs(
    output_path: str | os.PathLike,
    model_path: str | os.PathLike | None = None,
    data_path: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """The model and dataset files an attack's output was made from.

    The output records their file names and SHA-256 (``advgrad.jobs.inputs.provenance``). A
    file given here must have the recorded SHA-256; one not given is the file of the recorded
    name beside the output, else the bundled file of that name, whichever has the recorded
    SHA-256.

    Raises
    ------
    InputFileError
        The output does not record its inputs, or a file is not the one recorded: a given
        file's SHA-256 differs, or no file of the recorded name and SHA-256 is found (moved
        or changed: pass it).
    """
    with open_dataset(output_path) as output:
        attrs = output.attrs
    return (
        _recorded_input(output_path, attrs, "model", model_path),
        _recorded_input(output_path, attrs, "data", data_path),
    )


def _recorded_input(output_path, attrs, role: str, given) -> Path:
    """The ``role`` ("model" or "data") input of ``output_path``: see ``recorded_inputs``."""
    digest = _recorded_text(output_path, attrs, f"{role}_sha256")
    if not _SHA256.fullmatch(digest):
        raise InputFileError(output_path, None, f"attribute {role}_sha256 is not a SHA-256")
    if given is not None:
        regular_input(given, "an HDF5 file")
        if sha256_file(given) != digest:
            raise InputFileError(
                given,
                None,
                f"is not the {role} file that {output_path} was made from "
                f"(its SHA-256 differs from the recorded {role}_sha256)",
            )
        return Path(given)
    name = _recorded_text(output_path, attrs, f"{role}_file")
    candidates = []
    if Path(name).name == name and name not in ("", ".", ".."):
        candidates.append(Path(output_path).parent / name)
    if name in (MODEL, TEST_DATA, TRAIN_DATA):
        candidates.append(bundled_path(name))
    for candidate in candidates:
        if candidate.is_file() and sha256_file(candidate) == digest:
            return candidate
    raise InputFileError(
        output_path,
        None,
        f"was made from the {role} file {name!r}, which is not beside it (nor bundled) "
        f"as it was; pass --{role} with that file",
    )


def _recorded_text(output_path, attrs, name: str) -> str:
    """The string attribute ``name`` of an attack's output."""
    value = attrs.get(name)
    if not isinstance(value, str):
        raise InputFileError(
            output_path, None, f"has no {name} attribute; show reads outputs of advgrad attack"
        )
    return value


def shown_rows(
    output_path: str | os.PathLike,
    *,
    rows: int = 8,
    select: str = "first",
    model_path: str | os.PathLike | None = None,
    data_path: str | os.PathLike | None = None,
    max_weights: int = MAX_WEIGHTS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ShownRows:
    """Pick ``rows`` rows of an attack's output and what its picture says of them.

    Parameters
    ----------
    output_path : str or os.PathLike
        An output of ``advgrad attack`` on image-shaped data: the first ``input_shape``
        declared by the output, its dataset or its model (else the shape of a row of ``/X``)
        is (h, w), (h, w, c) or (c, h, w) with c 1 or 3 (channels last when both ends could
        be channels).
    rows : int
        How many rows, 1 to ``MAX_SHOWN_ROWS`` (fewer when fewer qualify).
    select : {"first", "successful", "confidence-drop"}
        The first rows; the first rows the attack succeeded on (as its success rate counts
        them: the prediction moved off the attacked labels, or onto the target); or the rows
        whose true class lost the most probability (the clean prediction stands in for it
        without labels), largest drop first, ties by row number.
    model_path, data_path : str or os.PathLike, optional
        The inputs the output was made from (``recorded_inputs``): found from its records
        when not given.
    max_weights : int
        Bound on the elements of one weight matrix of the model (``open_for_model``).
    batch_size : int
        Rows read at once (``rows_per_block``), for the selections that stream.

    Returns
    -------
    ShownRows
        Predictions and confidences from the model, computed on the CPU backend.

    Raises
    ------
    ValueError
        A bad ``rows``, ``select`` or ``batch_size``.
    InputFileError
        A file is refused by the safe readers or is not the recorded one; the output does not
        match its dataset (rows, shape, dtype); the data has no image shape; the output is
        incomplete; no row was broken (``successful``).
    """
    check_choice(rows, select)
    model_path, data_path = recorded_inputs(output_path, model_path, data_path)
    return _picked(output_path, model_path, data_path, rows, select, max_weights, batch_size)


def _picked(
    output_path, model_path, data_path, rows: int, select: str, max_weights: int, batch_size: int
) -> ShownRows:
    """``shown_rows`` from the inputs ``recorded_inputs`` found."""
    with (
        open_for_model(model_path, data_path, max_weights=max_weights) as (model, source),
        open_dataset(output_path, n_classes=model.n_classes) as output,
    ):
        if output.attrs.get("complete") is not True:
            raise InputFileError(
                output_path, None, "is not complete (an interrupted job's partial output)"
            )
        layout = (source.n_rows, source.row_shape, source.dtype)
        if (output.n_rows, output.row_shape, output.dtype) != layout:
            raise InputFileError(
                output_path,
                "/X",
                f"holds {output.n_rows} rows of shape {output.row_shape} {output.dtype}, but "
                f"its dataset {data_path} holds {source.n_rows} of {source.row_shape} "
                f"{source.dtype}",
            )
        shape = (
            output.info.input_shape
            or source.info.input_shape
            or model.input_shape
            or output.row_shape
        )
        to_images = _image_converter(output_path, shape)
        if output.n_rows == 0:
            raise InputFileError(output_path, "/X", "has no rows to show")
        targeted = output.attrs.get("targeted") is True
        reference_of = _reference_of(output_path, output, source, model, select, targeted)
        scan = _Scan(model, select, reference_of, targeted)
        block = rows if select == "first" else rows_per_block(batch_size, model)
        kept = _Kept.empty(model.n_inputs, model.dtype)
        for start in range(0, output.n_rows, block):
            stop = min(start + block, output.n_rows)
            clean, y = source.read(start, stop)
            adversarial, _ = output.read(start, stop)
            kept = kept.merged(
                start, as_rows(model, clean), as_rows(model, adversarial), y, scan, rows
            )
            if select != "confidence-drop" and len(kept.index) == rows:
                break
        if not len(kept.index):
            raise InputFileError(output_path, None, "has no row the attack succeeded on")
        value_range = declared_range(output, source, model) or _drawn_range(kept)
        class_names = model.class_names
        if class_names is None and len(source.info.class_names or ()) == model.n_classes:
            class_names = source.info.class_names
        title = _title(output_path, output.attrs, select, rows)
    backend = get_backend("cpu")
    P_clean, _, pred_clean = backend.forward(model, kept.clean, label_matrix(model, None, 0))
    P_adv, _, pred_adv = backend.forward(model, kept.adversarial, label_matrix(model, None, 0))
    shown_at = np.arange(len(kept.index))
    return ShownRows(
        index=kept.index,
        clean=to_images(kept.clean),
        adversarial=to_images(kept.adversarial),
        true_class=kept.true_class,
        pred_clean=pred_clean,
        pred_adv=pred_adv,
        confidence_clean=P_clean[shown_at, pred_clean].astype(np.float64),
        confidence_adv=P_adv[shown_at, pred_adv].astype(np.float64),
        class_names=class_names,
        value_range=value_range,
        title=title,
    )


def _image_converter(output_path, shape: tuple[int, ...]):
    """The function that turns rows (k, d) into images (k, h, w) or (k, h, w, 3) float64.

    Raises
    ------
    InputFileError
        ``shape`` is not an image shape.
    """
    shape = tuple(shape)
    channels_last = len(shape) == 3 and shape[2] in (1, 3)
    channels_first = len(shape) == 3 and shape[0] in (1, 3) and not channels_last
    if len(shape) != 2 and not channels_last and not channels_first:
        raise InputFileError(
            output_path,
            None,
            f"has no image shape (input_shape {shape}; an image is (h, w), (h, w, c) or "
            "(c, h, w) with c 1 or 3); show draws images only",
        )

    def to_images(rows: np.ndarray) -> np.ndarray:
        images = rows.reshape(len(rows), *shape).astype(np.float64)
        if channels_first:
            images = np.moveaxis(images, 1, -1)
        return images[..., 0] if images.ndim == 4 and images.shape[-1] == 1 else images

    return to_images


def _reference_of(output_path, output, source, model: Model, select: str, targeted: bool):
    """For ``successful``: the function of (start, stop, clean predictions, labels) giving
    the classes the attack's success is measured against (``Labels.reference``): its
    targets (``/target``, read whole: 8 bytes a row), the dataset's labels, or the clean
    predictions, as the output's attributes say. None for the other selections."""
    if select != "successful":
        return None
    if targeted:
        targets = read_column(output_path, "target")
        if targets.dtype.kind not in "iu" or len(targets) != output.n_rows:
            raise InputFileError(output_path, "/target", "is not one class per row")
        if ((targets < 0) | (targets >= model.n_classes)).any():
            raise InputFileError(
                output_path, "/target", f"holds classes outside [0, {model.n_classes})"
            )
        return lambda start, stop, predicted, labels: targets[start:stop]
    if output.attrs.get("labels") == "dataset":
        if not source.has_labels:
            raise InputFileError(source.path, "/y", "is missing, but the attack used labels")
        return lambda start, stop, predicted, labels: _classes(labels)
    return lambda start, stop, predicted, labels: predicted


@dataclass(frozen=True)
class _Scan:
    """What ranks the rows of a block for one selection."""

    model: Model
    select: str
    reference_of: Callable | None
    targeted: bool

    def rank(self, start: int, clean, adversarial, y) -> tuple[np.ndarray, np.ndarray]:
        """(eligible (m,) bool, key (m,) float64: smaller is shown first) of a block."""
        n_rows = len(clean)
        if self.select == "first":
            return np.ones(n_rows, dtype=bool), np.zeros(n_rows)
        backend = get_backend("cpu")
        no_labels = label_matrix(self.model, None, 0)
        P_clean, _, pred_clean = backend.forward(self.model, clean, no_labels)
        P_adv, _, pred_adv = backend.forward(self.model, adversarial, no_labels)
        if self.select == "successful":
            reference = self.reference_of(start, start + n_rows, pred_clean, y)
            return success_of(reference, pred_adv, self.targeted), np.zeros(n_rows)
        true = pred_clean if y is None else _classes(y)
        at = np.arange(n_rows)
        drop = P_clean[at, true].astype(np.float64) - P_adv[at, true].astype(np.float64)
        return np.ones(n_rows, dtype=bool), -drop


def _classes(y: np.ndarray) -> np.ndarray:
    """Integer labels (m,) int64 of ``y``: itself, or the most likely class of soft labels."""
    return y if y.ndim == 1 else np.argmax(y, axis=1)


@dataclass(frozen=True)
class _Kept:
    """The rows picked so far, in the order they are shown."""

    index: np.ndarray
    key: np.ndarray
    clean: np.ndarray
    adversarial: np.ndarray
    true_class: np.ndarray | None

    @classmethod
    def empty(cls, width: int, dtype) -> _Kept:
        return cls(
            np.empty(0, np.int64),
            np.empty(0),
            np.empty((0, width), dtype),
            np.empty((0, width), dtype),
            None,
        )

    def merged(self, start: int, clean, adversarial, y, scan: _Scan, n: int) -> _Kept:
        """The best ``n`` of these rows and the block's eligible rows (``scan.rank``), by key
        then row number."""
        eligible, key = scan.rank(start, clean, adversarial, y)
        picked = np.flatnonzero(eligible)
        index = np.concatenate([self.index, start + picked])
        keys = np.concatenate([self.key, key[picked]])
        best = np.lexsort((index, keys))[:n]
        true_class = None
        if y is not None:
            kept = self.true_class if self.true_class is not None else np.empty(0, np.int64)
            true_class = np.concatenate([kept, _classes(y)[picked]])[best]
        return _Kept(
            index[best],
            keys[best],
            np.concatenate([self.clean, clean[picked]])[best],
            np.concatenate([self.adversarial, adversarial[picked]])[best],
            true_class,
        )


def _drawn_range(kept: _Kept) -> tuple[float, float]:
    """The range of the values drawn, when no file declares one (1 wide when they are equal)."""
    values = np.concatenate([kept.clean.ravel(), kept.adversarial.ravel()])
    low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low, low + 1.0)


def _title(output_path, attrs, select: str, rows: int) -> tuple[str, str]:
    """The figure's title: the output's name; its attack and which rows are shown."""
    settings = [str(attrs["attack"])] if "attack" in attrs else []
    if "norm" in attrs:
        settings.append(f"L{attrs['norm']}")
    eps = attrs.get("eps")
    if isinstance(eps, float) and math.isfinite(eps):
        settings.append(f"eps {eps:g}")
    which = {
        "first": f"the first {rows} rows",
        "successful": f"the first {rows} rows it succeeded on",
        "confidence-drop": f"the {rows} rows whose true class lost the most probability",
    }[select]
    return Path(output_path).name, f"{', '.join(settings)}: {which}"
