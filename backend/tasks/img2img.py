"""Image to image ("variations"): the source picture noised to `strength`, then denoised with the prompt.

Steps like diffusers' StableDiffusionImg2ImgPipeline (and the SDXL one), on the warm weights through
`model.pipeline("img2img")` (from_pipe: nothing is loaded twice): check inputs, encode the prompt, encode
the picture with the VAE, denoise (the pipeline's own loop, stopping at latents), decode, save.

The picture is encoded here (backend.steps.encode_source), exactly as the pipeline's prepare_latents does
it, and handed to the pipeline as latents. So the encode is timed on its own, runs inside the seamless
context (the encoder's hand-made downsampling pads wrap too, see backend/seamless.py), and costs one VAE
pass per request instead of one per image of a batch; each image still samples the latent distribution
with its own generator, so the result is bit for bit the pipeline's, and image i of a batch can be redone
alone with seed + i.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline

from backend.context import JobContext
from backend.families import size_multiple
from backend.images import fit, tiling_axes, to_rgb
from backend.inputs import open_image
from backend.jobshell import ImageJob
from backend.outputs import output_folder
from backend.registry import runs
from backend.schedulers import make_scheduler
from backend.steps import (
    PipelineOutput,
    Stages,
    StepCallback,
    check_model_takes_plain_latents,
    check_strength,
    circular,
    cpu_generators,
    denoise_and_decode,
    encode_prompt_stage,
    encode_source,
    image_seeds,
    pixels_of,
    sampling,
)
from sdtex_contract.protocol import (
    INVALID_PARAMS,
    SIZE_MAX,
    SIZE_MIN,
    GenerateResult,
    Img2ImgParams,
    ProtocolError,
    TaskParams,
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


def kept(picture: PIL.Image.Image, seeds: list[int], output_type: str) -> PipelineOutput:
    """strength 0: the picture itself for every seed, and no model run."""
    pictures = [picture.copy() if output_type == "pil" else np.asarray(picture, np.float32) / 255 for _ in seeds]
    timings = dict.fromkeys(("encode", "encode_image", "denoise", "decode"), 0.0)
    return PipelineOutput(images=pictures, seeds=seeds, timings=timings)


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
) -> PipelineOutput:
    """params.batch_size variations of `picture` (RGB at its working size, see source_picture), on `pipe`, the
    family's img2img pipeline. params.seamless "auto" is resolved on the picture. Raises Cancelled when
    should_cancel() turns true; output_type "np" gives floats in 0..1 (exact comparisons in tests)."""
    stages = Stages(on_stage, on_step=on_step, should_cancel=should_cancel)
    device = device or pipe._execution_device
    # 1. Check inputs
    check_inputs(pipe, picture, params)
    axes = tiling_axes(picture) if params.seamless == "auto" else params.seamless

    # 2. Seeds: one CPU generator per image; strength 0 keeps the picture and runs no model
    seeds = image_seeds(params)
    if params.strength == 0:
        return kept(picture, seeds, output_type)
    generators = cpu_generators(seeds)
    scheduler = make_scheduler(params.scheduler, pipe.scheduler.config)

    # 3. Encode the prompt
    embeds = encode_prompt_stage(pipe, params, stages, device)

    with circular(pipe, axes):
        # 4. Encode the picture: one VAE pass, one latent sample per image
        with stages.timed("encode_image"):
            pixels, dtype = pixels_of(pipe, picture), embeds["prompt_embeds"].dtype
            init_latents = encode_source(pipe, pixels, dtype=dtype, device=device, generators=generators)

        # 5. Denoise from the picture's latents noised to `strength` (the generators go on to draw the noise),
        # 6. decode
        images = denoise_and_decode(
            pipe,
            scheduler,
            stages,
            output_type=output_type,
            **embeds,
            image=init_latents,
            strength=params.strength,
            **sampling(params),
            speed=params.speed,
            generator=generators,
        )
    return PipelineOutput(images=list(images), seeds=seeds, timings=stages.timings)


@runs("img2img")
def run(ctx: JobContext, params: Img2ImgParams) -> GenerateResult:
    """The img2img job: check the image and the folder, load (or reuse) the model, run, save and announce."""
    # 1. Check inputs that need no model: strength, the image decodes and fits, the output folder is writable
    check_strength(params.steps, params.strength)
    picture = source_picture(open_image(ctx.inputs, params.image, "image"), params)
    output_folder(params)
    axes = tiling_axes(picture) if params.seamless == "auto" else params.seamless
    job = ImageJob(ctx, params, dataclasses.replace(params, seamless=axes))  # "auto" decided

    # 2. Load the model (warm, or loaded now) and its img2img variant, sharing the weights
    pipe = job.load("img2img")

    # 3. Encode, denoise and decode
    output = run_img2img(pipe, job.resolved, picture, **job.callbacks())

    # 4. Save: every file is announced as soon as it is complete
    return job.save(output, picture.width, picture.height)
