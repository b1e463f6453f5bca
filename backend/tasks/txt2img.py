"""Text to image, step by step like a diffusers pipeline, with timings, per-image seeds and cancel.

The denoising loop is the pipeline's own (called with output_type="latent"); encoding and decoding are
done here, exactly as the pipeline does them, so each stage can be timed and a cancelled run never
pays for a VAE decode. `run_txt2img` is the pipeline (images in memory); `run` is the job around it
(model, progress, previews, files).

The steps every task shares live here too: seeds, prompt encoding, the pipeline's loop with a fresh
scheduler, cancel and progress (`denoise`), decoding, and the job's events (`JobProgress`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from backend.context import Cancelled, JobContext
from backend.families import Factors, family_of, size_multiple
from backend.outputs import output_folder
from backend.previews import preview_event
from backend.schedulers import make_scheduler
from backend.seamless import seamless
from blender_sd_addon.protocol import (
    EVENT_PREVIEW,
    INVALID_PARAMS,
    SEED_MAX,
    GenerateParams,
    GenerateResult,
    ProtocolError,
)

if TYPE_CHECKING:
    import numpy as np

StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class Txt2ImgOutput:
    images: list[PIL.Image.Image]
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)  # encode, denoise, decode (seconds)


def check_model_takes_plain_latents(pipe: DiffusionPipeline, task: str) -> None:
    """Inpainting U-Nets take 9 input channels (latents, mask, masked image): they can only inpaint."""
    channels = pipe.unet.config.in_channels
    if channels != 4:
        raise ProtocolError(
            INVALID_PARAMS,
            f"model is an inpainting model ({channels}-channel U-Net): use it with the inpaint task, not {task}",
            {"param": "model", "accepted": "a model with a 4-channel U-Net", "value": channels},
        )


def check_inputs(pipe: DiffusionPipeline, params: GenerateParams) -> None:
    check_model_takes_plain_latents(pipe, "txt2img")
    multiple = size_multiple(pipe)
    for name in ("width", "height"):
        value = getattr(params, name)
        if value % multiple:
            raise ProtocolError(
                INVALID_PARAMS,
                f"{name} must be a multiple of {multiple} for this model, got {value}",
                {"param": name, "accepted": f"multiples of {multiple}", "value": value},
            )


def image_seeds(params: GenerateParams, count: int | None = None) -> list[int]:
    """Image i uses seed + i (wrapping at SEED_MAX), so any image of a batch can be redone alone.
    count: how many (default params.batch_size)."""
    first = params.seed if params.seed is not None else secrets.randbelow(SEED_MAX + 1)
    return [(first + i) % (SEED_MAX + 1) for i in range(params.batch_size if count is None else count)]


def uses_guidance(pipe: DiffusionPipeline, guidance_scale: float) -> bool:
    """Classifier-free guidance on, as diffusers decides (guidance-distilled U-Nets never use it)."""
    return guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None


def encode_prompt(
    pipe: DiffusionPipeline, params: GenerateParams, guidance: bool, device: torch.device, count: int | None = None
) -> dict:
    """Prompt embeddings as keyword arguments for the pipeline call (SDXL adds pooled embeddings).
    count: images per prompt (default params.batch_size)."""
    negative = params.negative_prompt or None  # as the pipeline sees a missing negative prompt (SDXL zeroes it)
    embeds = pipe.encode_prompt(
        prompt=params.prompt,
        device=device,
        num_images_per_prompt=params.batch_size if count is None else count,
        do_classifier_free_guidance=guidance,
        negative_prompt=negative,
    )
    return dict(zip(family_of(pipe).prompt_embeds, embeds, strict=True))


def denoise(
    pipe: DiffusionPipeline,
    scheduler: SchedulerMixin,
    *,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    **call,
) -> torch.Tensor:
    """The pipeline's own denoising loop to latents (output_type="latent") with `scheduler` swapped in for
    this call only. on_step(step, total, latents) runs after every step; when should_cancel() turns true
    the pipeline's interrupt flag skips the remaining steps and Cancelled is raised (nothing is decoded).
    `call`: the pipeline's other arguments (embeddings, image, strength, sizes, generators...)."""
    cancel_requested = should_cancel or (lambda: False)
    if cancel_requested():
        raise Cancelled()
    cancelled = False

    def step_end(pipeline: DiffusionPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
        nonlocal cancelled
        if on_step is not None:
            on_step(i + 1, pipeline.num_timesteps, tensors["latents"])
        if cancel_requested():
            cancelled = pipeline._interrupt = True  # the remaining steps are skipped
        return tensors

    original_scheduler = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        latents = pipe(
            **call,
            output_type="latent",
            callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images
    finally:
        pipe.scheduler = original_scheduler
    if cancelled:
        raise Cancelled()
    return latents


def decode_latents(
    pipe: DiffusionPipeline, latents: torch.Tensor, output_type: str = "pil"
) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
    """The pipeline's own decode: unscale, VAE decode (fp32 where SDXL's VAE needs it), postprocess.
    output_type: "pil" (a list of pictures), or "np" / "pt" (a batch of floats in 0..1, for blending and
    exact comparisons)."""
    vae = pipe.vae
    honours_config = family_of(pipe).decode_honours_vae_config
    upcast = honours_config and vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(dtype=torch.float32)  # what the deprecated pipe.upcast_vae() does
    latents = latents.to(dtype=next(vae.post_quant_conv.parameters()).dtype)  # already on the pipeline's device
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if honours_config and mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    try:
        image = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:  # also after an out-of-memory error: the warm model must stay as loaded
            vae.to(dtype=torch.float16)
    pipe.maybe_free_model_hooks()
    return pipe.image_processor.postprocess(image, output_type=output_type)


@torch.no_grad()
def run_txt2img(
    pipe: DiffusionPipeline,
    params: GenerateParams,
    *,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
    device: torch.device | None = None,
) -> Txt2ImgOutput:
    """Generate params.batch_size images. Raises Cancelled when should_cancel() turns true.

    on_step(step, total, latents) runs after every step, on_stage(name) before "encoding", "denoising"
    and "decoding". device: the pipeline's execution device when the caller knows it (reading it walks
    every module).
    """
    stage = on_stage or (lambda name: None)
    # 1. Check inputs
    check_inputs(pipe, params)

    # 2. Scheduler: a fresh one from the pipeline's own config, swapped in for this run only
    scheduler = make_scheduler(params.scheduler, pipe.scheduler.config)

    # 3. Seeds: one CPU generator per image (CPU generators work for a pipeline on any device)
    seeds = image_seeds(params)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

    # 4. Encode the prompt
    timings = {}
    stage("encoding")
    guidance = uses_guidance(pipe, params.guidance_scale)
    start = time.perf_counter()
    embeds = encode_prompt(pipe, params, guidance, device or pipe._execution_device)
    timings["encode"] = time.perf_counter() - start

    # 5. Denoise: the pipeline's loop, stopping at latents; cancel sets the pipeline's interrupt flag
    if params.seamless != "none":
        pipe.vae.disable_tiling()  # tiles would wrap one by one
    if should_cancel is not None and should_cancel():
        raise Cancelled()
    with seamless([pipe.unet, pipe.vae], params.seamless):
        stage("denoising")
        start = time.perf_counter()
        latents = denoise(
            pipe,
            scheduler,
            on_step=on_step,
            should_cancel=should_cancel,
            **embeds,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            height=params.height,
            width=params.width,
            generator=generators,
        )
        timings["denoise"] = time.perf_counter() - start

        # 6. Decode
        stage("decoding")
        start = time.perf_counter()
        images = decode_latents(pipe, latents)
        timings["decode"] = time.perf_counter() - start

    return Txt2ImgOutput(images=images, seeds=seeds, timings=timings)


@dataclass
class JobProgress:
    """A pipeline's stages and steps as the job's status, progress and preview events.

    Tasks that run several denoising passes for one picture (tiles) set `passes` and `pass_index`: the
    progress then counts every pass's steps (step and total run over all passes) and a repeated
    "denoising" stage is announced once.
    """

    ctx: JobContext
    preview_every: int
    factors: Factors
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
        if self.preview_every and done % self.preview_every == 0:
            self.ctx.emit(EVENT_PREVIEW, asdict(preview_event(done, latents, self.factors)))


def run(ctx: JobContext, params: GenerateParams) -> GenerateResult:
    """The txt2img job: load (or reuse) the model, run the pipeline, save and announce each file."""
    # 1. Check inputs that need no model: the output folder must be writable before any denoising
    output_folder(params)

    # 2. Model (warm, or loaded now)
    ctx.stage("loading_model")
    model, load_seconds = ctx.models.get(params)
    ctx.check_cancelled()
    progress = JobProgress(ctx, params.preview_every, model.family.preview_factors)

    # 3. Denoise and decode
    output = run_txt2img(
        model.pipe,
        params,
        on_step=progress.step,
        should_cancel=ctx.is_cancelled,
        on_stage=progress.stage,
        device=model.device,
    )

    # 4. Save: every file is announced as soon as it is complete
    return ctx.save(output, params, params, width=params.width, height=params.height, load_seconds=load_seconds)
