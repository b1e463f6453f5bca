"""The "SD Textures" sidebar panels, one body shown in the 3D Viewport, Image Editor and Shader Editor."""

from __future__ import annotations

import textwrap

import bpy

from .. import readiness
from ..contract import protocol
from ..history import PBR_CONTROLS, HistoryRecord
from . import preview, session, status
from .properties import IMAGE_MODES, shown_params
from .ui_jobs import SOLID_HINT
from .ui_state import STATE, Target

SPACES = ("VIEW_3D", "IMAGE_EDITOR", "NODE_EDITOR")


def draw_progress(layout, factor: float, text: str) -> None:
    if hasattr(layout, "progress"):  # Blender 4.0+
        layout.progress(factor=factor, type="BAR", text=text)
    else:
        layout.label(text=f"{factor:.0%} · {text}")


class SidebarPanel:
    bl_region_type = "UI"
    bl_category = "SD Textures"

    @classmethod
    def poll(cls, context):
        space = context.space_data
        return space.type != "NODE_EDITOR" or space.tree_type == "ShaderNodeTree"


class MainPanel(SidebarPanel):
    """Setup status, the prompt and Generate first: the rest is in sub-panels (collapsed when advanced)."""

    bl_label = "SD Textures"
    bl_order = 2

    def draw(self, context):
        layout = self.layout
        settings = context.scene.sdtex
        draw_readiness(layout, status.check_readiness(context), context.region.width)

        col = layout.column(align=True)
        col.label(text="Prompt")
        col.prop(settings, "prompt", text="")
        col.label(text="Avoid")
        col.prop(settings, "negative_prompt", text="")
        col = layout.column(align=True)
        col.label(text="Seamless Tiling")
        col.row(align=True).prop(settings, "seamless", expand=True)

        state = STATE
        state.clear_fixed_error(settings)
        row = layout.row()
        row.scale_y = 1.5
        row.operator("sdtex.generate", icon="TEXTURE").apply = settings.apply
        for upload in state.uploads:
            draw_progress(layout.row(), 0.0, f"{job_label(upload.target, upload.task)}: Sending the image…")
        for job in state.board.active:  # each job: its own progress and Cancel; later ones wait in the queue
            column = layout.column(align=True)
            column.label(text=job_label(state.targets.get(job.request_id), job.task), icon="OBJECT_DATA")
            row = column.row(align=True)
            draw_progress(row, job.fraction, job.status_text)
            row.operator("sdtex.cancel", text="", icon="CANCEL").request_id = job.request_id
        if state.message:
            draw_message(layout, state.message, state.is_error, context.region.width)
            row = layout.row(align=True)
            if state.is_error:
                row.operator("sdtex.show_message", icon="TEXT")
            elif state.message.endswith(SOLID_HINT):
                row.operator("sdtex.material_preview", icon="SHADING_TEXTURE")
        draw_output_folder(layout, context.region.width)


def draw_readiness(layout, ready: readiness.Readiness, width: int) -> None:
    """The backend and model lines; a line that is not ready gets its fixes as buttons, one per row (side by
    side they are cut off at the default sidebar width)."""
    box = layout.box()
    for line in (ready.backend, ready.model):
        draw_line(box, line, width)


def draw_line(layout, line: readiness.Line, width: int) -> None:
    """One readiness line, wrapped to the sidebar's width, with its fixes as buttons."""
    column = layout.column(align=True)
    if line.progress is not None:
        draw_progress(column, line.progress, line.text)
    else:
        scale = bpy.context.preferences.system.ui_scale or 1.0
        for i, text in enumerate(message_lines(line.text, width - 70, scale)):  # less the icon and margins
            column.label(text=text, icon=line.icon if i == 0 else "BLANK1")
    for operator, text in line.fixes:
        button = column.operator(operator, text=text)
        if operator == "sdtex.browse_model":
            button.target = "PREFERENCES"  # a newcomer's choice holds for every file


def draw_output_folder(layout, width: int) -> None:
    """Where files go, when it is not beside the .blend: the artist must be able to find them."""
    if bpy.data.filepath:
        return
    column = layout.column(align=True)
    text = f"Unsaved file: images go to {session.output_folder(None)} (they move beside the .blend when you save it)"
    for i, line in enumerate(message_lines(text, width - 40, bpy.context.preferences.system.ui_scale or 1.0)):
        column.label(text=line, icon="FILE_FOLDER" if i == 0 else "BLANK1")
    column.operator("sdtex.open_folder", icon="FILEBROWSER")


