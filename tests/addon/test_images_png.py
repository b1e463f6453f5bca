"""The stdlib PNG encoder (Blender-free), checked by decoding with Pillow."""

import io

import numpy as np
import pytest
from PIL import Image

from blender_sd_addon.png import encode_rgba


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.mode) == ("PNG", "RGBA")
        return np.asarray(image)


def test_pixels_decode_exactly_top_row_first():
    pixels = np.random.default_rng(0).integers(0, 256, (3, 5, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decode(encode_rgba(5, 3, pixels.tobytes())), pixels)


def test_bottom_up_rows_are_flipped():
    pixels = np.random.default_rng(1).integers(0, 256, (4, 2, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decode(encode_rgba(2, 4, pixels.tobytes(), bottom_up=True)), pixels[::-1])


@pytest.mark.parametrize(("width", "height", "size"), [(2, 2, 15), (2, 2, 17), (0, 2, 0)])
def test_wrong_sizes_are_refused_by_name(width, height, size):
    with pytest.raises(ValueError, match="pixels must hold width \\* height \\* 4"):
        encode_rgba(width, height, bytes(size))
