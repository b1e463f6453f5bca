"""The task registry: one module per task, each with `run(ctx: JobContext, params) -> GenerateResult`.

A task's parameters are declared once, in protocol.TASK_PARAMS (the worker checks both lists agree);
this table says which function runs it.
"""

from __future__ import annotations

from collections.abc import Callable

from backend.tasks import pbr, txt2img

TASKS: dict[str, Callable] = {
    "txt2img": txt2img.run,
    "pbr": pbr.run,
}