class ImagePanel(SidebarPanel):
    bl_label = "Size and Seed"

    def draw(self, context):
        settings = context.scene.sdtex
        col = self.layout.column(align=True)
        col.prop(settings, "width")
        col.prop(settings, "height")
        row = self.layout.row(align=True)
        sub = row.row(align=True)
        sub.enabled = not settings.random_seed
        sub.prop(settings, "seed")
        row.prop(settings, "random_seed", text="", icon="FILE_REFRESH")
        self.layout.prop(settings, "steps")


class AdvancedPanel(SidebarPanel):
    bl_label = "Advanced"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        settings = context.scene.sdtex
        layout.label(text="Sampler")
        layout.prop(settings, "scheduler", text="")
        col = layout.column(align=True)
        col.prop(settings, "guidance_scale", text="Guidance")
        col.prop(settings, "batch_size", text="Images")
        layout.label(text="Model (empty: Preferences)")
        row = layout.row(align=True)
        row.prop(settings, "model", text="")
        row.operator("sdtex.browse_model", text="", icon="FILEBROWSER").target = "SCENE"
        layout.operator("sdtex.open_preferences", text="Device and Memory…", icon="PREFERENCES")


class PbrPanel(SidebarPanel):
    bl_label = "PBR Maps"
    bl_options = {"DEFAULT_CLOSED"}

    def draw_header(self, context):
        self.layout.prop(context.scene.sdtex, "pbr", text="")

    def draw(self, context):
        settings = context.scene.sdtex
        col = self.layout.column(align=True)
        col.enabled = settings.pbr
        col.label(text="Normal Map")
        col.prop(settings, "normal_format", text="")
        for name in PBR_CONTROLS:
            col.prop(settings, name)


def message_lines(text: str, width: int, ui_scale: float = 1.0) -> list[str]:
    """A message broken into lines that fit `width` pixels of sidebar (a label never wraps by itself, so a
    long error used to be cut off in the middle of the instruction)."""
    chars = max(16, int(width / (7 * ui_scale)))  # about 7 px per character at scale 1
    return [line for paragraph in text.splitlines() for line in textwrap.wrap(paragraph, chars) or [""]]


def draw_message(layout, text: str, is_error: bool, width: int) -> None:
    column = layout.column(align=True)
    scale = bpy.context.preferences.system.ui_scale or 1.0  # 0 without a window (background mode)
    for i, line in enumerate(message_lines(text, width, scale)):
        column.label(text=line, icon=("ERROR" if is_error else "INFO") if i == 0 else "BLANK1")


def job_label(target: Target | None, task: str) -> str:
    """Who a job is for: its objects, else its source image, else its task."""
    if target and target.object_names:
        return ", ".join(target.object_names)
    return target.source if target and target.source else task


class ApplyPanel(SidebarPanel):
    bl_label = "Apply"

    def draw_header(self, context):
        self.layout.prop(context.scene.sdtex, "apply", text="")

    def draw(self, context):
        settings = context.scene.sdtex
        col = self.layout.column()
        col.enabled = settings.apply
        col.prop(settings, "shared_material")
        for name in ("slot", "projection", "displacement"):
            labelled(col, settings, name)
        col.prop(settings, "texture_scale")
        col.prop(settings, "ao_multiply")
        col.prop(settings, "pack")


def labelled(layout, data, name: str) -> None:
    """A drop-down with its label in a column of its own (in one row Blender cuts the label to "Proje…")."""
    split = layout.split(factor=0.42, align=True)
    split.label(text=data.bl_rna.properties[name].name)
    split.prop(data, name, text="")


