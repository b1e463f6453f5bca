"""Operators: read properties into plain values, call api.py, turn SDTexError into a report.

In the UI `sdtex.generate`, `sdtex.derive_pbr_maps` and `sdtex.image_task` return at once and a
`bpy.app.timers` callback follows the job; in background mode (`blender -b`) they block until the material
is applied.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, StringProperty

from .. import api, installer, messages, model_catalog, paths, protocol, readiness
from ..client import BackendClient, SDTexError
from ..history import IMAGE_TASKS, HistoryRecord
from ..jobs import CANCELLED, DONE, Job, JobBoard
from . import images, materials, preview
from .properties import INT32_MAX, SCENE_CONTROLS

POLL_INTERVAL = 0.01  # seconds between timer polls while a job runs: a cheap mailbox check, and the
# result waits at most this long (0.05 s cost 25 ms per job on average, over the 20 ms overhead budget)
REDRAW_AREAS = {"VIEW_3D", "IMAGE_EDITOR", "NODE_EDITOR", "PREFERENCES"}
FACTS_TTL = 0.5  # seconds a readiness check is reused: panels redraw often, the check looks at files


@dataclass
class Target:
    """Where a UI job's result goes: names, not objects (objects may be deleted while it runs)."""

    object_names: tuple[str, ...]
    options: materials.ApplyOptions | None
    apply: bool
    source: str = ""  # the input image, by name: a pbr job's albedo, an image task's source
    mask: str = ""  # an inpaint job's mask image, by name


@dataclass(eq=False)
class Upload:
    """A job whose input images are on their way to the worker. Uploading waits for the worker to start, so
    it runs on a thread; the timer submits the job (main thread) once the bytes are there."""

    client: BackendClient
    task: str
    params: dict
    target: Target
    done: threading.Event = field(default_factory=threading.Event)
    error: str = ""  # set by the thread: plain Python only, never bpy
    cancelled: bool = False

    def send(self, uploads: list[bytes]) -> None:
        try:
            for data in uploads:
                self.client.upload(data)
        except SDTexError as exc:
            self.error = f"Could not send the image: {exc}"
        finally:
            self.done.set()


@dataclass
class UIState:
    """What the panel shows between timer ticks (module state: never saved in the .blend)."""

    board: JobBoard = field(default_factory=JobBoard)
    targets: dict[str, Target] = field(default_factory=dict)  # request id -> where its result goes
    uploads: list[Upload] = field(default_factory=list)  # jobs waiting for their input to be uploaded
    preview_serial: tuple[str, int] = ("", 0)  # the last preview shown: (request id, serial)
    message: str = ""  # the last outcome, shown under the Generate button (an error in the panel's words)
    details: str = ""  # an error's whole text, as the backend gave it (the Details popup)
    is_error: bool = False
    backend_message: str = ""  # set by the start-up thread: plain Python only, never bpy
    readiness: tuple[float, readiness.Readiness] | None = None  # (when, what): reused for FACTS_TTL

    @property
    def running(self) -> bool:
        return bool(self.board.active or self.uploads)

    def say(self, message: str, is_error: bool = False) -> None:
        self.message, self.details, self.is_error = message, message, is_error
        if is_error:
            print(f"SD Textures: {message}")  # the precise text; the panel shows it in its own words
            self.message = messages.readable(message)

    def clear_fixed_error(self, settings) -> None:
        """Forget an error about a panel field once the field holds a value it accepts (a stale "Prompt is
        empty" under a prompt someone has typed misleads)."""
        name = messages.parameter_of(self.details) if self.is_error else ""
        if name and name in settings.bl_rna.properties:
            try:
                protocol.param(name).check(getattr(settings, name))
            except protocol.ProtocolError:
                return
            self.say("")

    def download_job(self) -> Job | None:
        return next((job for job in self.board.active if job.task == "download_model"), None)


STATE = UIState()


def backend_status() -> str:
    client = api.current_client()
    if client is None or not client.alive:
        return "Backend: " + (STATE.backend_message or "not running")
    shake = client.handshake
    details = f"pid {client.pid}, torch {shake.torch_version}, {'/'.join(shake.devices)}" if shake else "starting"
    return f"Backend: running ({details}) {STATE.backend_message}".rstrip()


