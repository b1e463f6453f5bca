"""The task operators of the main panel and the Image Editor: Generate, Draft, PBR Maps from Image, Run Image Task,
Cancel.

Each reads the scene's settings into a JobRequest (plain values, checked before anything is sent); JobOperator
queues it on the UI's job board, or in background mode (`blender -b`) runs it until the material is applied.
"""

from __future__ import annotations

import random

import bpy
from bpy.props import BoolProperty, StringProperty

from ..client import SDTexError
from ..contract import protocol
from . import draft_jobs, status, tasks, ui_jobs
from .operator_base import JobOperator, SDTexOperator
from .own_message import OwnMessage
from .properties import INT32_MAX
from .train import generation_loras
from .ui_jobs import JobRequest
from .ui_state import STATE


def panel_seed(settings) -> int:
    """A seed the panel can show again (IntProperty is 32-bit) instead of the backend's wider pick."""
    return random.randint(0, INT32_MAX) if settings.random_seed else settings.seed


def editor_image(context, name: str, missing: str) -> bpy.types.Image:
    """The image called `name`, or (no name) the one the Image Editor shows; SDTexError `missing` when none."""
    if name:
        image = bpy.data.images.get(name)
        if image is None:
            raise SDTexError(f"image must name an image of this file; there is none called {name!r}")
        return image
    space = context.space_data
    image = space.image if space is not None and space.type == "IMAGE_EDITOR" else None
    if image is None:
        raise SDTexError(missing)
    return image


def scene_request(context, task: str, values: dict, apply: bool, inputs: dict | None = None) -> JobRequest:
    """A request with the scene's apply options and model, on the selected meshes (when applying)."""
    settings = context.scene.sdtex
    options = tasks.apply_options(**settings.apply_settings())  # checked first, in both modes
    meshes = tasks.mesh_objects(context.selected_objects) if apply else []
    params = tasks.task_params(task, values, model=settings.model or None)
    given = {name: image for name, image in (inputs or {}).items() if image is not None}
    tasks.check_inputs(task, params, given)
    return JobRequest(task, params, meshes, options, apply, given)


class Generating(JobOperator):
    """Generate and Draft: on while the backend and the model are ready; the scene's txt2img request."""

    # No undo step and no redo panel of its own: the result arrives later and its apply is the one undo
    # step ("Apply SD texture"); a redo panel would re-run a whole generation.
    bl_options = set()

    @classmethod
    def poll(cls, context):
        if bpy.app.background:  # scripts get the backend's own error instead
            return True
        blocker = status.check_readiness(context).blocker
        if blocker and hasattr(cls, "poll_message_set"):  # Blender 3.0+: the tooltip says why
            cls.poll_message_set(blocker)
        return not blocker

    def request(self, context, props: dict) -> JobRequest:
        settings = context.scene.sdtex
        values = settings.generate_settings(panel_seed(settings)) | {
            "preview_every": 0 if bpy.app.background else 1,
            "loras": generation_loras(context.scene),
        }
        return scene_request(context, "txt2img", values, props["apply"])


class SDTEX_OT_generate(Generating, bpy.types.Operator):
    """Generate a texture from the prompt and put it on the selected meshes"""

    bl_idname = "sdtex.generate"
    bl_label = "Generate"

    apply: BoolProperty(name="Apply", description="Put the result on the selected meshes", default=True)


class SDTEX_OT_draft(Generating, bpy.types.Operator):
    """A few-step draft first (shown in the Image Editor, never applied), then the full generation with the same
    seed and settings, put on the selected meshes. The preset: Advanced > Draft; its LoRA: Preferences"""

    bl_idname = "sdtex.draft"
    bl_label = "Draft"

    apply: BoolProperty(name="Apply", description="Put the final result on the selected meshes", default=True)

    def run(self, context, props: dict) -> str | None:
        final = self.request(context, props)  # the seed is picked here, once, for both
        preset = context.scene.sdtex.draft_preset
        draft = draft_jobs.draft_request(final, preset, draft_jobs.preferences_lora(preset))
        if bpy.app.background:
            return ui_jobs.saved_message(draft_jobs.run_now(draft, final)[1])
        draft_jobs.start(draft, final)
        return None


class SDTEX_OT_derive_pbr_maps(JobOperator, bpy.types.Operator):
    """Make height, normal, roughness and AO maps of the image in the Image Editor (unsaved paint included)"""

    bl_idname = "sdtex.derive_pbr_maps"
    bl_label = "PBR Maps from Image"
    bl_options = set()  # the result arrives later: its apply is the undo step, as for Generate
    errors = (SDTexError, ValueError)  # ValueError: the image has no pixels to send

    apply: BoolProperty(name="Apply", description="Put the image and its maps on the selected meshes", default=True)
    image: StringProperty(name="Image", description="The image's name; empty uses the one the Image Editor shows")

    def request(self, context, props: dict) -> JobRequest:
        image = editor_image(context, props["image"], "No image to make maps of: show one in the Image Editor")
        values = context.scene.sdtex.pbr_settings()
        return scene_request(context, "pbr", values, props["apply"], {"image": image})


class SDTEX_OT_image_task(OwnMessage, JobOperator, bpy.types.Operator):
    """Run the chosen task (variations, inpaint, outpaint, upscale, make seamless) on the image in the Image
    Editor; the results are new images, the image itself is never changed"""

    bl_idname = "sdtex.image_task"
    bl_label = "Run Image Task"
    bl_options = set()  # the result arrives later: its apply is the undo step, as for Generate

    apply: BoolProperty(name="Apply", description="Put the result on the selected meshes", default=True)
    image: StringProperty(name="Image", description="The image's name; empty uses the one the Image Editor shows")

    def request(self, context, props: dict) -> JobRequest:
        settings = context.scene.sdtex
        image = editor_image(context, props["image"], "No image to start from: show one in the Image Editor")
        task, values, inputs = settings.image_task_settings(panel_seed(settings))
        names = {p.name for p in protocol.TASK_PARAMS[task]}
        if "preview_every" in names:
            values["preview_every"] = 0 if bpy.app.background else 1
        if "loras" in names:
            values["loras"] = generation_loras(context.scene)
        return scene_request(context, task, values, props["apply"], {"image": image, **inputs})


class SDTEX_OT_cancel(SDTexOperator, bpy.types.Operator):
    """Stop this generation (queued ones never start)"""

    bl_idname = "sdtex.cancel"
    bl_label = "Cancel"

    request_id: StringProperty(name="Job", description="The job to stop; empty stops every job")

    @classmethod
    def poll(cls, context):
        return STATE.running

    def run(self, context, props: dict) -> None:
        ui_jobs.cancel_ui_jobs(props["request_id"])


classes = (SDTEX_OT_generate, SDTEX_OT_draft, SDTEX_OT_derive_pbr_maps, SDTEX_OT_image_task, SDTEX_OT_cancel)
