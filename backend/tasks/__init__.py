"""The task registry: one module per task, each with `run(ctx: JobContext, params) -> GenerateResult`.

A task's parameters are declared once, in protocol.TASK_PARAMS (the worker checks both lists agree);
this table says which function runs it.
"""

from __future__ import annotations

from collections.abc import Callable

from backend.tasks import (
    download_model,
    img2img,
    inpaint,
    list_models,
    pbr,
    project,
    train_lora,
    travel,
    txt2img,
    upscale,
)

TASKS: dict[str, Callable] = {
    "txt2img": txt2img.run,
    "pbr": pbr.run,
    "inpaint": inpaint.run,
    "make_seamless": inpaint.run_make_seamless,
    "img2img": img2img.run,
    "upscale": upscale.run,
    "download_model": download_model.run,
    "list_models": list_models.run,
    "train_lora": train_lora.run,
    "travel": travel.run,
    "project": project.run,
}
