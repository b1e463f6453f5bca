"""Tasks: one module per task, each a function (pipe, GenerateParams, callbacks) -> images, seeds, timings."""

from backend.tasks.txt2img import Cancelled, Txt2ImgOutput, run_txt2img

TASKS = {"txt2img": run_txt2img}

__all__ = ["TASKS", "Cancelled", "Txt2ImgOutput", "run_txt2img"]
