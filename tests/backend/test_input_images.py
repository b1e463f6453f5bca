"""Input pictures: every mode becomes RGB, resize modes give the requested size, tiling axes are found."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from scipy import ndimage

from backend.images import fit, tiling_axes, to_rgb


def smooth_field(shape, seed: int, wrap: bool) -> np.ndarray:
    """Smooth random values 0..255; with wrap=True the field is periodic (it tiles on both axes)."""
    noise = np.random.default_rng(seed).random(shape)
    field = ndimage.gaussian_filter(noise, 6, mode="wrap" if wrap else "reflect")
    return (field - field.min()) / (field.max() - field.min()) * 255


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(mode):
    grey = smooth_field((16, 24), 0, wrap=False).astype(np.uint8)
    source = PIL.Image.fromarray(grey, "L")
    if mode == "I;16":
        image = PIL.Image.fromarray(grey.astype(np.uint16) * 257)  # a 16-bit greyscale PNG opens like this
    elif mode == "F":
        image = PIL.Image.fromarray(grey.astype(np.float32) / 255, "F")
    else:
        image = source.convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (24, 16)
    if mode in ("L", "LA", "I;16", "I", "F", "RGBA", "P"):  # lossless (P: a greyscale palette)
        assert np.abs(np.asarray(rgb)[..., 0].astype(int) - grey).max() <= 1, mode


@pytest.mark.parametrize(
    ("mode", "size"), [("fit", (64, 32)), ("fill", (64, 32)), ("stretch", (64, 32)), ("keep", (30, 20))]
)
def test_resize_modes(mode, size):
    image = PIL.Image.fromarray(smooth_field((20, 30, 3), 1, wrap=False).astype(np.uint8))
    out = fit(image, 64, 32, mode)
    assert out.size == size
    if mode == "fit":  # scaled to 48x32, centred, the sides padded with the edge columns
        pixels = np.asarray(out)
        assert np.array_equal(pixels[:, 0], pixels[:, 7]) and np.array_equal(pixels[:, -1], pixels[:, -8])
    with pytest.raises(ValueError, match="mode must be one of"):
        fit(image, 64, 32, "zoom")


def test_tiling_axes_are_detected():
    periodic = smooth_field((48, 64), 2, wrap=True)
    assert tiling_axes(PIL.Image.fromarray(periodic.astype(np.uint8))) == "xy"
    rolled = np.roll(periodic, (17, 23), axis=(0, 1))  # still tiles wherever the cut is
    assert tiling_axes(PIL.Image.fromarray(rolled.astype(np.uint8))) == "xy"
    assert tiling_axes(PIL.Image.fromarray(smooth_field((48, 64), 3, wrap=False).astype(np.uint8))) == "none"
    # Periodic along x only: each row wraps, but the top and bottom rows differ.
    x_only = np.tile(periodic[:1], (48, 1)) + np.linspace(0, 120, 48)[:, None]
    assert tiling_axes(PIL.Image.fromarray(np.clip(x_only, 0, 255).astype(np.uint8))) == "x"
    gradient = np.tile(np.linspace(0, 255, 64), (48, 1))  # changes across x, constant down y
    assert tiling_axes(PIL.Image.fromarray(gradient.astype(np.uint8))) == "y"
