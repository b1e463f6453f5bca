"""Validating a request's params: the task named in it first, then that task's table."""

from __future__ import annotations

from typing import Any

from .errors import INVALID_REQUEST, ProtocolError, invalid
from .tables import MODEL_PARAMS
from .tasks import TASKS, TaskParams
from .typed import PARAMS_CLASSES, Txt2ImgParams


def task_params(params: Any) -> TaskParams:
    """Validate a `run` request's params: the task first, then that task's table."""
    task = params.get("task") if isinstance(params, dict) else None
    if not isinstance(task, str) or task not in PARAMS_CLASSES:
        raise invalid("task", "one of " + ", ".join(TASKS), task)
    return PARAMS_CLASSES[task].from_dict(params)


def model_params(params: Any) -> Txt2ImgParams:
    """Validate the model-related subset (for load_model): a txt2img parameter set with dummy output."""
    if not isinstance(params, dict):
        raise ProtocolError(INVALID_REQUEST, f"params must be an object, got {type(params).__name__}")
    names = {p.name for p in MODEL_PARAMS}
    chosen = {k: v for k, v in params.items() if k in names}
    return Txt2ImgParams.from_dict({**chosen, "prompt": "warm-up", "output_dir": "/unused"})
