"""advgrad.io: round trips, every refusal of untrusted input, crash-safe writers."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from advgrad.errors import InputFileError
from advgrad.io import (
    AdversarialWriter,
    column_blocks,
    dataset_attrs,
    fastzlib,
    load_dataset,
    load_model,
    open_dataset,
    safe,
    save_dataset,
    save_model,
    sha256_file,
)
from advgrad.io.digests import RECENT_CHANGE_S, DigestCache, FileDigest
from advgrad.model import Model

FLOATS = [np.float32, np.float64]


def assert_bitwise_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()


def make_model(dtype=np.float64, d=6, H=4, C=3, seed=0, **fields) -> Model:
    rng = np.random.default_rng(seed)
    return Model(
        rng.standard_normal((d, H)).astype(dtype),
        rng.standard_normal(H).astype(dtype),
        rng.standard_normal((H, C)).astype(dtype),
        rng.standard_normal(C).astype(dtype),
        **fields,
    )


def write_raw(path: Path, attrs=None, **datasets) -> Path:
    """A file written with h5py directly, to craft what advgrad's writers never produce."""
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f[name] = data
        f.attrs.update(attrs or {})
    return path


def model_arrays(dtype=np.float32, d=6, H=4, C=3) -> dict[str, np.ndarray]:
    model = make_model(dtype, d, H, C)
    return {name: getattr(model, name).copy() for name in ("W1", "b1", "W2", "b2")}


MODEL_ATTRS = {"advgrad_format": "two-layer-sigmoid", "format_version": 1}


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.h5"
    save_model(make_model(), path)
    return path


def refused(path: Path, dataset: str | None, match: str) -> pytest.RaisesExc:
    """pytest.raises for an InputFileError naming ``path`` and ``dataset``, reason ``match``."""
    where = str(path) if dataset is None else f"{path}:{dataset}"
    return pytest.raises(InputFileError, match=re.escape(where) + ": .*" + match)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", FLOATS)
def test_model_round_trip_is_bitwise(tmp_path, dtype):
    metadata = {
        "seed": 7,
        "lr": 0.5,
        "note": "trained on digits ✓",
        "tags": ("a", "b"),
        "losses": np.array([0.5, 0.25]),
        "early_stop": True,
    }
    model = make_model(
        dtype,
        d=4,
        input_shape=(2, 2),
        class_names=("cat", "dog", "emu"),
        x_min=0.0,
        x_max=1.0,
        metadata=metadata,
    )
    save_model(model, tmp_path / "m.h5")
    loaded = load_model(tmp_path / "m.h5")
    for name in ("W1", "b1", "W2", "b2"):
        assert_bitwise_equal(getattr(loaded, name), getattr(model, name))
    assert (loaded.input_shape, loaded.class_names) == ((2, 2), ("cat", "dog", "emu"))
    assert (loaded.x_min, loaded.x_max) == (0.0, 1.0)
    assert set(loaded.metadata) == set(metadata)
    for key, value in metadata.items():
        np.testing.assert_array_equal(loaded.metadata[key], value)
        assert type(loaded.metadata[key]) is type(value)


def test_model_without_optional_attrs(model_path):
    loaded = load_model(model_path)
    assert loaded.input_shape is loaded.class_names is loaded.x_min is loaded.x_max is None
    assert dict(loaded.metadata) == {}


def test_save_model_refuses_unstorable_metadata(tmp_path):
    with pytest.raises(TypeError, match="cannot store dict"):
        save_model(make_model(metadata={"params": {"lr": 1}}), tmp_path / "m.h5")
    with pytest.raises(ValueError, match="clash"):
        save_model(make_model(metadata={"format_version": 2}), tmp_path / "m.h5")
    assert list(tmp_path.iterdir()) == []


def labels_for(kind: str, n_rows: int, dtype, rng) -> np.ndarray | None:
    if kind == "none":
        return None
    if kind == "int":
        return rng.integers(0, 5, n_rows)
    soft = rng.random((n_rows, 5)) + 0.01
    return (soft / soft.sum(axis=1, keepdims=True)).astype(dtype)


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    dtype=st.sampled_from(FLOATS),
    row_shape=st.sampled_from([(3,), (8, 8), (2, 3, 4)]),
    label_kind=st.sampled_from(["none", "int", "soft"]),
    compression=st.sampled_from([None, "gzip", "lzf"]),
)
def test_dataset_round_trip_is_bitwise(
    tmp_path_factory, data, dtype, row_shape, label_kind, compression
):
    n_rows = data.draw(st.integers(0, 40), label="n_rows")
    X = data.draw(arrays(dtype, (n_rows, *row_shape), elements=st.floats(-1e6, 1e6, width=32)))
    y = labels_for(label_kind, n_rows, dtype, np.random.default_rng(n_rows))
    path = tmp_path_factory.mktemp("ds") / "d.h5"
    save_dataset(path, X, y, attrs={"x_min": -1e6, "x_max": 1e6}, compression=compression)
    X_back, y_back = load_dataset(path, n_classes=5)
    assert_bitwise_equal(X_back, X)
    if y is None:
        assert y_back is None
    else:
        assert_bitwise_equal(y_back, y.astype(np.int64) if label_kind == "int" else y)


def test_int_labels_of_any_width_come_back_int64(tmp_path):
    path = write_raw(tmp_path / "d.h5", X=np.zeros((3, 2)), y=np.array([2, 0, 1], np.uint8))
    _, y = load_dataset(path, n_classes=3)
    assert_bitwise_equal(y, np.array([2, 0, 1], np.int64))


def test_dataset_attrs(tmp_path):
    path = tmp_path / "d.h5"
    attrs = {"x_min": 0, "x_max": 16.0, "input_shape": (2, 3), "class_names": ["a", "b"], "k": 3}
    save_dataset(path, np.zeros((4, 6), np.float32), attrs=attrs)
    info = dataset_attrs(path)
    assert (info.x_min, info.x_max, info.input_shape) == (0.0, 16.0, (2, 3))
    assert info.class_names == ("a", "b")
    assert info.attrs["k"] == 3
    with open_dataset(path) as reader:
        assert (reader.x_min, reader.x_max, reader.attrs["k"]) == (0.0, 16.0, 3)
        assert (reader.n_rows, reader.row_shape, reader.dtype) == (4, (6,), np.float32)
        assert not reader.has_labels
        assert reader.y_template is None


