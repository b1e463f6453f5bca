"""The live step preview (blender/preview.py) in bpy 5.0 (background: no drawing; the GUI test draws it).

Per step the preview must touch no image datablock: any change to one redraws every 3D viewport, which on
software drawing cost seconds per step.
"""

from __future__ import annotations

import base64
import time
from array import array

import pytest

bpy = pytest.importorskip("bpy")

from blender_sd_addon.blender import preview  # noqa: E402
from blender_sd_addon.contract.protocol import PreviewEvent  # noqa: E402


def event(width: int, height: int, step: int = 1) -> PreviewEvent:
    rgb = bytes((x * 7 + y * 13 + c * 50) % 256 for y in range(height) for x in range(width) for c in range(3))
    return PreviewEvent(step=step, width=width, height=height, rgb=base64.b64encode(rgb).decode())


def test_bytes_become_rgba_floats_with_the_rows_flipped_for_blender():
    width, height = 3, 2
    rgb = bytes(range(width * height * 3))  # rows top to bottom
    rgba = preview.rgba_floats(rgb, width, height)
    assert len(rgba) == width * height * 4 and rgba[3::4] == array("f", [1.0] * width * height)
    top_left, bottom_left = [v / 255 for v in rgb[0:3]], [v / 255 for v in rgb[9:12]]
    assert rgba[0:3].tolist() == pytest.approx(bottom_left)  # Blender's first row is the bottom one
    assert rgba[12:15].tolist() == pytest.approx(top_left)


def test_converting_a_large_preview_takes_milliseconds():
    big = event(128, 128)  # a 1024 px image's latents
    rgb = base64.b64decode(big.rgb)
    start = time.perf_counter()
    for _ in range(10):
        preview.rgba_floats(rgb, 128, 128)
    assert (time.perf_counter() - start) / 10 < 0.05  # a per-pixel Python loop takes ~10x more


def test_a_preview_of_the_wrong_size_is_refused_naming_both_sizes():
    wrong = PreviewEvent(step=1, width=4, height=4, rgb=base64.b64encode(bytes(5)).decode())
    with pytest.raises(ValueError, match="preview holds 5 bytes, expected 4x4x3"):
        preview.show_preview(wrong)


def test_steps_touch_no_image_datablock(scene):
    images = set(bpy.data.images)
    for step in range(1, 4):
        preview.show_preview(event(8, 8, step))
    assert set(bpy.data.images) == images and preview.PREVIEW_NAME not in bpy.data.images
    assert preview._Live.handler is None  # background mode: nothing to draw in, no draw handler
