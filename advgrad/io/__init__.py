"""HDF5 input and output: the only code in advgrad that touches h5py (DESIGN.md sections 3-4)."""

from __future__ import annotations

from advgrad.io.convert import (
    DatasetConversion,
    convert_dataset,
    convert_model,
    read_model_file,
    read_safetensors,
    write_model_file,
    write_safetensors,
)
from advgrad.io.datasets import (
    DatasetAttrs,
    DatasetReader,
    column_blocks,
    dataset_attrs,
    load_dataset,
    open_dataset,
    read_column,
    save_dataset,
)
from advgrad.io.describe import FileDescription, describe_file
from advgrad.io.digests import FileDigest, sha256_file
from advgrad.io.models import load_model, save_model
from advgrad.io.paths import atomic_output, refuse_clobbering, same_file
from advgrad.io.writer import AdversarialWriter

__all__ = [
    "AdversarialWriter",
    "DatasetAttrs",
    "DatasetConversion",
    "DatasetReader",
    "FileDescription",
    "FileDigest",
    "atomic_output",
    "column_blocks",
    "convert_dataset",
    "convert_model",
    "dataset_attrs",
    "describe_file",
    "load_dataset",
    "load_model",
    "open_dataset",
    "read_column",
    "read_model_file",
    "read_safetensors",
    "refuse_clobbering",
    "same_file",
    "save_dataset",
    "save_model",
    "sha256_file",
    "write_model_file",
    "write_safetensors",
]
