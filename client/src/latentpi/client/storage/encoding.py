"""Arrays to HDF5 and back: bfloat16 as an HDF5 floating-point type, chunking for slice-wise reads.

bfloat16 is stored as a 16-bit HDF5 float (sign bit 15, exponent bits 7-14 with bias 127, mantissa
bits 0-6), a named type committed in the episode's group, so h5py, h5dump and every HDF5 reader see
floats (h5py reads them as float32, exactly: bfloat16 -> float32 loses nothing). HDF5 converts such
a type bit by bit in software (~80x slower than a copy), so our writer and reader move the raw 16
bits with the file's own type as the memory type (no conversion) and view them as
ml_dtypes.bfloat16. The attribute `logical_dtype = "bfloat16"` marks these datasets; files of
format 1 held the uint16 bit pattern with the same attribute and still read back the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import h5py
import ml_dtypes
import numpy as np
from h5py._hl import selections

LOGICAL_DTYPE_ATTR = "logical_dtype"
AXES_ATTR = "axes"
LAYOUT_ATTR = "layout"  # the response's latent_layout entry (JSON): shape, dtype, labels
CHUNK_TARGET_BYTES = 1 << 20
BFLOAT16_TYPE_NAME = "dtype_bfloat16"  # the named type, committed once per episode group
BFLOAT16_FIELDS = (15, 7, 8, 0, 7)  # sign position, exponent position and size, mantissa
_VIEWS = {"bfloat16": (np.dtype(ml_dtypes.bfloat16), np.dtype(np.uint16))}


def bfloat16_type() -> h5py.h5t.TypeFloatID:
    """A 16-bit IEEE-style float with bfloat16's layout (little-endian)."""
    float_type = h5py.h5t.IEEE_F32LE.copy()
    float_type.set_fields(*BFLOAT16_FIELDS)
    float_type.set_offset(0)
    float_type.set_precision(16)
    float_type.set_size(2)
    float_type.set_ebias(127)
    return float_type


def bfloat16_datatype(group: h5py.Group) -> h5py.Datatype:
    """The group's committed bfloat16 type (committed on first use)."""
    if BFLOAT16_TYPE_NAME not in group:
        bfloat16_type().commit(group.id, BFLOAT16_TYPE_NAME.encode())
    return group[BFLOAT16_TYPE_NAME]


def is_bfloat16_float(dataset: h5py.Dataset) -> bool:
    """Whether the dataset is stored as the 16-bit bfloat16 float type (format 2)."""
    file_type = dataset.id.get_type()
    return (
        isinstance(file_type, h5py.h5t.TypeFloatID)
        and file_type.get_size() == 2
        and file_type.get_fields() == BFLOAT16_FIELDS
        and file_type.get_ebias() == 127
    )


def encode(array: np.ndarray) -> tuple[np.ndarray, dict[str, str]]:
    """The array's bits as numpy can hold them (bfloat16 as uint16), and the attributes that say
    how to view them back."""
    for name, (logical, stored) in _VIEWS.items():
        if array.dtype == logical:
            return array.view(stored), {LOGICAL_DTYPE_ATTR: name}
    return array, {}


def logical_dtype(stored: np.dtype, attrs: Mapping[str, Any]) -> np.dtype:
    name = attrs.get(LOGICAL_DTYPE_ATTR)
    if isinstance(name, bytes):
        name = name.decode()
    return _VIEWS[name][0] if name in _VIEWS else np.dtype(stored)


def decode(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return array.view(dtype) if array.dtype != dtype else array


def write_rows(dataset: h5py.Dataset, start: int, rows: np.ndarray) -> None:
    """dataset[start : start + len(rows)] = rows, raw bits for a bfloat16 float dataset."""
    if not is_bfloat16_float(dataset):
        dataset[start : start + len(rows)] = rows
        return
    file_space = dataset.id.get_space()
    file_space.select_hyperslab((start,) + (0,) * (rows.ndim - 1), rows.shape)
    memory_space = h5py.h5s.create_simple(rows.shape)
    raw = np.ascontiguousarray(rows)
    dataset.id.write(memory_space, file_space, raw, mtype=dataset.id.get_type())


def read(dataset: h5py.Dataset, key: Any) -> np.ndarray:
    """dataset[key], as raw uint16 bits for a bfloat16 float dataset (no float conversion)."""
    if not is_bfloat16_float(dataset):
        return np.asarray(dataset[key])
    selection = selections.select(dataset.shape, key, dataset)
    out = np.empty(selection.array_shape, np.uint16)
    if selection.nselect == 0:
        return out
    memory_space = h5py.h5s.create_simple(selection.mshape)
    dataset.id.read(memory_space, selection.id, out, mtype=dataset.id.get_type())
    return out


def chunk_shape(sample_shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """One sample per chunk; leading axes (layer, step) split to 1 until a chunk is ~1 MiB, so a
    read of one layer does not decompress the whole sample. The last axis is never split. Small
    samples (a timestep, a state, an action chunk) get many samples per chunk instead (~64 KiB):
    one chunk per sample would cost more in chunk index and per-chunk overhead than in data."""
    sample_bytes = math.prod(sample_shape) * itemsize
    if sample_bytes <= SMALL_SAMPLE_BYTES:
        return (max(1, SMALL_CHUNK_BYTES // max(sample_bytes, 1)), *sample_shape)
    chunk = [1, *sample_shape]
    axis = 1
    while axis < len(chunk) - 1 and math.prod(chunk) * itemsize > CHUNK_TARGET_BYTES:
        chunk[axis] = 1
        axis += 1
    return tuple(max(1, c) for c in chunk)


SMALL_SAMPLE_BYTES = 4 << 10
SMALL_CHUNK_BYTES = 64 << 10
