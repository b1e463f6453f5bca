"""Latent travel in Blender: the "Travel" sub-panel (keyframes list, frames, loop, easing) runs the job on the
UI's job board; its frames become image-sequence textures that play with the timeline (results.finish_travel).
"""

from __future__ import annotations

import random
import re

import bpy
from bpy.props import CollectionProperty, IntProperty, PointerProperty, StringProperty

from ..client import SDTexError
from ..contract import protocol
from . import panels, tasks
from .operator_base import JobOperator
from .own_message import OwnMessage
from .properties import INT32_MAX, param_property
from .ui_jobs import JobRequest
from .ui_state import STATE

TASK = "travel"
# The travel task's own settings the panel holds (keyframes aside); the rest come from the main panel.
OWN_SETTINGS = ("frames", "loop", "easing", "embedding_interpolation", "export", "fps")
FRAME_COUNTS: dict[str, int] = {}  # UI job request id -> frames in its sequence (for "Frame 3/24")
PREFIX_WORDS = 24  # characters of each end keyframe's prompt in the frames' folder name


def frames_prefix(prompts: list[str]) -> str:
    """The frames' file and folder names: the first and last keyframes' prompts (the worker adds a digest of the
    settings), so the folder says what it holds instead of being a bare hash."""
    words = [re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:PREFIX_WORDS].strip("_") for prompt in prompts]
    ends = [w for w in (words[:1] + words[-1:]) if w] if words else []
    return "travel_" + "-".join(dict.fromkeys(ends)) if ends else "travel"


# --- the panel's settings ---------------------------------------------------------------------------------


class SDTEX_PG_travel_key(bpy.types.PropertyGroup):
    prompt: StringProperty(name="Prompt", description=protocol.KEYFRAME_ITEMS[0].help)
    negative_prompt: StringProperty(name="Negative Prompt", description=protocol.KEYFRAME_ITEMS[1].help)
    seed: IntProperty(name="Seed", description="This keyframe's seed", min=0, max=INT32_MAX)


class SDTEX_PG_travel(bpy.types.PropertyGroup):
    keyframes: CollectionProperty(type=SDTEX_PG_travel_key)
    active_key: IntProperty(name="Keyframe", default=0)
    frames: param_property("frames", TASK)
    loop: param_property("loop", TASK)
    easing: param_property("easing", TASK)
    embedding_interpolation: param_property("embedding_interpolation", TASK, name="Prompt Blend")
    export: param_property("export", TASK)
    fps: param_property("fps", TASK, name="FPS")

    @property
    def length(self) -> int:
        return protocol.travel_length(len(self.keyframes), self.frames, self.loop)

    def travel_settings(self, scene_settings) -> dict:
        """The travel parameters: the keyframes, this panel's settings, and the main panel's shared ones (size,
        steps, sampler, seamless, PBR maps), as tasks.task_params takes them."""
        names = {p.name for p in protocol.TASK_PARAMS[TASK]}
        shared = {k: v for k, v in scene_settings.generate_settings(None).items() if k in names}
        keyframes = [{"prompt": k.prompt, "negative_prompt": k.negative_prompt, "seed": k.seed} for k in self.keyframes]
        prefix = frames_prefix([k.prompt for k in self.keyframes])
        own = {name: getattr(self, name) for name in OWN_SETTINGS}
        return shared | own | {"keyframes": keyframes, "filename_prefix": prefix}


# --- operators --------------------------------------------------------------------------------------------


class SDTEX_OT_travel_add_key(bpy.types.Operator):
    """Add the main panel's prompt and seed as the next keyframe"""

    bl_idname = "sdtex.travel_add_key"
    bl_label = "Add Keyframe"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        settings, travel = context.scene.sdtex, context.scene.sdtex_travel
        if not settings.prompt.strip():
            self.report({"ERROR"}, "Write a prompt first: it becomes the keyframe's")
            return {"CANCELLED"}
        key = travel.keyframes.add()
        key.prompt, key.negative_prompt = settings.prompt, settings.negative_prompt
        key.seed = random.randint(0, INT32_MAX) if settings.random_seed else settings.seed
        travel.active_key = len(travel.keyframes) - 1
        return {"FINISHED"}


