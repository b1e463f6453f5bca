"""The "Project" sub-panel: texture the selected meshes themselves from depth-guided views (projecting.py).

Its own scene settings (Scene.sdtex_project) hold the views and the projection's settings; prompt, seed,
steps, size, sampler, PBR maps and the model come from the main panel. In the UI the job is a row on the
UI's job board, applied when it ends; in background mode (`blender -b`) the operator blocks until applied.
"""

from __future__ import annotations

import re

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty

from ..client import SDTexError
from ..jobs import CANCELLED, DONE, Job
from . import geometry, panels, projecting, status, ui_jobs
from .materials import ApplyOptions
from .operator_base import SDTexOperator
from .projecting import ProjectedTexture, ProjectionRequest
from .properties import enum_items, param_property
from .ui_state import STATE, Target

TASK = "project"
VIEW_SOURCES = {
    "ORBIT": ("Orbit", "Views on rings round the selection", ("ORBIT",)),
    "COVERAGE": ("Cover Selection", "Views chosen to see as much of the selection as few views can", ("COVERAGE",)),
    "CAMERA": ("Camera", "The scene camera", ("CAMERA",)),
    "CAMERA_ORBIT": ("Camera + Orbit", "The scene camera first, then orbit views", ("CAMERA", "ORBIT")),
    "VIEWPORT": ("Viewport", "This 3D view", ("VIEWPORT",)),
}
SETTINGS = (
    "mode", "sync_until", "controlnet", "controlnet_scale", "texture_size", "margin", "refine_below", "mask_blur",
    "match_colors", "allow_uv_overlap", "apply_unseen",
)  # fmt: skip


class SDTEX_PG_project(bpy.types.PropertyGroup):
    mode: param_property("mode", TASK)
    sync_until: param_property("sync_until", TASK, name="Sync Until")
    controlnet: param_property("controlnet", TASK, name="ControlNet")
    controlnet_scale: param_property("controlnet_scale", TASK, name="Depth Strength")
    texture_size: param_property("texture_size", TASK)
    margin: param_property("margin", TASK)
    refine_below: param_property("refine_below", TASK)
    mask_blur: param_property("mask_blur", TASK)
    match_colors: param_property("match_colors", TASK, name="Match Colors")
    allow_uv_overlap: param_property("allow_uv_overlap", TASK, name="Allow UV Overlap")
    apply_unseen: param_property("apply_unseen", TASK, name="Apply Unseen")
    targets: EnumProperty(
        name="Objects",
        items=[("SELECTED", "Selected", "The selected meshes"), ("VISIBLE", "All Visible", "Every visible mesh")],
        default="SELECTED",
    )
    views: EnumProperty(
        name="Views", items=[(key, label, text) for key, (label, text, _) in VIEW_SOURCES.items()], default="ORBIT"
    )
    views_per_ring: IntProperty(name="Views per Ring", default=8, min=1, max=32)
    elevation: FloatProperty(name="Elevation", description="Degrees above the horizon", default=20.0, min=-85, max=85)
    both_sides: BoolProperty(name="Ring Below Too", description="A second ring as far below the horizon", default=True)
    fov: FloatProperty(name="Field of View", description="Degrees across the wider side", default=40.0, min=5, max=120)
    occlude: BoolProperty(name="Others Occlude", description="Other visible meshes hide what they cover", default=True)
    uv_map: EnumProperty(
        name="UV Map",
        items=enum_items(geometry.UV_MAPS),
        description="Active: bake into each object's active UV map (unwrapped when missing); New: a fresh unwrap",
        default="ACTIVE",
    )

    def request(self, scene_settings, objects) -> dict:
        """projecting.prepare_projection's arguments for these settings and the main panel's."""
        seed = None if scene_settings.random_seed else scene_settings.seed
        elevations = (self.elevation, -self.elevation) if self.both_sides else (self.elevation,)
        main = ("prompt", "negative_prompt", "steps", "guidance_scale", "width", "height", "scheduler", "speed", "pbr")
        return dict(
            objects=objects,
            views=VIEW_SOURCES[self.views][2],
            views_per_ring=self.views_per_ring,
            elevations=elevations,
            fov=self.fov,
            occlude=self.occlude,
            uv_map=self.uv_map,
            model=scene_settings.model or None,
            seed=seed,
            **{name: getattr(scene_settings, name) for name in main},
            **{name: round(v, 6) if isinstance(v := getattr(self, name), float) else v for name in SETTINGS},
        )


class Running:
    """What the Project panel says: its last outcome (its jobs are rows on the UI's job board)."""

    message: str = ""


def project_jobs() -> list[Job]:
    return [job for job in STATE.board.active if job.task == TASK]


def _on_board_finished(job: Job, target: Target) -> None:
    Running.message = _finish(job, target.request, target.options.slot)


ui_jobs.FINISHERS[TASK] = _on_board_finished


def _finish(job: Job, request: ProjectionRequest, slot: str) -> str:
    try:
        if partial := projecting.partial_result(job, request) if job.state == CANCELLED else None:
            projecting.finish_projection(partial, request, slot=slot)  # the views finished before the cancel
            return projecting.cancelled_text(job, request)
        if job.state != DONE:
            raise request.failed(SDTexError(job.error))
        done = projecting.finish_projection(job.data, request, slot=slot)
    except SDTexError as exc:
        return str(exc)
    except ReferenceError:
        return "The objects were deleted while painting; the textures are on disk"
    return summary(done)


def summary(done: ProjectedTexture) -> str:
    covered = ", ".join(f"{name} {share:.0%}" for name, share in done.coverage.items())
    count = len(done.images)
    notes = [done.views_note] * bool(done.views_note) + done.warnings
    return f"Baked {count} texture{'' if count == 1 else 's'}; views saw {covered}" + (
        f" ({'; '.join(notes)})" if notes else ""
    )


