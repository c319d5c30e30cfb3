"""Resize-with-pad (openpi's PIL bilinear) and the uint8 → [-1, 1] scaling."""

from __future__ import annotations

import numpy as np
import pytest
from openpi_client import image_tools

from latentpi.server.model.pi0 import to_model_images
from latentpi.server.model.pixels import pixels_to_model
from latentpi.server.policy.image import resize_with_pad


def test_non_square_ramp_matches_a_hand_computation():
    # 16×8 image, a horizontal ramp 28·j: scaled ×14 to 224×112, pasted at columns 56..167.
    ramp = (28 * np.arange(8)).astype(np.uint8)
    image = np.tile(ramp[None, :, None], (16, 1, 3))
    out = resize_with_pad(image)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # Bilinear upsampling samples the input at x = (i + 0.5) / 14 - 0.5 (clamped at the edges):
    # 28·x = 2i - 13.
    i = np.arange(112)
    expected = np.clip(2 * i - 13, 0, 196)
    np.testing.assert_array_equal(
        out[:, 56:168, :], np.broadcast_to(expected[None, :, None], (224, 112, 3))
    )
    assert not out[:, :56].any() and not out[:, 168:].any()


def test_odd_padding_puts_the_extra_row_at_the_bottom():
    image = np.full((100, 224, 3), 200, np.uint8)  # ratio 1 → 100 rows, 124 rows of padding
    out = resize_with_pad(image)
    rows = np.flatnonzero(out[:, :, 0].any(axis=1))
    assert (rows[0], rows[-1]) == (62, 161)
    image = np.full((101, 224, 3), 200, np.uint8)  # 123 rows of padding: 61 above, 62 below
    rows = np.flatnonzero(resize_with_pad(image)[:, :, 0].any(axis=1))
    assert (rows[0], rows[-1]) == (61, 161)


def test_already_224_is_returned_unchanged():
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert resize_with_pad(image) is image


@pytest.mark.parametrize("shape", [(256, 256, 3), (128, 200, 3), (480, 640, 3), (9, 300, 3)])
def test_matches_openpi_client_resize_with_pad(shape: tuple[int, int, int]):
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(
        resize_with_pad(image), image_tools.resize_with_pad(image, 224, 224)
    )


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="image: expected uint8"):
        resize_with_pad(np.zeros((224, 224, 3), np.float32))
    with pytest.raises(ValueError, match="image: expected uint8"):
        resize_with_pad(np.zeros((3, 224, 224, 3), np.uint8))
    with pytest.raises(ValueError, match="aspect ratio"):
        resize_with_pad(np.zeros((1, 1000, 3), np.uint8))


def test_pixel_table_maps_0_and_255_to_the_unit_interval_ends():
    out = pixels_to_model(np.array([0, 51, 255], np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1.0, 51 / 255 * 2 - 1, 1.0], rtol=1e-7)


def test_every_pixel_level_is_bit_exact_to_openpis_eager_conversion_inside_the_jit():
    """openpi converts with eager jnp ops (IEEE division); a jitted x / 255 is a multiply by 1/255
    and moves most levels by one ulp. The model's conversion must equal the eager one everywhere."""
    import jax
    import jax.numpy as jnp

    levels = jnp.arange(256, dtype=jnp.uint8)
    eager = np.asarray(levels.astype(jnp.float32) / 255.0 * 2.0 - 1.0)
    jitted = np.asarray(jax.jit(to_model_images)(levels))
    np.testing.assert_array_equal(jitted, eager)
    np.testing.assert_array_equal(pixels_to_model(np.arange(256, dtype=np.uint8)), eager)


def test_pixel_table_refuses_other_dtypes():
    with pytest.raises(ValueError, match="expected uint8"):
        pixels_to_model(np.zeros(3, np.int16))
