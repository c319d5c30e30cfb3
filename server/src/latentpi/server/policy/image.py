"""Image preparation: openpi's resize-with-pad (PIL bilinear); the [-1, 1] scaling is model/pixels.py.

Resize-with-pad keeps the aspect ratio: the image is scaled by 1 / max(w / W, h / H) (sides
truncated to integers), then pasted centred on a black W×H canvas (extra pad row/column at the
bottom/right). An image already W×H is returned as it is, as openpi does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

MODEL_IMAGE_SIZE = 224


def resize_with_pad(
    image: np.ndarray, height: int = MODEL_IMAGE_SIZE, width: int = MODEL_IMAGE_SIZE
) -> np.ndarray:
    """A uint8 (h, w, c) image resized and zero-padded to (height, width, c)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            "image: expected uint8 (height, width, 1|3|4), "
            f"received {image.dtype} of shape {image.shape}"
        )
    cur_height, cur_width = image.shape[:2]
    if (cur_height, cur_width) == (height, width):
        return image
    ratio = max(cur_width / width, cur_height / height)
    new_height, new_width = int(cur_height / ratio), int(cur_width / ratio)
    if min(new_height, new_width) < 1:
        raise ValueError(
            f"image: expected an aspect ratio that keeps both sides at {height}x{width}, "
            f"received shape {image.shape}"
        )
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((new_width, new_height), resample=Image.BILINEAR))
    canvas = np.zeros((height, width, image.shape[-1]), dtype=np.uint8)
    top, left = (height - new_height) // 2, (width - new_width) // 2
    canvas[top : top + new_height, left : left + new_width] = resized.reshape(
        new_height, new_width, image.shape[-1]
    )
    return canvas
