"""What the panel shows between timer ticks: the UI's job board, each job's target, the last outcome, the
backend's start-up message (module state: never saved in the .blend). Plain Python but the Target's names."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .. import messages, readiness
from ..client import BackendClient, SDTexError
from ..contract import model_catalog, protocol
from ..jobs import Job, JobBoard
from . import own_message, session
from .materials import ApplyOptions


@dataclass
class Target:
    """Where a UI job's result goes: names, not objects (objects may be deleted while it runs)."""

    object_names: tuple[str, ...]
    options: ApplyOptions | None
    apply: bool
    source: str = ""  # the input image, by name: a pbr job's albedo, an image task's source
    mask: str = ""  # an inpaint job's mask image, by name
    kind: str = ""  # the finisher to use (ui_jobs.FINISHERS) when not the task's own, e.g. "batch"
    request: object = None  # what that finisher needs (a project job's ProjectionRequest, a batch entry's folder)


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
    applied: bool = False  # the message is about a result put on objects (the panel may say how to see it)
    backend_message: str = ""  # set by the start-up thread: plain Python only, never bpy
    readiness: tuple[float, readiness.Readiness] | None = None  # (when, what): reused for FACTS_TTL

    @property
    def running(self) -> bool:
        return bool(self.board.active or self.uploads)

    def closing_warning(self) -> str:
        """What the main panel says while jobs run or wait: quitting or opening a file cancels them."""
        count = len(self.board.active) + len(self.uploads)
        if not count:
            return ""
        return f"{count} job{'s' if count > 1 else ''} running: closing Blender or opening a file cancels them"

    def say(self, message: str, is_error: bool = False) -> None:
        self.message, self.details, self.is_error, self.applied = message, message, is_error, False
        if is_error:
            print(f"SD Textures: {message}")  # the precise text; the panel shows it in its own words
            self.message = own_message.in_ui_words(messages.readable(message))  # the panel's labels

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
    client = session.current_client()
    if client is None or not client.alive:
        return "Backend: " + (STATE.backend_message or "not running")
    shake = client.handshake
    details = f"pid {client.pid}, torch {shake.torch_version}, {'/'.join(shake.devices)}" if shake else "starting"
    return f"Backend: running ({details}) {STATE.backend_message}".rstrip()


def start_backend_async() -> threading.Thread:
    """Start the worker and load the model in a thread, so Blender stays responsive meanwhile. Only a model
    that is on disk is warmed: a missing one would only make the first Generate wait behind hub look-ups."""
    client = session.get_client()
    params = session.load_model_params()
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
