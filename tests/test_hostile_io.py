"""Hostile inputs to the io layer (issue 15): one test per class of defect.

Each test builds the hostile case and asserts the refusal names the file and the reason, every
input stays byte-for-byte the same, nothing is left beside the output, and, where the class is
about time or memory, a bound (in a subprocess, under ``ulimit``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from children import refusal_line, run_advgrad, run_python, snapshot

from advgrad.errors import InputFileError
from advgrad.io import (
    AdversarialWriter,
    atomic_output,
    convert_dataset,
    convert_model,
    describe_file,
    load_model,
    open_dataset,
    read_model_file,
    refuse_clobbering,
    safe,
    same_file,
    save_dataset,
    save_model,
    write_safetensors,
)
from advgrad.io.safe import error_reason
from advgrad.model import Model


def make_model(d=6, H=4, C=3) -> Model:
    rng = np.random.default_rng(0)
    return Model(
        rng.standard_normal((d, H)).astype(np.float32),
        rng.standard_normal(H).astype(np.float32),
        rng.standard_normal((H, C)).astype(np.float32),
        rng.standard_normal(C).astype(np.float32),
    )


def make_data(path: Path, n=20, d=6) -> Path:
    rng = np.random.default_rng(1)
    save_dataset(path, rng.random((n, d), dtype=np.float32), rng.integers(0, 3, n))
    return path


def refused(path, reason: str, dataset: str | None = None):
    where = str(path) if dataset is None else f"{path}:{dataset}"
    return pytest.raises(InputFileError, match="^" + re.escape(where) + ": .*" + reason)


def writer_for(target, inputs, **options) -> AdversarialWriter:
    return AdversarialWriter(
        target,
        n_rows=20,
        row_shape=(6,),
        dtype="f4",
        y_template=None,
        attrs={"attack": "fgsm"},
        rows_per_chunk=8,
        inputs=inputs,
        **options,
    )


# --------------------------------------------------------------------------- class 1


SIDE_NAMES = [".o.h5.partial.h5", ".o.h5.lock", ".o.h5.partial.json", ".o.h5.partial.json.tmp"]


@pytest.mark.parametrize("input_name", SIDE_NAMES)
def test_writer_never_touches_an_input_named_like_its_side_files(tmp_path, input_name):
    data = make_data(tmp_path / input_name)
    before = snapshot(tmp_path)
    with refused(tmp_path / "o.h5", f"writing it also writes {re.escape(input_name)}"):
        writer_for(tmp_path / "o.h5", inputs=[None, data])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("alias", ["hard link", "symlink", "dot path"])
def test_outputs_refuse_an_input_by_identity(tmp_path, alias, monkeypatch):
    make_data(tmp_path / "data.h5")
    monkeypatch.chdir(tmp_path)
    out = Path({"hard link": "linked.h5", "symlink": "linked.h5", "dot path": "./data.h5"}[alias])
    if alias == "hard link":
        os.link("data.h5", out)
    elif alias == "symlink":
        out.symlink_to("data.h5")
    assert same_file(out, "data.h5")
    before = snapshot(tmp_path)
    reason = "is the input file data.h5; choose another output path"
    with refused(out, reason):
        writer_for(out, inputs=["data.h5"], overwrite=True)
    with refused(out, reason):
        save_dataset(out, np.zeros((2, 2), np.float32), inputs=["data.h5"])
    with refused(out, reason):
        save_model(make_model(), out, inputs=["data.h5"])
    with refused(out, reason), atomic_output(out, overwrite=True, inputs=["data.h5"]):
        pytest.fail("atomic_output let an input be its target")
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((3, 2)))
    before = snapshot(tmp_path)
    with refused(out, reason):
        convert_dataset(npy, out, labels="data.h5", overwrite=True)
    assert snapshot(tmp_path) == before


def test_convert_model_refuses_its_source_by_identity(tmp_path):
    source = tmp_path / "m.npz"
    model = make_model()
    np.savez(source, W1=model.W1, b1=model.b1, W2=model.W2, b2=model.b2)
    os.link(source, tmp_path / "alias.safetensors")
    before = snapshot(tmp_path)
    with refused(tmp_path / "alias.safetensors", "is the input file"):
        convert_model(source, tmp_path / "alias.safetensors", overwrite=True)
    assert snapshot(tmp_path) == before


def test_refuse_clobbering_names_both_files_and_skips_none(tmp_path):
    (tmp_path / "a").write_text("a")
    refuse_clobbering(tmp_path / "o", [tmp_path / "o", tmp_path / "b"], [None, tmp_path / "a"])
    with refused(tmp_path / "o", "writing it also writes a, which is the input file"):
        refuse_clobbering(tmp_path / "o", [tmp_path / "o", tmp_path / "a"], [tmp_path / "a"])


def test_atomic_output_leaves_nothing_behind(tmp_path):
    target = tmp_path / "plot.png"
    with atomic_output(target, overwrite=False) as temp:
        assert temp.parent == tmp_path and temp.suffix == ".png" and temp.name.startswith(".")
        temp.write_bytes(b"first")
    assert snapshot(tmp_path) == {"plot.png": hashlib.sha256(b"first").hexdigest()}
    with refused(target, "exists; pass --overwrite"), atomic_output(target, overwrite=False):
        pytest.fail("atomic_output let an existing target be replaced")
    with pytest.raises(KeyError), atomic_output(target, overwrite=True) as temp:
        temp.write_bytes(b"second")
        raise KeyError("interrupted")
    with refused(tmp_path, "is a directory"), atomic_output(tmp_path, overwrite=True):
        pytest.fail("atomic_output accepted a directory")
    assert snapshot(tmp_path) == {"plot.png": hashlib.sha256(b"first").hexdigest()}


def test_cli_attack_does_not_delete_its_input(tmp_path):
    save_model(make_model(), tmp_path / "m.h5")
    make_data(tmp_path / ".o.h5.partial.h5")
    before = snapshot(tmp_path)
    result = run_advgrad(
        "attack", "--model", "m.h5", "--data", ".o.h5.partial.h5", "--out", "o.h5", cwd=tmp_path
    )
    refusal_line(result, "o.h5", ".o.h5.partial.h5", "input file")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- class 2


def test_integers_beyond_int64_are_stored_as_decimal_strings(tmp_path):
    save_model(make_model(), tmp_path / "m.h5")
    model = load_model(tmp_path / "m.h5")
    big = {"seed": 2**64, "steps": -(2**63) - 1, "seeds": [1, 2**70]}
    save_model(Model(model.W1, model.b1, model.W2, model.b2, metadata=big), tmp_path / "m.h5")
    assert load_model(tmp_path / "m.h5").metadata == {
        "seed": str(2**64),
        "steps": str(-(2**63) - 1),
        "seeds": ("1", str(2**70)),
    }
    with writer_for(tmp_path / "o.h5", inputs=(), resume=False) as writer:
        writer.write(0, np.zeros((20, 6), np.float32), None, np.zeros(20, int), np.zeros(20, int))
    with h5py.File(tmp_path / "o.h5") as f:
        assert f.attrs["attack"] == "fgsm"


def test_safetensors_metadata_with_huge_or_deep_values_converts(tmp_path):
    model = make_model()
    source = tmp_path / "m.safetensors"
    tensors = {name: getattr(model, name) for name in ("W1", "b1", "W2", "b2")}
    header, offset, buffers = {}, 0, []
    for name, array in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(array.shape)}
        header[name]["data_offsets"] = [offset, offset + array.nbytes]
        offset += array.nbytes
        buffers.append(array.astype("<f4").tobytes())
    header["__metadata__"] = {"seed": str(2**64), "deep": "[" * 100000 + "]" * 100000}
    encoded = json.dumps(header).encode()
    source.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(buffers))
    before = snapshot(tmp_path)
    convert_model(source, tmp_path / "m.h5")
    metadata = load_model(tmp_path / "m.h5").metadata
    assert metadata["seed"] == str(2**64) and metadata["deep"].startswith("[[[")
    assert {name: digest for name, digest in snapshot(tmp_path).items() if name != "m.h5"} == before


@pytest.mark.parametrize("shape", [(5, 0), (5, 3, 0)])
def test_npy_whose_rows_hold_no_values_is_refused(tmp_path, shape):
    np.save(tmp_path / "x.npy", np.zeros(shape, np.float32))
    before = snapshot(tmp_path)
    with refused(tmp_path / "x.npy", re.escape(f"has shape {shape}: its rows hold no values")):
        convert_dataset(tmp_path / "x.npy", tmp_path / "o.h5")
    assert snapshot(tmp_path) == before


FULL_DISK = """
    import os, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    import numpy as np
    from advgrad.errors import InputFileError
    from advgrad.io import AdversarialWriter, convert_dataset
    rng = np.random.default_rng(0)
    try:
        if "{case}" == "writer":
            writer = AdversarialWriter(
                "o.h5", n_rows=4000, row_shape=(256,), dtype="f4", y_template=None,
                attrs={{"seed": 2**70}}, rows_per_chunk=100,
            )
            with writer:
                for start in range(0, 4000, 100):
                    X = rng.random((100, 256), dtype=np.float32)
                    writer.write(start, X, None, np.zeros(100, int), np.zeros(100, int))
                    writer.checkpoint()
        else:
            convert_dataset("x.npy", "o.h5")
    except InputFileError as exc:
        print(exc)
