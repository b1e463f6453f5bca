"""The UI job timer: jobs queued from the panel return at once; a `bpy.app.timers` callback follows them on the
one job board (ui_state.STATE.board), shows their previews, and applies each result to the objects it was
started for. Never blocks Blender: input images that must be uploaded go on a thread first.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import bpy

from ..client import BackendClient, SDTexError
from ..history import IMAGE_TASKS
from ..jobs import CANCELLED, DONE, Job, JobBoard, ProcessJob
from . import images, preview, session, tasks
from .materials import ApplyOptions
from .results import TextureResult, finish
from .ui_state import STATE, Target, Upload

POLL_INTERVAL = 0.01  # seconds between timer polls while a job runs: a cheap mailbox check, and the
# result waits at most this long (0.05 s cost 25 ms per job on average, over the 20 ms overhead budget)
SIDEBARS = {"VIEW_3D", "IMAGE_EDITOR", "NODE_EDITOR"}  # the spaces whose sidebar (region "UI") shows the board
PROGRESS_REDRAW_INTERVAL = 0.25  # seconds: a sidebar redraw costs 0.2-0.25 s on software GL, so progress alone
# redraws at most 4 times a second; a job starting, finishing or being cancelled redraws at once
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


def add_ui(job: Job, target: Target) -> Job:
    """Put a job started elsewhere (a ProcessJob) on the board and follow it."""
    STATE.board.add(job)
    STATE.targets[job.request_id] = target
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
        stop_polling(f"Cancelled: internal error ({exc})")
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
    # Redraw only on news: a redraw per tick can cost more than a step on a slow GPU
    REDRAWS.news(bool(changed or uploaded), _board_signature())
    return POLL_INTERVAL if STATE.running else None


def _board_signature() -> tuple:
    """What the rows show besides progress: a change here redraws at once."""
    return tuple((j.request_id, j.state, j.stage, j.cancelling, bool(j.download)) for j in STATE.board.jobs)


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
    (FINISHERS.get(target.kind or job.task) or finish_texture_job)(job, target)
    if made_something(job):
        mark_file_changed("Apply SD texture" if target.apply else "SD Textures result")


def made_something(job: Job) -> bool:
    """A result, or files a cancelled job made that its finisher applied (a project's views, a Ray batch's
    entries); a download changes nothing in the .blend."""
    partial = bool(job.artifacts) or isinstance(job, ProcessJob) and job.step > 0
    return job.task != "download_model" and (job.state == DONE or partial)


def mark_file_changed(message: str) -> None:
    """A result was applied or recorded: one undo step, which also marks the .blend unsaved, so Blender asks
    to save it on quit (loading images or adding history entries alone does not)."""
    if bpy.ops.ed.undo_push.poll():  # no undo stack without a window
        bpy.ops.ed.undo_push(message=message)


def finish_texture_job(job: Job, target: Target) -> None:
    """The usual end: apply the images to the target objects, record them, and say how it went."""
    if job.state != DONE:
        if job.state == CANCELLED:
            STATE.say(cancelled_text(job))
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
        STATE.say(saved_message(texture))
        STATE.applied = target.apply
    except SDTexError as exc:
        STATE.say(str(exc), is_error=True)


def cancelled_text(job: Job) -> str:
    """A cancelled travel keeps its finished frames on disk (a re-run with the same settings skips them)."""
    frames = [a.path for a in job.artifacts if a.kind == "frame"]
    if job.task != "travel" or not frames:
        return "Cancelled"
    done = f"{len(frames)} frame" + ("" if len(frames) == 1 else "s")
    return (f"Cancelled after {done}: they stay in {os.path.dirname(frames[0])}, and running the "
            "same travel again continues from there")  # fmt: skip


def saved_message(texture: TextureResult) -> str:
    seed = "" if texture.seed is None else f" (seed {texture.seed})"
    count = len(texture.files)
    return f"Saved {count} file{'' if count == 1 else 's'} in {os.path.dirname(texture.files[0])}{seed}"


# Drawn while it is true (a hint kept in the message went stale once the artist switched shading).
SOLID_HINT = "The viewport is in Solid shading: press Material Preview (Z) to see the texture."


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


class Redraws:
    """Tags the sidebars for redraw: at once when the board's state changed, at most every
    PROGRESS_REDRAW_INTERVAL seconds when only progress did (the last progress is drawn when the interval ends)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.last = float("-inf")  # when the sidebars were last tagged
        self.signature: tuple = ()
        self.pending = False  # progress news not drawn yet

    def news(self, progress: bool, signature: tuple) -> bool:
        """Called on every tick; True when the sidebars were tagged."""
        now = self.clock()
        changed = signature != self.signature
        self.signature, self.pending = signature, self.pending or progress
        if not changed and not (self.pending and now - self.last >= PROGRESS_REDRAW_INTERVAL):
            return False
        self.last, self.pending = now, False
        redraw()
        return True


REDRAWS = Redraws()


def redraw(areas: tuple[str, ...] = ()) -> None:
    """The add-on's one redraw: tag the sidebars that show the board (region "UI"), never the area: tagging the
    area redraws its main region too, a whole 3D viewport (with software drawing that costs more than a
    denoising step). `areas`: area types redrawn whole (the Preferences window while installing). Previews
    redraw their own Image Editors (blender/preview.py)."""
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in areas:
                area.tag_redraw()
            elif area.type in SIDEBARS:
                for region in area.regions:
                    if region.type == "UI":
                        region.tag_redraw()


def stop_polling(reason: str = "Cancelled") -> None:
    """Forget the UI jobs (unregister, another file opened: load_pre): each is cancelled and marked finished at
    once, so nothing of it is applied to the next file and no panel keeps a running row; the timer stops."""
    for job in STATE.board.active:
        job.abandon(reason)
    for upload in STATE.uploads:
        upload.cancelled = True
    STATE.board, STATE.targets, STATE.uploads = JobBoard(), {}, []
    if bpy.app.timers.is_registered(_tick):
        bpy.app.timers.unregister(_tick)
