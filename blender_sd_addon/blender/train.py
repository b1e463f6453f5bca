"""Teach the model a subject or a style in Blender: the "Train" sub-panel (photos folder, token, what it is, a
subject/style preset, steps) runs the train_lora job with a progress bar, a loss sparkline and sample thumbnails;
Cancel leaves a checkpoint that Resume continues. The "LoRAs" sub-panel lists LoRA files with weights for
generation; a finished training adds its LoRA there at once.

The generate operator takes the list with `generation_loras(scene)` (a `loras` parameter of every generating
task). A training job is a row on the UI's one job board like any other; its samples and its LoRA are taken here
(ui_jobs.WATCHERS / FINISHERS), since its result is a LoRA, not images to apply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from .. import readiness
from ..client import SDTexError
from ..contract import protocol
from ..jobs import CANCELLED, DONE, Job
from . import panels, session, tasks, ui_jobs
from .operator_base import SDTexOperator
from .properties import param_property
from .results import add_training_history
from .ui_state import Target

TASK = "train_lora"
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
THUMBNAILS = 4  # sample images shown, the latest last
# Presets: a subject (an object, a material) learns with prior preservation, a style without, at a higher rank.
PRESETS = {
    "SUBJECT": {"steps": 500, "rank": 4, "learning_rate": 1e-4, "prior": True},
    "STYLE": {"steps": 1000, "rank": 16, "learning_rate": 1e-4, "prior": False},
}
LORA_ITEMS = {p.name: p for p in protocol.param("loras").items}
LORA_FOLDER = "loras"  # beside the .blend (//loras/), else in the user data folder: not among the textures
PHASES = {"class_images": "Class images", "training": "Training"}  # the stages that count steps
SKIPPED_SHOWN = 3  # skipped photos named in the panel (all of them are in the console)


def sparkline(values: list[float], width: int = 32) -> str:
    """The values as a line of block characters (the mean of each of `width` buckets), low to high."""
    if not values:
        return ""
    buckets = min(width, len(values))
    means = [
        sum(chunk) / len(chunk)
        for chunk in (values[i * len(values) // buckets : (i + 1) * len(values) // buckets] for i in range(buckets))
    ]
    low, high = min(means), max(means)
    scale = (len(SPARK_BLOCKS) - 1) / (high - low) if high > low else 0.0
    return "".join(SPARK_BLOCKS[round((m - low) * scale)] for m in means)


def prompts(preset: str, token: str, subject: str) -> tuple[str, str]:
    """(instance prompt, class prompt) for a preset: "a photo of sks wood" / "a photo of wood" for a subject;
    "wood in sks style" and no class prompt for a style."""
    subject = subject.strip() or ("texture" if preset == "STYLE" else "object")
    if preset == "STYLE":
        return f"{subject} in {token} style", ""
    return f"a photo of {token} {subject}", f"a photo of {subject}"


# --- following a training job -----------------------------------------------------------------------------


@dataclass
class TrainState:
    job: Job | None = None  # the latest training job (a row on the UI's job board while it runs)
    samples: list[str] = field(default_factory=list)  # bpy image names of the sample images, in order
    checkpoint: str = ""  # the last checkpoint written (Resume continues it)
    seen: int = 0  # artifacts of the job taken so far
    message: str = ""
    is_error: bool = False
    earlier_losses: list[float] = field(default_factory=list)  # a resumed run's losses before it (the sparkline)
    skipped: list[str] = field(default_factory=list)  # "photo.jpg: why", for the files the last run could not use


STATE = TrainState()


def _take_artifacts(job: Job) -> None:
    """Load the new sample images (thumbnails) and remember the last checkpoint."""
    for artifact in job.artifacts[STATE.seen :]:
        if artifact.kind == "sample" and os.path.isfile(artifact.path):
            STATE.samples.append(bpy.data.images.load(artifact.path, check_existing=True).name)
        elif artifact.kind == "checkpoint":
            STATE.checkpoint = artifact.path
    STATE.seen = len(job.artifacts)


def use_lora(scene, path: str) -> None:
    """A LoRA (a finished training, or its history record applied again) enabled in the LoRA list, added if missing."""
    loras = scene.sdtex_train.loras
    entry = next((e for e in loras if bpy.path.abspath(e.filepath) == path), None) or loras.add()
    entry.filepath, entry.enabled = path, True


def _finished(scene: bpy.types.Scene, job: Job) -> None:
    """A finished job: its LoRA joins the LoRA list (enabled), or the reason it stopped is shown."""
    if job.state == DONE:
        result = protocol.TrainResult.from_dict(job.data)
        use_lora(scene, result.lora)
        add_training_history(result)
        STATE.checkpoint, STATE.earlier_losses = "", []
        job.losses[:] = result.losses  # every step's, the checkpoint's included
        STATE.skipped = [f"{os.path.basename(s['path'])}: {s['reason']}" for s in result.skipped]
        for line in STATE.skipped:
            print(f"SD Textures: skipped photo {line}")
        STATE.message, STATE.is_error = f"LoRA saved: {os.path.basename(result.lora)} (loss {result.loss:.4f})", False
    elif job.state == CANCELLED:
        STATE.message = "Cancelled" + (f": Resume continues from {STATE.checkpoint}" if STATE.checkpoint else "")
        STATE.is_error = False
    else:
        STATE.message, STATE.is_error = job.status_text, True


def _on_board_finished(job: Job, target: Target) -> None:
    _take_artifacts(job)
    _finished(bpy.context.scene, job)


ui_jobs.WATCHERS[TASK] = _take_artifacts  # samples show up while it trains
panels.PROGRESS[TASK] = lambda job: (job.fraction, progress_text(job))
ui_jobs.FINISHERS[TASK] = _on_board_finished


def lora_folder() -> str:
    """Where LoRAs and checkpoints go: a loras folder beside the .blend, else in the user data folder."""
    if bpy.data.filepath:
        return os.path.abspath(bpy.path.abspath(f"//{LORA_FOLDER}/"))
    return str(session.user_data_dir() / LORA_FOLDER)


def all_losses(job: Job) -> list[float]:
    """The sparkline's values: a resumed run's earlier losses first, so Resume does not start the line again."""
    return STATE.earlier_losses + job.losses


def start(scene: bpy.types.Scene, resume_from: str = "") -> Job:
    """Start training with the panel's settings on the UI's job board; in background mode block until it ends."""
    settings = scene.sdtex_train.train_settings() | {"resume_from": resume_from}
    params = tasks.task_params(TASK, settings, output_dir=lora_folder())
    earlier = all_losses(STATE.job) if resume_from and STATE.job is not None else []
    STATE.samples, STATE.seen, STATE.message, STATE.skipped, STATE.earlier_losses = [], 0, "", [], earlier
    if bpy.app.background:  # no timers run: wait here, passing the events to the job
        client = session.get_client()
        STATE.job = job = Job.submit(client, TASK, params)
        job.handle(client.wait(job.request_id, on_event=job.handle))
        _on_board_finished(job, Target((), None, False))
    else:
        STATE.job = ui_jobs.submit_ui(TASK, params, Target((), None, False))
    return STATE.job


def generation_loras(scene: bpy.types.Scene) -> list[dict]:
    """The enabled LoRAs of the list, as a generating task's `loras` parameter."""
    return [
        {"model": bpy.path.abspath(entry.filepath), "weight": entry.weight}
        for entry in scene.sdtex_train.loras
        if entry.enabled and entry.filepath.strip()
    ]