"""


@pytest.mark.parametrize("case", ["writer", "convert"])
def test_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, case):
    np.save(tmp_path / "x.npy", np.random.default_rng(1).random((3000, 256)))
    before = snapshot(tmp_path)
    result = run_python(FULL_DISK.format(case=case), tmp_path, limits="ulimit -f 1500;")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    [line] = result.stdout.splitlines()
    assert line.startswith("o.h5: cannot write: File too large")
    after = snapshot(tmp_path)
    if case == "writer":  # the checkpointed rows are kept, nothing else
        assert set(after) - set(before) == {".o.h5.partial.h5", ".o.h5.partial.json"}
    else:
        assert after == before


# --------------------------------------------------------------------------- class 3


def test_hdf5_and_os_errors_become_one_line():
    hdf5 = OSError("Can't write data (file write failed: time = Sun Dec  6 06:01:35 2026\n, x)")
    assert error_reason(hdf5) == "Can't write data (file write failed: time = Sun Dec 6 " + (
        "06:01:35 2026 , x)"
    )
    assert error_reason(RuntimeError("failed (errno = 28, error message = 'x')")) == (
        os.strerror(28)
    )
    assert error_reason(OSError(27, "File too large\nmore")) == os.strerror(27)


def test_corrupt_input_is_refused_in_one_line(tmp_path):
    data = make_data(tmp_path / "d.h5", n=5000)
    raw = bytearray(data.read_bytes())
    raw[-20000:] = bytes(20000)  # zero the tail, where the chunks are
    data.write_bytes(bytes(raw[: len(raw) - 7]))
    with pytest.raises(InputFileError) as caught, open_dataset(data) as reader:
        reader.read(0, reader.n_rows)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(data))


# --------------------------------------------------------------------------- class 4


def gzip_model(path: Path, d: int, H: int, C: int) -> Path:
    with h5py.File(path, "w") as f:
        for name, shape in (("W1", (d, H)), ("b1", (H,)), ("W2", (H, C)), ("b2", (C,))):
            f.create_dataset(name, shape=shape, dtype="f4", compression="gzip", fillvalue=0)
            f[name][...] = 0
        f.attrs.update({"advgrad_format": "two-layer-sigmoid", "format_version": 1})
    return path


def test_oversized_model_is_refused_before_allocating(tmp_path):
    gzip_model(tmp_path / "big.h5", d=64, H=2**18, C=10)
    model = tmp_path / "big.h5"
    code = """
        from advgrad.errors import InputFileError
        from advgrad.io import describe_file, load_model, read_model_file
        for read in (load_model, read_model_file, describe_file):
            try:
                read("big.h5", max_weights=2**20)
            except InputFileError as exc:
                print(exc)
        print(load_model("big.h5", max_weights=2**25).n_hidden)
    """
    before = snapshot(tmp_path)
    # 2**18 * 64 float32 weights take 64 MiB; refused under a limit that reading would break
    result = run_python(code, tmp_path, limits="ulimit -v 2000000;")
    lines = result.stdout.splitlines()
    expected = (
        "big.h5:/W1: has shape (64, 262144), 16777216 weights, over the limit of 1048576 "
        "(--max-weights raises it)"
    )
    assert lines == [expected] * 3 + ["262144"], result.stderr
    assert snapshot(tmp_path) == before
    assert model.stat().st_size < 2**20


@pytest.mark.parametrize("kind", ["npz", "safetensors"])
def test_oversized_npz_and_safetensors_models_are_refused(tmp_path, kind):
    model = make_model(d=6, H=40, C=3)
    path = tmp_path / f"m.{kind}"
    arrays = {name: getattr(model, name) for name in ("W1", "b1", "W2", "b2")}
    if kind == "npz":
        np.savez(path, **arrays)
    else:
        write_safetensors(path, arrays)
    before = snapshot(tmp_path)
    with refused(path, r"has shape \(6, 40\), 240 weights, over the limit of 100", "W1"):
        read_model_file(path, max_weights=100)
    assert read_model_file(path, max_weights=240).n_hidden == 40
    assert snapshot(tmp_path) == before


def test_csv_line_longer_than_the_limit_is_refused_unread(tmp_path, monkeypatch):
    from advgrad.io import sources

    monkeypatch.setattr(sources, "MAX_CSV_LINE_CHARS", 1000)
    path = tmp_path / "x.csv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("1,2,3\n4,5,6\n" + "7," * 600 + "8\n")
    before = snapshot(tmp_path)
    with refused(path, "line 3 is longer than 1000 characters"):
        convert_dataset(path, tmp_path / "o.h5")
    assert snapshot(tmp_path) == before


def test_endless_csv_line_is_bounded_in_memory_and_time(tmp_path):
    with gzip.open(tmp_path / "x.csv.gz", "wb") as handle:  # 200 MB of one line
        for _ in range(200):
            handle.write(b"1," * 2**19)
    before = snapshot(tmp_path)
    code = """
        from advgrad.errors import InputFileError
        from advgrad.io import convert_dataset
        try:
            convert_dataset("x.csv.gz", "o.h5")
        except InputFileError as exc:
            print(exc)
    """
    result = run_python(code, tmp_path, limits="ulimit -v 1500000;", timeout=60)
    assert result.stdout.splitlines() == [
        "x.csv.gz: line 1 is longer than 16777216 characters (MAX_CSV_LINE_CHARS)"
    ], result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("which", ["source", "labels"])
def test_convert_refuses_fifos_and_devices_without_blocking(tmp_path, which):
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    os.mkfifo(tmp_path / "fifo.npy")
    (tmp_path / "zero.csv").symlink_to("/dev/zero")
    code = f"""
        from advgrad.errors import InputFileError
        from advgrad.io import convert_dataset
        for special in ("fifo.npy", "zero.csv"):
            try:
                if "{which}" == "source":
                    convert_dataset(special, "o.h5")
                else:
                    convert_dataset("x.npy", "o.h5", labels=special)
            except InputFileError as exc:
                print(exc)
    """
    result = run_python(code, tmp_path, timeout=30)
    assert result.stdout.splitlines() == [
        "fifo.npy: is not a regular file",
        "zero.csv: is not a regular file",
    ], result.stderr
    assert not (tmp_path / "o.h5").exists()


# --------------------------------------------------------------------------- class 5


def column_chunked(path: Path, n: int, d: int) -> np.ndarray:
    X = np.random.default_rng(2).random((n, d), dtype=np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=X, chunks=(n, 1), compression="gzip")
    return X


def test_column_chunked_data_is_read_once(tmp_path):
    X = column_chunked(tmp_path / "cols.h5", n=2**16, d=32)
    before = snapshot(tmp_path)
    code = """
        import time
        import numpy as np
        from advgrad.io import open_dataset
        start = time.perf_counter()
        with open_dataset("cols.h5") as reader:
            blocks = [X for _, X, _ in reader.chunks(512)]
        print(time.perf_counter() - start)
        np.save("read.npy", np.concatenate(blocks))
    """
    # without a cache, 128 blocks inflate each 256 KiB chunk again: about 13 s
    result = run_python(code, tmp_path, limits="ulimit -v 3000000;", timeout=60)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 4.0
    assert np.load(tmp_path / "read.npy").tobytes() == X.tobytes()
    (tmp_path / "read.npy").unlink()
    assert snapshot(tmp_path) == before


def test_column_chunked_data_beyond_the_cache_bound_is_refused(tmp_path, monkeypatch):
    column_chunked(tmp_path / "cols.h5", n=4096, d=8)
    monkeypatch.setattr(safe, "MAX_CHUNK_CACHE_BYTES", 2**16)
    before = snapshot(tmp_path)
    with refused(
        tmp_path / "cols.h5", r"has chunks \(4096, 1\) across its columns", "/X"
    ) as caught:
        open_dataset(tmp_path / "cols.h5")
    assert "h5repack -l X:CHUNK=" in str(caught.value)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- class 8


def test_failed_conversion_leaves_nothing(tmp_path):
    X = np.zeros((300, 4))
    X[250, 1] = np.nan
    np.save(tmp_path / "x.npy", X)
    before = snapshot(tmp_path)
    with refused(tmp_path / "x.npy", "NaN"):
        convert_dataset(tmp_path / "x.npy", tmp_path / "o.h5", block_rows=100)
    assert snapshot(tmp_path) == before


def test_failed_create_leaves_nothing(tmp_path):
    (tmp_path / "ro").mkdir()
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    model = make_model()
    long_name = "m" * 240 + ".h5"  # the temporary name beside it is too long
    before = snapshot(tmp_path)
    with refused(tmp_path / long_name, "cannot create"):
        save_model(model, tmp_path / long_name)
    with refused(tmp_path / long_name, "cannot create"):
        convert_dataset(tmp_path / "x.npy", tmp_path / long_name)
    assert snapshot(tmp_path) == before


def test_describe_all_nan_data_without_warnings(tmp_path):
    save_dataset(tmp_path / "nan.h5", np.full((3, 2), np.nan, np.float32))
    items = dict(describe_file(tmp_path / "nan.h5", allow_nonfinite=True).items)
    assert items["rows"] == "3"


# --------------------------------------------------------------------------- class 9


def test_one_dimensional_npy_is_refused_at_conversion(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(7, np.float32))
    before = snapshot(tmp_path)
    with refused(tmp_path / "x.npy", r"holds a 1-D array of 7 values; expected rows \(N, d\)"):
        convert_dataset(tmp_path / "x.npy", tmp_path / "o.h5")
    assert snapshot(tmp_path) == before
    result = run_advgrad("convert-data", "x.npy", "o.h5", cwd=tmp_path)
    refusal_line(result, "x.npy", "1-D array")
    assert snapshot(tmp_path) == before
