"""A size that suits the device and the model, offered under Size: on a CPU-only backend 512 px costs minutes a
step, and a model trained at 1024 px (SDXL) paints poorly at 512. One button sets it; nothing changes unasked."""

from __future__ import annotations

import bpy
from bpy.props import IntProperty

from ..contract import model_catalog, protocol
from . import session, status

CPU_SIZE = 256  # the longest side offered on a CPU: about 4 times faster per step than 512


def on_cpu_only() -> bool:
    """The backend runs on the CPU: the preferences say so, or the running backend has no other device."""
    if getattr(session.preferences(), "device", "auto") == "cpu":
        return True
    client = session.current_client()
    shake = client.handshake if client and client.alive and client.handshake else None
    return bool(shake and shake.devices and all(d.startswith("cpu") for d in shake.devices))


def scaled(width: int, height: int, longest: int) -> tuple[int, int]:
    """The size with its longest side `longest`, the aspect kept, both sides valid for the width parameter."""
    spec = protocol.param("width").range
    factor = longest / max(width, height)

    def side(value: int) -> int:
        multiple = spec.multiple or 8
        return int(min(max(round(value * factor / multiple) * multiple, spec.low), spec.high))

    return side(width), side(height)


def suggestion(width: int, height: int, model: str, cpu: bool) -> tuple[tuple[int, int], str] | None:
    """((width, height), why) when another size would suit better, else None."""
    if cpu:
        if max(width, height) <= CPU_SIZE:
            return None
        return scaled(width, height, CPU_SIZE), f"The backend runs on the CPU: {max(width, height)} px is slow"
    native = model_catalog.defaults_for(model).width
    if max(width, height) >= native:
        return None
    return scaled(width, height, native), model_catalog.defaults_for(model).note


def draw(layout, context) -> None:
    settings = context.scene.sdtex
    found = suggestion(settings.width, settings.height, status.scene_model(context), on_cpu_only())
    if found is None:
        return
    (width, height), why = found
    column = layout.column(align=True)
    column.label(text=why, icon="INFO")
    button = column.operator("sdtex.use_size", text=f"Use {width} × {height}")
    button.width, button.height = width, height


class SDTEX_OT_use_size(bpy.types.Operator):
    """Set the size that suits the device and the model"""

    bl_idname = "sdtex.use_size"
    bl_label = "Use Size"
    bl_options = {"REGISTER", "UNDO", "INTERNAL"}

    width: IntProperty(name="Width", default=protocol.param("width").default, min=1)
    height: IntProperty(name="Height", default=protocol.param("height").default, min=1)

    def execute(self, context):
        context.scene.sdtex.width, context.scene.sdtex.height = self.width, self.height
        return {"FINISHED"}


classes = (SDTEX_OT_use_size,)
