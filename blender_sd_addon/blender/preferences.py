"""Add-on preferences: where the backend runs, which model, how much memory it may use."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, StringProperty

from .. import installer, readiness
from ..contract import drafts
from ..history import ESTIMATOR_MODELS
from .panels import draw_progress, message_lines
from .properties import param_property
from .remote import RemotePreferences, draw_preferences
from .ui_state import STATE, backend_status

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def _interpreter_changed(prefs, context) -> None:
    """What was said about the previous interpreter ("error: No Python with the backend found") is stale."""
    if readiness.message_kind(STATE.backend_message) == readiness.ERROR:
        STATE.backend_message = ""
    STATE.readiness = None


class SDTEX_AP_preferences(RemotePreferences, bpy.types.AddonPreferences):
    bl_idname = __package__.rpartition(".")[0]  # the add-on's root package

    backend_python: StringProperty(
        name="Backend Interpreter",
        description="Python with torch and diffusers that runs the backend; empty finds one, in order: "
        "$SDTEX_BACKEND_PYTHON, the repository's .venv (add-on run from a checkout), the backend made by "
        "Install Backend, Blender's own Python if it has torch and diffusers",
        subtype="FILE_PATH",
        update=_interpreter_changed,
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
    channels_last: param_property("channels_last", name="Channels Last")
    compile: param_property("compile", name="Compile U-Net")
    attention_slicing: param_property("attention_slicing")
    vae_tiling: param_property("vae_tiling", name="VAE Tiling")
    preview_decoder: param_property("preview_decoder", name="Preview Decoder", subtype="DIR_PATH")
    allow_pickle: param_property("allow_pickle", name="Allow Pickle Checkpoints")
    # The Marigold estimators of the "Model" map methods: hub ids (Download) or local diffusers folders.
    depth_model: param_property("depth_model", name="Depth (Height)", subtype="DIR_PATH")
    normals_model: param_property("normals_model", name="Normals", subtype="DIR_PATH")
    intrinsics_model: param_property(
        "intrinsics_model", name="Intrinsics (Albedo, Roughness, Metallic)", subtype="DIR_PATH"
    )
    output_folder: StringProperty(
        name="Output Folder",
        description="Where images are written; // means beside the saved .blend",
        default="//textures/",
        subtype="DIR_PATH",
    )
    # The LoRAs of the Draft presets that need one (sdtex.draft): a .safetensors file, a folder or a hub id.
    lcm_lora: StringProperty(
        name="LCM-LoRA", subtype="FILE_PATH", description="; ".join(drafts.DRAFT_PRESETS["lcm"].lora_examples)
    )
    tcd_lora: StringProperty(
        name="TCD LoRA", subtype="FILE_PATH", description="; ".join(drafts.DRAFT_PRESETS["tcd"].lora_examples)
    )
    hyper_lora: StringProperty(
        name="Hyper-SD LoRA", subtype="FILE_PATH", description="; ".join(drafts.DRAFT_PRESETS["hyper"].lora_examples)
    )
    start_early: BoolProperty(
        name="Start Backend Early",
        description="Start the backend and load the model when Blender starts, so the first generation is quick",
        default=True,
    )

    def draw(self, context) -> None:
        layout = self.layout
        draw_preferences(self, layout)  # Local or Remote
        if self.backend_mode != "REMOTE":  # the local backend's interpreter and install mean nothing for a remote one
            draw_local_backend(self, layout.box(), context)

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
        row = box.row()
        row.prop(self, "channels_last")
        row.prop(self, "compile")
        box.prop(self, "preview_decoder")
        box.prop(self, "allow_pickle")
        if self.allow_pickle:
            box.label(
                text="Pickle checkpoints (.ckpt/.pt/.bin) can run any code: load only files you trust", icon="ERROR"
            )
        draw_estimators(self, layout.box())
        box = layout.box()
        box.label(text="Draft LoRAs", icon="RENDER_RESULT")
        column = box.column(align=True)
        for name in ("lcm_lora", "tcd_lora", "hyper_lora"):
            column.prop(self, name)
        layout.prop(self, "output_folder")


def draw_estimators(prefs, box) -> None:
    """The estimator models (Marigold): used by the map methods set to Model in the PBR panels."""
    box.label(text="PBR Estimator Models", icon="NODE_MATERIAL")
    column = box.column(align=True)
    for name in ESTIMATOR_MODELS:
        column.prop(prefs, name)


def draw_local_backend(prefs, box, context) -> None:
    box.label(text="Backend", icon="CONSOLE")
    box.prop(prefs, "backend_python")
    draw_install(box, context)
    row = box.row()
    row.operator("sdtex.start_backend", icon="PLAY")
    row.operator("sdtex.stop_backend", icon="PAUSE")
    kind = readiness.message_kind(STATE.backend_message)
    box.label(text=backend_status(), icon=readiness.ICONS[kind])
    box.prop(prefs, "start_early")


def draw_install(box, context) -> None:
    """Install Backend, or its progress, pip's last lines and Cancel; after a failure its cause, fix and log."""
    state = installer.STATE
    row = box.row()
    if state.running:
        row.operator("sdtex.install_backend_cancel", icon="CANCEL")
        draw_progress(box, state.progress, state.message)
        log = box.column(align=True)
        for line in state.log_lines[-6:]:
            log.label(text=line)
        return
    row.operator("sdtex.install_backend", icon="IMPORT")
    if state.error:
        row.operator("sdtex.open_install_log", icon="TEXT")
    if state.message:
        kind = readiness.ERROR if state.error else readiness.INFO if state.cancelled else readiness.OK
        column = box.column(align=True)
        for i, text in enumerate(message_lines(state.message, context.region.width - 70)):
            column.label(text=text, icon=readiness.ICONS[kind] if i == 0 else "BLANK1")


classes = (SDTEX_AP_preferences,)