class SDTEX_OT_travel_remove_key(bpy.types.Operator):
    """Remove the selected keyframe"""

    bl_idname = "sdtex.travel_remove_key"
    bl_label = "Remove Keyframe"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return len(context.scene.sdtex_travel.keyframes) > 0

    def execute(self, context):
        travel = context.scene.sdtex_travel
        travel.keyframes.remove(travel.active_key)
        travel.active_key = max(0, min(travel.active_key, len(travel.keyframes) - 1))
        return {"FINISHED"}


class SDTEX_OT_travel(OwnMessage, JobOperator, bpy.types.Operator):
    """Make an animated texture travelling through the keyframes and put it on the selected meshes as image
    sequences that play with the timeline"""

    bl_idname = "sdtex.travel"
    bl_label = "Travel"
    bl_options = set()  # the result arrives later: its apply is the undo step, as for Generate

    apply: bpy.props.BoolProperty(name="Apply", description="Put the result on the selected meshes", default=True)

    def request(self, context, props: dict) -> JobRequest:
        settings, travel = context.scene.sdtex, context.scene.sdtex_travel
        if len(travel.keyframes) < 2:
            raise SDTexError(
                "Keyframes: add at least 2 with the Add Keyframe button (+) beside the list; each takes the main "
                "panel's prompt and seed"
            )
        options = tasks.apply_options(**settings.apply_settings())
        meshes = tasks.mesh_objects(context.selected_objects) if props["apply"] else []
        values = travel.travel_settings(settings) | {"preview_every": 0 if bpy.app.background else 1}
        params = tasks.task_params(TASK, values, model=settings.model or None)
        return JobRequest(TASK, params, meshes, options, props["apply"])

    def started(self, job, props: dict) -> None:
        FRAME_COUNTS[job.request_id] = bpy.context.scene.sdtex_travel.length


# --- the panel --------------------------------------------------------------------------------------------


class SDTEX_UL_travel_keys(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_property, index=0, flt_flag=0):
        row = layout.row(align=True)
        row.prop(item, "prompt", text="", emboss=False, icon="KEYFRAME")
        row.prop(item, "seed", text="")


def frames_done(job) -> int:
    return sum(1 for artifact in job.artifacts if artifact.kind == "frame")


class TravelPanel(panels.SidebarPanel):
    bl_label = "Animate (Travel)"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        settings, travel = context.scene.sdtex, context.scene.sdtex_travel
        row = layout.row()
        row.template_list("SDTEX_UL_travel_keys", "", travel, "keyframes", travel, "active_key", rows=3)
        col = row.column(align=True)
        col.operator("sdtex.travel_add_key", text="", icon="ADD")
        col.operator("sdtex.travel_remove_key", text="", icon="REMOVE")
        col = layout.column(align=True)
        col.prop(travel, "frames")
        col.prop(travel, "easing")
        col.prop(travel, "embedding_interpolation")
        layout.prop(travel, "loop")
        row = layout.row(align=True)
        row.prop(travel, "export", text="Export")
        if travel.export != "none":
            row.prop(travel, "fps")
        if len(travel.keyframes) >= 2:
            layout.label(text=f"{travel.length} frames", icon="SEQUENCE")
        layout.operator("sdtex.travel", icon="RENDER_ANIMATION").apply = settings.apply
        panels.draw_own_message(layout, "sdtex.travel", context.region.width)
        for job in STATE.board.active:
            if job.request_id in FRAME_COUNTS:
                total = FRAME_COUNTS[job.request_id]
                panels.draw_progress(
                    layout.row(), frames_done(job) / total, f"Frame {min(frames_done(job) + 1, total)}/{total}"
                )


classes = (
    SDTEX_PG_travel_key,
    SDTEX_PG_travel,
    SDTEX_OT_travel_add_key,
    SDTEX_OT_travel_remove_key,
    SDTEX_OT_travel,
    SDTEX_UL_travel_keys,
    *panels._for_each_space(TravelPanel, parent="mainpanel"),
)


def register() -> None:
    bpy.types.Scene.sdtex_travel = PointerProperty(type=SDTEX_PG_travel)


def unregister() -> None:
    del bpy.types.Scene.sdtex_travel
    FRAME_COUNTS.clear()