class SDTEX_OT_project(SDTexOperator, bpy.types.Operator):
    """Paint the selected meshes from depth-guided views and bake the result into their UV textures"""

    bl_idname = "sdtex.project"
    bl_label = "Project Texture"
    bl_options = set()  # the result arrives later; applying it is the change

    def run(self, context, props: dict) -> None:
        scene = context.scene
        settings = scene.sdtex_project
        chosen = context.selected_objects if settings.targets == "SELECTED" else context.visible_objects
        if settings.targets == "VISIBLE":
            chosen = [obj for obj in chosen if obj.type == "MESH" and obj.data.polygons]
        arguments = settings.request(scene.sdtex, list(chosen))
        objects, prompt = arguments.pop("objects"), arguments.pop("prompt")
        request = projecting.prepare_projection(objects, prompt, output_dir=None, **arguments)
        if bpy.app.background:
            done = projecting.run_projection(request, slot=scene.sdtex.slot)
            Running.message = summary(done)
            self.report({"WARNING"} if done.warnings else {"INFO"}, Running.message)
            return
        options = ApplyOptions(shared_material=False, slot=scene.sdtex.slot)
        ui_jobs.submit_ui(TASK, request.params, Target(tuple(request.names), options, True, request=request))
        Running.message = ""

    def fail(self, message: str) -> set[str]:
        Running.message = message  # the Project panel's own message line
        return super().fail(message)


class SDTEX_OT_project_cancel(bpy.types.Operator):
    """Stop painting; the views finished so far stay baked into textures on disk"""

    bl_idname = "sdtex.project_cancel"
    bl_label = "Cancel"
    bl_options = {"INTERNAL"}

    @classmethod
    def poll(cls, context):
        return bool(project_jobs())

    def execute(self, context):
        for job in project_jobs():
            job.cancel()
        return {"FINISHED"}


VIEW_STAGE = re.compile(r"view (\d+)/(\d+)")  # the worker's stage while it paints view n of N (sequential)
TOGETHER_STAGE = re.compile(r"views 1-(\d+) together")  # ... while it paints all N at once (synchronized)


def progress(job: Job) -> tuple[float, str]:
    """The whole job's fraction and "View 3/8 · step 12/25" (the bar and the view count agree: the steps are the
    view's own), or "Views 1-8 together · step 12/25"; the stage (loading, saving) before and after the views."""
    steps = f" · step {job.step}/{job.total}" if job.total else ""
    within = job.step / job.total if job.total else 0.0
    if together := TOGETHER_STAGE.fullmatch(job.stage):
        return within, f"Views 1-{together[1]} together{steps}"
    view = VIEW_STAGE.fullmatch(job.stage)
    if view is None:
        stage = job.stage.replace("_", " ").capitalize() or "Starting"
        return (1.0 if job.stage == "saving" else 0.0), f"{stage}…"
    number, views = int(view[1]), int(view[2])
    return (number - 1 + within) / views, f"View {number}/{views}{steps}"


panels.PROGRESS[TASK] = progress


class SDTEX_PT_project(panels.SidebarPanel, bpy.types.Panel):
    bl_label = "Project"
    bl_idname = "SDTEX_PT_project"
    bl_space_type = "VIEW_3D"
    bl_parent_id = "SDTEX_PT_mainpanel_view_3d"
    bl_options = {"DEFAULT_CLOSED"}
    bl_order = panels.panel_order("ProjectPanel")

    def draw(self, context):
        layout = self.layout
        settings = context.scene.sdtex_project
        layout.prop(settings, "controlnet")
        if not settings.controlnet.strip():  # empty: the model family's standard depth ControlNet
            hub_id, family = projecting.default_controlnet(status.scene_model(context))
            column = layout.column(align=True)
            column.label(text=f"Empty: {family} depth ControlNet", icon="INFO")
            column.label(text=f"{hub_id} (downloaded on first use)", icon="BLANK1")
        layout.prop(settings, "targets")
        layout.prop(settings, "views")
        if "ORBIT" in settings.views:
            col = layout.column(align=True)
            col.prop(settings, "views_per_ring")
            col.prop(settings, "elevation")
            col.prop(settings, "both_sides")
            col.prop(settings, "fov")
        elif settings.views == "COVERAGE":
            layout.prop(settings, "fov")
        layout.prop(settings, "mode", expand=True)
        col = layout.column(align=True)
        col.prop(settings, "texture_size")
        col.prop(settings, "margin")
        col.prop(settings, "sync_until" if settings.mode == "synchronized" else "refine_below")
        col.prop(settings, "controlnet_scale")
        if settings.mode == "sequential":  # synchronized views agree already
            layout.prop(settings, "match_colors")
        layout.prop(settings, "uv_map")
        row = layout.row()
        row.prop(settings, "occlude")
        row.prop(settings, "allow_uv_overlap")
        layout.prop(settings, "apply_unseen")
        if project_jobs():
            for job in project_jobs():
                panels.draw_progress(layout.row(), *progress(job))
            layout.operator("sdtex.project_cancel", icon="CANCEL")
        else:
            layout.operator("sdtex.project", icon="MOD_UVPROJECT")
        if Running.message:  # one clause a line, each wrapped to the sidebar's width
            panels.draw_message(layout, Running.message.replace("; ", "\n"), False, context.region.width)


classes = (SDTEX_PG_project, SDTEX_OT_project, SDTEX_OT_project_cancel, SDTEX_PT_project)


def register() -> None:
    bpy.types.Scene.sdtex_project = PointerProperty(type=SDTEX_PG_project)


def unregister() -> None:
    del bpy.types.Scene.sdtex_project