def test_save_dataset_refuses_bad_arrays(tmp_path):
    path = tmp_path / "d.h5"
    with pytest.raises(ValueError, match="float32 or float64"):
        save_dataset(path, np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match="at least one feature"):
        save_dataset(path, np.zeros(3))
    with pytest.raises(ValueError, match="outside"):
        save_dataset(path, np.zeros((3, 2)), np.array([0, -1, 2]))
    with pytest.raises(ValueError, match="sum to 1"):
        save_dataset(path, np.zeros((2, 2)), np.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="has dtype bool; expected integer or float32"):
        save_dataset(path, np.zeros((3, 2)), np.ones(3, bool))
    with pytest.raises(ValueError, match="compression"):
        save_dataset(path, np.zeros((3, 2)), compression="zstd")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "d.h5"
    save_dataset(path, np.ones((2, 2)))
    before = path.read_bytes()
    with pytest.raises(TypeError, match="cannot store"):
        save_dataset(path, np.zeros((2, 2)), attrs={"bad": object()})
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_save_dataset_accepts_big_endian_arrays_and_writes_native(tmp_path):
    path = tmp_path / "d.h5"
    save_dataset(path, np.arange(6, dtype=">f4").reshape(3, 2), np.array([1, 0, 1], ">i4"))
    X, y = load_dataset(path)
    assert_bitwise_equal(X, np.arange(6, dtype=np.float32).reshape(3, 2))
    assert_bitwise_equal(y, np.array([1, 0, 1]))


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("label_kind", ["none", "int", "soft"])
def test_chunks_match_load_dataset(tmp_path, label_kind):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((23, 4, 2)).astype(np.float32)
    y = labels_for(label_kind, 23, np.float32, rng)
    path = tmp_path / "d.h5"
    save_dataset(path, X, y)
    X_all, y_all = load_dataset(path)
    with open_dataset(path) as reader:
        if label_kind != "none":
            assert reader.y_template == (y_all.shape[1:], y_all.dtype)
        for rows in (1, 5, 7, 23, 100):
            for start in (0, 4):
                blocks = list(reader.chunks(rows, start=start))
                assert [b[0] for b in blocks] == list(range(start, 23, rows))
                assert all(len(b[1]) <= rows for b in blocks)
                assert_bitwise_equal(np.concatenate([b[1] for b in blocks]), X_all[start:])
                if y is None:
                    assert reader.y_template is None
                    assert all(b[2] is None for b in blocks)
                else:
                    assert_bitwise_equal(np.concatenate([b[2] for b in blocks]), y_all[start:])


def test_chunks_read_blocks_not_the_whole_dataset(tmp_path, monkeypatch):
    path = tmp_path / "d.h5"
    save_dataset(path, np.zeros((50, 3)))
    reads = []
    original = safe.h5py.Dataset.__getitem__

    def spy(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(safe.h5py.Dataset, "__getitem__", spy)
    with open_dataset(path) as reader:
        list(reader.chunks(16))
    assert reads == [slice(0, 16), slice(16, 32), slice(32, 48), slice(48, 50)]


def test_chunks_check_each_block(tmp_path):
    y = np.zeros(10, np.int64)
    y[7] = 3
    path = write_raw(tmp_path / "d.h5", X=np.zeros((10, 2)), y=y)
    with open_dataset(path, n_classes=3) as reader:
        blocks = reader.chunks(4)
        assert next(blocks)[0] == 0
        with refused(path, "/y", r"1 labels outside \[0, 3\), the first \(3\) in row 7"):
            next(blocks)


def test_read_into_a_reused_buffer(tmp_path):
    """Blocks read into one buffer equal fresh reads, and are checked the same way."""
    X = np.arange(60, dtype=np.float32).reshape(10, 2, 3)
    X[8, 1, 2] = np.inf
    path = write_raw(tmp_path / "d.h5", X=X, y=np.arange(10) % 3)
    buffer = np.full((4, 2, 3), np.nan, np.float32)
    with open_dataset(path, n_classes=3) as reader:
        for start in (0, 4):
            block, y = reader.read(start, start + 4, out=buffer)
            assert block is buffer
            assert_bitwise_equal(block, X[start : start + 4])
            np.testing.assert_array_equal(y, np.arange(start, start + 4) % 3)
        assert reader.read(4, 4, out=buffer[:0])[0].shape == (0, 2, 3)
        with refused(path, "/X", "1 non-finite values .* the first in row 8"):
            reader.read(6, 10, out=buffer)
        for bad in (buffer[:3], buffer.astype(np.float64), np.empty((4, 3, 2), np.float32)):
            with pytest.raises(ValueError, match="out must be a C-contiguous"):
                reader.read(0, 4, out=bad)
        with pytest.raises(ValueError, match="converting as_dtype"):
            reader.read(0, 4, out=buffer, as_dtype=np.float64)


def test_chunks_refuse_bad_arguments(tmp_path):
    path = write_raw(tmp_path / "d.h5", X=np.zeros((10, 2)))
    with open_dataset(path) as reader:
        with pytest.raises(ValueError, match="rows_per_chunk"):
            reader.chunks(0)
        with pytest.raises(ValueError, match="start"):
            reader.chunks(3, start=11)
        with pytest.raises(ValueError, match="not within"):
            reader.read(5, 11)


# --------------------------------------------------------------------------- files refused


def test_missing_file(tmp_path):
    with refused(tmp_path / "nope.h5", None, "no such file"):
        load_model(tmp_path / "nope.h5")


def test_directory(tmp_path):
    with refused(tmp_path, None, "is a directory"):
        load_dataset(tmp_path)


def test_not_an_hdf5_file(tmp_path):
    path = tmp_path / "x.h5"
    path.write_text("W1,b1\n1,2\n")
    with refused(path, None, "not an HDF5 file"):
        load_model(path)


def test_truncated_hdf5_file(model_path):
    model_path.write_bytes(model_path.read_bytes()[:600])
    with refused(model_path, None, "cannot open: "):
        load_model(model_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(model_path):
    model_path.chmod(0)
    with refused(model_path, None, "permission denied"):
        load_model(model_path)


# --------------------------------------------------------------------------- links and layout


@pytest.fixture
def linked_file(tmp_path: Path) -> Path:
    """A file whose /X and /g are reached in every way but a hard link."""
    other = write_raw(tmp_path / "other.h5", X=np.zeros((2, 2)))
    with h5py.File(other, "a") as f:
        f.create_group("g")["X"] = np.zeros((2, 2))
    path = tmp_path / "links.h5"
    with h5py.File(path, "w") as f:
        f["real/X"] = np.zeros((2, 2))
        f["soft"] = h5py.SoftLink("/real/X")
        f["dangling"] = h5py.SoftLink("/nowhere")
        f["softgroup"] = h5py.SoftLink("/real")
        f["ext"] = h5py.ExternalLink(str(other), "/X")
        f["extgroup"] = h5py.ExternalLink(str(other), "/g")
        f["hard"] = f["real/X"]
    return path


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("/soft", "/soft is a soft link to /real/X; only hard links"),
        ("/dangling", "/dangling is a soft link to /nowhere"),
        ("/softgroup/X", "/softgroup is a soft link to /real; only hard links"),
        ("/ext", r"/ext is an external link to .*other.h5:/X; only hard links"),
        ("/extgroup/X", r"/extgroup is an external link to .*other.h5:/g"),
    ],
)
def test_links_other_than_hard_are_refused(linked_file, name, match):
    with h5py.File(linked_file, "r") as f, refused(linked_file, name, match):
        safe.checked_dataset(f, name, kind="float")