def scene_model(context) -> str:
    """The model in effect: the scene's own, else the preferences'."""
    own = context.scene.sdtex.model
    return bpy.path.abspath(own) if own else api.load_model_params()["model"]


def check_readiness(context) -> readiness.Readiness:
    """The panel's backend and model lines (readiness.check on facts gathered here, reused briefly)."""
    now = time.monotonic()
    if STATE.readiness and now - STATE.readiness[0] < FACTS_TTL:
        return STATE.readiness[1]
    remote = api.remote_settings()
    try:
        if remote is None:  # a remote backend needs no interpreter here
            paths.find_backend_python(bpy.path.abspath(api.preferences().backend_python), api.user_data_dir())
        interpreter_error = ""
    except SDTexError as exc:
        interpreter_error = str(exc)
    client, install, download = api.current_client(), installer.STATE, STATE.download_job()
    shake = client.handshake if client and client.alive else None
    model = scene_model(context)
    facts = readiness.Facts(
        interpreter_error=interpreter_error,
        installing=install.running,
        install_progress=install.progress,
        install_message=install.message,
        install_failed=install.error,
        running=bool(client and client.alive),
        starting=bool(client and client.starting),
        # A start that failed before any worker existed (no interpreter) is that line's business, not this one's.
        worker_error=STATE.backend_message if client and STATE.backend_message.startswith("error") else "",
        device="/".join(shake.devices[:1]) if shake else "",
        torch_version=shake.torch_version if shake else "",
        remote=remote.address if remote else "",
        model=model,
        model_state="remote" if remote else model_catalog.local_status(model),
        downloading=download is not None,
        download_progress=download.fraction if download else 0.0,
        download_text=download.status_text if download else "",
    )
    STATE.readiness = (now, readiness.check(facts))
    return STATE.readiness[1]


def start_backend_async() -> threading.Thread:
    """Start the worker and load the model in a thread, so Blender stays responsive meanwhile. Only a model
    that is on disk is warmed: a missing one would only make the first Generate wait behind hub look-ups."""
    client = api.get_client()
    params = api.load_model_params()
    on_disk = model_catalog.local_status(params["model"]) in ("file", "folder", "cached")

    def warm_up() -> None:  # runs off the main thread: touches the client and plain strings only
        try:
            STATE.backend_message = "starting…"
            client.start()
            if not on_disk:
                STATE.backend_message = f"ready; the model is not on disk: {params['model']}"
                return
            STATE.backend_message = "loading model…"
            client.request(protocol.LOAD_MODEL, params)
            STATE.backend_message = "model loaded"
        except SDTexError as exc:
            STATE.backend_message = f"error: {exc}"

    thread = threading.Thread(target=warm_up, daemon=True, name="sdtex-start")
    thread.start()
    return thread


# --- the UI job timer --------------------------------------------------------------------------------


def start_ui_job(params: dict, meshes: list, options: materials.ApplyOptions, apply: bool, task: str = "txt2img"):
    """Queue a job and follow it from a timer, which applies its result when it arrives.

    Returns at once: the client queues the request while the worker starts, so a click never freezes
    Blender. Any number of jobs can be queued; each applies to the objects it was started for.
    """
    # get_client reads preferences: main thread only
    job = _submit(api.get_client(), task, params, Target(tuple(obj.name for obj in meshes), options, apply))
    _follow()
    return job


def start_ui_pbr_job(
    image: bpy.types.Image, params: dict, meshes: list, options: materials.ApplyOptions, apply: bool
) -> Job | Upload:
    """Queue a pbr job for `image` (start_ui_input_job)."""
    return start_ui_input_job("pbr", {"image": image}, params, meshes, options, apply)


