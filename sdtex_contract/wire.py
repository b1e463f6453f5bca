"""The one protocol between the Blender add-on and the backend worker (version 2): messages on the wire.

Stdlib only: Blender's Python imports this file, and so does the torch worker.
Wire format: one JSON object per line (UTF-8); logs go elsewhere (stderr). See docs/protocol.md.

Client -> worker
    request       {"id": "r1", "method": "run", "params": {"task": "txt2img", ...}}
    notification  {"method": "cancel", "params": {"id": "r1"}}          (no id, no reply)
Worker -> client
    event         {"id": "r1", "event": "progress", "data": {...}}      (zero or more)
    terminal      {"id": "r1", "result": {...}}
                  {"id": "r1", "error": {"code": "...", "message": "...", "data": {...}}}
                  {"id": "r1", "cancelled": true}

Every request gets exactly one terminal reply. Unknown fields are ignored. Every `run` request is a job
(its id is the request id) with a state, progress and artifacts; jobs queue and run one at a time.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import PARSE_ERROR, PROTOCOL_MISMATCH, ProtocolError, shown
from .params import MAX_LINE, valid_text

# The major version: a different one is refused. Additions within a major are announced as capabilities.
PROTOCOL_VERSION = 2
CAPABILITIES = ("jobs", "upload", "artifacts", "fetch", "tasks")

# Methods (requests). `cancel` may also be sent as a notification (no id, no reply).
HANDSHAKE = "handshake"
RUN = "run"  # start a job: params = {"task": ..., the task's parameters}
LOAD_MODEL = "load_model"
UPLOAD = "upload"  # bytes in, named by their sha256
FETCH = "fetch"  # an artifact's bytes out, in chunks
JOBS = "jobs"  # list jobs
JOB = "job"  # one job
CANCEL = "cancel"
SHUTDOWN = "shutdown"
METHODS = (HANDSHAKE, RUN, LOAD_MODEL, UPLOAD, FETCH, JOBS, JOB, CANCEL, SHUTDOWN)

# Events streamed before the terminal reply.
EVENT_STATE = "state"  # data: {"state": "running"} when a queued job starts
# data: {"stage": "loading_model" | "encoding" | "denoising" | "decoding" | "estimating_maps" | "saving"}
EVENT_STATUS = "status"
EVENT_PROGRESS = "progress"  # data: ProgressEvent
EVENT_PREVIEW = "preview"  # data: PreviewEvent
EVENT_ARTIFACT = "artifact"  # data: Artifact; the file is complete under its final name
EVENT_DOWNLOAD = "download"  # data: DownloadProgress (download_model; `progress` counts the same bytes)

# Job states.
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
JOB_STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINISHED_STATES = (DONE, FAILED, CANCELLED)


def encode(message: dict) -> bytes:
    """One message as a JSON line. Raises ValueError for NaN/Infinity or text that is not UTF-8."""
    return (json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def decode(line: bytes | str) -> dict:
    """Parse one line; ProtocolError(PARSE_ERROR) when it is not a JSON object (or nests too deep)."""
    if len(line) > MAX_LINE:
        raise ProtocolError(PARSE_ERROR, f"message too long: {len(line)} bytes, at most {MAX_LINE}")
    try:
        message = json.loads(line, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(PARSE_ERROR, f"not valid JSON: {shown(str(exc), 200)}") from None
    if not isinstance(message, dict):
        raise ProtocolError(PARSE_ERROR, f"a message must be a JSON object, got {type(message).__name__}")
    return message


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity, -Infinity


def request(request_id: str, method: str, params: dict | None = None) -> dict:
    return {"id": request_id, "method": method, "params": params or {}}


def notification(method: str, params: dict) -> dict:
    return {"method": method, "params": params}


def event(request_id: str, kind: str, data: dict) -> dict:
    return {"id": request_id, "event": kind, "data": data}


def result(request_id: str, data: dict) -> dict:
    return {"id": request_id, "result": data}


def error(request_id: str | None, exc: ProtocolError) -> dict:
    return {"id": request_id, "error": exc.to_wire()}


def cancelled(request_id: str) -> dict:
    return {"id": request_id, "cancelled": True}


def is_terminal(message: dict) -> bool:
    return "result" in message or "error" in message or "cancelled" in message


def request_id_of(message: dict) -> str | int | None:
    """The message's id when it is a usable one (a short string or an integer), else None."""
    request_id = message.get("id")
    if isinstance(request_id, str) and valid_text(request_id, 200):
        return request_id
    if isinstance(request_id, int) and not isinstance(request_id, bool) and abs(request_id) < 2**53:
        return request_id
    return None


def check_protocol_version(theirs: Any) -> None:
    """Refuse another major version; within one major, capabilities tell what the other side has."""
    if theirs != PROTOCOL_VERSION:
        raise ProtocolError(
            PROTOCOL_MISMATCH,
            f"protocol version mismatch: this side speaks {PROTOCOL_VERSION}, the other side {shown(theirs)}; "
            "update the add-on and the backend together",
            {"expected": PROTOCOL_VERSION, "got": shown(theirs)},
        )


def missing_capabilities(theirs: Any, needed: tuple[str, ...] = CAPABILITIES) -> list[str]:
    have = set(theirs) if isinstance(theirs, list) else set()
    return [c for c in needed if c not in have]
