"""Converters: models to and from .npz / .safetensors, datasets from .npy, .npz, IDX and CSV."""

from __future__ import annotations

import gzip
import json
import pathlib
import struct

import h5py
import numpy as np
import pytest
from conftest import random_network
from typer.testing import CliRunner

import advgrad
from advgrad import Model
from advgrad.bundled import MODEL, bundled_path
from advgrad.cli import app
from advgrad.errors import InputFileError
from advgrad.io import (
    convert_dataset,
    convert_model,
    read_model_file,
    read_safetensors,
    write_model_file,
    write_safetensors,
)

PARAMETERS = ("W1", "b1", "W2", "b2")
runner = CliRunner()


def same_weights(a: Model, b: Model) -> bool:
    return all(np.array_equal(getattr(a, name), getattr(b, name)) for name in PARAMETERS)


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """An IDX file: 0x0000, type code, ndim, big-endian dimensions, big-endian data."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


@pytest.fixture
def mnist_like(tmp_path):
    """A small MNIST in IDX files: images (gzipped too) and labels (gzipped)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 6, 5), dtype=np.uint8)
    labels = rng.integers(0, 10, 300).astype(np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(idx_bytes(images))
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(idx_bytes(labels))
    return tmp_path, images, labels


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("extension", ["npz", "safetensors"])
def test_bundled_model_round_trips(tmp_path, digits_model, extension):
    middle, back = tmp_path / f"model.{extension}", tmp_path / "back.h5"
    convert_model(bundled_path(MODEL), middle)
    convert_model(middle, back)
    model = advgrad.load_model(back)
    assert same_weights(model, digits_model)
    assert model.dtype == digits_model.dtype
    for name in ("input_shape", "class_names", "x_min", "x_max"):
        assert getattr(model, name) == getattr(digits_model, name)
    if extension == "safetensors":
        assert dict(model.metadata) == dict(digits_model.metadata)


def test_npz_and_safetensors_convert_into_each_other(tmp_path):
    model = Model(*random_network(np.random.default_rng(1), 4, 3, 2), x_min=-1.0, x_max=1.0)
    write_model_file(model, tmp_path / "a.npz")
    convert_model(tmp_path / "a.npz", tmp_path / "b.safetensors")
    tensors, metadata = read_safetensors(tmp_path / "b.safetensors")
    assert list(tensors) == list(PARAMETERS)
    assert metadata["advgrad_format"] == "two-layer-sigmoid"
    back = read_model_file(tmp_path / "b.safetensors")
    assert same_weights(back, model)
    assert (back.x_min, back.x_max) == (-1.0, 1.0)


def test_plain_npz_with_four_arrays_converts(tmp_path):
    arrays = dict(zip(PARAMETERS, random_network(np.random.default_rng(2), 3, 2, 4), strict=True))
    np.savez(tmp_path / "plain.npz", **arrays)
    model = convert_model(tmp_path / "plain.npz", tmp_path / "plain.h5")
    assert same_weights(advgrad.load_model(tmp_path / "plain.h5"), Model(**arrays))
    assert model.dtype == np.float64


def test_torch_state_dict_safetensors_is_read(tmp_path):
    network = random_network(np.random.default_rng(3), 5, 4, 3, dtype=np.float32)
    W1, b1, W2, b2 = network
    state = {"0.weight": W1.T, "0.bias": b1, "2.weight": W2.T, "2.bias": b2}
    write_safetensors(tmp_path / "torch.safetensors", state, {"format": "pt"})
    model = read_model_file(tmp_path / "torch.safetensors")
    assert same_weights(model, Model(*network))
    assert model.metadata["format"] == "pt"


def test_npz_never_unpickles(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    weights = dict(zip(PARAMETERS, random_network(np.random.default_rng(4), 2, 2, 2), strict=True))
    weights["W1"] = np.array([Payload()], dtype=object)
    np.savez(tmp_path / "evil.npz", **weights)
    with pytest.raises(InputFileError, match=r"evil\.npz"):
        read_model_file(tmp_path / "evil.npz")
    with pytest.raises(InputFileError, match="never objects"):
        convert_dataset(tmp_path / "evil.npz", tmp_path / "out.h5", x_key="W1")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x02", "shorter than 8 bytes"),
        (struct.pack("<Q", 2**40) + b"{}", "header length"),
        (struct.pack("<Q", 3) + b"{x}", "bad JSON"),
        (
            safetensors_bytes({"W1": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}),
            "BF16",
        ),
        (
            safetensors_bytes(
                {"W1": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"1234"
            ),
            "outside",
        ),
        (
            safetensors_bytes(
                {"W1": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"1234"
            ),
            "bytes for shape",
        ),
        (
            safetensors_bytes(
                {"W1": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"12345678"
            ),
            "hole",
        ),
        (
            safetensors_bytes(
                {"W1": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"12345678"
            ),
            "after the last tensor",
        ),
        (
            struct.pack("<Q", 2) + b"[]",
            "not an object",
        ),
    ],
)
def test_malformed_safetensors_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(InputFileError, match=message):
        read_model_file(path)


def test_duplicate_safetensors_names_are_refused(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    header = f'{{"W1": {entry}, "W1": {entry}}}'.encode()
    path = tmp_path / "twice.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(InputFileError, match="twice"):
        read_safetensors(path)


def test_model_conversion_errors(tmp_path):
    model = Model(*random_network(np.random.default_rng(5), 2, 2, 2))
    np.savez(tmp_path / "missing.npz", W1=model.W1, b1=model.b1)
    with pytest.raises(InputFileError, match="missing: W2 b2"):
        read_model_file(tmp_path / "missing.npz")
    np.savez(tmp_path / "extra.npz", **{n: getattr(model, n) for n in PARAMETERS}, junk=1)
    with pytest.raises(InputFileError, match="unknown: junk"):
        read_model_file(tmp_path / "extra.npz")
    with pytest.raises(ValueError, match="nothing to convert"):
        convert_model(tmp_path / "extra.npz", tmp_path / "other.npz")
    with pytest.raises(ValueError, match="extension"):
        convert_model(tmp_path / "extra.npz", tmp_path / "model.pt")
    write_model_file(model, tmp_path / "model.h5")
    with pytest.raises(InputFileError, match="exists; pass --overwrite"):
        write_model_file(model, tmp_path / "model.h5")
    with pytest.raises(InputFileError, match="no such file"):
        read_model_file(tmp_path / "absent.safetensors")


# --------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("images", ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"])
def test_idx_converts_in_blocks(mnist_like, images):
    folder, pixels, labels = mnist_like
    calls = []
    result = convert_dataset(
        folder / images,
        folder / "mnist.h5",
        labels=folder / "train-labels-idx1-ubyte.gz",
        block_rows=64,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(min(k, 300), 300) for k in range(64, 300 + 64, 64)]
    assert (result.n_rows, result.row_shape, result.labels) == (300, (6, 5), "integer")
    X, y = advgrad.load_dataset(folder / "mnist.h5")
    np.testing.assert_array_equal(X, (pixels / 255.0).astype(np.float32))
    np.testing.assert_array_equal(y, labels)
    attrs = advgrad.io.dataset_attrs(folder / "mnist.h5")
    assert (attrs.x_min, attrs.x_max, attrs.input_shape) == (0.0, 1.0, (6, 5))


@pytest.mark.parametrize("name", ["big-images-idx3-ubyte.gz", "big.npy"])
def test_conversion_memory_is_bounded_by_the_block(tmp_path, name):
    import tracemalloc

    pixels = np.random.default_rng(9).integers(0, 256, (20000, 28, 28), dtype=np.uint8)
    if name.endswith(".npy"):
        np.save(tmp_path / name, pixels)
    else:
        with gzip.open(tmp_path / name, "wb", compresslevel=1) as handle:
            handle.write(idx_bytes(pixels))
    del pixels  # the float64 image of the whole source would take 125 MB
    tracemalloc.start()
    try:
        convert_dataset(tmp_path / name, tmp_path / "big.h5", block_rows=500)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak
    with h5py.File(tmp_path / "big.h5", "r") as f:
        assert f["X"].shape == (20000, 28, 28)


def test_idx_errors_name_the_file_and_reason(mnist_like):
    folder, pixels, labels = mnist_like
    cases = {
        "wrong-idx3-ubyte": (b"\x08\x03\x00\x00" + bytes(16), "not an IDX file: magic number"),
        "short-idx3-ubyte": (
            idx_bytes(pixels)[:-3],
            r"holds 9013 bytes, but its IDX header .* declares 9016",
        ),
        "float-idx3-ubyte": (idx_bytes(np.full((2, 2), np.nan, ">f4"), 0x0D), "4 values .*NaN"),
    }
    for name, (content, message) in cases.items():
        (folder / name).write_bytes(content)
        with pytest.raises(InputFileError, match=f"{name}: {message}"):
            convert_dataset(folder / name, folder / "out.h5")
    with gzip.open(folder / "cut-idx3-ubyte.gz", "wb") as handle:
        handle.write(idx_bytes(pixels)[:-3])
    with pytest.raises(InputFileError, match="truncated"):
        convert_dataset(folder / "cut-idx3-ubyte.gz", folder / "out.h5")
    (folder / "few-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:-1]))
    with pytest.raises(InputFileError, match=r"has 299 labels, but .* has 300 rows"):
        convert_dataset(
            folder / "train-images-idx3-ubyte",
            folder / "out.h5",
            labels=folder / "few-labels-idx1-ubyte",
        )
    assert not (folder / "out.h5").exists()
    assert not list(folder.glob(".out.h5.partial-*"))


def test_csv_with_header_and_label_column(tmp_path):
    rng = np.random.default_rng(6)
    values = rng.random((40, 3))
    classes = rng.integers(0, 4, 40)
    lines = ["a,label,b,c"] + [
        f"{v[0]},{k},{v[1]},{v[2]}" for v, k in zip(values, classes, strict=True)
    ]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n\n")
    for column in ("label", 1, -3):
        result = convert_dataset(
            tmp_path / "data.csv", tmp_path / "d.h5", label_column=column, block_rows=7,
            dtype="float64", overwrite=True,
        )  # fmt: skip
        assert (result.n_rows, result.row_shape, result.x_min) == (40, (3,), None)
        X, y = advgrad.load_dataset(tmp_path / "d.h5")
        np.testing.assert_array_equal(X, values)
        np.testing.assert_array_equal(y, classes)


def test_gzipped_csv_without_labels(tmp_path):
    with gzip.open(tmp_path / "rows.csv.gz", "wt") as handle:
        handle.write("1,2\n3,4\n5,6\n")
    result = convert_dataset(tmp_path / "rows.csv.gz", tmp_path / "rows.h5")
    X, y = advgrad.load_dataset(tmp_path / "rows.h5")
    assert result.labels == "none"
    assert y is None
    np.testing.assert_array_equal(X, [[1, 2], [3, 4], [5, 6]])


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("1,2,3\n4,nan,6\n", {}, "NaN"),
        ("1,2,3\n4,inf,6\n", {}, "NaN, inf"),
        ("1,2,3\n4,5\n", {}, "line 2 has 2 values; expected 3"),
        ("1,2,3\n\n4,x,6\n", {}, r"line 3, column 2: 'x' is not a number"),
        ("1,2,0.5\n", {"label_column": -1}, "not whole numbers"),
        ("1,2,-1\n", {"label_column": 2}, "outside"),
        ("1,2,3\n", {"label_column": "label"}, "no header column named 'label'"),
        ("1,2,3\n", {"label_column": 5}, "label column 5 of 3 columns"),
        ("a,b\n", {}, "holds no rows"),
    ],
)
def test_bad_csv_gives_one_clear_error(tmp_path, text, options, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputFileError, match=f"bad.csv: .*{message}"):
        convert_dataset(path, tmp_path / "out.h5", **options)
    assert not (tmp_path / "out.h5").exists()


def test_npy_is_memory_mapped_with_npy_labels(tmp_path):
    rng = np.random.default_rng(7)
    X = rng.random((100, 3, 2))
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", rng.integers(0, 5, 100).astype(np.int16))
    np.save(tmp_path / "soft.npy", np.full((100, 4), 0.25))
    np.save(tmp_path / "short.npy", np.zeros(99, dtype=np.int64))
    result = convert_dataset(tmp_path / "x.npy", tmp_path / "a.h5", labels=tmp_path / "y.npy")
    assert result.labels == "integer"
    X_read, y = advgrad.load_dataset(tmp_path / "a.h5")
    np.testing.assert_array_equal(X_read, X.astype(np.float32))
    np.testing.assert_array_equal(y, np.load(tmp_path / "y.npy"))
    result = convert_dataset(
        tmp_path / "x.npy", tmp_path / "b.h5", labels=tmp_path / "soft.npy", scale=2.0,
        x_range=(0.0, 0.5),
    )  # fmt: skip
    assert (result.labels, result.x_max) == ("soft", 0.5)
    np.testing.assert_allclose(advgrad.load_dataset(tmp_path / "b.h5")[0], X / 2, rtol=1e-7)
    with pytest.raises(InputFileError, match="has 99 labels"):
        convert_dataset(tmp_path / "x.npy", tmp_path / "c.h5", labels=tmp_path / "short.npy")


def test_npz_members_are_streamed(tmp_path):
    rng = np.random.default_rng(8)
    X, y = rng.random((50, 4)).astype(np.float32), rng.integers(0, 3, 50)
    np.savez_compressed(tmp_path / "data.npz", x_train=X, y_train=y)
    result = convert_dataset(
        tmp_path / "data.npz", tmp_path / "d.h5", x_key="x_train", y_key="y_train", block_rows=9
    )
    assert result.labels == "integer"
    X_read, y_read = advgrad.load_dataset(tmp_path / "d.h5")
    np.testing.assert_array_equal(X_read, X)
    np.testing.assert_array_equal(y_read, y)
    with pytest.raises(InputFileError, match="no such array; the archive holds x_train, y_train"):
        convert_dataset(tmp_path / "data.npz", tmp_path / "e.h5")
    np.savez(tmp_path / "fortran.npz", X=np.asfortranarray(X))
    with pytest.raises(InputFileError, match="Fortran order"):
        convert_dataset(tmp_path / "fortran.npz", tmp_path / "e.h5")


def test_unknown_data_formats_and_options_are_refused(tmp_path, mnist_like):
    folder, _, _ = mnist_like
    with pytest.raises(ValueError, match="cannot tell the data format"):
        convert_dataset(tmp_path / "data.parquet", tmp_path / "out.h5")
    with pytest.raises(ValueError, match="label_column applies to CSV"):
        convert_dataset(folder / "train-images-idx3-ubyte", tmp_path / "o.h5", label_column=0)
    with pytest.raises(InputFileError, match="is the input file"):
        convert_dataset(folder / "train-images-idx3-ubyte", folder / "train-images-idx3-ubyte")


# --------------------------------------------------------------------------- command line


def test_cli_convert_model_and_data(tmp_path, mnist_like):
    folder, _, _ = mnist_like
    result = runner.invoke(
        app, ["convert-model", str(bundled_path(MODEL)), str(tmp_path / "m.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert "d = 64, H = 64, C = 10" in result.output
    again = runner.invoke(
        app, ["convert-model", str(bundled_path(MODEL)), str(tmp_path / "m.safetensors")]
    )
    assert again.exit_code == 1
    assert "exists; pass --overwrite" in again.output
    images, labels = folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz"
    out = tmp_path / "mnist.h5"
    result = runner.invoke(
        app,
        ["convert-data", str(images), str(out), "--labels", str(labels), "--compression", "gzip"],
    )
    assert result.exit_code == 0, result.output
    assert "(6, 5)" in result.output
    with h5py.File(out, "r") as f:
        assert f["X"].compression == "gzip"
    (folder / "bad-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    result = runner.invoke(
        app, ["convert-data", str(folder / "bad-idx3-ubyte"), str(tmp_path / "bad.h5")]
    )
    assert result.exit_code == 1
    assert "magic number" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(
        app, ["convert-data", str(images), str(tmp_path / "x.h5"), "--x-min", "0"]
    )
    assert result.exit_code == 2