def test_hard_links_are_followed(linked_file):
    with h5py.File(linked_file, "r") as f:
        assert safe.checked_dataset(f, "/hard", kind="float").shape == (2, 2)
        assert safe.checked_dataset(f, "real/X", kind="float").shape == (2, 2)
        assert safe.checked_dataset(f, "/real/nope", kind="float", required=False) is None
        with refused(linked_file, "/real/X/deeper", "/real/X is not a group"):
            safe.checked_dataset(f, "/real/X/deeper", kind="float")
        with refused(linked_file, "/real", "is a Group, not a dataset"):
            safe.checked_dataset(f, "/real", kind="float")


def test_model_with_soft_linked_weights_is_refused(tmp_path):
    path = write_raw(tmp_path / "m.h5", MODEL_ATTRS, **model_arrays())
    with h5py.File(path, "a") as f:
        f.move("W1", "hidden")
        f["W1"] = h5py.SoftLink("/hidden")
    with refused(path, "/W1", "soft link"):
        load_model(path)


def test_virtual_dataset(tmp_path):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        f["source"] = np.zeros((4, 2))
        layout = h5py.VirtualLayout(shape=(4, 2), dtype="f8")
        layout[:] = h5py.VirtualSource(path, "source", shape=(4, 2))
        f.create_virtual_dataset("X", layout)
    with refused(path, "/X", "virtual dataset"):
        load_dataset(path)


def test_external_raw_storage(tmp_path):
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.zeros(8).tobytes())
    path = tmp_path / "e.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", shape=(4, 2), dtype="f8", external=[(str(raw), 0, 64)])
    with refused(path, "/X", "raw data in external files"):
        load_dataset(path)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"compression": 32009, "allow_unknown_filter": True}, r"filter 32009 \(unknown\)"),
        ({"scaleoffset": 3}, r"filter 6 \(scaleoffset\)"),
    ],
)
def test_filters_outside_the_allowed_set(tmp_path, options, match):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=np.zeros((4, 2)), chunks=(2, 2), **options)
    with refused(path, "/X", match + "; only deflate, shuffle, fletcher32, lzf"):
        load_dataset(path)


def test_allowed_filters_are_read(tmp_path):
    path = tmp_path / "f.h5"
    X = np.arange(8.0).reshape(4, 2)
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=X, compression="gzip", shuffle=True, fletcher32=True)
    assert_bitwise_equal(load_dataset(path)[0], X)


def test_corrupt_chunk_is_one_error(tmp_path):
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("X", data=np.arange(16.0).reshape(8, 2), fletcher32=True)
        offset = dset.id.get_chunk_info(0).byte_offset
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(b"\x01\x02\x03\x04" * 2)  # zeros and 0xff words share a checksum
    with refused(path, "/X", "cannot read rows 0:8"):
        load_dataset(path)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda f: f.create_dataset("X", (3, 2), dtype=">f4"), "dtype >f4 in non-native byte"),
        (lambda f: f.create_dataset("X", (3, 2), dtype="f2"), "dtype float16; expected float32"),
        (lambda f: f.create_dataset("X", (3, 2), dtype="i4"), "dtype int32; expected float32"),
        (lambda f: f.create_dataset("X", (3,), dtype="f4,i4"), "compound dtype"),
        (lambda f: f.create_dataset("X", (3,), dtype=("f4", (2,))), "array-valued dtype"),
        (lambda f: f.create_dataset("X", data=["a", "b"]), "string dtype"),
        (lambda f: f.create_dataset("X", (3,), dtype=h5py.vlen_dtype("f4")), "variable-length"),
        (lambda f: f.create_dataset("X", (3,), dtype=h5py.ref_dtype), "reference dtype"),
        (lambda f: f.create_dataset("X", (3,), dtype="c8"), "dtype complex64"),
    ],
)
def test_refused_dtypes_for_X(tmp_path, make, match):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        make(f)
    with refused(path, "/X", match):
        load_dataset(path)


def test_enum_labels_are_refused(tmp_path):
    path = write_raw(tmp_path / "d.h5", X=np.zeros((2, 2)))
    with h5py.File(path, "a") as f:
        f.create_dataset("y", data=[0, 1], dtype=h5py.enum_dtype({"a": 0, "b": 1}, basetype="i1"))
    with refused(path, "/y", "enum dtype"):
        load_dataset(path)


def test_non_standard_float_type_is_refused(tmp_path):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        stored = h5py.h5t.IEEE_F32LE.copy()
        stored.set_ebias(100)
        h5py.h5d.create(f.id, b"X", stored, h5py.h5s.create_simple((3, 2)))
    with refused(path, "/X", "non-standard number type"):
        load_dataset(path)


def test_int_weights_are_refused(tmp_path):
    arrays_ = model_arrays() | {"W1": np.ones((6, 4), np.int64)}
    path = write_raw(tmp_path / "m.h5", MODEL_ATTRS, **arrays_)
    with refused(path, "/W1", "dtype int64; expected float32 or float64"):
        load_model(path)


