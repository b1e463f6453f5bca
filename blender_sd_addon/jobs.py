"""Jobs: one `run` request each, followed through the worker's messages; a JobBoard follows many at once.

Blender-free. A Job remembers the client that took its request (a later client, after the interpreter
preference changed, knows nothing of it). The panel reads `status_text` and `fraction`; a bpy timer calls
`JobBoard.poll()` every 10 ms, which costs one mailbox check per unfinished job when nothing happened.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field, fields
from typing import Any

from .client import BackendClient
from .contract import protocol
from .contract.protocol import CANCELLED, DONE, FAILED, FINISHED_STATES, QUEUED, RUNNING
from .contract.units import transfer_text

__all__ = ["CANCELLED", "DONE", "FAILED", "QUEUED", "RUNNING", "FollowUp", "Job", "JobBoard", "ProcessJob"]


@dataclass(eq=False)
class FollowUp:
    """A job the board submits on the same client once another is done (not failed, not cancelled, and no cancel
    asked): a draft's final. Cancelling the first one therefore stops both."""

    task: str
    params: dict
    job: Job | None = None  # once submitted


@dataclass(eq=False)
class Job:
    client: BackendClient
    request_id: str
    task: str
    params: dict = field(default_factory=dict)  # what it was asked (a download's model)
    state: str = QUEUED  # one of protocol.JOB_STATES
    stage: str = ""  # the worker's latest status stage, e.g. "loading_model", "denoising"
    step: int = 0
    total: int = 0
    elapsed: float = 0.0  # seconds of denoising, as the worker measured them
    preview: protocol.PreviewEvent | None = None  # the latest only: previews are large and superseded
    preview_serial: int = 0  # bumped on each new preview, so the UI knows when to copy pixels
    download: protocol.DownloadProgress | None = None  # the latest, while a download_model job runs
    artifacts: list[protocol.Artifact] = field(default_factory=list)  # in the order the worker announced them
    losses: list[float] = field(default_factory=list)  # a training job's loss at each step (progress events)
    cancelling: bool = False  # cancel was asked: the row says so at once, the worker confirms later
    result: protocol.GenerateResult | None = None  # image tasks
    data: dict | None = None  # the raw result of any task
    error: str = ""
    error_code: str = ""  # a protocol error code, or client.BACKEND_STOPPED / BACKEND_START_FAILED
    finished_at: float | None = None  # time.monotonic() when the terminal reply was handled
    then: FollowUp | None = None  # submitted by the JobBoard when this one is done

    @classmethod
    def submit(cls, client: BackendClient, task: str, params: dict) -> Job:
        """Start a job of `task` (a protocol.TASKS name) on `client`; returns at once, even while it starts."""
        return cls(client, client.submit(protocol.RUN, {**params, "task": task}), task, params)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    def poll(self) -> bool:
        """Apply the messages that arrived since the last poll; True when there were any."""
        if self.finished:
            return False
        messages = self.client.messages(self.request_id)
        for message in messages:
            self.handle(message)
        return bool(messages)

    def cancel(self) -> None:
        """Ask the worker to stop; the job finishes as cancelled when the worker confirms (next polls)."""
        if not self.finished:
            self.cancelling = True
            self.client.cancel(self.request_id)

    def abandon(self, reason: str) -> None:
        """Cancel and finish it here at once, without waiting for the worker (the file it works for is closing):
        nothing of it is applied later, and no panel keeps a row of it."""
        if not self.finished:
            self.cancel()
            self.error, self.state, self.finished_at = reason, CANCELLED, time.monotonic()

    def handle(self, message: dict) -> None:
        """Update from one worker message for this request."""
        kind = message.get("event")
        data = message.get("data") if isinstance(message.get("data"), dict) else {}
        if kind == protocol.EVENT_STATE:
            if data.get("state") in (QUEUED, RUNNING):
                self.state = data["state"]
        elif kind == protocol.EVENT_STATUS:
            self.state, self.stage = RUNNING, str(data.get("stage", self.stage))
        elif kind == protocol.EVENT_PROGRESS:
            self.state = RUNNING
            self.step, self.total, self.elapsed = data.get("step", 0), data.get("total", 0), data.get("elapsed", 0.0)
            if isinstance(data.get("loss"), (int, float)):
                self.losses.append(float(data["loss"]))
        elif kind == protocol.EVENT_PREVIEW:
            preview = _known(protocol.PreviewEvent, data)
            if preview is not None:
                self.preview, self.preview_serial = preview, self.preview_serial + 1
        elif kind == protocol.EVENT_DOWNLOAD:
            self.state, self.download = RUNNING, _known(protocol.DownloadProgress, data) or self.download
        elif kind == protocol.EVENT_ARTIFACT:
            artifact = _known(protocol.Artifact, data)
            if artifact is not None:
                self.artifacts.append(artifact)
        elif "result" in message:
            self.data = message["result"] if isinstance(message["result"], dict) else {}
            self.state = DONE
            if "images" in self.data:  # image tasks answer a GenerateResult; others (downloads, listings) their own
                try:
                    self.result = protocol.GenerateResult.from_dict(self.data)
                except (KeyError, TypeError, AttributeError) as exc:
                    self.error, self.state = f"malformed result from the backend: {exc!r}", FAILED
        elif "error" in message:
            error = message["error"] if isinstance(message["error"], dict) else {}
            self.error = error.get("message") or "unknown backend error"
            self.error_code, self.state = error.get("code", ""), FAILED
        elif message.get("cancelled"):
            self.error, self.state = "Cancelled", CANCELLED
        if self.finished and self.finished_at is None:
            self.finished_at = time.monotonic()

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
            return f"Failed: {self.error.splitlines()[0] if self.error else 'unknown error'}"
        if self.state in (DONE, CANCELLED):
            return self.state.capitalize()
        if self.cancelling:
            return "Cancelling…"
        if self.state == QUEUED:
            return "Starting backend…" if self.client.starting else "Queued"
        if self.download:
            d = self.download
            return f"Downloading {transfer_text(d.bytes_done, d.bytes_total, d.speed)}"
        if not self.step:
            return (self.stage.replace("_", " ").capitalize() or "Running") + "…"
        left = self.seconds_left
        return f"Step {self.step}/{self.total}" + (f" · ~{left:.0f}s left" if left is not None else "")


