"""Operators: read properties into plain values, call api.py, turn SDTexError into a report.

In the UI `sdtex.generate` returns at once and a `bpy.app.timers` callback follows the job; in
background mode (`blender -b`) it blocks until the material is applied.
"""

from __future__ import annotations

import os
import random
import threading
import traceback
from dataclasses import dataclass

import bpy
from bpy.props import BoolProperty, EnumProperty, StringProperty

from .. import api, protocol
from ..client import SDTexError
from ..history import HistoryRecord
from ..jobs import CANCELLED, DONE, Job
from . import materials, preview
from .properties import INT32_MAX

POLL_INTERVAL = 0.01  # seconds between timer polls while a job runs: a cheap mailbox check, and the
# result waits at most this long (0.05 s cost 25 ms per job on average, over the 20 ms overhead budget)
REDRAW_AREAS = {"VIEW_3D", "IMAGE_EDITOR", "NODE_EDITOR", "PREFERENCES"}


@dataclass
class UIState:
    """What the panel shows between timer ticks (module state: never saved in the .blend)."""

    job: Job | None = None
    object_names: tuple[str, ...] = ()
    options: materials.ApplyOptions | None = None
    apply: bool = True
    preview_serial: int = 0
    message: str = ""  # the last outcome, shown under the Generate button
    is_error: bool = False
    backend_message: str = ""  # set by the start-up thread: plain Python only, never bpy

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.finished

    def say(self, message: str, is_error: bool = False) -> None:
        self.message, self.is_error = message, is_error
        if is_error:
            print(f"SD Textures: {message}")


STATE = UIState()


def backend_status() -> str:
    client = api.current_client()
    if client is None or not client.alive:
        return "Backend: " + (STATE.backend_message or "not running")
    shake = client.handshake
    details = f"pid {client.pid}, torch {shake.torch_version}, {'/'.join(shake.devices)}" if shake else "starting"
    return f"Backend: running ({details}) {STATE.backend_message}".rstrip()


def start_backend_async() -> None:
    """Start the worker and load the model in a thread, so Blender stays responsive meanwhile."""
    client = api.get_client()
    params = api.load_model_params()

    def warm_up() -> None:  # runs off the main thread: touches the client and plain strings only
        try:
            STATE.backend_message = "starting…"
            client.start()
            STATE.backend_message = "loading model…"
            client.request(protocol.LOAD_MODEL, params)
            STATE.backend_message = "model loaded"
        except SDTexError as exc:
            STATE.backend_message = f"error: {exc}"

    threading.Thread(target=warm_up, daemon=True, name="sdtex-start").start()


# --- the UI job timer --------------------------------------------------------------------------------


def start_ui_job(params: dict, meshes: list, options: materials.ApplyOptions, apply: bool) -> None:
    """Submit a generation and follow it from a timer; the timer applies the result when it arrives.

    Submitting may have to start the worker (seconds): that happens on a thread, so a click never
    freezes Blender; the job shows "Starting backend…" meanwhile.
    """
    client = api.get_client()  # reads preferences: main thread only
    job = Job("", params, stage="starting_backend")

    def submit() -> None:  # off the main thread: the client and plain Python only, never bpy
        try:
            job.request_id = client.submit(protocol.GENERATE, params)
            if job.state == CANCELLED:  # cancelled while the backend was starting
                client.cancel(job.request_id)
        except SDTexError as exc:
            job.fail(str(exc))

    STATE.job, STATE.object_names = job, tuple(obj.name for obj in meshes)
    STATE.options, STATE.apply, STATE.preview_serial = options, apply, 0
    STATE.say("")
    threading.Thread(target=submit, daemon=True, name="sdtex-submit").start()
    bpy.app.timers.register(_tick, first_interval=POLL_INTERVAL)


def cancel_ui_job() -> None:
    """Ask the worker to stop the UI job; a job still waiting for the backend is dropped at once."""
    job, client = STATE.job, api.current_client()
    if job is None or job.finished:
        return
    if job.request_id and client is not None:
        client.cancel(job.request_id)
    else:
        job.state, job.error = CANCELLED, "Cancelled"


def _tick() -> float | None:
    try:
        return _follow_job()
    except Exception as exc:  # Blender drops a timer that raises: leave a message, not a stuck progress bar
        traceback.print_exc()
        stop_polling()
        STATE.say(f"Internal error: {exc}", is_error=True)
        return None


def _follow_job() -> float | None:
    job, client = STATE.job, api.current_client()
    if job is None or client is None:
        return None
    messages = client.messages(job.request_id) if job.request_id else []
    for message in messages:
        job.handle(message)
    if job.preview and job.preview_serial != STATE.preview_serial:
        STATE.preview_serial = job.preview_serial
        preview.show_preview(job.preview)
    if messages:  # redraw only on news: a redraw per tick can cost more than a step on a slow GPU
        _redraw()
    if not job.finished:
        return POLL_INTERVAL
    if job.state == DONE:
        meshes = [bpy.data.objects[n] for n in STATE.object_names if n in bpy.data.objects]
        try:
            texture = api.finish(job.result, meshes, STATE.options, apply=STATE.apply and bool(meshes))
            if STATE.apply and not meshes:
                raise SDTexError("The objects were deleted while generating; the images are in the history")
            if STATE.apply and bpy.ops.ed.undo_push.poll():  # no undo stack without a window
                bpy.ops.ed.undo_push(message="Apply SD texture")
            folder = os.path.dirname(texture.files[0])
            STATE.say(f"Saved {len(texture.files)} file(s) in {folder} (seed {texture.seed})")
        except SDTexError as exc:
            STATE.say(str(exc), is_error=True)
    else:
        STATE.say(job.status_text, is_error=job.state != "cancelled")
    _redraw()
    return None


