"""The live step preview (an image datablock shown in Image Editors) and history thumbnails."""

from __future__ import annotations

import base64
from array import array

import bpy
import bpy.utils.previews

from ..protocol import PreviewEvent

PREVIEW_NAME = "SD Textures Preview"
_thumbnails = None  # bpy.utils.previews collection, made on first use


def show_preview(event: PreviewEvent) -> bpy.types.Image:
    """Copy a step preview into the image "SD Textures Preview" and show it in Image Editors that are
    empty or already show it (an artist's own image is left on screen)."""
    width, height = event.width, event.height
    rgb = base64.b64decode(event.rgb)
    if len(rgb) != width * height * 3:
        raise ValueError(f"preview holds {len(rgb)} bytes, expected {width}x{height}x3")

    # 1. Rows arrive top to bottom; Blender stores them bottom to top.
    row = width * 3
    rgb = b"".join(rgb[y * row : (y + 1) * row] for y in reversed(range(height)))

    # 2. RGB bytes -> RGBA floats
    pixels = array("f", [1.0]) * (width * height * 4)
    for channel in range(3):
        pixels[channel::4] = array("f", (value / 255.0 for value in rgb[channel::3]))

    # 3. Into the datablock, reused between steps and jobs
    image = bpy.data.images.get(PREVIEW_NAME)
    if image is None:
        image = bpy.data.images.new(PREVIEW_NAME, width, height)
    elif tuple(image.size) != (width, height):
        image.scale(width, height)
    image.pixels.foreach_set(pixels)
    image.update()
    image.pack()  # held in the .blend, not "modified": quitting never asks to save a preview

    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            space = area.spaces.active
            if area.type == "IMAGE_EDITOR" and space.image in (None, image):
                space.image = image
                area.tag_redraw()
    return image


def thumbnail_icon(path: str) -> int:
    """Icon id of a small preview of an image file (0 when Blender has none to give)."""
    global _thumbnails
    if _thumbnails is None:
        _thumbnails = bpy.utils.previews.new()
    thumbnail = _thumbnails.get(path) or _thumbnails.load(path, path, "IMAGE")
    return thumbnail.icon_id


def unregister() -> None:
    global _thumbnails
    if _thumbnails is not None:
        bpy.utils.previews.remove(_thumbnails)
        _thumbnails = None
