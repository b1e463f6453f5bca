"""Backend and model operators: start and stop the backend, choose, pick or download a model, and the panel's
small helpers (the message's Details, the preferences, the output folder, Material Preview)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bpy
from bpy.props import EnumProperty, StringProperty

from .. import readiness
from ..client import SDTexError
from ..contract import model_catalog, protocol
from . import session, status, tasks, ui_jobs
from .operator_base import SDTexOperator
from .panels import message_lines
from .ui_jobs import solid_viewports
from .ui_state import STATE, Target, start_backend_async


class SDTEX_OT_start_backend(SDTexOperator, bpy.types.Operator):
    """Start the backend and load the model now"""

    bl_idname = "sdtex.start_backend"
    bl_label = "Start Backend"

    def run(self, context, props: dict) -> None:
        if bpy.app.background:
            session.get_client().start()
        else:
            start_backend_async()

    def fail(self, message: str) -> set[str]:
        STATE.backend_message = f"error: {message}"  # the status line says it
        return super().fail(message)


class SDTEX_OT_stop_backend(bpy.types.Operator):
    """Stop the backend (frees its memory; it starts again on the next generation)"""

    bl_idname = "sdtex.stop_backend"
    bl_label = "Stop Backend"

    def execute(self, context):
        ui_jobs.stop_polling()
        session.shutdown_backend()
        STATE.backend_message = "stopped"
        return {"FINISHED"}


_local_models: list[tuple[str, str, str]] = []  # enum items must outlive the callback (Blender keeps pointers)


def _local_model_items(self, context) -> list[tuple[str, str, str]]:
    folder = bpy.path.abspath(session.preferences().models_folder)
    models = model_catalog.local_models(folders=(Path(folder),) if folder else ())
    _local_models[:] = [(m, model_catalog.short_name(m), m) for m in models] or [("", "No models on disk", "")]
    return _local_models


class SDTEX_OT_pick_model(bpy.types.Operator):
    """Choose one of the models already on disk (the Hugging Face cache and the Preferences' models folder)"""

    bl_idname = "sdtex.pick_model"
    bl_label = "On Disk"
    bl_property = "model"

    model: EnumProperty(name="Model", items=_local_model_items)

    def invoke(self, context, event):
        context.window_manager.invoke_search_popup(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        if not self.model:
            self.report({"WARNING"}, "No models on disk yet: Download Model, or Choose Model to pick a file or folder")
            return {"CANCELLED"}
        use_model(context, self.model, "PREFERENCES")
        return {"FINISHED"}


class SDTEX_OT_download_model(SDTexOperator, bpy.types.Operator):
    """Download the model from the Hugging Face hub (only the files it needs, half-size weights where the \
repository has them); progress shows in the panel and Cancel stops it"""

    bl_idname = "sdtex.download_model"
    bl_label = "Download Model"
    say_errors = True

    @classmethod
    def poll(cls, context):
        return STATE.download_job() is None

    def run(self, context, props: dict) -> str:
        return download(status.scene_model(context).strip())


def download(model: str) -> str:
    """Start the download job of a hub model; its progress shows on the model's readiness line."""
    if not protocol.HUB_ID.match(model):
        raise SDTexError(f"Only hub models (like owner/name) can be downloaded; {model!r} is a path")
    job = ui_jobs.submit(session.get_client(), "download_model", {"model": model}, Target((), None, False))
    ui_jobs.follow()
    STATE.readiness = None
    return f"Downloading {model} (job {job.request_id})"


class SDTEX_OT_download_estimator(SDTexOperator, bpy.types.Operator):
    """Download the estimator model (Marigold) that a map's Model method needs and that is not on disk yet"""

    bl_idname = "sdtex.download_estimator"
    bl_label = "Download Estimator"
    say_errors = True

    @classmethod
    def poll(cls, context):
        return STATE.download_job() is None

    def run(self, context, props: dict) -> str:
        remote = session.remote_settings() is not None
        missing = readiness.missing_estimators(tasks.estimator_facts(context.scene.sdtex, remote))
        hub = [model for model in missing if protocol.HUB_ID.match(model)]
        if not hub:
            raise SDTexError("No estimator model to download: set a hub id (owner/name) in Preferences, or a folder")
        return download(hub[0])


class SDTEX_OT_download_preview_decoder(SDTexOperator, bpy.types.Operator):
    """Download the preview decoder (TAESD) set in Preferences, so step previews look like the result"""

    bl_idname = "sdtex.download_preview_decoder"
    bl_label = "Download Preview Decoder"
    say_errors = True

    @classmethod
    def poll(cls, context):
        return STATE.download_job() is None

    def run(self, context, props: dict) -> str:
        return download(session.preferences().preview_decoder.strip())


class SDTEX_OT_show_message(bpy.types.Operator):
    """Show the whole message, as the backend wrote it"""

    bl_idname = "sdtex.show_message"
    bl_label = "Details"

    def invoke(self, context, event):
        return context.window_manager.invoke_popup(self, width=min(900, context.window.width - 40))

    def draw(self, context):
        column = self.layout.column(align=True)
        for line in message_lines(STATE.details or STATE.message, 880):
            column.label(text=line)
        print(f"SD Textures: {STATE.details}")

    def execute(self, context):
        return {"FINISHED"}


class SDTEX_OT_open_preferences(bpy.types.Operator):
    """Open this add-on's preferences (backend interpreter, model, output folder)"""

    bl_idname = "sdtex.open_preferences"
    bl_label = "Open Preferences"

    def execute(self, context):
        bpy.ops.screen.userpref_show()
        context.preferences.active_section = "ADDONS"
        context.window_manager.addon_search = "SD Textures"
        return {"FINISHED"}


class SDTEX_OT_open_folder(SDTexOperator, bpy.types.Operator):
    """Open the folder the images are written to in the file browser of your system"""

    bl_idname = "sdtex.open_folder"
    bl_label = "Open Folder"

    def run(self, context, props: dict) -> None:
        folder = session.output_folder(None)
        os.makedirs(folder, exist_ok=True)
        opener = {"win32": ["explorer"], "darwin": ["open"]}.get(sys.platform, ["xdg-open"])
        try:
            subprocess.Popen([*opener, folder])
        except OSError as exc:
            raise SDTexError(f"Could not open {folder}: {exc}") from None


class SDTEX_OT_material_preview(bpy.types.Operator):
    """Switch the 3D viewports in Solid shading to Material Preview, to see the textures"""

    bl_idname = "sdtex.material_preview"
    bl_label = "Show Textures"

    def execute(self, context):
        for shading in solid_viewports():
            shading.type = "MATERIAL"
        return {"FINISHED"}


class SDTEX_OT_browse_model(bpy.types.Operator):
    """Pick a diffusers model folder or a .safetensors checkpoint"""

    bl_idname = "sdtex.browse_model"
    bl_label = "Choose Model"

    target: EnumProperty(items=[("PREFERENCES", "Preferences", ""), ("SCENE", "Scene", "")])
    filepath: StringProperty(subtype="FILE_PATH")
    directory: StringProperty(subtype="DIR_PATH")
    filter_glob: StringProperty(default="*.safetensors;*.ckpt;*.pt;*.bin", options={"HIDDEN"})

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        # A file is a single-file checkpoint; a folder (no file picked) is a diffusers model.
        path = self.filepath if os.path.isfile(self.filepath) else self.directory
        use_model(context, path.rstrip("/\\") if os.path.isdir(path) else path, self.target)
        return {"FINISHED"}


def use_model(context, model: str, target: str) -> None:
    """Make `model` the preferences' (the scene then follows them) or the scene's own, and fill in the size,
    steps, guidance and sampler that suit it (SDXL 1024 px, Turbo 1 step without guidance...)."""
    settings = context.scene.sdtex
    if target == "PREFERENCES":
        session.preferences().model, settings.model = model, ""
    else:
        settings.model = model
    defaults = model_catalog.defaults_for(model)
    for name in ("width", "height", "steps", "guidance_scale", "scheduler"):
        setattr(settings, name, getattr(defaults, name))
    STATE.readiness = None


classes = (
    SDTEX_OT_start_backend,
    SDTEX_OT_stop_backend,
    SDTEX_OT_browse_model,
    SDTEX_OT_pick_model,
    SDTEX_OT_download_model,
    SDTEX_OT_download_estimator,
    SDTEX_OT_download_preview_decoder,
    SDTEX_OT_show_message,
    SDTEX_OT_open_preferences,
    SDTEX_OT_open_folder,
    SDTEX_OT_material_preview,
)