# --- settings -------------------------------------------------------------------------------------------


def _apply_preset(self, context) -> None:
    for name, value in PRESETS[self.preset].items():
        setattr(self, name, value)


class SDTEX_PG_lora(bpy.types.PropertyGroup):
    enabled: BoolProperty(name="Use", description="Apply this LoRA when generating", default=True)
    filepath: StringProperty(name="LoRA", description=LORA_ITEMS["model"].help, subtype="FILE_PATH")
    weight: FloatProperty(
        name="Weight", description=LORA_ITEMS["weight"].help, default=LORA_ITEMS["weight"].default,
        min=LORA_ITEMS["weight"].range.low, max=LORA_ITEMS["weight"].range.high, soft_min=-1.0, soft_max=2.0,
    )  # fmt: skip


class SDTEX_PG_train(bpy.types.PropertyGroup):
    photos_dir: StringProperty(name="Photos", description=protocol.param("photos_dir", TASK).help, subtype="DIR_PATH")
    token: param_property("token", TASK)
    subject: StringProperty(
        name="What", description="What the photos show, in a word or two (wood, sneaker, watercolour)", default=""
    )
    preset: EnumProperty(
        name="Preset",
        items=[
            ("SUBJECT", "Subject", "A thing or material: prior preservation keeps the rest of its class intact"),
            ("STYLE", "Style", "A look to apply to anything: higher rank, no class images"),
        ],
        update=_apply_preset,
    )
    prior: BoolProperty(name="Prior Preservation", description=protocol.param("class_prompt", TASK).help, default=True)
    steps: param_property("steps", TASK)
    learning_rate: param_property("learning_rate", TASK, precision=6)
    rank: param_property("rank", TASK)
    resolution: param_property("resolution", TASK)
    batch_size: param_property("batch_size", TASK)
    train_text_encoder: param_property("train_text_encoder", TASK)
    sample_prompt: param_property("sample_prompt", TASK)
    sample_every: param_property("sample_every", TASK)
    loras: CollectionProperty(type=SDTEX_PG_lora)
    active_lora: IntProperty(name="LoRA", default=0)

    def train_settings(self) -> dict:
        """The train_lora parameters the panel sets (tasks.task_params adds model, device and output)."""
        instance, class_prompt = prompts(self.preset, self.token, self.subject)
        if not self.photos_dir.strip():
            raise SDTexError("photos_dir: choose the folder of photos to train on")
        return {
            "photos_dir": bpy.path.abspath(self.photos_dir), "token": self.token, "instance_prompt": instance,
            "class_prompt": class_prompt if self.prior else "", "steps": self.steps,
            "learning_rate": self.learning_rate, "rank": self.rank, "resolution": self.resolution,
            "batch_size": self.batch_size, "train_text_encoder": self.train_text_encoder,
            "sample_prompt": self.sample_prompt, "sample_every": self.sample_every,
            "checkpoint_every": max(self.steps // 4, 1) if self.steps >= 400 else 0,
        }  # fmt: skip


# --- operators ------------------------------------------------------------------------------------------


class SDTEX_OT_train(SDTexOperator, bpy.types.Operator):
    """Train a LoRA on the photos (DreamBooth); it joins the LoRA list when done"""

    bl_idname = "sdtex.train"
    bl_label = "Train"

    resume: BoolProperty(name="Resume", description="Continue from the last checkpoint", default=False)

    @classmethod
    def poll(cls, context):
        return STATE.job is None or STATE.job.finished

    def run(self, context, props: dict) -> None:
        if props["resume"] and not STATE.checkpoint:
            raise SDTexError("No checkpoint to resume: a cancelled training leaves one")
        job = start(context.scene, STATE.checkpoint if props["resume"] else "")
        if job.finished and job.state not in (DONE, CANCELLED):
            raise SDTexError(job.status_text)

    def fail(self, message: str) -> set[str]:
        STATE.message, STATE.is_error = message, True  # the Train panel's own message line
        return super().fail(message)


class SDTEX_OT_train_cancel(bpy.types.Operator):
    """Stop training; a checkpoint is saved, and Resume continues from it"""

    bl_idname = "sdtex.train_cancel"
    bl_label = "Cancel Training"

    @classmethod
    def poll(cls, context):
        return STATE.job is not None and not STATE.job.finished

    def execute(self, context):
        STATE.job.cancel()
        return {"FINISHED"}


class SDTEX_OT_lora_add(bpy.types.Operator):
    """Add a row to the LoRA list (choose its file)"""

    bl_idname = "sdtex.lora_add"
    bl_label = "Add LoRA"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        train = context.scene.sdtex_train
        if len(train.loras) >= protocol.LORAS_MAX:
            self.report({"ERROR"}, f"At most {protocol.LORAS_MAX} LoRAs at once")
            return {"CANCELLED"}
        train.loras.add()
        train.active_lora = len(train.loras) - 1
        return {"FINISHED"}


class SDTEX_OT_lora_choose(bpy.types.Operator):
    """Choose this LoRA's file"""

    bl_idname = "sdtex.lora_choose"
    bl_label = "Choose LoRA File"
    bl_options = {"REGISTER", "UNDO", "INTERNAL"}

    index: IntProperty(name="Row", description="The row of the LoRA list", default=0, min=0)
    filepath: StringProperty(subtype="FILE_PATH")
    filter_glob: StringProperty(default="*.safetensors", options={"HIDDEN"})

    @classmethod
    def description(cls, context, properties):
        """The full path as the tooltip: the list shows the file's name only."""
        loras = context.scene.sdtex_train.loras
        path = loras[properties.index].filepath if properties.index < len(loras) else ""
        return bpy.path.abspath(path) if path else cls.__doc__

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        loras = context.scene.sdtex_train.loras
        if self.index >= len(loras):
            self.report({"ERROR"}, f"No LoRA in row {self.index + 1}")
            return {"CANCELLED"}
        loras[self.index].filepath = self.filepath
        return {"FINISHED"}


class SDTEX_OT_lora_remove(bpy.types.Operator):
    """Remove the selected LoRA from the list (the file stays)"""

    bl_idname = "sdtex.lora_remove"
    bl_label = "Remove LoRA"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return len(context.scene.sdtex_train.loras) > 0

    def execute(self, context):
        train = context.scene.sdtex_train
        train.loras.remove(train.active_lora)
        train.active_lora = max(0, min(train.active_lora, len(train.loras) - 1))
        return {"FINISHED"}


# --- panels ---------------------------------------------------------------------------------------------


class SDTEX_UL_loras(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_property, index=0, flt_flag=0):
        row = layout.row(align=True)
        row.prop(item, "enabled", text="")
        # The file's name, whole (a path would be cut in the middle); the full path is the button's tooltip.
        name = os.path.basename(bpy.path.abspath(item.filepath).rstrip("/\\")) or "Choose File…"
        row.operator("sdtex.lora_choose", text=name, icon="FILEBROWSER", emboss=False).index = index
        row.prop(item, "weight", text="")


def progress_text(job: Job) -> str:
    """ "Class images 35/50" while it makes the prior images, "Training 10/40 · loss 0.1234" while it trains."""
    phase = PHASES.get(job.stage)
    if phase is None or not job.total or job.cancelling:
        return job.status_text
    loss = f" · loss {job.losses[-1]:.4f}" if phase == PHASES["training"] and job.losses else ""
    return f"{phase} {job.step}/{job.total}{loss}"


def unavailable_line() -> readiness.Line | None:
    """Why the running backend cannot train (its handshake says), or None."""
    client = session.current_client()
    shake = client.handshake if client and client.alive else None
    remote = session.remote_settings() is not None
    return readiness.feature_line(shake.unavailable if shake else {}, "train_lora", remote)


class TrainPanel(panels.SidebarPanel):
    bl_label = "Train"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        train = context.scene.sdtex_train
        blocked = unavailable_line()
        if blocked:
            panels.draw_line(layout.box(), blocked, context.region.width)
        layout.prop(train, "photos_dir")
        layout.row().prop(train, "preset", expand=True)
        col = layout.column(align=True)
        col.prop(train, "token")
        col.prop(train, "subject")
        instance, class_prompt = prompts(train.preset, train.token, train.subject)
        layout.label(text=instance, icon="SORTALPHA")
        if train.preset == "SUBJECT":
            layout.prop(train, "prior", text=f"Prior: {class_prompt}")
        col = layout.column(align=True)
        col.prop(train, "steps")
        col.prop(train, "rank")
        col.prop(train, "learning_rate")
        col.prop(train, "resolution")
        col.prop(train, "batch_size")
        layout.prop(train, "train_text_encoder")
        row = layout.row(align=True)
        row.prop(train, "sample_every", text="Sample Every")
        layout.prop(train, "sample_prompt", text="Sample")
        job = STATE.job
        if job is not None and not job.finished:
            row = layout.row(align=True)
            panels.draw_progress(row, *panels.job_progress(job))
            row.operator("sdtex.train_cancel", text="", icon="CANCEL")
        else:
            row = layout.row(align=True)
            row.enabled = blocked is None  # the worker would refuse it with the same reason
            row.operator("sdtex.train", icon="OUTLINER_OB_ARMATURE").resume = False
            if STATE.checkpoint:
                row.operator("sdtex.train", text="Resume", icon="PLAY").resume = True
        if job is not None and all_losses(job):
            layout.label(text=sparkline(all_losses(job)), icon="GRAPH")
        shown = [bpy.data.images[name] for name in STATE.samples[-THUMBNAILS:] if name in bpy.data.images]
        if shown:
            grid = layout.grid_flow(columns=len(shown), even_columns=True, align=True)
            for image in shown:
                image.preview_ensure()
                grid.template_icon(icon_value=image.preview.icon_id, scale=4.0)
        if STATE.message:
            panels.draw_message(layout, STATE.message, STATE.is_error, context.region.width)
        draw_skipped(layout, context.region.width)


def draw_skipped(layout, width: int) -> None:
    """The photos the last run could not use, and why (they were only in backend.log)."""
    if not STATE.skipped:
        return
    more = len(STATE.skipped) - SKIPPED_SHOWN
    text = f"Skipped {len(STATE.skipped)} photo{'s' if len(STATE.skipped) > 1 else ''}: " + "; ".join(
        STATE.skipped[:SKIPPED_SHOWN]
    ) + (f"; and {more} more (listed in the console)" if more > 0 else "")
    panels.draw_message(layout, text, False, width)


class LorasPanel(panels.SidebarPanel):
    bl_label = "LoRAs"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        train = context.scene.sdtex_train
        row = self.layout.row()
        row.template_list("SDTEX_UL_loras", "", train, "loras", train, "active_lora", rows=2)
        col = row.column(align=True)
        col.operator("sdtex.lora_add", text="", icon="ADD")
        col.operator("sdtex.lora_remove", text="", icon="REMOVE")


classes = (
    SDTEX_PG_lora,
    SDTEX_PG_train,
    SDTEX_OT_train,
    SDTEX_OT_train_cancel,
    SDTEX_OT_lora_add,
    SDTEX_OT_lora_choose,
    SDTEX_OT_lora_remove,
    SDTEX_UL_loras,
    *panels._for_each_space(LorasPanel, parent="mainpanel"),
    *panels._for_each_space(TrainPanel, parent="mainpanel"),
)


def register() -> None:
    bpy.types.Scene.sdtex_train = PointerProperty(type=SDTEX_PG_train)


def unregister() -> None:
    STATE.job, STATE.samples, STATE.seen, STATE.checkpoint, STATE.message = None, [], 0, "", ""
    del bpy.types.Scene.sdtex_train
