"""The worker: protocol 2 (sdtex_contract.protocol) over JSON lines, jobs run one at a time.

One Worker serves one or more peers (clients): stdio serves one, backend/server.py one per TCP connection.
Each peer has its own `emit` and its own job ids; every peer's jobs share one queue and the main thread.

Two threads (the reader: one per peer). The reader thread reads each line, checks it, and answers at once
everything that is cheap (handshake, upload, fetch, jobs, job, cancel, and every malformed line), so a
10-minute job never delays a cancel or a job list. `run` and `load_model` become jobs queued for the main
thread, which runs them in order. Every request gets exactly one terminal reply; nothing a client sends can
stop either thread. End of input (the client is gone) cancels running and queued work and exits within
seconds.
"""

from __future__ import annotations

import base64
import binascii
import gc
import logging
import os
import queue
import sys
import threading
import time
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

import diffusers
import torch
import transformers

from backend import __version__, compat
from backend.context import Cancelled, JobContext
from backend.estimators import Estimators
from backend.families import size_multiple
from backend.inputs import InputStore, remove_stale
from backend.models import ModelManager, available_devices
from backend.preview_decoder import PreviewDecoders
from backend.tasks import TASKS
from backend.tasks.txt2img import run_txt2img
from sdtex_contract import protocol
from sdtex_contract.protocol import (
    CANCELLED,
    DONE,
    FAILED,
    FINISHED_STATES,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOT_FOUND,
    OUT_OF_MEMORY,
    QUEUED,
    RUNNING,
    SHUTTING_DOWN,
    HandshakeResult,
    JobInfo,
    ProtocolError,
)

log = logging.getLogger("backend.worker")

Emit = Callable[[dict], None]
QUEUED_METHODS = (protocol.RUN, protocol.LOAD_MODEL, protocol.SHUTDOWN)  # the main thread's work
FINISHED_KEPT = 200  # finished jobs remembered for `jobs`/`job`; older ones are forgotten
EXIT_GRACE = 3.0  # seconds a cancelled job gets to stop after the client went away, then the worker exits
OOM_ADVICE = (
    "out of memory: try a smaller width/height, batch_size 1, cpu_offload (CUDA), attention_slicing "
    "or vae_tiling"
)


@dataclass(eq=False)
class Peer:
    """One client: its replies go to `emit`; its job ids are its own (two clients may both use "r1")."""

    emit: Emit
    name: str = "local"
    # A TCP client: its own uploads, and it is not told what another client loaded (None, False: the worker's).
    inputs: InputStore | None = None
    remote: bool = False


@dataclass
class Job:
    """The worker's record of one `run` or `load_model` request."""

    id: Any
    task: str
    peer: Peer | None = None
    state: str = QUEUED
    stage: str = ""
    step: int = 0
    total: int = 0
    elapsed: float = 0.0
    artifacts: list[dict] = field(default_factory=list)
    error: dict | None = None
    cancel_requested: bool = False

    def info(self, queued_ahead: int = 0) -> dict:
        fields = {k: getattr(self, k) for k in JobInfo.__dataclass_fields__ if hasattr(self, k)}
        return asdict(JobInfo(**fields, queued_ahead=queued_ahead))


@dataclass
class Work:
    """A request for the main thread."""

    id: Any
    method: str
    params: Any  # validated TaskParams for run/load_model
    peer: Peer | None = None  # who asked (None: the worker's own peer)


