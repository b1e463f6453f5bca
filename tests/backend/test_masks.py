"""Masks without a model: sources, feathering, paste-back, outpainting canvases and make_seamless's band."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from scipy import ndimage

from backend import masks


def picture(height: int = 40, width: int = 48, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def square_mask(height: int = 40, width: int = 48) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[12:25, 15:30] = True
    return mask


@pytest.mark.parametrize("radius", [0, 1, 3, 7])
def test_feather_is_exactly_zero_beyond_its_radius_and_full_deep_inside(radius):
    mask = square_mask()
    soft = masks.feather(mask, radius)
    assert soft.dtype == np.uint8
    reach = ndimage.binary_dilation(mask, np.ones((2 * radius + 1,) * 2, bool)) if radius else mask
    core = ndimage.binary_erosion(mask, np.ones((2 * radius + 1,) * 2, bool)) if radius else mask
    assert (soft[~reach] == 0).all()  # beyond the radius: untouched, so paste-back keeps the source
    assert (soft[core] == 255).all()  # deep inside: all generated
    if radius:
        edge = reach & ~core
        assert ((soft[edge] > 0) & (soft[edge] < 255)).any()  # a soft edge, not a hard one
    else:
        assert np.array_equal(soft, mask.astype(np.uint8) * 255)


def test_feather_wraps_only_on_tiled_axes():
    mask = np.zeros((32, 32), bool)
    mask[10:20, 0:6] = True  # touches the left edge
    assert masks.feather(mask, 4, wrap_x=True)[10:20, -1].max() > 0  # continues at the right edge
    assert masks.feather(mask, 4)[10:20, -1].max() == 0
    assert masks.feather(mask, 4, wrap_y=True)[10:20, -1].max() == 0
    # On an edge that does not wrap, a mask touching the border keeps its full strength there.
    assert masks.feather(mask, 4)[14, 0] == 255


def test_paste_back_keeps_every_source_byte_where_the_mask_is_zero():
    source, generated = picture(seed=1), picture(seed=2)
    soft = masks.feather(square_mask(), 3)
    out = np.asarray(masks.paste_back(source, generated, soft))
    kept, made = np.asarray(source), np.asarray(generated)
    assert np.array_equal(out[soft == 0], kept[soft == 0])
    assert np.array_equal(out[soft == 255], made[soft == 255])
    blend = (soft > 0) & (soft < 255)
    expected = kept[blend] + (made[blend].astype(float) - kept[blend]) * soft[blend, None] / 255
    assert np.abs(out[blend] - expected).max() <= 0.5 + 1e-9
    with pytest.raises(ValueError, match="sizes differ"):
        masks.paste_back(source, picture(40, 40), soft)


def test_mask_sources():
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[2:5, 3:7, 3] = 0  # erased: repaint
    rgba[6, 0, 3] = 127  # mostly transparent: repaint; 128 and up: keep
    rgba[6, 1, 3] = 128
    expected = np.zeros((8, 10), bool)
    expected[2:5, 3:7] = expected[6, 0] = True
    image = PIL.Image.fromarray(rgba, "RGBA")
    assert masks.has_alpha(image) and not masks.has_alpha(image.convert("RGB"))
    assert np.array_equal(masks.from_alpha(image), expected)
    # A mask image: white repaints, in any mode (16-bit, paletted, RGB painted in Blender).
    grey = np.where(expected, 255, 0).astype(np.uint8)
    for mask in (
        PIL.Image.fromarray(grey),
        PIL.Image.fromarray(grey).convert("P"),
        PIL.Image.fromarray(grey.astype(np.uint16) * 257),
        PIL.Image.fromarray(np.stack([grey] * 3, -1)),
    ):
        assert np.array_equal(masks.from_image(mask), expected), mask.mode
    assert np.array_equal(masks.from_rect(10, 8, 3, 2, 4, 3), expected & (np.arange(8)[:, None] < 5))


def test_extend_keeps_the_image_and_masks_only_the_new_area():
    image = picture(16, 24)
    for fill in masks.FILLS:
        canvas, new = masks.extend(image, 8, 16, 0, 8, fill)
        assert canvas.size == (24 + 8 + 16, 16 + 8) and new.shape == (24, 48)
        pixels = np.asarray(canvas)
        assert np.array_equal(pixels[0:16, 8:32], np.asarray(image)) and not new[0:16, 8:32].any()
        assert new.sum() == 48 * 24 - 24 * 16
    edge, _ = masks.extend(image, 8, 0, 0, 0, "edge")
    assert np.array_equal(np.asarray(edge)[:, 0], np.asarray(image)[:, 0])  # the border stretched out
    noise, _ = masks.extend(image, 8, 0, 0, 0, "noise")
    assert np.array_equal(np.asarray(noise), np.asarray(masks.extend(image, 8, 0, 0, 0, "noise")[0]))  # seeded
    assert not np.array_equal(np.asarray(noise)[:, :8], np.asarray(edge)[:, :8])


@pytest.mark.parametrize(("axes", "size"), [("xy", (48, 40)), ("x", (48, 40)), ("y", (47, 33))])
def test_the_band_covers_the_seams_once_rolled_back(axes, size):
    width, height = size
    band = masks.seam_band(width, height, 8, axes)
    shift = masks.half_shift(width, height, axes)
    back = np.asarray(masks.roll(PIL.Image.fromarray(band.astype(np.uint8)), shift, back=True)).astype(bool)
    # Rolled back, the band sits on the wrap-around edges: 4 pixels each side of each seam, nothing else.
    expected = np.zeros((height, width), bool)
    if "x" in axes:
        expected[:, :4] = expected[:, -4:] = True
    if "y" in axes:
        expected[:4, :] = expected[-4:, :] = True
    assert np.array_equal(back, expected)
    image = picture(height, width)
    assert np.array_equal(np.asarray(masks.roll(masks.roll(image, shift), shift, back=True)), np.asarray(image))
