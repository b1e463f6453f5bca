"""The UI job timer: jobs queued from the panel return at once; a `bpy.app.timers` callback follows them on the
one job board (ui_state.STATE.board), shows their previews, and applies each result to the objects it was
started for. Never blocks Blender: input images that must be uploaded go on a thread first.
"""

from __future__ import annotations

import hashlib
import os
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import bpy

from ..client import BackendClient, SDTexError
from ..history import IMAGE_TASKS
from ..jobs import CANCELLED, DONE, Job, JobBoard
from . import images, preview, session, tasks
from .materials import ApplyOptions
from .results import TextureResult, finish
from .ui_state import STATE, Target, Upload

POLL_INTERVAL = 0.01  # seconds between timer polls while a job runs: a cheap mailbox check, and the
# result waits at most this long (0.05 s cost 25 ms per job on average, over the 20 ms overhead budget)
REDRAW_AREAS = {"VIEW_3D", "IMAGE_EDITOR", "NODE_EDITOR", "PREFERENCES"}
# Tasks whose results are not a material on the target objects (train_lora, project, batch entries) register their
# own handling here, by task (or a target's `kind`): every job is still a row on the one board.
WATCHERS: dict[str, Callable[[Job], None]] = {}  # on each poll that brought news (e.g. sample images)
FINISHERS: dict[str, Callable[[Job, Target], None]] = {}  # once finished, however it ended


@dataclass
class JobRequest:
    """A job an operator asks for, in plain values: run at once (background mode) or queued (the UI)."""

    task: str
    params: dict  # checked (tasks.task_params), without the image inputs
    meshes: list
    options: ApplyOptions | None
    apply: bool
    inputs: dict = field(default_factory=dict)  # input name -> bpy.types.Image ("image", "mask")


def start(request: JobRequest) -> Job | Upload:
    """Queue the job on the UI's board; returns at once."""
    if request.inputs:
        return start_ui_input_job(
            request.task, request.inputs, request.params, request.meshes, request.options, request.apply
        )
    return start_ui_job(request.params, request.meshes, request.options, request.apply, task=request.task)


def run_now(request: JobRequest) -> TextureResult:
    """Run the job, wait for it and apply its result (background mode: there is no event loop to follow it)."""
    sources, params = tasks.send_images(request.task, request.params, request.inputs, None)
    source, mask = sources.get("image"), sources.get("mask")
    names = {"source": source.name if source else "", "mask": mask.name if mask else ""}
    return finish(tasks.run(params, request.task), request.meshes, request.options, apply=request.apply, **names)


def start_ui_job(params: dict, meshes: list, options: ApplyOptions, apply: bool, task: str = "txt2img"):
    """Queue a job and follow it from a timer, which applies its result when it arrives.

    Returns at once: the client queues the request while the worker starts, so a click never freezes
    Blender. Any number of jobs can be queued; each applies to the objects it was started for.
    """
    # get_client reads preferences: main thread only
    job = submit(session.get_client(), task, params, Target(tuple(obj.name for obj in meshes), options, apply))
    follow()
    return job


def start_ui_pbr_job(
    image: bpy.types.Image, params: dict, meshes: list, options: ApplyOptions, apply: bool
) -> Job | Upload:
    """Queue a pbr job for `image` (start_ui_input_job)."""
    return start_ui_input_job("pbr", {"image": image}, params, meshes, options, apply)


def start_ui_input_job(
    task: str, inputs: dict, params: dict, meshes: list, options: ApplyOptions, apply: bool
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
    client = session.get_client()
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
        started = submit(client, task, params | references, target)
    else:
        started = Upload(client, task, params | references, target)
        STATE.uploads.append(started)
        threading.Thread(target=started.send, args=(uploads,), daemon=True, name="sdtex-upload").start()
    follow()
    return started


def submit(client: BackendClient, task: str, params: dict, target: Target) -> Job:
    job = STATE.board.submit(client, task, params)
    STATE.targets[job.request_id] = target
    return job


def submit_ui(task: str, params: dict, target: Target) -> Job:
    """Queue a job on the board with the configured client and follow it."""
    job = submit(session.get_client(), task, params, target)
    follow()
    return job


def follow() -> None:
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
        if job.task in WATCHERS:
            WATCHERS[job.task](job)
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
            submit(upload.client, upload.task, upload.params, upload.target)
    return ended


def _finish(job: Job, target: Target) -> None:
    """Apply a finished job's result to the objects it was started for, and say how it went."""
    STATE.readiness = None  # a download or a worker's start changes what the panel says
    finisher = FINISHERS.get(target.kind or job.task)
    if finisher is not None:
        finisher(job, target)
        return
    finish_texture_job(job, target)


def finish_texture_job(job: Job, target: Target) -> None:
    """The usual end: apply the images to the target objects, record them, and say how it went."""
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
        texture = finish(job.result, meshes, target.options, apply=apply, source=target.source, mask=target.mask)
        if job.result.task in IMAGE_TASKS:
            show_result(target.source, texture.images[0])
        elif job.result.task == "txt2img":
            preview.hand_over(texture.images[0])  # the final image replaces the live preview
        if target.apply and not meshes:
            raise SDTexError("The objects were deleted while generating; the images are in the history")
        if target.apply and bpy.ops.ed.undo_push.poll():  # no undo stack without a window
            bpy.ops.ed.undo_push(message="Apply SD texture")
        STATE.say(saved_message(texture) + (SOLID_HINT if target.apply and solid_viewports() else ""))
    except SDTexError as exc:
        STATE.say(str(exc), is_error=True)


def saved_message(texture: TextureResult) -> str:
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