def start_ui_input_job(
    task: str, inputs: dict, params: dict, meshes: list, options: materials.ApplyOptions, apply: bool
) -> Job | Upload:
    """Queue a job whose image inputs (name -> bpy Image, "image" among them) are Blender images, like
    start_ui_job; images that are not files are uploaded first, on a thread, and the job follows once their
    bytes are there."""
    sources = {}
    for name, image in inputs.items():  # reads pixels: main thread
        try:
            sources[name] = images.image_source(image)
        except ValueError as exc:
            raise SDTexError(str(exc) if name == "image" else f"{name}: {exc}") from None
    client = api.get_client()
    mask = inputs.get("mask")
    target = Target(
        tuple(obj.name for obj in meshes), options, apply, source=inputs["image"].name, mask=mask.name if mask else ""
    )
    # Bytes are named by their digest, as the worker will store them.
    references = {
        name: {"path": source} if isinstance(source, str) else {"sha256": hashlib.sha256(source).hexdigest()}
        for name, source in sources.items()
    }
    uploads = [source for source in sources.values() if isinstance(source, bytes)]
    if not uploads:
        started = _submit(client, task, params | references, target)
    else:
        started = Upload(client, task, params | references, target)
        STATE.uploads.append(started)
        threading.Thread(target=started.send, args=(uploads,), daemon=True, name="sdtex-upload").start()
    _follow()
    return started


def _submit(client: BackendClient, task: str, params: dict, target: Target) -> Job:
    job = STATE.board.submit(client, task, params)
    STATE.targets[job.request_id] = target
    return job


def _follow() -> None:
    STATE.say("")
    if not bpy.app.timers.is_registered(_tick):
        bpy.app.timers.register(_tick, first_interval=POLL_INTERVAL)


def cancel_ui_jobs(request_id: str = "") -> None:
    """Ask the worker to stop one UI job (by request id) or all of them (uploading ones included)."""
    for job in STATE.board.active:
        if not request_id or job.request_id == request_id:
            job.cancel()
    if not request_id:
        for upload in STATE.uploads:
            upload.cancelled = True


def _tick() -> float | None:
    try:
        return _follow_jobs()
    except Exception as exc:  # Blender drops a timer that raises: leave a message, not a stuck progress bar
        traceback.print_exc()
        stop_polling()
        STATE.say(f"Internal error: {exc}", is_error=True)
        return None


def _follow_jobs() -> float | None:
    uploaded = _submit_uploaded()
    finished = STATE.board.poll()
    changed = STATE.board.changed
    for job in changed:
        serial = (job.request_id, job.preview_serial)
        if job.preview and not job.finished and serial != STATE.preview_serial:
            STATE.preview_serial = serial
            preview.show_preview(job.preview)
    for job in finished:
        _finish(job, STATE.targets.pop(job.request_id, Target((), None, False)))
    if changed or uploaded:  # redraw only on news: a redraw per tick can cost more than a step on a slow GPU
        _redraw()
    return POLL_INTERVAL if STATE.running else None


def _submit_uploaded() -> list[Upload]:
    """Submit the jobs whose input arrived (or report why it did not); return the uploads that ended."""
    ended = [upload for upload in STATE.uploads if upload.done.is_set()]
    for upload in ended:
        STATE.uploads.remove(upload)
        if upload.cancelled:
            STATE.say("Cancelled")
        elif upload.error:
            STATE.say(upload.error, is_error=True)
        else:
            _submit(upload.client, upload.task, upload.params, upload.target)
    return ended


def _finish(job: Job, target: Target) -> None:
    """Apply a finished job's result to the objects it was started for, and say how it went."""
    STATE.readiness = None  # a download or a worker's start changes what the panel says
    if job.state != DONE:
        if job.state == CANCELLED:
            STATE.say("Cancelled")
        else:
            STATE.say(job.error or job.status_text, is_error=True)
        return
    if job.result is None:  # a job that made no images (a download)
        model = str((job.data or {}).get("model", ""))
        STATE.say(f"Downloaded {model}: ready to generate" if job.task == "download_model" else "Done")
        return
    meshes = [bpy.data.objects[n] for n in target.object_names if n in bpy.data.objects]
    try:
        apply = target.apply and bool(meshes)
        texture = api.finish(job.result, meshes, target.options, apply=apply, source=target.source, mask=target.mask)
        if job.result.task in IMAGE_TASKS:
            show_result(target.source, texture.images[0])
        elif job.result.task == "txt2img":
            show_result(preview.PREVIEW_NAME, texture.images[0])  # the final image, not the last step's preview
        if target.apply and not meshes:
            raise SDTexError("The objects were deleted while generating; the images are in the history")
        if target.apply and bpy.ops.ed.undo_push.poll():  # no undo stack without a window
            bpy.ops.ed.undo_push(message="Apply SD texture")
        STATE.say(saved_message(texture) + (SOLID_HINT if target.apply and solid_viewports() else ""))
    except SDTexError as exc:
        STATE.say(str(exc), is_error=True)


