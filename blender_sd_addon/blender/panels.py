"""The "SD Textures" sidebar panels, one body shown in the 3D Viewport, Image Editor and Shader Editor."""

from __future__ import annotations

import re
from collections.abc import Callable

import bpy

from .. import messages, readiness
from ..contract import protocol
from ..history import PBR_CONTROLS, HistoryRecord
from ..jobs import Job
from . import delight_ops, own_message, preview, session, size_hint, status, tasks
from .properties import IMAGE_MODES, shown_params
from .ui_jobs import SOLID_HINT, solid_viewports
from .ui_state import STATE, Target

SPACES = ("VIEW_3D", "IMAGE_EDITOR", "NODE_EDITOR")
MESSAGE_MARGIN = 60  # px of a message line that are not text: its icon and the panel's margins (seen in 3.4)
BAR_CELLS = 5  # the drawn bar of Blender < 4.0 (no layout.progress): short, the text beside it must fit too
# The sidebar's sub-panels, in the order of what the artist does: generate (size, material, model), then the
# other ways to texture, then the record. bl_order sorts siblings; the rarely used ones start closed.
PANEL_ORDER = (
    "ImagePanel", "ApplyPanel", "AdvancedPanel", "LorasPanel", "ProjectPanel", "TravelPanel", "TrainPanel",
    "BatchPanel", "HistoryPanel",
)  # fmt: skip


# A task's own progress line (fraction, text) where the generic one says too little (project: which view of how
# many; train: which phase); the task's module registers it.
PROGRESS: dict[str, Callable[[Job], tuple[float, str]]] = {}


def job_progress(job: Job) -> tuple[float, str]:
    """The bar's fraction and text of a job: its task's own (PROGRESS), else the step count."""
    own = PROGRESS.get(job.task)
    return own(job) if own and not job.finished else (job.fraction, job.status_text)


def progress_bar(factor: float) -> str:
    """A bar of block characters, for the Blender versions that cannot draw one."""
    filled = round(min(max(factor, 0.0), 1.0) * BAR_CELLS)
    return "█" * filled + "░" * (BAR_CELLS - filled)


def draw_progress(layout, factor: float, text: str) -> None:
    if hasattr(layout, "progress"):  # Blender 4.0+
        layout.progress(factor=factor, type="BAR", text=text)
    else:
        layout.label(text=f"{progress_bar(factor)} {factor:.0%} · {text}")


class SidebarPanel:
    bl_region_type = "UI"
    bl_category = "SD Textures"

    @classmethod
    def poll(cls, context):
        space = context.space_data
        return space.type != "NODE_EDITOR" or space.tree_type == "ShaderNodeTree"


class MainPanel(SidebarPanel):
    """Setup status, the prompt and Generate first: the rest is in sub-panels (collapsed when advanced)."""

    bl_label = "Generate"
    bl_order = 2

    def draw(self, context):
        layout = self.layout
        settings = context.scene.sdtex
        col = layout.column(align=True)
        col.label(text="Prompt")
        col.prop(settings, "prompt", text="")
        col.label(text="Negative Prompt")
        col.prop(settings, "negative_prompt", text="")
        col = layout.column(align=True)
        col.label(text="Model (empty: Preferences)")
        row = col.row(align=True)
        row.prop(settings, "model", text="")
        row.operator("sdtex.browse_model", text="", icon="FILEBROWSER").target = "SCENE"
        col = layout.column(align=True)
        col.label(text="Seamless Tiling")
        col.row(align=True).prop(settings, "seamless", expand=True)

        STATE.clear_fixed_error(settings)
        row = layout.row()
        row.scale_y = 1.5
        row.operator("sdtex.generate", icon="TEXTURE").apply = settings.apply
        row.operator("sdtex.draft", icon="RENDER_RESULT").apply = settings.apply  # a few steps first, then Generate
        # Everything that comes and goes is below the button, so Generate never moves under the mouse.
        draw_jobs(layout)
        if STATE.message:
            draw_message(layout, STATE.message, STATE.is_error, context.region.width)
            row = layout.row(align=True)
            if STATE.is_error:
                row.operator("sdtex.show_message", icon="TEXT")
            elif STATE.applied and solid_viewports():
                draw_message(layout, SOLID_HINT, False, context.region.width)
                layout.operator("sdtex.material_preview", icon="SHADING_TEXTURE")
        draw_readiness(layout, status.check_readiness(context), context.region.width)
        draw_output_folder(layout, context.region.width)


