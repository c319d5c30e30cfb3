"""Pixels as the vision tower sees them: uint8 [0, 255] → float32 [-1, 1], bit-exact to openpi.

openpi converts eagerly, outside its jit: x / 255 * 2 - 1 with IEEE division. Inside a jit, XLA
rewrites the division as a multiplication by 1/255, which moves 205 of the 256 levels by one ulp. A
table computed once in numpy (IEEE, as eager JAX) keeps every level exact on any backend.
"""

from __future__ import annotations

import numpy as np

PIXEL_TO_MODEL: np.ndarray = np.arange(256, dtype=np.float32) / np.float32(255.0) * np.float32(
    2.0
) - np.float32(1.0)
PIXEL_TO_MODEL.setflags(write=False)


def pixels_to_model(images: np.ndarray) -> np.ndarray:
    """uint8 pixels (any shape) → float32 in [-1, 1] (host side; the model does the same on device)."""
    if images.dtype != np.uint8:
        raise ValueError(f"images: expected uint8 pixels, received {images.dtype}")
    return PIXEL_TO_MODEL[images]
