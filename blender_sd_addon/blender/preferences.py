"""Add-on preferences: where the backend runs, which model, how much memory it may use."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, StringProperty

from .. import installer
from .panels import draw_progress
from .properties import param_property
from .remote import RemotePreferences, draw_preferences

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class SDTEX_AP_preferences(RemotePreferences, bpy.types.AddonPreferences):
    bl_idname = __package__.rpartition(".")[0]  # the add-on's root package

    backend_python: StringProperty(
        name="Backend Interpreter",
        description="Python with torch and diffusers that runs the backend; empty finds one, in order: "
        "$SDTEX_BACKEND_PYTHON, the repository's .venv (add-on run from a checkout), the backend made by "
        "Install Backend, Blender's own Python if it has torch and diffusers",
        subtype="FILE_PATH",
    )
    model: StringProperty(
        name="Model",
        description="Hub id, local diffusers folder, or single-file .safetensors checkpoint",
        default=DEFAULT_MODEL,
    )
    models_folder: StringProperty(
        name="Models Folder",
        description="A folder of your models (diffusers folders and .safetensors files): the panel's On Disk list "
        "shows them next to those in the Hugging Face cache",
        subtype="DIR_PATH",
    )
    device: param_property("device")
    dtype: param_property("dtype", name="Precision")
    cpu_offload: param_property("cpu_offload", name="CPU Offload")
    attention_slicing: param_property("attention_slicing")
    vae_tiling: param_property("vae_tiling", name="VAE Tiling")
    allow_pickle: param_property("allow_pickle", name="Allow Pickle Checkpoints")
    output_folder: StringProperty(
        name="Output Folder",
        description="Where images are written; // means beside the saved .blend",
        default="//textures/",
        subtype="DIR_PATH",
    )
    start_early: BoolProperty(
        name="Start Backend Early",
        description="Start the backend and load the model when Blender starts, so the first generation is quick",
        default=True,
    )

    def draw(self, context) -> None:
        from . import operators  # the status lives with the operators that change it

        layout = self.layout
        draw_preferences(self, layout)  # Local or Remote
        box = layout.box()
        box.label(text="Backend", icon="CONSOLE")
        box.prop(self, "backend_python")
        state = installer.STATE
        row = box.row()
        if state.running:
            row.operator("sdtex.install_backend_cancel", icon="CANCEL")
            draw_progress(box, state.progress, state.message)
        else:
            row.operator("sdtex.install_backend", icon="IMPORT")
            if state.message:
                box.label(text=state.message)
        if state.log_lines:
            log = box.column(align=True)
            for line in state.log_lines[-6:]:
                log.label(text=line)
        row = box.row()
        row.operator("sdtex.start_backend", icon="PLAY")
        row.operator("sdtex.stop_backend", icon="PAUSE")
        box.label(text=operators.backend_status(), icon="INFO")
        box.prop(self, "start_early")

        box = layout.box()
        box.label(text="Model", icon="FILE_3D")
        row = box.row(align=True)
        row.prop(self, "model")
        row.operator("sdtex.pick_model", text="", icon="DOWNARROW_HLT")
        row.operator("sdtex.browse_model", text="", icon="FILEBROWSER").target = "PREFERENCES"
        box.prop(self, "models_folder")
        row = box.row()
        row.prop(self, "device")
        row.prop(self, "dtype")
        row = box.row()
        row.prop(self, "cpu_offload")
        row.prop(self, "attention_slicing")
        row.prop(self, "vae_tiling")
        box.prop(self, "allow_pickle")
        if self.allow_pickle:
            box.label(
                text="Pickle checkpoints (.ckpt/.pt/.bin) can run any code: load only files you trust", icon="ERROR"
            )
        layout.prop(self, "output_folder")


classes = (SDTEX_AP_preferences,)