def _redraw() -> None:
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in REDRAW_AREAS:
                area.tag_redraw()


def stop_polling() -> None:
    """Forget the UI job (unregister, new file): cancel it and stop the timer."""
    cancel_ui_job()
    STATE.job = None
    if bpy.app.timers.is_registered(_tick):
        bpy.app.timers.unregister(_tick)


# --- operators -----------------------------------------------------------------------------------------


class SDTEX_OT_generate(bpy.types.Operator):
    """Generate a texture from the prompt and put it on the selected meshes"""

    bl_idname = "sdtex.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER", "UNDO"}

    apply: BoolProperty(name="Apply", description="Put the result on the selected meshes", default=True)

    def execute(self, context):
        settings = context.scene.sdtex
        try:
            if STATE.running:
                raise SDTexError("A generation is already running: wait for it or cancel it")
            options = api.apply_options(
                settings.shared_material, settings.slot, settings.projection, settings.texture_scale
            )
            meshes = api.mesh_objects(context.selected_objects) if self.apply else []
            seed = None if settings.random_seed else settings.seed
            # A seed the panel can show again (IntProperty is 32-bit) instead of the backend's wider pick.
            seed = random.randint(0, INT32_MAX) if seed is None else seed
            generate = settings.generate_settings(seed) | {"preview_every": 0 if bpy.app.background else 1}
            params = api.generate_params(generate, model=settings.model or None)
            if bpy.app.background:
                texture = api.finish(api.run(params), meshes, options, apply=self.apply)
                self.report({"INFO"}, f"Saved {len(texture.files)} file(s) in {os.path.dirname(texture.files[0])}")
            else:
                start_ui_job(params, meshes, options, self.apply)
        except SDTexError as exc:
            STATE.say(str(exc), is_error=True)
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


class SDTEX_OT_cancel(bpy.types.Operator):
    """Stop the running generation"""

    bl_idname = "sdtex.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context):
        return STATE.running

    def execute(self, context):
        cancel_ui_job()
        return {"FINISHED"}


def _active_record(context) -> HistoryRecord:
    settings = context.scene.sdtex
    if not 0 <= settings.history_index < len(settings.history):
        raise SDTexError("Pick an entry in the history first")
    return HistoryRecord.from_fields(settings.history[settings.history_index])


class SDTEX_OT_apply_history(bpy.types.Operator):
    """Put the selected history entry's image on the selected meshes again"""

    bl_idname = "sdtex.apply_history"
    bl_label = "Apply Again"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        settings = context.scene.sdtex
        try:
            record = _active_record(context)
            image = record.images()[0]
            if not os.path.isfile(image.path):
                raise SDTexError(f"The image file is gone: {image.path}")
            options = api.apply_options(
                settings.shared_material, settings.slot, settings.projection, settings.texture_scale
            )
            api.apply_image(image, api.mesh_objects(context.selected_objects), options, record.settings())
        except SDTexError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


class SDTEX_OT_use_history_settings(bpy.types.Operator):
    """Copy the selected history entry's prompt, seed and settings into the panel"""

    bl_idname = "sdtex.use_history_settings"
    bl_label = "Use These Settings"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        settings = context.scene.sdtex
        try:
            record = _active_record(context)
        except SDTexError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        for name, value in record.settings().items():
            if name == "seed":
                settings.random_seed = value > INT32_MAX
                settings.seed = value if value <= INT32_MAX else settings.seed
            elif name == "model":  # keep following the preferences when the entry used their model
                settings.model = "" if value == api.load_model_params()["model"] else value
            else:
                setattr(settings, name, value)
        if record.seed > INT32_MAX:
            self.report({"WARNING"}, f"Seed {record.seed} is above the panel's limit {INT32_MAX}: left random")
        return {"FINISHED"}


class SDTEX_OT_tile_preview(bpy.types.Operator):
    """Show the image repeated 2x2 in the Image Editor, to check that it tiles"""

    bl_idname = "sdtex.tile_preview"
    bl_label = "Tile Preview"

    filepath: StringProperty(
        name="Image", description="Image file; empty uses the selected history entry", subtype="FILE_PATH"
    )

    def execute(self, context):
        try:
            path = self.filepath or _active_record(context).images()[0].path
            materials.show_tile_preview(bpy.path.abspath(path))
        except (SDTexError, ValueError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


class SDTEX_OT_start_backend(bpy.types.Operator):
    """Start the backend and load the model now"""

    bl_idname = "sdtex.start_backend"
    bl_label = "Start Backend"

    def execute(self, context):
        try:
            if bpy.app.background:
                api.get_client().start()
            else:
                start_backend_async()
        except SDTexError as exc:
            STATE.backend_message = f"error: {exc}"
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


class SDTEX_OT_stop_backend(bpy.types.Operator):
    """Stop the backend (frees its memory; it starts again on the next generation)"""

    bl_idname = "sdtex.stop_backend"
    bl_label = "Stop Backend"

    def execute(self, context):
        stop_polling()
        api.shutdown_backend()
        STATE.backend_message = "stopped"
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
        owner = api.preferences() if self.target == "PREFERENCES" else context.scene.sdtex
        owner.model = path.rstrip("/\\") if os.path.isdir(path) else path
        return {"FINISHED"}


classes = (
    SDTEX_OT_generate,
    SDTEX_OT_cancel,
    SDTEX_OT_apply_history,
    SDTEX_OT_use_history_settings,
    SDTEX_OT_tile_preview,
    SDTEX_OT_start_backend,
    SDTEX_OT_stop_backend,
    SDTEX_OT_browse_model,
)
