"""The live step preview, drawn over empty Image Editors, and history thumbnails.

The preview is never an image datablock: any change to one (pixels, update, pack, even a new image) sends
Blender's image notifier, which redraws every 3D viewport, and with software drawing (VMs, remote desktops)
that cost 1-2.5 s per step. Instead each step's bytes wait here, and a draw handler of the Image Editor turns
the newest ones into a GPU texture when the editor actually draws: work follows what the screen shows, not
how fast steps arrive, and nothing happens while no Image Editor is open.
"""

from __future__ import annotations

import base64
from array import array

import blf
import bpy
import bpy.utils.previews
import gpu
from gpu_extras.presets import draw_texture_2d

from ..contract.protocol import PreviewEvent

PREVIEW_NAME = "SD Textures Preview"  # the datablock older versions made; editors showing it count as empty
MARGIN = 20  # pixels around the preview in the editor
_BYTE_TO_FLOAT = [value / 255.0 for value in range(256)]
_thumbnails = None  # bpy.utils.previews collection, made on first use


class _Live:
    """The newest step (bytes) and the texture made from it (on the next draw)."""

    event: PreviewEvent | None = None
    rgb: bytes = b""  # its pixels as sent (converted only when an editor draws them)
    texture = None  # gpu.types.GPUTexture of `rgb`, made in the draw callback
    handler = None  # the SpaceImageEditor draw handler, added on first use


def show_preview(event: PreviewEvent) -> None:
    """Show a step preview over the Image Editors that are empty (or show an old preview image); an artist's
    own image is left on screen. Costs a base64 decode and a redraw of those editors only."""
    width, height = event.width, event.height
    rgb = base64.b64decode(event.rgb)
    if len(rgb) != width * height * 3:
        raise ValueError(f"preview holds {len(rgb)} bytes, expected {width}x{height}x3")
    if bpy.app.background:  # no drawing without a window
        return
    _Live.event, _Live.rgb, _Live.texture = event, rgb, None
    if _Live.handler is None:
        _Live.handler = bpy.types.SpaceImageEditor.draw_handler_add(_draw, (), "WINDOW", "POST_PIXEL")
        bpy.app.handlers.load_pre.append(_on_load_pre)
    for area in preview_areas():
        area.tag_redraw()


def rgba_floats(rgb: bytes, width: int, height: int) -> array:
    """RGB bytes (rows top to bottom) -> RGBA floats in 0..1 (rows bottom to top, as GPU textures and Blender
    images hold them), with slicing and a lookup table: no per-pixel Python loop."""
    row = width * 3
    rgb = b"".join(rgb[y * row : (y + 1) * row] for y in reversed(range(height)))
    values = array("f", map(_BYTE_TO_FLOAT.__getitem__, rgb))
    rgba = array("f", [1.0]) * (width * height * 4)
    for channel in range(3):
        rgba[channel::4] = values[channel::3]
    return rgba


def preview_areas() -> list:
    """The unpinned Image Editors that show no image of the artist's (nothing, or an old preview image)."""
    return [
        area
        for window in bpy.context.window_manager.windows
        for area in window.screen.areas
        if area.type == "IMAGE_EDITOR" and _shows_preview(area.spaces.active)
    ]


def _shows_preview(space) -> bool:
    return not space.use_image_pin and (space.image is None or space.image.name == PREVIEW_NAME)


def hand_over(image: bpy.types.Image) -> None:
    """A job's final image replaces its live preview: shown in the editors that showed the preview."""
    for area in preview_areas():
        area.spaces.active.image = image
    clear()


def clear() -> None:
    """Stop drawing the preview (a job's end, a new file)."""
    _Live.event, _Live.rgb, _Live.texture = None, b"", None


def _draw() -> None:
    """SpaceImageEditor draw callback: the newest step, fitted into the editor."""
    event, space, region = _Live.event, bpy.context.space_data, bpy.context.region
    if event is None or not _shows_preview(space):
        return
    if _Live.texture is None:
        rgba = rgba_floats(_Live.rgb, event.width, event.height)
        data = gpu.types.Buffer("FLOAT", len(rgba), rgba)
        _Live.texture = gpu.types.GPUTexture((event.width, event.height), format="RGBA8", data=data)
    scale = min((region.width - 2 * MARGIN) / event.width, (region.height - 2 * MARGIN) / event.height)
    if scale <= 0:
        return
    width, height = event.width * scale, event.height * scale
    left, bottom = (region.width - width) / 2, (region.height - height) / 2
    draw_texture_2d(_Live.texture, (left, bottom), width, height)
    blf.position(0, left, max(bottom - 16, 2), 0)
    blf.size(0, 12)
    blf.color(0, 1.0, 1.0, 1.0, 1.0)
    blf.draw(0, f"SD Textures: step {event.step}")


@bpy.app.handlers.persistent
def _on_load_pre(*_args) -> None:
    clear()  # a step of a job of the file being closed


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
    clear()
    if _Live.handler is not None:
        bpy.types.SpaceImageEditor.draw_handler_remove(_Live.handler, "WINDOW")
        bpy.app.handlers.load_pre.remove(_on_load_pre)
        _Live.handler = None