@dataclass(eq=False)
class ProcessJob(Job):
    """A job run by a process of its own (`python -m backend batch --ray`) rather than the worker: a row on the
    board like any other. Its progress is how many of `outputs` exist (each written when its entry is done);
    Cancel stops the process."""

    process: subprocess.Popen | None = None
    outputs: list[str] = field(default_factory=list)
    log: str = ""  # where the process writes its output (named in errors)
    check_every: float = 0.5  # seconds between counting the outputs
    _next_check: float = 0.0

    def __post_init__(self) -> None:
        self.state, self.total = RUNNING, len(self.outputs)

    def poll(self) -> bool:
        now = time.monotonic()
        if self.finished or now < self._next_check:
            return False
        self._next_check = now + self.check_every
        before = (self.step, self.state)
        self.step = sum(os.path.isfile(path) for path in self.outputs)
        code = self.process.poll()
        if code is not None:
            if self.cancelling:
                self.error, self.state = "Cancelled", CANCELLED
            elif code:
                self.error, self.state = f"the batch process stopped with exit status {code}; see {self.log}", FAILED
            else:
                self.state = DONE
            self.finished_at = now
        return (self.step, self.state) != before

    def cancel(self) -> None:
        if not self.finished:
            self.cancelling = True
            self.process.terminate()

    @property
    def status_text(self) -> str:
        if self.state == RUNNING and not self.cancelling:
            return f"{self.step} of {self.total} done"
        return super().status_text


class JobBoard:
    """The jobs the UI follows: any number at once, each on the client that took it.

    Finished jobs stay listed for `keep_seconds` (at most `keep` of them), then are dropped.
    """

    def __init__(self, keep: int = 10, keep_seconds: float = 120.0):
        self.keep, self.keep_seconds = keep, keep_seconds
        self.changed: list[Job] = []  # jobs that had news in the last poll (redraw, new previews)
        self._jobs: list[Job] = []
        self._next_prune = 0.0

    @property
    def jobs(self) -> list[Job]:
        """Every listed job, oldest first."""
        return list(self._jobs)

    @property
    def active(self) -> list[Job]:
        return [job for job in self._jobs if not job.finished]

    def submit(self, client: BackendClient, task: str, params: dict, then: FollowUp | None = None) -> Job:
        """Submit a job; `then`: one to submit on the same client when it is done (its job: then.job)."""
        job = Job.submit(client, task, params)
        job.then = then
        self._jobs.append(job)
        return job

    def add(self, job: Job) -> Job:
        """List a job started elsewhere (a ProcessJob)."""
        self._jobs.append(job)
        return job

    def poll(self) -> list[Job]:
        """Drain every unfinished job's messages and submit the follow-ups of those done; return the jobs that
        finished since the last poll."""
        self.changed = [job for job in self._jobs if job.poll()]
        finished = [job for job in self.changed if job.finished]
        for job in finished:
            then = job.then
            if then is not None and then.job is None and job.state == DONE and not job.cancelling:
                then.job = self.submit(job.client, then.task, then.params)
        now = time.monotonic()
        if finished or now >= self._next_prune:
            self._prune(now)
        return finished

    def cancel(self, job: Job) -> None:
        job.cancel()

    def _prune(self, now: float) -> None:
        self._next_prune = now + 1.0
        done = [job for job in self._jobs if job.finished]
        too_old = now - self.keep_seconds
        dropped = {id(job) for job in done[: max(0, len(done) - self.keep)]}
        dropped |= {id(job) for job in done if job.finished_at < too_old}
        self._jobs = [job for job in self._jobs if id(job) not in dropped]


def _known(cls: type, data: dict) -> Any:
    """A dataclass from the fields it knows (unknown ones are ignored); None when a required one is missing."""
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{key: value for key, value in data.items() if key in names})
    except TypeError:
        return None
