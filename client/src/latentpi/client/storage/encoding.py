"""Arrays to HDF5 and back: bfloat16 kept bit-exact, chunking for slice-wise reads.

h5py has no bfloat16: such an array is stored as its uint16 bit pattern with the attribute
`logical_dtype = "bfloat16"` and viewed back as ml_dtypes.bfloat16 on read (lossless).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

LOGICAL_DTYPE_ATTR = "logical_dtype"
AXES_ATTR = "axes"
LAYOUT_ATTR = "layout"  # the response's latent_layout entry (JSON): shape, dtype, labels
CHUNK_TARGET_BYTES = 1 << 20
_VIEWS = {"bfloat16": (np.dtype(ml_dtypes.bfloat16), np.dtype(np.uint16))}


def encode(array: np.ndarray) -> tuple[np.ndarray, dict[str, str]]:
    """An array as HDF5 can hold it, and the attributes that say how to view it back."""
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


def chunk_shape(sample_shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """One sample per chunk; leading axes (layer, step) split to 1 until a chunk is ~1 MiB, so a
    read of one layer does not decompress the whole sample. The last axis is never split."""
    chunk = [1, *sample_shape]
    axis = 1
    while axis < len(chunk) - 1 and math.prod(chunk) * itemsize > CHUNK_TARGET_BYTES:
        chunk[axis] = 1
        axis += 1
    return tuple(max(1, c) for c in chunk)