def test_big_endian_weights_are_refused(tmp_path):
    arrays_ = model_arrays() | {"b1": np.zeros(4, ">f4")}
    path = write_raw(tmp_path / "m.h5", MODEL_ATTRS, **arrays_)
    with refused(path, "/b1", "non-native byte order"):
        load_model(path)


# --------------------------------------------------------------------------- shapes and bounds


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"shape": (1,) * 9}, "has 9 axes; at most 8"),
        ({"shape": (2**41, 1), "chunks": (1024, 1)}, "at most 1099511627776 per axis"),
        ({"shape": (2**21, 2**20), "chunks": (1, 1024)}, "1099511627776 in all"),
        ({"shape": (1, 2**24), "chunks": (1, 2**24)}, "of 134217728 bytes; at most 67108864"),
        ({"shape": ()}, "is a scalar"),
        ({"data": h5py.Empty("f8")}, "null dataspace"),
    ],
)
def test_shape_bounds(tmp_path, options, match):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", dtype="f8", **options)
    with refused(path, "/X", match):
        load_dataset(path)


def test_X_needs_a_feature_axis(tmp_path):
    path = write_raw(tmp_path / "d.h5", X=np.zeros(3))
    with refused(path, "/X", "expected \\(N, ...\\) with a feature axis"):
        load_dataset(path)


@pytest.mark.parametrize(
    ("y", "match"),
    [
        (np.zeros(4, np.int64), "has shape \\(4,\\), but /X has 3 rows"),
        (np.zeros((3, 2), np.int64), "integer labels must have shape \\(N,\\)"),
        (np.zeros(3, np.float32), "float labels must be soft labels of shape \\(N, C\\)"),
        (np.full((3, 4), 0.25), "soft labels have 4 classes, expected 3"),
    ],
)
def test_label_layouts_are_refused(tmp_path, y, match):
    path = write_raw(tmp_path / "d.h5", X=np.zeros((3, 2)), y=y)
    with refused(path, "/y", match):
        load_dataset(path, n_classes=3)


def test_missing_dataset(tmp_path):
    arrays_ = model_arrays()
    del arrays_["b2"]
    path = write_raw(tmp_path / "m.h5", MODEL_ATTRS, **arrays_)
    with refused(path, "/b2", "no dataset /b2"):
        load_model(path)
    with refused(path, "/X", "no dataset /X"):
        load_dataset(path)


@pytest.mark.parametrize(
    ("name", "value", "dataset", "match"),
    [
        ("b1", np.zeros(5, np.float32), "/b1", "b1 must have shape \\(4,\\)"),
        ("W2", np.zeros((5, 3), np.float32), "/W2", "W2 must have 4 rows"),
        ("b2", np.zeros(2, np.float32), "/b2", "b2 must have shape \\(3,\\)"),
        ("W1", np.zeros(6, np.float32), "/W1", "W1 must be 2-D"),
        ("W2", np.zeros((4, 1), np.float32), None, "at least 2 classes"),
    ],
)
def test_model_shape_mismatches(tmp_path, name, value, dataset, match):
    path = write_raw(tmp_path / "m.h5", MODEL_ATTRS, **(model_arrays() | {name: value}))
    with refused(path, dataset, match):
        load_model(path)


def test_model_mixed_dtypes(tmp_path):
    arrays_ = model_arrays() | {"b2": np.zeros(3, np.float64)}
    path = write_raw(tmp_path / "m.h5", MODEL_ATTRS, **arrays_)
    with refused(path, None, "weights must share one dtype, got W1 float32, .* b2 float64"):
        load_model(path)


# --------------------------------------------------------------------------- values


def test_nonfinite_values(tmp_path):
    X = np.zeros((6, 2, 2), np.float32)
    X[3, 1, 0] = np.nan
    X[5, 0, 1] = -np.inf
    path = write_raw(tmp_path / "d.h5", X=X)
    match = "2 non-finite values \\(NaN or inf\\) in rows 0:6, the first in row 3"
    with refused(path, "/X", match):
        load_dataset(path)
    with open_dataset(path) as reader, refused(path, "/X", "in rows 4:6, the first in row 5"):
        list(reader.chunks(2, start=4))
    assert_bitwise_equal(load_dataset(path, allow_nonfinite=True)[0], X)


def test_nonfinite_weights(tmp_path):
    arrays_ = model_arrays()
    arrays_["W2"][2, 1] = np.inf
    path = write_raw(tmp_path / "m.h5", MODEL_ATTRS, **arrays_)
    with refused(path, "/W2", "1 non-finite values .* the first in row 2"):
        load_model(path)


def test_nonfinite_soft_labels_are_refused_even_when_allowed_in_X(tmp_path):
    y = np.full((2, 2), 0.5)
    y[1, 0] = np.nan
    path = write_raw(tmp_path / "d.h5", X=np.zeros((2, 2)), y=y)
    with refused(path, "/y", "non-finite values .* the first in row 1"):
        load_dataset(path, allow_nonfinite=True)


@pytest.mark.parametrize(
    ("y", "n_classes", "match"),
    [
        (np.array([0, 2, 3, 1, 9]), 3, r"2 labels outside \[0, 3\), the first \(3\) in row 2"),
        (np.array([0, 1, -1], np.int8), None, r"outside \[0, 2\*\*63\), the first \(-1\) in row 2"),
        (np.array([0, 2**63 + 1], np.uint64), None, r"the first \(9223372036854775809\) in row 1"),
        (np.array([[0.5, 0.5], [1.2, -0.2]]), None, "the first is row 1 \\(sum 1\\)"),
        (np.array([[0.5, 0.5], [0.5, 0.49]]), None, "sum to 1 \\(within 0.001\\).* row 1"),
    ],
)
def test_label_values_are_refused(tmp_path, y, n_classes, match):
    path = write_raw(tmp_path / "d.h5", X=np.zeros((len(y), 2)), y=y)
    with refused(path, "/y", match):
        load_dataset(path, n_classes=n_classes)


def test_soft_label_tolerance(tmp_path):
    y = np.array([[0.5, 0.5004], [0.3334, 0.6663]], np.float32)
    path = write_raw(tmp_path / "d.h5", X=np.zeros((2, 2)), y=y)
    assert_bitwise_equal(load_dataset(path, n_classes=2)[1], y)