class Worker:
    """Routes requests and runs jobs. `emit` sends one message and must be safe to call from any thread."""

    def __init__(self, emit: Emit, inputs: InputStore | None = None):
        self.emit = emit
        self.peer = Peer(emit)  # the stdio client, the CLI, tests
        self.models = ModelManager()
        self.estimators = Estimators()  # the Marigold models, warm next to the generator
        self.preview_decoders = PreviewDecoders()  # the step previews' tiny autoencoder, too
        self.inputs = inputs or InputStore()
        self.closing = False
        self._lock = threading.Lock()
        self._jobs: OrderedDict[tuple[Peer, Any], Job] = OrderedDict()  # (peer, id): one queue for all peers
        # Paths `fetch` may read: only the files a peer's own jobs announced (forgotten with the peer).
        self._artifacts: weakref.WeakKeyDictionary[Peer, set[str]] = weakref.WeakKeyDictionary()

    # --- the reader thread: checks every message, answers the cheap ones ---------------------------

    def receive(self, message: dict, peer: Peer | None = None) -> Work | None:
        """Answer a message now, or return the Work the main thread must do for it."""
        peer = peer or self.peer
        request_id = protocol.request_id_of(message)
        method = message.get("method")
        params = message.get("params", {})
        if method == protocol.CANCEL and "id" not in message:  # a notification: no reply, ever
            if isinstance(params, dict):
                self.cancel(params.get("id"), peer)
            return None
        try:
            if request_id is None:
                raise ProtocolError(INVALID_REQUEST, "a request needs an id (a short string or an integer)")
            if not isinstance(method, str):
                raise ProtocolError(INVALID_REQUEST, "a request needs a method (string)")
            if method not in protocol.METHODS:
                methods = ", ".join(protocol.METHODS)
                raise ProtocolError(METHOD_NOT_FOUND, f"unknown method {protocol.shown(method)}; methods: {methods}")
            if not isinstance(params, dict):
                raise ProtocolError(INVALID_REQUEST, f"params must be an object, got {type(params).__name__}")
            if self.closing:
                raise ProtocolError(SHUTTING_DOWN, "the backend is shutting down")
            if method in QUEUED_METHODS:
                return self._enqueue(request_id, method, params, peer)
            peer.emit(protocol.result(request_id, self._answer(method, params, peer)))
        except ProtocolError as exc:
            peer.emit(protocol.error(request_id, exc))
        except Exception as exc:  # a bug in an answer must not kill the reader: report it
            log.exception("message %s failed", protocol.shown(request_id))
            peer.emit(protocol.error(request_id, _internal(exc)))
        return None

    def _enqueue(self, request_id: Any, method: str, params: dict, peer: Peer) -> Work:
        if method == protocol.SHUTDOWN:
            self.closing = True
            self.cancel_all()  # stop what runs; what is queued answers `cancelled` without running
            return Work(request_id, method, None, peer)
        # Parameters are checked now, so a bad request is answered before the jobs queued ahead of it.
        checked = protocol.task_params(params) if method == protocol.RUN else protocol.model_params(params)
        compat.check_task(checked.task)  # a task the installed packages cannot run is refused before it queues
        key = (peer, request_id)
        with self._lock:
            if key in self._jobs and self._jobs[key].state not in FINISHED_STATES:
                raise ProtocolError(INVALID_REQUEST, f"id {protocol.shown(request_id)} is already in use by a job")
            self._jobs.pop(key, None)
            self._jobs[key] = Job(request_id, checked.task if method == protocol.RUN else method, peer)
        return Work(request_id, method, checked, peer)

    def _answer(self, method: str, params: dict, peer: Peer) -> dict:
        if method == protocol.HANDSHAKE:
            return self.handshake(params) | ({"loaded_model": None} if peer.remote else {})
        if method == protocol.UPLOAD:
            return self.upload(params, peer.inputs or self.inputs)
        if method == protocol.FETCH:
            return self.fetch(params, peer)
        if method == protocol.JOBS:
            return {"jobs": self.job_list(peer)}
        return self.job_info(params.get("id"), cancel=method == protocol.CANCEL, peer=peer)  # job, cancel

    def handshake(self, params: dict) -> dict:
        protocol.check_protocol_version(params.get("protocol_version"))
        return asdict(
            HandshakeResult(
                protocol_version=protocol.PROTOCOL_VERSION,
                backend_version=__version__,
                devices=available_devices(),
                schedulers=list(protocol.SCHEDULERS),
                tasks=protocol.task_specs(),
                capabilities=list(protocol.CAPABILITIES),
                torch_version=torch.__version__,
                diffusers_version=diffusers.__version__,
                loaded_model=self.models.loaded_name,
                unavailable=compat.unavailable(),
            )
        )

    def upload(self, params: dict, store: InputStore) -> dict:
        data = params.get("data")
        if not isinstance(data, str):
            raise protocol.invalid("data", "the file's bytes as base64 text", data)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise protocol.invalid("data", "the file's bytes as base64 text", data) from None
        digest = store.put(raw)
        expected = params.get("sha256")
        if expected is not None and expected != digest:
            raise protocol.invalid("sha256", f"the sha256 of the data ({digest})", expected)
        return {"sha256": digest, "size": len(raw)}

    def fetch(self, params: dict, peer: Peer) -> dict:
        path, offset = params.get("path"), params.get("offset", 0)
        length = params.get("length", protocol.FETCH_CHUNK)
        with self._lock:
            announced = isinstance(path, str) and path in self._artifacts.get(peer, ())
        if not announced:
            why = "fetch reads only the files this client's jobs announced"
            raise ProtocolError(NOT_FOUND, f"no artifact {protocol.shown(path)}: {why}")
        for name, value, low, high in (("offset", offset, 0, 2**53), ("length", length, 1, protocol.FETCH_CHUNK)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise protocol.invalid(name, f"an integer from {low} to {high}", value)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(offset)
                data = f.read(length)
        except OSError as exc:
            raise ProtocolError(NOT_FOUND, f"artifact {path} cannot be read: {exc.strerror}") from None
        encoded = base64.b64encode(data).decode("ascii")
        return {"data": encoded, "offset": offset, "size": size, "eof": offset + len(data) >= size}

    # --- jobs ---------------------------------------------------------------------------------------

    def job_list(self, peer: Peer | None = None) -> list[dict]:
        """The peer's jobs; `queued_ahead` counts every peer's jobs (they share the queue)."""
        peer = peer or self.peer
        with self._lock:
            queued = 0
            infos = []
            for job in self._jobs.values():
                if job.peer is peer:
                    infos.append(job.info(queued_ahead=queued if job.state == QUEUED else 0))
                queued += job.state in (QUEUED, RUNNING)
            return infos

    def job_info(self, job_id: Any, cancel: bool = False, peer: Peer | None = None) -> dict:
        if cancel:
            self.cancel(job_id, peer)
        for info in self.job_list(peer):
            if info["id"] == job_id and type(info["id"]) is type(job_id):
                return info
        raise ProtocolError(NOT_FOUND, f"no job with id {protocol.shown(job_id)}", {"param": "id"})

    def cancel(self, job_id: Any, peer: Peer | None = None) -> None:
        """Ask a job to stop (any thread); unknown, finished or unhashable ids are ignored."""
        if not isinstance(job_id, (str, int)):
            return
        with self._lock:
            job = self._jobs.get((peer or self.peer, job_id))
            if job and job.state not in FINISHED_STATES:
                job.cancel_requested = True

    def cancel_all(self, peer: Peer | None = None) -> None:
        """Ask every unfinished job to stop: all peers' (None), or one peer's (its connection closed)."""
        with self._lock:
            for job in self._jobs.values():
                if job.state not in FINISHED_STATES and peer in (None, job.peer):
                    job.cancel_requested = True

    def unfinished(self, peer: Peer) -> int:
        """How many of the peer's jobs are queued or running."""
        with self._lock:
            return sum(job.peer is peer and job.state not in FINISHED_STATES for job in self._jobs.values())

    # --- the main thread: runs jobs in order ---------------------------------------------------------

    def execute(self, work: Work) -> bool:
        """Run one piece of work to its terminal reply. False once the worker should exit."""
        peer = work.peer or self.peer
        if work.method == protocol.SHUTDOWN:
            peer.emit(protocol.result(work.id, {}))
            return False
        job = self._jobs[(peer, work.id)]
        reply, state = None, FAILED
        try:
            if job.cancel_requested:
                raise Cancelled()
            job.state = RUNNING
            self._emit_event(job, protocol.EVENT_STATE, {"state": RUNNING})
            ctx = JobContext(
                work.id,
                self.models,
                peer.inputs or self.inputs,
                emit=lambda kind, data: self._emit_event(job, kind, data),
                is_cancelled=lambda: job.cancel_requested,
                estimators=self.estimators,
                preview_decoders=self.preview_decoders,
            )
            if work.method == protocol.LOAD_MODEL:
                result = self.load_model(ctx, work.params)
            else:
                outcome = TASKS[work.params.task](ctx, work.params)
                outcome.artifacts = list(job.artifacts)
                result = asdict(outcome)
            reply, state = protocol.result(work.id, result), DONE
        except Cancelled:
            reply, state = protocol.cancelled(work.id), CANCELLED
        except ProtocolError as exc:
            reply = protocol.error(work.id, exc)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            self.free_memory()
            log.error("%s: %s", OOM_ADVICE, exc)
            reply = protocol.error(work.id, ProtocolError(OUT_OF_MEMORY, OOM_ADVICE, {"detail": str(exc)[:500]}))
        except Exception as exc:
            log.exception("job %s failed", protocol.shown(work.id))
            reply = protocol.error(work.id, _internal(exc))
        with self._lock:
            job.state = state
            job.error = reply.get("error")
            self._forget_old_jobs()
        peer.emit(reply)
        return True

    def handle(self, message: dict) -> bool:
        """receive + execute in the calling thread (for in-process callers and tests)."""
        work = self.receive(message)
        return self.execute(work) if work else True

    def load_model(self, ctx: JobContext, params: Any) -> dict:
        """Load the model and run one small denoising step on it when it was not warm yet, so the first
        click does not pay for paging in the memory-mapped weights and the backend's kernel set-up."""
        ctx.stage("loading_model")
        model, seconds = self.models.get(params)
        warmup = 0.0
        if seconds and model.pipe.unet.config.in_channels == 4:  # an inpainting U-Net can't run txt2img: not warmed
            start = time.perf_counter()
            size = max(64, size_multiple(model.pipe))
            probe = protocol.GenerateParams.from_dict(
                {"model": params.model, "prompt": "warm-up", "output_dir": "/unused", "seed": 0, "steps": 1}
                | {"width": size, "height": size}
            )
            run_txt2img(model.pipe, probe, device=model.device)
            warmup = time.perf_counter() - start
        key = model.key
        return {
            "model": key.source.location,
            "load_seconds": seconds,
            "warmup_seconds": warmup,
            "device": key.device,
            "dtype": model.dtype_name,  # what the weights really are, not what was asked for
        }

    def _emit_event(self, job: Job, kind: str, data: dict) -> None:
        """Record what the job list shows, then send the event."""
        if kind == protocol.EVENT_STATUS:
            job.stage = data["stage"]
        elif kind == protocol.EVENT_PROGRESS:
            job.step, job.total, job.elapsed = data["step"], data["total"], data["elapsed"]
        elif kind == protocol.EVENT_ARTIFACT:
            with self._lock:
                job.artifacts.append(data)
                self._artifacts.setdefault(job.peer, set()).add(data["path"])
        job.peer.emit(protocol.event(job.id, kind, data))

    def _forget_old_jobs(self) -> None:
        finished = [key for key, job in self._jobs.items() if job.state in FINISHED_STATES]
        for key in finished[: max(0, len(finished) - FINISHED_KEPT)]:
            del self._jobs[key]

    def free_memory(self) -> None:
        self.estimators.release()  # out of memory: the estimators go first (the generator stays warm)
        self.preview_decoders.release()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _internal(exc: Exception) -> ProtocolError:
    return ProtocolError(
        INTERNAL_ERROR, f"{type(exc).__name__}: {protocol.shown(str(exc), 500)}", {"traceback": traceback.format_exc()}
    )


# --- serving over stdin/stdout --------------------------------------------------------------------


class _Writer:
    """Thread-safe JSON-lines writer on the private copy of the real stdout. Never raises."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.lock = threading.Lock()

    def __call__(self, message: dict) -> None:
        try:
            data = protocol.encode(message)
        except (ValueError, TypeError) as exc:  # NaN or unencodable text in a reply: still answer the request
            log.error("cannot encode a %s: %s", "reply" if protocol.is_terminal(message) else "message", exc)
            if not protocol.is_terminal(message):
                return
            data = protocol.encode(protocol.error(message.get("id"), _internal(exc)))
        with self.lock:
            try:
                self.stream.write(data)
                self.stream.flush()
            except (OSError, ValueError):  # the client is gone; end of input stops the worker
                pass


def _read(stdin: BinaryIO, worker: Worker, work: queue.Queue) -> None:
    """Reader thread: one line at a time, never longer than MAX_LINE; None on the queue means end of input."""
    while line := stdin.readline(protocol.MAX_LINE + 1):
        if len(line) > protocol.MAX_LINE and not line.endswith(b"\n"):
            while (rest := stdin.readline(protocol.MAX_LINE)) and not rest.endswith(b"\n"):
                pass  # skip the rest of an over-long line without holding it
            too_long = ProtocolError(protocol.PARSE_ERROR, f"message longer than {protocol.MAX_LINE} bytes")
            worker.emit(protocol.error(None, too_long))
            continue
        if not line.strip():
            continue
        try:
            message = protocol.decode(line)
        except ProtocolError as exc:
            worker.emit(protocol.error(None, exc))
            continue
        try:
            if (item := worker.receive(message)) is not None:
                work.put(item)
        except Exception:  # receive answers its own errors; this is the last guard for the thread itself
            log.exception("reader: unexpected failure")
    # The client is gone: nobody will read what running or queued jobs make.
    worker.closing = True
    worker.cancel_all()
    work.put(None)
    threading.Timer(EXIT_GRACE, _exit_now).start()


def run_jobs(worker: Worker, work: queue.Queue) -> None:
    """The main thread of every server (stdio or TCP): run the queued work in order until None or shutdown."""
    while (item := work.get()) is not None:
        if not worker.execute(item):
            return


def _exit_now() -> None:
    log.warning("the client went away and the running job did not stop within %.0f s: exiting", EXIT_GRACE)
    os._exit(0)


def quiet_libraries() -> None:
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[sdtex-backend] %(levelname)s %(message)s")


def serve() -> int:
    """Serve until shutdown or end of input. Returns the exit status (0)."""
    # Keep the real stdout for the protocol and send fd 1 to stderr, so stray prints and progress
    # bars from libraries can never corrupt a message.
    out = os.fdopen(os.dup(1), "wb")
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # End any partial line something printed before this point, so the first reply starts a line.
    out.write(b"\n")
    out.flush()
    quiet_libraries()

    # The reader thread may still be blocked in a read at exit: give it a private stdin, because
    # finalising sys.stdin while a daemon thread holds its lock aborts the interpreter.
    stdin = os.fdopen(os.dup(0), "rb")
    if removed := remove_stale():  # a worker killed with Blender (kill -9) could not delete its uploads
        log.info("removed %d uploads folder(s) that killed workers left behind", len(removed))
    worker = Worker(_Writer(out))
    work: queue.Queue = queue.Queue()
    threading.Thread(target=_read, args=(stdin, worker, work), daemon=True, name="reader").start()
    log.info("backend %s ready (protocol %d)", __version__, protocol.PROTOCOL_VERSION)
    try:
        run_jobs(worker, work)
    finally:
        worker.inputs.close()
        out.close()
        sys.stderr.flush()
    os._exit(0)  # neither the exit-grace timer nor the reader blocked in a read may keep the process alive