def saved_message(texture: api.TextureResult) -> str:
    seed = "" if texture.seed is None else f" (seed {texture.seed})"
    return f"Saved {len(texture.files)} file(s) in {os.path.dirname(texture.files[0])}{seed}"


SOLID_HINT = "\nThe viewport is in Solid shading: press Material Preview (Z) to see the texture."


def solid_viewports() -> list:
    """The 3D viewports' shading settings that show no textures."""
    return [
        area.spaces.active.shading
        for window in bpy.context.window_manager.windows
        for area in window.screen.areas
        if area.type == "VIEW_3D" and area.spaces.active.shading.type in ("SOLID", "WIREFRAME")
    ]


def show_result(source: str, image: bpy.types.Image) -> None:
    """Show a result in the Image Editors that still show `source` (unpinned ones): an image task's source
    image, or the step preview."""
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            space = area.spaces.active
            if area.type == "IMAGE_EDITOR" and not space.use_image_pin and space.image and space.image.name == source:
                space.image = image


def _redraw() -> None:
    """Redraw the sidebars and preferences that show progress, and the Image Editors' images; never a whole
    3D viewport (with software drawing a viewport redraw costs more than a denoising step)."""
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type not in REDRAW_AREAS:
                continue
            for region in area.regions:
                if region.type == "UI" or area.type in ("PREFERENCES", "IMAGE_EDITOR") and region.type == "WINDOW":
                    region.tag_redraw()


def stop_polling() -> None:
    """Forget the UI jobs (unregister, new file): cancel them and stop the timer."""
    cancel_ui_jobs()
    STATE.board, STATE.targets, STATE.uploads = JobBoard(), {}, []
    if bpy.app.timers.is_registered(_tick):
        bpy.app.timers.unregister(_tick)


# --- operators -----------------------------------------------------------------------------------------


class SDTEX_OT_generate(bpy.types.Operator):
    """Generate a texture from the prompt and put it on the selected meshes"""

    bl_idname = "sdtex.generate"
    bl_label = "Generate"
    # No undo step and no redo panel of its own: the result arrives later and its apply is the one undo
    # step ("Apply SD texture"); a redo panel would re-run a whole generation.
    bl_options = set()

    apply: BoolProperty(name="Apply", description="Put the result on the selected meshes", default=True)

    @classmethod
    def poll(cls, context):
        if bpy.app.background:  # scripts get the backend's own error instead
            return True
        blocker = check_readiness(context).blocker
        if blocker and hasattr(cls, "poll_message_set"):  # Blender 3.0+: the tooltip says why
            cls.poll_message_set(blocker)
        return not blocker

    def execute(self, context):
        settings = context.scene.sdtex
        try:
            options = api.apply_options(**settings.apply_settings())
            meshes = api.mesh_objects(context.selected_objects) if self.apply else []
            seed = None if settings.random_seed else settings.seed
            # A seed the panel can show again (IntProperty is 32-bit) instead of the backend's wider pick.
            seed = random.randint(0, INT32_MAX) if seed is None else seed
            from .train import generation_loras  # train's panels import this module

            generate = settings.generate_settings(seed) | {
                "preview_every": 0 if bpy.app.background else 1,
                "loras": generation_loras(context.scene),
            }
            params = api.generate_params(generate, model=settings.model or None)
            if bpy.app.background:
                texture = api.finish(api.run(params), meshes, options, apply=self.apply)
                self.report({"INFO"}, saved_message(texture))
            else:
                start_ui_job(params, meshes, options, self.apply)
        except SDTexError as exc:
            STATE.say(str(exc), is_error=True)
            self.report({"ERROR"}, STATE.message)
            return {"CANCELLED"}
        return {"FINISHED"}