# --------------------------------------------------------------------------- attributes


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        ({}, "no string attribute advgrad_format; not an advgrad model file"),
        ({"advgrad_format": 3, "format_version": 1}, "no string attribute advgrad_format"),
        ({"advgrad_format": "keras", "format_version": 1}, "is 'keras', expected"),
        ({"advgrad_format": "two-layer-sigmoid"}, "no numeric attribute format_version"),
        (MODEL_ATTRS | {"format_version": 2}, "format_version is 2; this advgrad reads version 1"),
        (MODEL_ATTRS | {"x_min": "low"}, "attribute x_min must be a number"),
        (MODEL_ATTRS | {"x_max": np.inf}, "attribute x_max must be finite"),
        (MODEL_ATTRS | {"x_min": 1.0, "x_max": 0.0}, "x_min \\(1.0\\) must be below x_max"),
        (MODEL_ATTRS | {"input_shape": [2.0, 3.0]}, "input_shape must be a list of positive"),
        (MODEL_ATTRS | {"input_shape": [2, 2]}, "input_shape \\(2, 2\\) does not have d = 6"),
        (MODEL_ATTRS | {"class_names": 7}, "class_names must be an array of strings"),
        (MODEL_ATTRS | {"class_names": ["a"]}, "1 class names for 3 classes"),
    ],
)
def test_model_attributes_are_checked(tmp_path, attrs, match):
    path = write_raw(tmp_path / "m.h5", attrs, **model_arrays())
    with refused(path, None, match):
        load_model(path)


def test_format_attrs_are_checked_before_datasets(tmp_path):
    path = write_raw(tmp_path / "m.h5", {"advgrad_format": "other"}, W1=np.zeros(3, "i4"))
    with refused(path, None, "advgrad_format is 'other'"):
        load_model(path)


def test_dataset_input_shape_must_match_rows(tmp_path):
    path = write_raw(tmp_path / "d.h5", {"input_shape": [3, 3]}, X=np.zeros((2, 8)))
    with refused(path, None, "input_shape \\(3, 3\\) does not match /X rows \\(8,\\)"):
        load_dataset(path)


def test_read_attrs_keeps_only_plain_values(tmp_path):
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f.attrs["text"] = "héllo"
        f.attrs["fixed"] = np.bytes_("héllo".encode())
        f.attrs["names"] = np.array([b"a", b"bc"])
        f.attrs["big_endian"] = np.array([1.5, 2.5], ">f8")
        f.attrs["flag"] = True
        f.attrs["number"] = np.int16(4)
        f.attrs.create("pair", np.zeros(1, "f4,i4"))
        f.attrs["empty"] = h5py.Empty("f8")
        f.attrs["matrix_of_names"] = np.array([[b"a"], [b"b"]])
        f.attrs["complex"] = 1j
        f.attrs.create("ref", f.ref, dtype=h5py.ref_dtype)
        f.attrs["not_utf8"] = np.bytes_(b"\xff\xfe")
        f.attrs.create("enum", 1, dtype=h5py.enum_dtype({"a": 0, "b": 1}, basetype="i1"))
    with h5py.File(path, "r") as f:
        values = safe.read_attrs(f, path=path)
    assert set(values) == {"text", "fixed", "names", "big_endian", "flag", "number"}
    assert values["text"] == values["fixed"] == "héllo"
    assert values["names"] == ("a", "bc")
    assert_bitwise_equal(values["big_endian"], np.array([1.5, 2.5]))
    assert values["flag"] is True
    assert values["number"] == 4
    assert type(values["number"]) is int


def test_too_many_attributes(tmp_path):
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        for i in range(safe.MAX_ATTRS + 1):
            f.attrs[f"a{i}"] = i
    with h5py.File(path, "r") as f, refused(path, None, "1025 attributes; at most 1024"):
        safe.read_attrs(f, path=path)


# --------------------------------------------------------------------------- adversarial writer


def partial_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.partial*"))


def writer_for(
    target: Path, labels: bool = True, sha256_model="ab" * 32, **options
) -> AdversarialWriter:
    return AdversarialWriter(
        target,
        n_rows=10,
        row_shape=(2, 3),
        dtype=np.float32,
        y_template=((), np.int64) if labels else None,
        attrs={"attack": "fgsm", "eps": 0.1, "target": None, "sha256_model": sha256_model},
        rows_per_chunk=4,
        **options,
    )


def adv_block(start: int, stop: int):
    rows = np.arange(start, stop)
    X = np.broadcast_to(rows[:, None, None], (stop - start, 2, 3)).astype(np.float32)
    return X, rows % 3, rows % 3, (rows + 1) % 3


@pytest.mark.parametrize("compression", [None, "gzip", "lzf"])
def test_adversarial_writer_commits_only_on_success(tmp_path, compression):
    target = tmp_path / "adv.h5"
    with writer_for(target, compression=compression) as writer:
        for start in range(0, 10, 4):
            writer.write(start, *adv_block(start, min(start + 4, 10)))
            assert not target.exists()
            (partial,) = partial_files(tmp_path)
        assert partial.name == ".adv.h5.partial.h5"
        with h5py.File(partial, "r") as f:
            assert not f.attrs["complete"]
    assert partial_files(tmp_path) == []
    X, y = load_dataset(target, n_classes=3)
    expected = adv_block(0, 10)
    assert_bitwise_equal(X, expected[0])
    assert_bitwise_equal(y, expected[1])
    with h5py.File(target, "r") as f:
        assert f.attrs["complete"]
        assert f["X"].chunks == (4, 2, 3)
        assert f["X"].compression == compression
        assert_bitwise_equal(f["pred_clean"][:], expected[2])
        assert_bitwise_equal(f["pred_adv"][:], expected[3])
    info = dataset_attrs(target)
    assert info.attrs["complete"] is True
    assert (info.attrs["attack"], info.attrs["eps"]) == ("fgsm", 0.1)
    assert "target" not in info.attrs


def test_adversarial_writer_without_labels_or_rows(tmp_path):
    X, _, clean, adv = adv_block(0, 10)
    with writer_for(tmp_path / "adv.h5", labels=False) as writer:
        writer.write(0, X, None, clean, adv)
    assert load_dataset(tmp_path / "adv.h5")[1] is None
    empty = AdversarialWriter(
        tmp_path / "empty.h5",
        n_rows=0,
        row_shape=(5,),
        dtype=np.float64,
        y_template=((4,), np.float64),
        attrs={},
        rows_per_chunk=8,
    )
    with empty:
        pass
    X, y = load_dataset(tmp_path / "empty.h5")
    assert (X.shape, y.shape) == ((0, 5), (0, 4))


