"""The pipeline steps the tasks share, each as diffusers' pipelines do it: checks, seeds, prompt encoding,
the pipeline's own denoising loop with a fresh scheduler, cancel and progress (`denoise`), picture encoding
(img2img's prepare_latents) and decoding, and the stages' timings.

The runners in backend/tasks/ are built from these steps; no runner imports another runner.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from backend import vae_tiles
from backend.context import Cancelled
from backend.deepcache import deep_cache
from backend.families import family_of, size_multiple
from backend.schedulers import call_arguments
from backend.seamless import seamless
from sdtex_contract.protocol import INVALID_PARAMS, SEED_MAX, ProtocolError, TaskParams

if TYPE_CHECKING:
    import numpy as np

StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class PipelineOutput:
    """What an image pipeline run gives back: one picture per seed, and its stages' timings."""

    images: list  # PIL pictures (output_type "pil"), else float arrays / tensors in 0..1
    seeds: list[int | None]  # None where no seed ran (upscale by Lanczos alone)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage: encode, denoise, decode...


class Stages:
    """A run's stages and hooks: each stage announced to on_stage(name) (when given) and timed into `timings`
    (repeated ones, like a tile's, add up); on_step and should_cancel for its denoising loops."""

    def __init__(
        self,
        on_stage: Callable[[str], None] | None = None,
        timings: dict[str, float] | None = None,
        *,
        on_step: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.announce = on_stage or (lambda name: None)
        self.timings: dict[str, float] = timings if timings is not None else {}
        self.on_step, self.should_cancel = on_step, should_cancel

    @contextlib.contextmanager
    def timed(self, timing: str, stage: str = "") -> Iterator[None]:
        """Time the block as `timing`, after announcing `stage` (none when empty)."""
        if stage:
            self.announce(stage)
        start = time.perf_counter()
        yield
        self.timings[timing] = self.timings.get(timing, 0.0) + time.perf_counter() - start


# --- checks -----------------------------------------------------------------------------------------------


def check_model_takes_plain_latents(pipe: DiffusionPipeline, task: str) -> None:
    """Inpainting U-Nets take 9 input channels (latents, mask, masked image): they can only inpaint."""
    channels = pipe.unet.config.in_channels
    if channels != 4:
        raise ProtocolError(
            INVALID_PARAMS,
            f"model is an inpainting model ({channels}-channel U-Net): use it with the inpaint task, not {task}",
            {"param": "model", "accepted": "a model with a 4-channel U-Net", "value": channels},
        )


def check_size(pipe: DiffusionPipeline, params: TaskParams) -> None:
    """params.width and params.height suit the model (multiples of its size_multiple)."""
    multiple = size_multiple(pipe)
    for name in ("width", "height"):
        value = getattr(params, name)
        if value % multiple:
            raise ProtocolError(
                INVALID_PARAMS,
                f"{name} must be a multiple of {multiple} for this model, got {value}",
                {"param": name, "accepted": f"multiples of {multiple}", "value": value},
            )


def denoising_steps(steps: int, strength: float) -> int:
    """The steps img2img runs: the last int(steps * strength) of the schedule (diffusers' get_timesteps)."""
    return min(int(steps * strength), steps)


def check_strength(steps: int, strength: float, name: str = "strength") -> None:
    """A strength above 0 must leave at least one denoising step (diffusers would fail or do nothing)."""
    if strength > 0 and denoising_steps(steps, strength) < 1:
        raise ProtocolError(
            INVALID_PARAMS,
            f"{name} {strength:g} with {steps} steps runs no denoising step (int(steps * {name}) is 0): "
            f"raise steps or {name}, or use {name} 0 to keep the image",
            {"param": name, "accepted": f"0, or at least {1 / steps:g} with {steps} steps", "value": strength},
        )


def check_not_cancelled(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel is not None and should_cancel():
        raise Cancelled()


# --- seeds and the prompt ---------------------------------------------------------------------------------


def image_seeds(params: TaskParams, count: int | None = None) -> list[int]:
    """Image i uses seed + i (wrapping at SEED_MAX), so any image of a batch can be redone alone.
    count: how many (default params.batch_size)."""
    first = params.seed if params.seed is not None else secrets.randbelow(SEED_MAX + 1)
    return [(first + i) % (SEED_MAX + 1) for i in range(params.batch_size if count is None else count)]


def cpu_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image (CPU generators work for a pipeline on any device)."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def uses_guidance(pipe: DiffusionPipeline, guidance_scale: float) -> bool:
    """Classifier-free guidance on, as diffusers decides (guidance-distilled U-Nets never use it)."""
    return guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None


def encode_prompt(
    pipe: DiffusionPipeline, params: TaskParams, guidance: bool, device: torch.device, count: int | None = None
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


def encode_prompt_stage(
    pipe: DiffusionPipeline, params: TaskParams, stages: Stages, device: torch.device, count: int | None = None
) -> dict:
    """The "encoding" stage: encode_prompt, with classifier-free guidance as diffusers decides."""
    with stages.timed("encode", "encoding"):
        embeds = encode_prompt(pipe, params, uses_guidance(pipe, params.guidance_scale), device, count)
    return embeds


# --- the denoising loop -----------------------------------------------------------------------------------


@contextlib.contextmanager
def swapped_scheduler(pipe: DiffusionPipeline, scheduler: SchedulerMixin) -> Iterator[None]:
    """`scheduler` in the pipeline for the block only: the warm pipeline keeps its own."""
    original_scheduler = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = original_scheduler


@contextlib.contextmanager
def circular(pipe: DiffusionPipeline, axes: str) -> Iterator[None]:
    """Circular padding on the U-Net's and the VAE's convolutions on the seamless axes, for the block."""
    if axes != "none":
        pipe.vae.disable_tiling()  # tiles would wrap one by one
    with seamless([pipe.unet, pipe.vae], axes):
        yield


def sampling(params: TaskParams) -> dict:
    """The pipeline call's arguments every task passes alike: steps and CFG scale."""
    return {"num_inference_steps": params.steps, "guidance_scale": params.guidance_scale}


def denoise(
    pipe: DiffusionPipeline,
    scheduler: SchedulerMixin,
    *,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    speed: str = "off",
    **call,
) -> torch.Tensor:
    """The pipeline's own denoising loop to latents (output_type="latent") with `scheduler` swapped in and
    the U-Net caching its deep features as Speed `speed` says (backend/deepcache.py), for this call only.
    on_step(step, total, latents) runs after every step; when should_cancel() turns true
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

    with swapped_scheduler(pipe, scheduler), deep_cache(pipe.unet, speed):
        latents = pipe(
            **call_arguments(scheduler),  # what the sampler needs (TCD's eta)
            **call,
            output_type="latent",
            callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images
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
        image = vae_tiles.decode(vae, latents)  # in tiles, exactly, when vae_tiling is on
    finally:
        if upcast:  # also after an out-of-memory error: the warm model must stay as loaded
            vae.to(dtype=torch.float16)
    pipe.maybe_free_model_hooks()
    return pipe.image_processor.postprocess(image, output_type=output_type)


def denoise_and_decode(
    pipe: DiffusionPipeline, scheduler: SchedulerMixin, stages: Stages, *, output_type: str = "pil", **call
) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
    """The "denoising" stage (`denoise` with the pipeline's arguments and its speed in `call`, stages' on_step
    and should_cancel), then the "decoding" stage."""
    with stages.timed("denoise", "denoising"):
        latents = denoise(pipe, scheduler, on_step=stages.on_step, should_cancel=stages.should_cancel, **call)
    with stages.timed("decode", "decoding"):
        images = decode_latents(pipe, latents, output_type=output_type)
    return images


# --- encoding a picture -----------------------------------------------------------------------------------


def pixels_of(pipe: DiffusionPipeline, picture: PIL.Image.Image) -> torch.Tensor:
    """The pipeline's own preprocessing: (1, 3, H, W) floats in -1..1."""
    return pipe.image_processor.preprocess(picture)


def encode_source(
    pipe: DiffusionPipeline,
    pixels: torch.Tensor,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generators: list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The img2img pipelines' prepare_latents encoding: one VAE pass over the picture, then one sample of its
    latent distribution per image, drawn with that image's generator (or `noise`: the standard normal draws,
    (N, 4, h, w), given by the caller), scaled as the family's pipeline scales them.

    Adapted from diffusers' StableDiffusionImg2ImgPipeline.prepare_latents and
    StableDiffusionXLImg2ImgPipeline.prepare_latents (0.42.1): SDXL's encodes in fp32 when the VAE config
    says force_upcast, and normalises by latents_mean/std when the VAE has them.
    """
    vae = pipe.vae
    honours_config = family_of(pipe).decode_honours_vae_config  # SDXL's img2img honours it when encoding too
    upcast = honours_config and vae.config.force_upcast
    loaded_dtype = vae.dtype
    pixels = pixels.to(device=device, dtype=dtype)
    if upcast:
        pixels = pixels.float()
        vae.to(dtype=torch.float32)
    try:
        dist = vae.encode(pixels).latent_dist
        if noise is None:
            latents = torch.cat([dist.sample(generator) for generator in generators])
        else:
            latents = dist.mean + dist.std * noise.to(device=dist.mean.device, dtype=dist.mean.dtype)
    finally:
        if upcast:  # also after an error: the warm model stays as loaded
            vae.to(dtype=loaded_dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if honours_config:
        latents = latents.to(dtype)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(device=device, dtype=dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(device=device, dtype=dtype)
            return (latents - mean) * vae.config.scaling_factor / std
    return vae.config.scaling_factor * latents
