"""The job around an image pipeline, shared by the image tasks: load the model (warm, or now) and pick the
pipeline variant, report the pipeline's stages and steps as events, save the pictures (and their PBR maps and
metadata) and make the GenerateResult.

A runner reads like a diffusers pipeline's `__call__`:

    # 1. Check inputs that need no model       (its own checks, output_folder(params))
    job = ImageJob(ctx, params, resolved)     (it finds the PBR maps' estimator models too)
    # 2. Load                                   pipe = job.load("img2img")
    # 3. Run                                    output = run_img2img(pipe, resolved, picture, **job.callbacks())
    # 4. Save                                   return job.save(output, width, height)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline

from backend.context import JobContext
from backend.estimated_maps import check_estimators
from backend.families import Factors
from backend.outputs import save_images
from backend.preview_decoder import job_previewer
from backend.previews import Previewer
from backend.steps import PipelineOutput
from backend.upscaler import upscalers
from sdtex_contract.protocol import EVENT_PREVIEW, GenerateResult, TaskParams


@dataclass
class JobProgress:
    """A pipeline's stages and steps as the job's status, progress and preview events (made by `previews`: none
    without preview factors, for latents that are no image's, like the x4 upscaler's).

    Tasks that run several denoising passes for one picture (tiles) set `passes` and `pass_index`: the
    progress then counts every pass's steps (step and total run over all passes) and a repeated
    "denoising" stage is announced once.
    """

    ctx: JobContext
    preview_every: int
    previews: Previewer
    passes: int = 1
    pass_index: int = 0
    denoise_start: float = field(default_factory=time.perf_counter)
    _stages: list[str] = field(default_factory=list)

    def stage(self, name: str) -> None:
        if self.passes > 1 and name in self._stages:
            return
        if name == "denoising":
            self.denoise_start = time.perf_counter()
        self._stages.append(name)
        self.ctx.stage(name)

    def step(self, step: int, total: int, latents: torch.Tensor) -> None:
        done, steps = self.pass_index * total + step, self.passes * total
        self.ctx.progress(done, steps, time.perf_counter() - self.denoise_start)
        self.preview(done, latents)

    def preview(self, step: int, latents: torch.Tensor) -> None:
        if self.preview_every and self.previews and step % self.preview_every == 0 and self.previews.due():
            self.ctx.emit(EVENT_PREVIEW, asdict(self.previews.event(step, latents)))


class ImageJob:
    """One image job: `params` as requested (reported back), `resolved` as run (e.g. seamless "auto" decided:
    VAE tiling, PBR maps and the files' metadata follow it)."""

    def __init__(self, ctx: JobContext, params: TaskParams, resolved: TaskParams | None = None) -> None:
        self.ctx, self.params = ctx, params
        self.resolved = resolved if resolved is not None else params
        check_estimators(self.resolved)  # the maps' estimator models are found before the generator runs
        self.load_seconds = 0.0
        self.model_name = ""  # the model that ran ("" when none did)
        self.device: torch.device | None = None
        self.progress: JobProgress | None = None

    def _loaded(self, get: Callable[[], tuple[Any, float]], name: str, factors: Callable[[Any], Factors]) -> Any:
        self.ctx.stage("loading_model")
        loaded, self.load_seconds = get()
        self.ctx.check_cancelled()
        self.model_name, self.device = name, loaded.device
        previews = job_previewer(self.ctx, self.params, loaded.pipe, factors(loaded), loaded.device)
        self.progress = JobProgress(self.ctx, self.params.preview_every, previews)
        return loaded

    def load(self, variant: str = "", model_params: TaskParams | None = None) -> DiffusionPipeline:
        """The model (warm, or loaded now for `model_params`, default `resolved`) as its `variant` pipeline
        ("img2img", "inpaint": from_pipe, sharing the weights), or as loaded."""
        wanted = model_params if model_params is not None else self.resolved
        model = self._loaded(lambda: self.ctx.models.get(wanted), self.params.model, lambda m: m.family.preview_factors)
        return model.pipeline(variant) if variant else model.pipe

    def load_upscaler(self) -> DiffusionPipeline:
        """The x4 upscaler (warm, or loaded now); its latents get no preview."""
        get = lambda: upscalers(self.ctx.models).get(self.params)  # noqa: E731
        return self._loaded(get, self.params.upscaler_model, lambda upscaler: ()).pipe

    def callbacks(self) -> dict:
        """The pipeline run's hooks: steps and stages as events, the job's cancel, the model's device."""
        progress = self.progress
        return dict(
            on_step=progress.step, should_cancel=self.ctx.is_cancelled, on_stage=progress.stage, device=self.device
        )

    def save(self, output: PipelineOutput, width: int, height: int, names: list[str] | None = None) -> GenerateResult:
        """The last step: write every picture (and its maps), each announced once complete, and make the result.
        names: the pictures' file-name parts after the job's stamp (default: their seeds)."""
        ctx = self.ctx
        ctx.stage("saving")
        save_start = time.perf_counter()
        records = save_images(output.images, output.seeds, self.resolved, announce=ctx.artifact, names=names, ctx=ctx)
        timings = {"load": self.load_seconds, **output.timings, "save": time.perf_counter() - save_start}
        timings["total"] = time.perf_counter() - ctx.started
        return GenerateResult(
            images=records,
            seed=output.seeds[0],
            width=width,
            height=height,
            model=self.model_name,
            seamless=self.resolved.seamless,
            timings=timings,
            params=self.params.to_dict(),
            task=self.params.task,
        )