def test_exception_mid_write_leaves_nothing(tmp_path):
    target = tmp_path / "adv.h5"
    with pytest.raises(KeyboardInterrupt), writer_for(target) as writer:
        writer.write(0, *adv_block(0, 4))
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_incomplete_output_is_not_committed(tmp_path):
    target = tmp_path / "adv.h5"
    with pytest.raises(RuntimeError, match="only 4 of 10 rows"), writer_for(target) as writer:
        writer.write(0, *adv_block(0, 4))
    assert list(tmp_path.iterdir()) == []


def test_writes_must_be_in_order_and_well_shaped(tmp_path):
    with writer_for(tmp_path / "adv.h5") as writer:
        with pytest.raises(ValueError, match="in order"):
            writer.write(4, *adv_block(4, 8))
        X, y, clean, adv = adv_block(0, 4)
        with pytest.raises(ValueError, match="float32"):
            writer.write(0, X.astype(np.float64), y, clean, adv)
        with pytest.raises(ValueError, match="y must be given"):
            writer.write(0, X, None, clean, adv)
        with pytest.raises(ValueError, match="y must have shape \\(4,\\)"):
            writer.write(0, X, y[:3], clean, adv)
        with pytest.raises(ValueError, match="pred_adv must be"):
            writer.write(0, X, y, clean, adv[:2])
        writer.write(0, *adv_block(0, 8))
        with pytest.raises(ValueError, match="past n_rows"):
            writer.write(8, *adv_block(8, 12))
        writer.write(8, *adv_block(8, 10))
        writer.close()
        writer.close()
    assert load_dataset(tmp_path / "adv.h5")[0].shape == (10, 2, 3)


def test_failed_rename_leaves_nothing(tmp_path, monkeypatch):
    def refuse_rename(self, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "replace", refuse_rename)
    target = tmp_path / "adv.h5"
    with refused(target, None, "cannot write: .*Permission denied"), writer_for(target) as writer:
        writer.write(0, *adv_block(0, 10))
    assert list(tmp_path.iterdir()) == []


def test_existing_target_needs_overwrite(tmp_path):
    target = tmp_path / "adv.h5"
    target.write_bytes(b"old")
    with refused(target, None, "exists; pass --overwrite"):
        writer_for(target)
    assert target.read_bytes() == b"old"
    with writer_for(target, overwrite=True) as writer:
        writer.write(0, *adv_block(0, 10))
    assert load_dataset(target)[0].shape == (10, 2, 3)


def test_target_appearing_during_the_write_is_kept(tmp_path):
    target = tmp_path / "adv.h5"
    with refused(target, None, "exists; pass --overwrite"), writer_for(target) as writer:
        writer.write(0, *adv_block(0, 10))
        target.write_bytes(b"someone else's")
    assert target.read_bytes() == b"someone else's"
    assert partial_files(tmp_path) == []


def test_writer_never_writes_onto_an_input(tmp_path):
    source = tmp_path / "data.h5"
    save_dataset(source, np.zeros((10, 2, 3), np.float32))
    before = source.read_bytes()
    (tmp_path / "alias.h5").symlink_to(source)
    (tmp_path / "hard.h5").hardlink_to(source)
    for target in (source, tmp_path / "alias.h5", tmp_path / "hard.h5", tmp_path / "." / "data.h5"):
        with refused(target, None, "is the input file .*data.h5; choose another output path"):
            writer_for(target, overwrite=True, inputs=[tmp_path / "model.h5", source])
    assert source.read_bytes() == before
    assert partial_files(tmp_path) == []


def test_writer_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="compression"):
        writer_for(tmp_path / "a.h5", compression="bz2")
    with pytest.raises(ValueError, match="rows_per_chunk"):
        AdversarialWriter(
            tmp_path / "a.h5",
            n_rows=1,
            row_shape=(1,),
            dtype="f4",
            y_template=None,
            attrs={},
            rows_per_chunk=0,
        )
    with pytest.raises(ValueError, match="y_template integer labels must have shape"):
        AdversarialWriter(
            tmp_path / "a.h5",
            n_rows=1,
            row_shape=(1,),
            dtype="f4",
            y_template=((2,), np.int64),
            attrs={},
            rows_per_chunk=1,
        )
    with pytest.raises(TypeError, match="cannot store set"):
        AdversarialWriter(
            tmp_path / "a.h5",
            n_rows=1,
            row_shape=(1,),
            dtype="f4",
            y_template=None,
            attrs={"norms": {1, 2}},
            rows_per_chunk=1,
        )
    with refused(tmp_path, None, "exists; pass --overwrite"):
        writer_for(tmp_path)
    with refused(tmp_path, None, "is a directory"):
        writer_for(tmp_path, overwrite=True)
    with refused(tmp_path / "no" / "a.h5", None, "cannot create"):
        writer_for(tmp_path / "no" / "a.h5")
    assert list(tmp_path.iterdir()) == []


def file_contents(path: Path) -> dict:
    """Every dataset's bytes, dtype and shape, and every root attribute."""
    with h5py.File(path, "r") as f:
        datasets = {name: (f[name].dtype, f[name].shape, f[name][()].tobytes()) for name in f}
        return {"datasets": datasets, "attrs": dict(f.attrs)}


def write_blocks(writer: AdversarialWriter, starts, size: int = 4, checkpoint: bool = True):
    for start in starts:
        writer.write(start, *adv_block(start, min(start + size, 10)))
        if checkpoint:
            writer.checkpoint({"rows": writer.rows_written})


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_suspended_writer_resumes_to_the_same_file(tmp_path, compression):
    reference = tmp_path / "reference.h5"
    with writer_for(reference, compression=compression) as writer:
        write_blocks(writer, range(0, 10, 4))
    target = tmp_path / "adv.h5"
    with pytest.raises(KeyboardInterrupt), writer_for(target, compression=compression) as writer:
        write_blocks(writer, [0, 4])
        writer.write(8, *adv_block(8, 10))  # written, never checkpointed: redone on resume
        raise KeyboardInterrupt
    assert not target.exists()
    assert [p.name for p in partial_files(tmp_path)] == [
        ".adv.h5.partial.h5",
        ".adv.h5.partial.json",
    ]
    with writer_for(target, compression=compression) as writer:
        assert (writer.resumed_rows, writer.rows_written) == (8, 8)
        assert writer.resumed_state == {"rows": 8}
        assert writer.notice is None
        write_blocks(writer, [8])
    assert partial_files(tmp_path) == []
    assert list(tmp_path.glob(".*.lock")) == []
    assert file_contents(target) == file_contents(reference)