class SDTEX_PT_pbr_image_editor(SidebarPanel, bpy.types.Panel):
    """Maps of the image the Image Editor shows (a file, or unsaved paint: it is read, never changed)."""

    bl_space_type = "IMAGE_EDITOR"
    bl_label = "PBR Maps from Image"
    bl_order = 1  # above the main panel: in the Image Editor the image's own tasks come first

    def draw(self, context):
        layout = self.layout
        settings = context.scene.sdtex
        image = context.space_data.image
        layout.label(text=image.name if image else "No image shown", icon="IMAGE_DATA")
        row = layout.row()
        row.label(text="Tiles")
        row.prop(settings, "pbr_seamless", expand=True)
        col = layout.column(align=True)
        col.prop(settings, "normal_format", text="Normals")
        for name in PBR_CONTROLS:
            col.prop(settings, name)
        row = layout.row()
        row.enabled = image is not None
        row.operator("sdtex.derive_pbr_maps", icon="NODE_MATERIAL").apply = settings.apply


class SDTEX_PT_image_tasks(SidebarPanel, bpy.types.Panel):
    """Variations, inpainting, outpainting, upscaling and seam repair of the image the Image Editor shows.

    The controls are the chosen task's own parameters, drawn from its protocol table; the prompt, seed,
    steps and PBR maps come from the main panel. Results are new images: the image shown is never changed."""

    bl_space_type = "IMAGE_EDITOR"
    bl_label = "Image Tasks"
    bl_order = 0

    def draw(self, context):
        layout = self.layout
        settings = context.scene.sdtex
        image = context.space_data.image
        layout.label(text=image.name if image else "No image shown", icon="IMAGE_DATA")
        layout.prop(settings, "image_task", text="")
        mode = IMAGE_MODES[settings.image_task]
        if any(p.name == "prompt" for p in protocol.TASK_PARAMS[mode.task]):
            layout.prop(settings, "prompt", text="")  # the main panel's prompt, here too
        group = getattr(settings, mode.task)
        col = layout.column(align=True)
        for p in shown_params(mode, group):
            if p.kind is protocol.ImageInput:  # the mask: any image of the file, e.g. one painted here
                layout.prop_search(group, p.name, bpy.data, "images")
            else:
                col.prop(group, p.name)
        row = layout.row()
        row.enabled = image is not None
        row.operator("sdtex.image_task", text=mode.label, icon="IMAGE").apply = settings.apply


class SDTEX_UL_history(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_property, index=0, flt_flag=0):
        record = HistoryRecord.from_fields(item)
        images = record.images()
        # Maps made from an uploaded image have no albedo file: their normal map stands for them.
        path = (images[0].path or images[0].maps.get("normal", "")) if images else ""
        icon_id = preview.thumbnail_icon(path) if path else 0
        row = layout.row()
        icon_kwargs = {"icon_value": icon_id} if icon_id else {"icon": "IMAGE_DATA"}
        row.label(text=record.title, **icon_kwargs)
        row.label(text="" if record.seed is None else str(record.seed))


class HistoryPanel(SidebarPanel):
    bl_label = "History"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        settings = context.scene.sdtex
        layout.template_list("SDTEX_UL_history", "", settings, "history", settings, "history_index", rows=4)
        row = layout.row(align=True)
        row.operator("sdtex.apply_history", icon="MATERIAL")
        row.operator("sdtex.use_history_settings", icon="PASTEDOWN")
        layout.operator("sdtex.tile_preview", icon="IMGDISPLAY")


def _for_each_space(base: type, parent: str = "") -> tuple[type, ...]:
    """One Panel subclass of `base` per sidebar (Blender needs a class per space type)."""
    made = []
    for space in SPACES:
        suffix = space.lower()
        attrs = {"bl_space_type": space, "bl_idname": f"SDTEX_PT_{base.__name__.lower()}_{suffix}"}
        if parent:
            attrs["bl_parent_id"] = f"SDTEX_PT_{parent}_{suffix}"
        made.append(type(f"SDTEX_PT_{base.__name__.lower()}_{suffix}", (base, bpy.types.Panel), attrs))
    return tuple(made)


classes = (
    SDTEX_UL_history,
    *_for_each_space(MainPanel),
    *_for_each_space(ImagePanel, parent="mainpanel"),
    *_for_each_space(ApplyPanel, parent="mainpanel"),
    *_for_each_space(PbrPanel, parent="mainpanel"),
    *_for_each_space(AdvancedPanel, parent="mainpanel"),
    *_for_each_space(HistoryPanel, parent="mainpanel"),
    SDTEX_PT_image_tasks,
    SDTEX_PT_pbr_image_editor,
)
