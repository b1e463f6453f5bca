"""Text to image, step by step like a diffusers pipeline, with timings, per-image seeds and cancel.

The denoising loop is the pipeline's own (called with output_type="latent"); encoding and decoding are
done here, exactly as the pipeline does them, so each stage can be timed and a cancelled run never
pays for a VAE decode.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import PIL.Image
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from backend.schedulers import make_scheduler
from backend.seamless import seamless
from blender_sd_addon.protocol import INVALID_PARAMS, SEED_MAX, GenerateParams, ProtocolError

StepCallback = Callable[[int, int, torch.Tensor], None]


class Cancelled(Exception):
    """The client cancelled the run; nothing was decoded."""


@dataclass
class Txt2ImgOutput:
    images: list[PIL.Image.Image]
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)  # encode, denoise, decode (seconds)


def size_multiple(pipe: DiffusionPipeline) -> int:
    """Pixels per latent cell times the U-Net's downsampling: sizes must divide by this to stay valid
    all the way down the U-Net (and for circular padding to tile)."""
    downsampling = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return pipe.vae_scale_factor * downsampling


def check_inputs(pipe: DiffusionPipeline, params: GenerateParams) -> None:
    multiple = size_multiple(pipe)
    for name in ("width", "height"):
        value = getattr(params, name)
        if value % multiple:
            raise ProtocolError(
                INVALID_PARAMS,
                f"{name} must be a multiple of {multiple} for this model, got {value}",
                {"param": name, "accepted": f"multiples of {multiple}", "value": value},
            )


def image_seeds(params: GenerateParams) -> list[int]:
    """Image i uses seed + i (wrapping at SEED_MAX), so any image of a batch can be redone alone."""
    first = params.seed if params.seed is not None else secrets.randbelow(SEED_MAX + 1)
    return [(first + i) % (SEED_MAX + 1) for i in range(params.batch_size)]


def encode_prompt(pipe: DiffusionPipeline, params: GenerateParams, guidance: bool, device: torch.device) -> dict:
    """Prompt embeddings as keyword arguments for the pipeline call (SDXL adds pooled embeddings)."""
    negative = params.negative_prompt or None  # as the pipeline sees a missing negative prompt (SDXL zeroes it)
    embeds = pipe.encode_prompt(
        prompt=params.prompt,
        device=device,
        num_images_per_prompt=params.batch_size,
        do_classifier_free_guidance=guidance,
        negative_prompt=negative,
    )
    names = ["prompt_embeds", "negative_prompt_embeds"]
    if isinstance(pipe, StableDiffusionXLPipeline):
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return dict(zip(names, embeds, strict=True))


def decode_latents(pipe: DiffusionPipeline, latents: torch.Tensor) -> list[PIL.Image.Image]:
    """The pipeline's own decode: unscale, VAE decode (fp32 where SDXL's VAE needs it), postprocess."""
    vae = pipe.vae
    upcast = isinstance(pipe, StableDiffusionXLPipeline) and vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        pipe.upcast_vae()
    latents = latents.to(dtype=next(vae.post_quant_conv.parameters()).dtype)  # already on the pipeline's device
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if upcast:
        vae.to(dtype=torch.float16)
    pipe.maybe_free_model_hooks()
    return pipe.image_processor.postprocess(image, output_type="pil")


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
    cancel_requested = should_cancel or (lambda: False)
    # 1. Check inputs
    check_inputs(pipe, params)

    # 2. Scheduler: a fresh one from the pipeline's own config, swapped in for this run only
    original_scheduler = pipe.scheduler
    scheduler = make_scheduler(params.scheduler, original_scheduler.config)

    # 3. Seeds: one CPU generator per image (CPU generators work for a pipeline on any device)
    seeds = image_seeds(params)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

    # 4. Encode the prompt
    timings = {}
    stage("encoding")
    guidance = params.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None  # as diffusers decides
    start = time.perf_counter()
    embeds = encode_prompt(pipe, params, guidance, device or pipe._execution_device)
    timings["encode"] = time.perf_counter() - start

    # 5. Denoise: the pipeline's loop, stopping at latents; cancel sets the pipeline's interrupt flag
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

    if params.seamless != "none":
        pipe.vae.disable_tiling()  # tiles would wrap one by one
    with seamless([pipe.unet, pipe.vae], params.seamless):
        stage("denoising")
        start = time.perf_counter()
        pipe.scheduler = scheduler
        try:
            latents = pipe(
                **embeds,
                num_inference_steps=params.steps,
                guidance_scale=params.guidance_scale,
                height=params.height,
                width=params.width,
                generator=generators,
                output_type="latent",
                callback_on_step_end=step_end,
                callback_on_step_end_tensor_inputs=["latents"],
            ).images
        finally:
            pipe.scheduler = original_scheduler
        timings["denoise"] = time.perf_counter() - start
        if cancelled:
            raise Cancelled()

        # 6. Decode
        stage("decoding")
        start = time.perf_counter()
        images = decode_latents(pipe, latents)
        timings["decode"] = time.perf_counter() - start

    return Txt2ImgOutput(images=images, seeds=seeds, timings=timings)