@pytest.mark.parametrize("block_rows", [1, 3, 10, 64])
def test_column_blocks_read_the_columns_together(tmp_path, block_rows):
    target = tmp_path / "adv.h5"
    with writer_for(target) as writer:
        write_blocks(writer, range(0, 10, 4))
    blocks = list(column_blocks(target, ["pred_adv", "y"], block_rows))
    assert [len(a) for a, _ in blocks] == [len(b) for _, b in blocks]
    assert max(len(a) for a, _ in blocks) == min(block_rows, 10)
    _, y, _, adv = adv_block(0, 10)
    assert_bitwise_equal(np.concatenate([a for a, _ in blocks]), adv)
    assert_bitwise_equal(np.concatenate([b for _, b in blocks]), y)


def test_column_blocks_refuse_columns_of_other_lengths(tmp_path):
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f["a"] = np.zeros(4)
        f["b"] = np.zeros(5)
    with refused(path, "/b", "has 5 rows; /a has 4"):
        list(column_blocks(path, ["a", "b"]))
    with refused(path, "/c", "no dataset /c"):
        list(column_blocks(path, ["a", "c"]))


def test_an_unchanged_file_takes_its_digest_from_the_cache(tmp_path):
    """A digest remembered for the file as it is now is taken without reading the file (here
    a planted value shows it); any change to the file (a write, a touch) is hashed again."""
    path = tmp_path / "blob"
    path.write_bytes(b"rows")
    cache = DigestCache(tmp_path / "cache")
    later = time.time_ns() + int(2 * RECENT_CHANGE_S * 1e9)
    cache.remember(path.stat(), "ab" * 32, hashing_started_ns=later)
    assert FileDigest(path, cache).result() == "ab" * 32
    os.utime(path)  # the change time moves on, whatever the times set
    assert FileDigest(path, cache).result() == hashlib.sha256(b"rows").hexdigest()
    path.write_bytes(b"ROWS")
    assert FileDigest(path, cache).result() == hashlib.sha256(b"ROWS").hexdigest()


def test_a_file_changed_just_before_hashing_is_not_remembered(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"rows")
    cache = DigestCache(tmp_path / "cache")
    assert FileDigest(path, cache).result() == hashlib.sha256(b"rows").hexdigest()
    assert cache.lookup(path.stat()) is None  # changed within RECENT_CHANGE_S: not kept
    cache.remember(path.stat(), "cd" * 32, hashing_started_ns=time.time_ns() + 10**10)
    assert cache.lookup(path.stat()) == "cd" * 32


@pytest.mark.parametrize("content", ["{", "[1, 2]", '{"a b": 3}', ""])
def test_a_malformed_digest_cache_is_an_empty_one(tmp_path, content):
    path = tmp_path / "blob"
    path.write_bytes(b"rows")
    cache = DigestCache(tmp_path)
    cache.path.write_text(content)
    assert cache.lookup(path.stat()) is None
    assert FileDigest(path, cache).result() == hashlib.sha256(b"rows").hexdigest()


class Later:
    """A deferred attribute value (as ``FileDigest``): ``result`` waits until ``ready``."""

    def __init__(self, value):
        self.value, self.ready, self.cancelled = value, threading.Event(), False

    def result(self):
        assert self.ready.wait(10), "result() was called before the value was ready"
        if isinstance(self.value, Exception):
            raise self.value
        return self.value

    def cancel(self):
        self.cancelled = True


def test_deferred_attributes_are_stored_at_the_first_checkpoint(tmp_path):
    """A deferred value (an input's digest) is waited for at the first checkpoint, not
    before: rows are written meanwhile. The file equals one written with the plain value."""
    reference = tmp_path / "reference.h5"
    with writer_for(reference) as writer:
        write_blocks(writer, range(0, 10, 4))
    target = tmp_path / "adv.h5"
    later = Later("ab" * 32)
    writer = writer_for(target, sha256_model=later)
    writer.write(0, *adv_block(0, 4))  # the value is not ready: writing goes on
    partial_attrs = writer._partial.file.attrs  # the open partial file, as written so far
    assert "sha256_model" not in partial_attrs
    later.ready.set()
    writer.checkpoint({"rows": 4})
    assert partial_attrs["sha256_model"] == "ab" * 32
    write_blocks(writer, [4, 8])
    writer.close()
    assert file_contents(target) == file_contents(reference)


@pytest.mark.parametrize("first_deferred", [True, False])
def test_a_job_with_deferred_attributes_resumes_as_the_same_job(tmp_path, first_deferred):
    """Interrupted with a deferred digest and resumed with the plain value, or the other
    way round: the same job, resumed; a resuming writer waits for the value at once."""
    target = tmp_path / "adv.h5"
    ready = Later("ab" * 32)
    ready.ready.set()
    first = writer_for(target, sha256_model=ready) if first_deferred else writer_for(target)
    with pytest.raises(KeyboardInterrupt), first as writer:
        write_blocks(writer, [0, 4])
        raise KeyboardInterrupt
    second = writer_for(target) if first_deferred else writer_for(target, sha256_model=ready)
    with second as writer:
        assert writer.resumed_rows == 8
        write_blocks(writer, [8])
    reference = tmp_path / "reference.h5"
    with writer_for(reference) as writer:
        write_blocks(writer, range(0, 10, 4))
    assert file_contents(target) == file_contents(reference)


def test_a_failed_deferred_attribute_keeps_no_partial_output(tmp_path):
    target = tmp_path / "adv.h5"
    failing = Later(InputFileError(tmp_path / "data.h5", None, "cannot read: gone"))
    failing.ready.set()
    with (
        refused(tmp_path / "data.h5", None, "cannot read: gone"),
        writer_for(target, sha256_model=failing) as writer,
    ):
        write_blocks(writer, [0])
    assert partial_files(tmp_path) == []
    assert not target.exists()


