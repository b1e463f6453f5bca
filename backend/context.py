"""What a running job sees of the worker: its id, the model manager, the estimators, the uploaded inputs, and
callbacks for events, artifacts and cancel. Tasks take a JobContext and their parameters and return a result."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from backend.inputs import InputStore
from backend.models import ModelManager
from sdtex_contract.protocol import (
    EVENT_ARTIFACT,
    EVENT_PROGRESS,
    EVENT_STATUS,
    Artifact,
    ProgressEvent,
)


class Cancelled(Exception):
    """The client cancelled the job; the task stopped early."""


@dataclass
class JobContext:
    job_id: Any
    models: ModelManager
    inputs: InputStore
    emit: Callable[[str, dict], None] = lambda kind, data: None  # (event kind, data) for this job
    is_cancelled: Callable[[], bool] = lambda: False
    started: float = field(default_factory=time.perf_counter)
    # The worker's backend.estimators.Estimators (Marigold models, warm between jobs); None: the job makes its own
    # when it needs one (estimated_maps.job_estimators). Not imported here: the estimators import this module.
    estimators: Any = None
    # The worker's backend.preview_decoder.PreviewDecoders (the warm TAESD); None: the job makes its own.
    preview_decoders: Any = None

    def stage(self, name: str) -> None:
        self.emit(EVENT_STATUS, {"stage": name})

    def progress(self, step: int, total: int, elapsed: float) -> None:
        self.emit(EVENT_PROGRESS, asdict(ProgressEvent(step=step, total=total, elapsed=elapsed)))

    def artifact(self, artifact: Artifact) -> None:
        self.emit(EVENT_ARTIFACT, asdict(artifact))

    def check_cancelled(self) -> None:
        if self.is_cancelled():
            raise Cancelled()