def draw_jobs(layout) -> None:
    """Each upload and job: its progress and Cancel; later ones wait in the queue."""
    for upload in STATE.uploads:
        draw_progress(layout.row(), 0.0, f"{job_label(upload.target, upload.task)}: Sending the image…")
    for job in STATE.board.active:
        column = layout.column(align=True)
        column.label(text=job_label(STATE.targets.get(job.request_id), job.task), icon="OBJECT_DATA")
        row = column.row(align=True)
        draw_progress(row, *job_progress(job))
        row.operator("sdtex.cancel", text="", icon="CANCEL").request_id = job.request_id
    if warning := STATE.closing_warning():  # quitting or opening a file cancels them: say so before it happens
        draw_message(layout, warning, False, bpy.context.region.width)


def draw_own_message(layout, operator: str, width: int) -> None:
    """An operator's own error (own_message.OwnMessage), under its button."""
    if own_message.MESSAGES.get(operator):
        draw_message(layout, own_message.MESSAGES[operator], True, width)


def draw_readiness(layout, ready: readiness.Readiness, width: int) -> None:
    """The backend and model lines; a line that is not ready gets its fixes as buttons, one per row (side by
    side they are cut off at the default sidebar width)."""
    box = layout.box()
    for line in ready.lines:
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
        size_hint.draw(self.layout, context)
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
        layout.prop(settings, "speed")
        col = layout.column(align=True)
        col.prop(settings, "guidance_scale", text="Guidance")
        col.prop(settings, "batch_size", text="Images")
        layout.prop(settings, "draft_preset")
        layout.operator("sdtex.open_preferences", text="Device and Memory…", icon="PREFERENCES")


class PbrPanel(SidebarPanel):
    bl_label = "PBR Maps"
    bl_options = {"DEFAULT_CLOSED"}

    def draw_header(self, context):
        self.layout.prop(context.scene.sdtex, "pbr", text="")

    def draw(self, context):
        settings = context.scene.sdtex
        layout = self.layout.column()
        layout.enabled = settings.pbr
        draw_pbr_methods(layout, settings)
        col = layout.column(align=True)
        col.label(text="Normal Map")
        col.prop(settings, "normal_format", text="")
        for name in PBR_CONTROLS:
            col.prop(settings, name)


MAP_METHODS = ("normal_method", "height_method", "roughness_method", "metallic_method")
ESTIMATE_SETTINGS = ("estimate_steps", "ensemble_size", "processing_resolution")


def draw_pbr_methods(layout, settings) -> None:
    """Per map its method (Classical or Model; Metallic: None or Model), Delight, and, only while a method uses a
    model, the estimators' sampling and the models they need (the preferences')."""
    col = layout.column(align=True)
    col.label(text="Maps From")
    for name in MAP_METHODS:
        labelled(col, settings, name)
    layout.prop(settings, "delight")
    needed = readiness.estimators_needed({name: getattr(settings, name) for name in readiness.METHOD_ESTIMATORS})
    if not needed:
        return
    box = layout.box()
    col = box.column(align=True)
    col.label(text="Estimators (Marigold)", icon="NODE_MATERIAL")
    for name in ESTIMATE_SETTINGS:
        col.prop(settings, name)
    prefs = session.preferences()
    for kind in needed:
        box.prop(prefs, f"{kind}_model", text=kind.title())


def message_lines(text: str, width: int, ui_scale: float = 1.0) -> list[str]:
    """A message broken into lines that fit `width` pixels of sidebar (a label never wraps by itself, so a
    long error used to be cut off in the middle of the instruction); a long path breaks after a separator."""
    chars = max(16, int(width / (7 * ui_scale)))  # about 7 px per character at scale 1
    return [line for paragraph in text.splitlines() for line in _wrap(paragraph, chars)]


def _wrap(paragraph: str, chars: int) -> list[str]:
    lines, line = [], ""
    for word in paragraph.split():
        for i, piece in enumerate(_pieces(word, chars)):
            glue = "" if i else " "  # the pieces of one path join without a space
            if line and len(line) + len(glue) + len(piece) > chars:
                lines.append(line)
                line = piece
            else:
                line = f"{line}{glue}{piece}" if line else piece
    return [*lines, line]


