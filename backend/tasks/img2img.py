"""Image to image ("variations"): the source picture noised to `strength`, then denoised with the prompt.

Steps like diffusers' StableDiffusionImg2ImgPipeline (and the SDXL one), on the warm weights through
`model.pipeline("img2img")` (from_pipe: nothing is loaded twice): check inputs, encode the prompt, encode
the picture with the VAE, denoise (the pipeline's own loop, stopping at latents), decode, save.

The picture is encoded here, exactly as the pipeline's prepare_latents does it, and handed to the pipeline
as latents. So the encode is timed on its own, runs inside the seamless context (the encoder's hand-made
downsampling pads wrap too, see backend/seamless.py), and costs one VAE pass per request instead of one
per image of a batch; each image still samples the latent distribution with its own generator, so the
result is bit for bit the pipeline's, and image i of a batch can be redone alone with seed + i.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline

from backend.context import JobContext
from backend.families import family_of, size_multiple
from backend.images import fit, tiling_axes, to_rgb
from backend.inputs import open_image
from backend.outputs import output_folder
from backend.schedulers import make_scheduler
from backend.seamless import seamless
from backend.tasks.txt2img import (
    JobProgress,
    StepCallback,
    check_model_takes_plain_latents,
    decode_latents,
    denoise,
    encode_prompt,
    image_seeds,
    uses_guidance,
)
from blender_sd_addon.protocol import (
    INVALID_PARAMS,
    SIZE_MAX,
    SIZE_MIN,
    GenerateResult,
    Img2ImgParams,
    ProtocolError,
    TaskParams,
)


@dataclass
class Img2ImgOutput:
    images: list  # PIL pictures (output_type "pil"), else float arrays / tensors in 0..1
    seeds: list[int]
    timings: dict[str, float] = field(default_factory=dict)  # encode, encode_image, denoise, decode (seconds)


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


def source_picture(image: PIL.Image.Image, params: TaskParams) -> PIL.Image.Image:
    """The input as the model gets it: RGB (any mode converted), at width x height by the resize mode, or at
    its own size with resize "keep", which must then lie within the sizes the worker generates."""
    picture = fit(to_rgb(image), params.width, params.height, params.resize)
    if params.resize == "keep" and not (
        SIZE_MIN <= picture.width <= SIZE_MAX and SIZE_MIN <= picture.height <= SIZE_MAX
    ):
        raise ProtocolError(
            INVALID_PARAMS,
            f"image is {picture.width}x{picture.height} pixels; with resize keep each side must be from {SIZE_MIN} "
            f"to {SIZE_MAX} pixels, the sizes this worker generates: use resize fit, fill or stretch with width "
            "and height (and the upscale task for larger results)",
            {"param": "image", "accepted": f"sides from {SIZE_MIN} to {SIZE_MAX} pixels", "value": picture.size},
        )
    return picture


def check_inputs(pipe: DiffusionPipeline, picture: PIL.Image.Image, params: TaskParams) -> None:
    """The model takes plain latents, the picture's size suits it, and strength leaves a step to run."""
    check_model_takes_plain_latents(pipe, "img2img")
    multiple = size_multiple(pipe)
    for name, value in (("width", picture.width), ("height", picture.height)):
        if value % multiple:
            param = "image" if params.resize == "keep" else name
            what = f"the image's {name} (resize keep)" if param == "image" else name
            raise ProtocolError(
                INVALID_PARAMS,
                f"{what} must be a multiple of {multiple} for this model, got {value}"
                + ("; use resize fit, fill or stretch with width and height" if param == "image" else ""),
                {"param": param, "accepted": f"multiples of {multiple}", "value": value},
            )
    check_strength(params.steps, params.strength)


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


