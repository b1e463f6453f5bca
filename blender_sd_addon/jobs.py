"""Job: the state of one generate request, fed with the worker's messages for it.

Blender-free. The panel reads `status_text` and `fraction`; the timer hands new previews to Blender.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import protocol

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


@dataclass
class Job:
    request_id: str  # "" while the backend is still starting (the UI submits from a thread)
    params: dict
    state: str = RUNNING
    stage: str = "starting"
    step: int = 0
    total: int = 0
    elapsed: float = 0.0  # seconds of denoising, as the worker measured them
    preview: protocol.PreviewEvent | None = None
    preview_serial: int = 0  # bumped on each new preview, so the UI knows when to copy pixels
    result: protocol.GenerateResult | None = None
    error: str = ""
    error_code: str = ""  # a protocol error code, or client.BACKEND_STOPPED
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    def handle(self, message: dict) -> None:
        """Update from one worker message for this request."""
        kind = message.get("event")
        data = message.get("data") or {}
        if kind == protocol.EVENT_PROGRESS:
            self.stage = "denoising"
            self.step, self.total, self.elapsed = data["step"], data["total"], data["elapsed"]
        elif kind == protocol.EVENT_PREVIEW:
            self.preview = protocol.PreviewEvent(**{k: data[k] for k in ("step", "width", "height", "rgb")})
            self.preview_serial += 1
        elif kind == protocol.EVENT_STATUS:
            self.stage = data.get("stage", self.stage)
        elif "result" in message:
            self.result = protocol.GenerateResult.from_dict(message["result"])
            self.state = DONE
        elif "error" in message:
            error = message["error"] or {}
            self.error = error.get("message") or "unknown backend error"
            self.error_code = error.get("code", "")
            self.state = FAILED
        elif message.get("cancelled"):
            self.error = "Cancelled"
            self.state = CANCELLED

    def fail(self, message: str, code: str = "") -> None:
        """Finish with an error that did not come from the worker (e.g. it failed to start)."""
        self.error, self.error_code, self.state = message, code, FAILED

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    @property
    def seconds_left(self) -> float | None:
        """Linear estimate from the worker's own step timings; None before the first step."""
        if not self.step or not self.total:
            return None
        return self.elapsed / self.step * (self.total - self.step)

    @property
    def status_text(self) -> str:
        if self.state == FAILED:
            return f"Failed: {self.error}"
        if self.state != RUNNING:
            return self.state.capitalize()
        if not self.step:
            return self.stage.replace("_", " ").capitalize() + "…"
        text = f"Step {self.step}/{self.total}"
        left = self.seconds_left
        return text + (f" · ~{left:.0f}s left" if left is not None else "")