def _pieces(word: str, chars: int) -> list[str]:
    """A word too long for a line, in pieces that each end at a path separator (cut hard only when one
    folder's name alone is longer than a line)."""
    if len(word) <= chars:
        return [word]
    pieces = [""]
    for part in re.findall(r"[^/\\]*[/\\]|[^/\\]+$", word):
        while len(part.rstrip("/\\")) > chars:  # a separator may overhang: never alone on a line
            pieces.append(part[:chars])
            part = part[chars:]
        if len(pieces[-1]) + len(part.rstrip("/\\")) > chars:
            pieces.append(part)
        else:
            pieces[-1] += part
    return [piece for piece in pieces if piece]


def draw_message(layout, text: str, is_error: bool, width: int) -> None:
    column = layout.column(align=True)
    scale = bpy.context.preferences.system.ui_scale or 1.0  # 0 without a window (background mode)
    for i, line in enumerate(message_lines(text, width - MESSAGE_MARGIN, scale)):
        column.label(text=line, icon=("ERROR" if is_error else "INFO") if i == 0 else "BLANK1")


def job_label(target: Target | None, task: str) -> str:
    """Who a job is for: its objects, else its source image, else its task."""
    if target and target.object_names:
        return ", ".join(target.object_names)
    return target.source if target and target.source else task


class ApplyPanel(SidebarPanel):
    bl_label = "Material & PBR"
    bl_options = {"DEFAULT_CLOSED"}

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
        draw_pbr_methods(layout, settings)
        col = layout.column(align=True)
        col.prop(settings, "normal_format", text="Normals")
        for name in PBR_CONTROLS:
            col.prop(settings, name)
        # The pbr task always makes maps: a missing estimator is named here even while Generate's maps are off.
        remote = session.remote_settings() is not None
        if missing := readiness.estimator_line(tasks.estimator_facts(settings, remote)):
            draw_line(layout.box(), missing, context.region.width)
        row = layout.row()
        row.enabled = image is not None
        row.operator("sdtex.derive_pbr_maps", icon="NODE_MATERIAL").apply = settings.apply
        delight_ops.draw_toggle(layout, context)


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
        draw_own_message(layout, "sdtex.image_task", context.region.width)


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
        draw_map_sources(layout, settings, context.region.width)
        row = layout.row(align=True)
        row.operator("sdtex.apply_history", icon="MATERIAL")
        row.operator("sdtex.use_history_settings", icon="PASTEDOWN")
        layout.operator("sdtex.tile_preview", icon="IMGDISPLAY")


def draw_map_sources(layout, settings, width: int) -> None:
    """Which method made each map of the selected entry ("Normal: Marigold · Roughness: derived")."""
    if not 0 <= settings.history_index < len(settings.history):
        return
    images = HistoryRecord.from_fields(settings.history[settings.history_index]).images()
    if images and images[0].map_sources:
        draw_message(layout, messages.map_sources_line(images[0].map_sources), False, width)


def panel_order(name: str) -> int:
    """A sub-panel's bl_order (PANEL_ORDER): its place among the main panel's sub-panels."""
    return PANEL_ORDER.index(name)


def _for_each_space(base: type, parent: str = "") -> tuple[type, ...]:
    """One Panel subclass of `base` per sidebar (Blender needs a class per space type)."""
    made = []
    for space in SPACES:
        suffix = space.lower()
        attrs = {"bl_space_type": space, "bl_idname": f"SDTEX_PT_{base.__name__.lower()}_{suffix}"}
        if base.__name__ in PANEL_ORDER:
            attrs["bl_order"] = panel_order(base.__name__)
        if parent:
            attrs["bl_parent_id"] = f"SDTEX_PT_{parent}_{suffix}"
        made.append(type(f"SDTEX_PT_{base.__name__.lower()}_{suffix}", (base, bpy.types.Panel), attrs))
    return tuple(made)


classes = (
    *size_hint.classes,
    SDTEX_UL_history,
    *_for_each_space(MainPanel),
    *_for_each_space(ImagePanel, parent="mainpanel"),
    *_for_each_space(ApplyPanel, parent="mainpanel"),
    *_for_each_space(PbrPanel, parent="applypanel"),
    *_for_each_space(AdvancedPanel, parent="mainpanel"),
    *_for_each_space(HistoryPanel, parent="mainpanel"),
    SDTEX_PT_image_tasks,
    SDTEX_PT_pbr_image_editor,
)