class SDTEX_OT_derive_pbr_maps(bpy.types.Operator):
    """Make height, normal, roughness and AO maps of the image in the Image Editor (unsaved paint included)"""

    bl_idname = "sdtex.derive_pbr_maps"
    bl_label = "PBR Maps from Image"
    # No undo step and no redo panel of its own: the result arrives later and its apply is the one undo
    # step ("Apply SD texture"); a redo panel would re-run a whole generation.
    bl_options = set()

    apply: BoolProperty(name="Apply", description="Put the image and its maps on the selected meshes", default=True)
    image: StringProperty(name="Image", description="The image's name; empty uses the one the Image Editor shows")

    def execute(self, context):
        settings = context.scene.sdtex
        try:
            image = editor_image(context, self.image, "No image to make maps of: show one in the Image Editor")
            meshes = api.mesh_objects(context.selected_objects) if self.apply else []
            if bpy.app.background:
                texture = api.derive_pbr_maps(
                    image, meshes, apply=self.apply, **settings.pbr_settings(), **settings.apply_settings()
                )
                self.report({"INFO"}, saved_message(texture))
            else:
                options = api.apply_options(**settings.apply_settings())
                params = api.pbr_params(settings.pbr_settings())
                start_ui_pbr_job(image, params, meshes, options, self.apply)
        except (SDTexError, ValueError) as exc:  # ValueError: the image has no pixels to send
            STATE.say(str(exc), is_error=True)
            self.report({"ERROR"}, STATE.message)
            return {"CANCELLED"}
        return {"FINISHED"}


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


class SDTEX_OT_image_task(bpy.types.Operator):
    """Run the chosen task (variations, inpaint, outpaint, upscale, make seamless) on the image in the Image
    Editor; the results are new images, the image itself is never changed"""

    bl_idname = "sdtex.image_task"
    bl_label = "Run Image Task"
    # No undo step and no redo panel of its own: the result arrives later and its apply is the one undo
    # step ("Apply SD texture"); a redo panel would re-run a whole generation.
    bl_options = set()

    apply: BoolProperty(name="Apply", description="Put the result on the selected meshes", default=True)
    image: StringProperty(name="Image", description="The image's name; empty uses the one the Image Editor shows")

    def execute(self, context):
        settings = context.scene.sdtex
        try:
            image = editor_image(context, self.image, "No image to start from: show one in the Image Editor")
            options = api.apply_options(**settings.apply_settings())  # checked first, in both modes
            meshes = api.mesh_objects(context.selected_objects) if self.apply else []
            # A seed the panel can show again (IntProperty is 32-bit) instead of the backend's wider pick.
            seed = random.randint(0, INT32_MAX) if settings.random_seed else settings.seed
            task, values, inputs = settings.image_task_settings(seed)
            names = {p.name for p in protocol.TASK_PARAMS[task]}
            if "preview_every" in names:
                values["preview_every"] = 0 if bpy.app.background else 1
            if "loras" in names:
                from .train import generation_loras  # train's panels import this module

                values["loras"] = generation_loras(context.scene)
            inputs = {"image": image, **inputs}
            model = settings.model or None
            if bpy.app.background:
                apply = {"apply": self.apply, **settings.apply_settings()}
                texture = api.image_task(task, inputs, meshes, model=model, **apply, **values)
                self.report({"INFO"}, saved_message(texture))
            else:
                params = api.image_task_params(task, values, model=model)
                api.check_inputs(task, params, inputs)
                start_ui_input_job(task, inputs, params, meshes, options, self.apply)
        except SDTexError as exc:
            STATE.say(str(exc), is_error=True)
            self.report({"ERROR"}, STATE.message)
            return {"CANCELLED"}
        return {"FINISHED"}


class SDTEX_OT_cancel(bpy.types.Operator):
    """Stop this generation (queued ones never start)"""

    bl_idname = "sdtex.cancel"
    bl_label = "Cancel"

    request_id: StringProperty(name="Job", description="The job to stop; empty stops every job")

    @classmethod
    def poll(cls, context):
        return STATE.running

    def execute(self, context):
        cancel_ui_jobs(self.request_id)
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
            options = api.apply_options(**settings.apply_settings())
            api.apply_record(record, api.mesh_objects(context.selected_objects), options)
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
        # A pbr record's seamless says whether its image tiles: the pbr section's own choice.
        panel_names = {"seamless": "pbr_seamless"} if record.task == "pbr" else {}
        # An image task's own settings go to its section; the rest (prompt, seed...) to the main panel.
        values = settings.restore_image_task(record) if record.task in IMAGE_TASKS else record.settings()
        for name, value in values.items():
            if name == "seed" and value is None:  # a job that sampled nothing (strength 0)
                continue
            if panel_names.get(name, name) not in SCENE_CONTROLS:  # the preferences' device, memory options...
                continue
            if name == "seed":
                settings.random_seed = value > INT32_MAX
                settings.seed = value if value <= INT32_MAX else settings.seed
            elif name == "model":  # keep following the preferences when the entry used their model
                settings.model = "" if value == api.load_model_params()["model"] else value
            else:
                setattr(settings, panel_names.get(name, name), value)
        if record.seed is not None and record.seed > INT32_MAX:
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
            if not path:
                raise SDTexError("This entry's image is not a file (its maps were made from an unsaved image)")
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


