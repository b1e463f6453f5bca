"""Delight before/after: the Image Editor shows a job's lit original or its delit albedo, one click apart.

A job with Delight on writes a delit albedo (ImageRecord.maps["albedo"]) next to the original the record keeps; the
material's base colour is the delit one. This compares them where the artist looks at images.
"""

from __future__ import annotations

import os

import bpy
from bpy.props import IntProperty

from ..client import SDTexError
from ..history import HistoryRecord
from . import materials
from .operator_base import SDTexOperator


def delit_record(scene, index: int = -1) -> HistoryRecord | None:
    """The history entry at `index` when it has a delit albedo on disk; index -1: the newest such entry."""
    entries = scene.sdtex.history
    indices = [index] if index >= 0 else range(len(entries))  # newest first
    for i in indices:
        if 0 <= i < len(entries):
            record = HistoryRecord.from_fields(entries[i])
            if record.delit_albedo() and os.path.isfile(record.delit_albedo()):
                return record
    return None


def lit_and_delit(record: HistoryRecord) -> tuple[bpy.types.Image, bpy.types.Image]:
    """The record's lit original (a pbr job's source image, by name, else its file) and its delit albedo."""
    image = record.images()[0]
    original = bpy.data.images.get(record.source) if record.task == "pbr" else None
    if original is None:
        if not os.path.isfile(image.path):
            raise SDTexError(f"The original image of this entry is gone: {record.source or image.path}")
        original = bpy.data.images.load(image.path, check_existing=True)
    return original, materials.load_image(record.delit_albedo(), "albedo")


def image_editors(context) -> list:
    """The Image Editor the operator runs in, else every open one."""
    space = getattr(context, "space_data", None)
    if space is not None and space.type == "IMAGE_EDITOR":
        return [space]
    return [
        area.spaces.active
        for window in context.window_manager.windows
        for area in window.screen.areas
        if area.type == "IMAGE_EDITOR"
    ]


class SDTEX_OT_delight_toggle(SDTexOperator, bpy.types.Operator):
    """Switch the Image Editor between the lit original and the delit albedo (the light and shade the model painted \
taken out: the material's base colour)"""

    bl_idname = "sdtex.delight_toggle"
    bl_label = "Before / After Delight"

    index: IntProperty(name="History Entry", description="-1: the newest entry with a delit albedo", default=-1)

    def run(self, context, props: dict) -> str:
        record = delit_record(context.scene, props["index"])
        if record is None:
            raise SDTexError("No delit albedo to compare: make maps with Delight on first")
        editors = image_editors(context)
        if not editors:
            raise SDTexError("Open an Image Editor to compare the lit and the delit image")
        original, delit = lit_and_delit(record)
        shown = delit if editors[0].image != delit else original
        for space in editors:
            space.image = shown
        return "Showing the delit albedo (After)" if shown == delit else "Showing the lit original (Before)"


def draw_toggle(layout, context) -> None:
    """The Before / After button, only while an entry has a delit albedo."""
    record = delit_record(context.scene)
    if record is None:
        return
    shown = getattr(getattr(context, "space_data", None), "image", None)
    after = shown is not None and shown.filepath and bpy.path.abspath(shown.filepath) == record.delit_albedo()
    text = "Show Before (Lit)" if after else "Show After (Delit)"
    layout.operator(SDTEX_OT_delight_toggle.bl_idname, text=text, icon="LIGHT_SUN")


classes = (SDTEX_OT_delight_toggle,)