@torch.no_grad()
def run_img2img(
    pipe: DiffusionPipeline,
    params: TaskParams,
    picture: PIL.Image.Image,
    *,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
    device: torch.device | None = None,
    output_type: str = "pil",
) -> Img2ImgOutput:
    """params.batch_size variations of `picture` (RGB at its working size, see source_picture), on `pipe`, the
    family's img2img pipeline. params.seamless "auto" is resolved on the picture. Raises Cancelled when
    should_cancel() turns true; output_type "np" gives floats in 0..1 (exact comparisons in tests)."""
    stage = on_stage or (lambda name: None)
    device = device or pipe._execution_device
    # 1. Check inputs
    check_inputs(pipe, picture, params)
    axes = tiling_axes(picture) if params.seamless == "auto" else params.seamless

    # 2. Seeds: one CPU generator per image; strength 0 keeps the picture and runs no model
    seeds = image_seeds(params)
    if params.strength == 0:
        kept = [picture.copy() if output_type == "pil" else np.asarray(picture, np.float32) / 255 for _ in seeds]
        timings = dict.fromkeys(("encode", "encode_image", "denoise", "decode"), 0.0)
        return Img2ImgOutput(images=kept, seeds=seeds, timings=timings)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    scheduler = make_scheduler(params.scheduler, pipe.scheduler.config)

    # 3. Encode the prompt
    timings = {}
    stage("encoding")
    start = time.perf_counter()
    embeds = encode_prompt(pipe, params, uses_guidance(pipe, params.guidance_scale), device)
    timings["encode"] = time.perf_counter() - start

    if axes != "none":
        pipe.vae.disable_tiling()  # tiles would wrap one by one
    with seamless([pipe.unet, pipe.vae], axes):
        # 4. Encode the picture: one VAE pass, one latent sample per image
        start = time.perf_counter()
        dtype = embeds["prompt_embeds"].dtype
        init_latents = encode_source(pipe, pixels_of(pipe, picture), dtype=dtype, device=device, generators=generators)
        timings["encode_image"] = time.perf_counter() - start

        # 5. Denoise from the picture's latents noised to `strength` (the generators go on to draw the noise)
        stage("denoising")
        start = time.perf_counter()
        latents = denoise(
            pipe,
            scheduler,
            on_step=on_step,
            should_cancel=should_cancel,
            **embeds,
            image=init_latents,
            strength=params.strength,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            generator=generators,
        )
        timings["denoise"] = time.perf_counter() - start

        # 6. Decode
        stage("decoding")
        start = time.perf_counter()
        images = decode_latents(pipe, latents, output_type=output_type)
        timings["decode"] = time.perf_counter() - start

    return Img2ImgOutput(images=list(images), seeds=seeds, timings=timings)


def run(ctx: JobContext, params: Img2ImgParams) -> GenerateResult:
    """The img2img job: check the image and the folder, load (or reuse) the model, run, save and announce."""
    # 1. Check inputs that need no model: strength, the image decodes and fits, the output folder is writable
    check_strength(params.steps, params.strength)
    picture = source_picture(open_image(ctx.inputs, params.image, "image"), params)
    output_folder(params)
    axes = tiling_axes(picture) if params.seamless == "auto" else params.seamless
    resolved = dataclasses.replace(params, seamless=axes)  # "auto" decided: VAE tiling, PBR maps, metadata

    # 2. Model (warm, or loaded now) and its img2img variant, sharing the weights
    ctx.stage("loading_model")
    model, load_seconds = ctx.models.get(resolved)
    ctx.check_cancelled()
    pipe = model.pipeline("img2img")
    progress = JobProgress(ctx, params.preview_every, model.family.preview_factors)

    # 3. Encode, denoise and decode
    output = run_img2img(
        pipe,
        resolved,
        picture,
        on_step=progress.step,
        should_cancel=ctx.is_cancelled,
        on_stage=progress.stage,
        device=model.device,
    )

    # 4. Save: every file is announced as soon as it is complete
    return ctx.save(output, params, resolved, width=picture.width, height=picture.height, load_seconds=load_seconds)