def test_a_writer_stopped_early_cancels_its_deferred_attributes(tmp_path):
    later = Later("ab" * 32)
    with pytest.raises(KeyboardInterrupt), writer_for(tmp_path / "adv.h5", sha256_model=later):
        raise KeyboardInterrupt
    assert later.cancelled
    assert partial_files(tmp_path) == []


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
@pytest.mark.parametrize("block", [4, 8, 3])
@pytest.mark.parametrize("compression", [None, "gzip", "lzf"])
def test_whole_chunks_written_raw_decode_as_hdf5_filters_do(
    tmp_path, monkeypatch, compression, block, deflate
):
    """Blocks of whole chunks (4, 8 rows) are encoded by advgrad (gzip: shuffled and deflated
    on threads, by ISA-L or zlib) and written raw; others (3 rows) and lzf go through HDF5's
    filters. All read back exactly, and a raw chunk is what HDF5's filters would store."""
    if deflate == "zlib":
        monkeypatch.setattr(fastzlib, "isal_zlib", None)
    elif fastzlib.isal_zlib is None:
        pytest.skip("isal is not installed")
    target = tmp_path / "adv.h5"
    with writer_for(target, compression=compression) as writer:
        for start in range(0, 10, block):
            writer.write(start, *adv_block(start, min(start + block, 10)))
    expected = adv_block(0, 10)[0]
    X, _ = load_dataset(target, n_classes=3)
    assert_bitwise_equal(X, expected)
    with h5py.File(target, "r") as f:
        dset = f["X"]
        assert (dset.chunks, dset.compression) == ((4, 2, 3), compression)
        assert dset.compression_opts == (fastzlib.ZLIB_LEVEL if compression == "gzip" else None)
        _, raw = dset.id.read_direct_chunk((8, 0, 0))
    last = np.zeros((4, 2, 3), np.float32)  # the edge chunk, padded with the fill value
    last[:2] = expected[8:]
    if compression == "lzf":
        return
    if compression == "gzip":
        raw = np.frombuffer(zlib.decompress(raw), np.uint8).reshape(4, -1).T.tobytes()  # unshuffle
    assert_bitwise_equal(np.frombuffer(raw, np.float32).reshape(4, 2, 3), last)


def test_fastzlib_computes_what_zlib_does_with_and_without_isal(monkeypatch):
    data = np.linspace(0, 1, 4096, dtype=np.float32).tobytes() * 4
    assert zlib.decompress(fastzlib.compress(data)) == data
    assert fastzlib.crc32(data[100:], fastzlib.crc32(data[:100])) == zlib.crc32(data)
    monkeypatch.setattr(fastzlib, "isal_zlib", None)
    assert fastzlib.compress(data) == zlib.compress(data, fastzlib.ZLIB_LEVEL)
    assert fastzlib.crc32(data, 7) == zlib.crc32(data, 7)


def test_partial_of_another_job_is_refused_until_restart(tmp_path):
    target = tmp_path / "adv.h5"
    with pytest.raises(KeyboardInterrupt), writer_for(target) as writer:
        write_blocks(writer, [0])
        raise KeyboardInterrupt
    with refused(target, None, "holds an interrupted run with other settings .*--restart"):
        writer_for(target, compression="gzip")
    with refused(tmp_path / "fresh.h5", None, "has no interrupted run to resume"):
        writer_for(tmp_path / "fresh.h5", resume=True)
    with writer_for(target, compression="gzip", resume=False) as writer:
        assert writer.resumed_rows == 0
        write_blocks(writer, range(0, 10, 4))
    assert load_dataset(target)[0].shape == (10, 2, 3)


def test_damaged_partial_starts_afresh(tmp_path):
    reference = tmp_path / "reference.h5"
    with writer_for(reference) as writer:
        write_blocks(writer, range(0, 10, 4))
    target = tmp_path / "adv.h5"
    with pytest.raises(KeyboardInterrupt), writer_for(target) as writer:
        write_blocks(writer, [0, 4])
        raise KeyboardInterrupt
    checkpoint = tmp_path / ".adv.h5.partial.json"
    checkpoint.write_text(checkpoint.read_text().replace("[4, 8, ", "[4, 8, 1"))
    with writer_for(target) as writer:
        assert writer.resumed_rows == 0
        assert "cannot be resumed (rows 4:8 do not match their checksum)" in writer.notice
        write_blocks(writer, range(0, 10, 4))
    assert file_contents(target) == file_contents(reference)


def test_locked_output_is_refused(tmp_path):
    from advgrad.io.checkpoint import OutputLock

    target = tmp_path / "adv.h5"
    lock = OutputLock(target)
    with refused(target, None, "another advgrad run is writing it"):
        writer_for(target)
    assert [p.name for p in tmp_path.iterdir()] == [".adv.h5.lock"]
    lock.release()
    with writer_for(target) as writer:
        write_blocks(writer, range(0, 10, 4), checkpoint=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adv.h5"]


# --------------------------------------------------------------------------- sha256


@pytest.mark.parametrize("size", [0, 1, 2**20, 2**20 + 3])
def test_sha256_matches_hashlib(tmp_path, size):
    data = np.random.default_rng(size).bytes(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_sha256_of_a_missing_file(tmp_path):
    with refused(tmp_path / "nope", None, "no such file"):
        sha256_file(tmp_path / "nope")
    with refused(tmp_path, None, "cannot read"):
        sha256_file(tmp_path)


@pytest.mark.parametrize("size", [0, 2**20 + 3])
def test_file_digest_is_sha256_file_on_a_thread(tmp_path, size):
    path = tmp_path / "blob"
    path.write_bytes(np.random.default_rng(size).bytes(size))
    digest = FileDigest(path)
    assert digest.result() == sha256_file(path)
    digest.cancel()  # once done, a no-op
    assert digest.result() == sha256_file(path)


def test_file_digest_hands_over_errors_and_stops_when_cancelled(tmp_path):
    with refused(tmp_path / "nope", None, "no such file"):
        FileDigest(tmp_path / "nope").result()
    huge = tmp_path / "sparse"
    with huge.open("wb") as handle:
        handle.truncate(2**40)  # a TiB of holes: hashing it would take many minutes
    digest = FileDigest(huge)
    digest.cancel()
    with refused(huge, None, "hashing was cancelled"):
        digest.result()