_local_models: list[tuple[str, str, str]] = []  # enum items must outlive the callback (Blender keeps pointers)


def _local_model_items(self, context) -> list[tuple[str, str, str]]:
    folder = bpy.path.abspath(api.preferences().models_folder)
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


class SDTEX_OT_download_model(bpy.types.Operator):
    """Download the model from the Hugging Face hub (only the files it needs, half-size weights where the \
repository has them); progress shows in the panel and Cancel stops it"""

    bl_idname = "sdtex.download_model"
    bl_label = "Download Model"

    @classmethod
    def poll(cls, context):
        return STATE.download_job() is None

    def execute(self, context):
        model = scene_model(context)
        try:
            if not model_catalog.HUB_ID.match(model.strip()):
                raise SDTexError(f"Only hub models (like owner/name) can be downloaded; {model!r} is a path")
            job = _submit(api.get_client(), "download_model", {"model": model.strip()}, Target((), None, False))
            _follow()
        except SDTexError as exc:
            STATE.say(str(exc), is_error=True)
            self.report({"ERROR"}, STATE.message)
            return {"CANCELLED"}
        STATE.readiness = None
        self.report({"INFO"}, f"Downloading {model} (job {job.request_id})")
        return {"FINISHED"}


class SDTEX_OT_show_message(bpy.types.Operator):
    """Show the whole message, as the backend wrote it"""

    bl_idname = "sdtex.show_message"
    bl_label = "Details"

    def invoke(self, context, event):
        return context.window_manager.invoke_popup(self, width=min(900, context.window.width - 40))

    def draw(self, context):
        from .panels import message_lines  # panels imports this module

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


class SDTEX_OT_open_folder(bpy.types.Operator):
    """Open the folder the images are written to in the file browser of your system"""

    bl_idname = "sdtex.open_folder"
    bl_label = "Open Folder"

    def execute(self, context):
        folder = api.output_folder(None)
        os.makedirs(folder, exist_ok=True)
        opener = {"win32": ["explorer"], "darwin": ["open"]}.get(sys.platform, ["xdg-open"])
        try:
            subprocess.Popen([*opener, folder])
        except OSError as exc:
            self.report({"ERROR"}, f"Could not open {folder}: {exc}")
            return {"CANCELLED"}
        return {"FINISHED"}


class SDTEX_OT_material_preview(bpy.types.Operator):
    """Switch the 3D viewports in Solid shading to Material Preview, to see the textures"""

    bl_idname = "sdtex.material_preview"
    bl_label = "Show Textures"

    def execute(self, context):
        for shading in solid_viewports():
            shading.type = "MATERIAL"
        if STATE.message.endswith(SOLID_HINT):
            STATE.message = STATE.message[: -len(SOLID_HINT)]
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
        api.preferences().model, settings.model = model, ""
    else:
        settings.model = model
    defaults = model_catalog.defaults_for(model)
    for name in ("width", "height", "steps", "guidance_scale", "scheduler"):
        setattr(settings, name, getattr(defaults, name))
    STATE.readiness = None


classes = (
    SDTEX_OT_generate,
    SDTEX_OT_derive_pbr_maps,
    SDTEX_OT_image_task,
    SDTEX_OT_cancel,
    SDTEX_OT_apply_history,
    SDTEX_OT_use_history_settings,
    SDTEX_OT_tile_preview,
    SDTEX_OT_start_backend,
    SDTEX_OT_stop_backend,
    SDTEX_OT_browse_model,
    SDTEX_OT_pick_model,
    SDTEX_OT_download_model,
    SDTEX_OT_show_message,
    SDTEX_OT_open_preferences,
    SDTEX_OT_open_folder,
    SDTEX_OT_material_preview,
)
