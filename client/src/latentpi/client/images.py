"""Camera frames as the policies were trained on them: rotated 180 degrees, resized with padding.

`resize_with_pad` reproduces openpi_client.image_tools.resize_with_pad (itself tf.image.resize_with_pad
in PIL): bilinear, aspect ratio kept, zero-padded and centred. A test checks the two are equal.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from latentpi.protocol.errors import ValidationError


def flip(image: np.ndarray) -> np.ndarray:
    """LIBERO renders upside down and mirrored; openpi trained on the 180-degree rotation."""
    return np.ascontiguousarray(image[::-1, ::-1])


def to_uint8(image: np.ndarray) -> np.ndarray:
    if np.issubdtype(image.dtype, np.floating):
        return (255 * image).astype(np.uint8)
    return image.astype(np.uint8, copy=False)


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """One (H, W, C) uint8 image -> (height, width, C), aspect kept, zero padding centred."""
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValidationError("image", "a uint8 array of shape (height, width, channels)", image)
    if image.shape[:2] == (height, width):
        return image
    cur_height, cur_width = image.shape[:2]
    ratio = max(cur_width / width, cur_height / height)
    new_height, new_width = int(cur_height / ratio), int(cur_width / ratio)
    resized = Image.fromarray(image).resize((new_width, new_height), resample=Image.BILINEAR)
    out = np.zeros((height, width, image.shape[2]), dtype=np.uint8)
    top = max(0, int((height - new_height) / 2))
    left = max(0, int((width - new_width) / 2))
    out[top : top + new_height, left : left + new_width] = np.asarray(resized).reshape(
        new_height, new_width, image.shape[2]
    )
    return out


def policy_image(frame: np.ndarray, size: int) -> np.ndarray:
    """A raw LIBERO camera frame -> what the policy receives: flipped, uint8, size x size."""
    return resize_with_pad(to_uint8(flip(frame)), size, size)
