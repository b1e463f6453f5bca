"""Upscaling 2x or 4x, two ways, both keeping the seamless axes of a texture that tiles.

- With `upscaler_model` (an SD x4 upscaler): diffusers' StableDiffusionUpscalePipeline, step by step like
  the other tasks (encode the prompt, its own loop to latents, decode here), with circular padding on its
  U-Net and VAE on the seamless axes. Scale 2 is the x4 result reduced by 2 (Lanczos, wrapping).
- Otherwise tiled img2img ("hires fix") with the main model's warm weights (`model.pipeline("img2img")`):
  the picture is enlarged with Lanczos, cut into overlapping tiles of the model's native size, each tile is
  repainted at a low strength, and the tiles are blended with raised-cosine weights so no tile edge shows
  (backend/tiles.py). On a seamless axis the tiles run on past the last pixel into the first, so the
  wrap-around edge is blended like any other and the result tiles too. The noise is drawn once for the
  whole canvas and each tile takes its part, so overlapping tiles start from the same noise where they
  overlap, and the whole process commutes with circular shifts (the proof in tests/backend/test_upscale.py).
  strength 0 is Lanczos alone (no model is needed).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from backend import tiles
from backend.context import Cancelled, JobContext
from backend.deepcache import deep_cache
from backend.families import family_of, size_multiple
from backend.images import tiling_axes, to_rgb
from backend.inputs import open_image
from backend.jobshell import ImageJob, JobProgress
from backend.outputs import output_folder
from backend.registry import runs
from backend.schedulers import make_scheduler
from backend.seamless import seamless, wrap_axes
from backend.steps import (
    PipelineOutput,
    Stages,
    StepCallback,
    check_not_cancelled,
    check_strength,
    decode_latents,
    denoise,
    encode_prompt_stage,
    encode_source,
    image_seeds,
    pixels_of,
    sampling,
    swapped_scheduler,
)
from sdtex_contract import protocol
from sdtex_contract.protocol import (
    INPUT_PIXELS_MAX,
    INVALID_PARAMS,
    SIZE_MIN,
    GenerateResult,
    ProtocolError,
    TaskParams,
    UpscaleParams,
)

OUTPUT_SIDE_MAX = math.isqrt(INPUT_PIXELS_MAX)  # 8192: a result the worker can take back as an input
X4_INPUT_SIDE_MAX = 1024  # the x4 upscaler denoises the whole picture at its input size: memory grows fast


@dataclass
class UpscaleOutput:
    image: PIL.Image.Image
    seed: int | None
    timings: dict[str, float] = field(default_factory=dict)
    tiles: int = 0  # img2img passes run (tiled path), 0 for the x4 upscaler and Lanczos alone


def _bad(param: str, message: str, value, accepted: str) -> ProtocolError:
    return ProtocolError(
        INVALID_PARAMS, message, {"param": param, "accepted": accepted, "value": protocol.shown(value)}
    )


def check_image(image: PIL.Image.Image, params: TaskParams) -> None:
    """The result must stay within what the worker writes and reads back; the x4 upscaler has its own limit."""
    width, height = image.width * params.scale, image.height * params.scale
    if max(width, height) > OUTPUT_SIDE_MAX:
        largest = OUTPUT_SIDE_MAX // params.scale
        raise _bad(
            "image",
            f"image is {image.width}x{image.height} pixels; upscaled {params.scale}x it would be {width}x{height}, "
            f"larger than {OUTPUT_SIDE_MAX} pixels a side, the largest result this worker makes: at scale "
            f"{params.scale} each side may be at most {largest} pixels",
            f"{image.width}x{image.height}",
            f"sides of at most {largest} pixels at scale {params.scale}",
        )
    if params.upscaler_model and max(image.size) > X4_INPUT_SIDE_MAX:
        raise _bad(
            "image",
            f"image is {image.width}x{image.height} pixels; the x4 upscaler takes at most {X4_INPUT_SIDE_MAX} pixels "
            "a side (it denoises the whole picture at once): leave upscaler_model empty to upscale in tiles",
            f"{image.width}x{image.height}",
            f"sides of at most {X4_INPUT_SIDE_MAX} pixels with upscaler_model",
        )


def pad_to(image: PIL.Image.Image, multiple: int, axes: str, what: str) -> PIL.Image.Image:
    """The picture padded at the right and bottom with its edge pixels to multiples of `multiple` (the caller
    crops the result). A seamless axis cannot be padded without breaking the wrap: it must fit already."""
    wrap_x, wrap_y = wrap_axes(axes)
    for name, size, wrap in (("width", image.width, wrap_x), ("height", image.height, wrap_y)):
        if wrap and size % multiple:
            raise _bad(
                "image",
                f"{what} {name} is {size} pixels; tiling on {name[0] if name == 'width' else 'y'} needs a multiple "
                f"of {multiple} for this model (padding would break the wrap): resize the image first",
                size,
                f"a {what} {name} in multiples of {multiple} while seamless",
            )
    width, height = -(-image.width // multiple) * multiple, -(-image.height // multiple) * multiple
    if (width, height) == image.size:
        return image
    pixels = np.asarray(image)
    return PIL.Image.fromarray(np.pad(pixels, ((0, height - image.height), (0, width - image.width), (0, 0)), "edge"))


# --- the SD x4 upscaler -------------------------------------------------------------------------------


def _stepping(scheduler: SchedulerMixin, on_step: StepCallback | None, should_cancel: Callable[[], bool]) -> None:
    """Progress and cancel for a pipeline without step-end callbacks: the fresh scheduler's step reports
    each step and raises Cancelled when asked (the pipeline stops there; nothing is decoded)."""
    step, done = scheduler.step, 0

    @functools.wraps(step)  # the pipeline reads step's signature to decide whether to pass eta and generator
    def reporting_step(*args, **kwargs):
        nonlocal done
        output = step(*args, **kwargs)
        done += 1
        if on_step is not None:
            on_step(done, len(scheduler.timesteps), output[0] if isinstance(output, tuple) else output.prev_sample)
        if should_cancel():
            raise Cancelled()
        return output

    scheduler.step = reporting_step


def x4_multiple(pipe: DiffusionPipeline) -> int:
    """Input sizes the x4 upscaler takes: multiples of its VAE factor (the image processor rounds down to it)
    and of its U-Net's downsampling (the small picture is the latents' size)."""
    return math.lcm(pipe.vae_scale_factor, 2 ** (len(pipe.unet.config.block_out_channels) - 1))


def check_noise_level(pipe: DiffusionPipeline, params: TaskParams) -> None:
    if params.noise_level > pipe.config.max_noise_level:
        raise _bad(
            "noise_level",
            f"noise_level must be at most {pipe.config.max_noise_level} for this upscaler, got {params.noise_level}",
            params.noise_level,
            f"0 to {pipe.config.max_noise_level}",
        )


def decode_x4(pipe: DiffusionPipeline, latents: torch.Tensor) -> np.ndarray:
    """The upscale pipeline's own decode (fp32 where the VAE config asks for it) to floats in 0..1."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    return pipe.image_processor.postprocess(decoded, output_type="np")[0]


def x4_result(
    pipe: DiffusionPipeline, pixels: np.ndarray, image: PIL.Image.Image, params: TaskParams, output_type: str
) -> PIL.Image.Image | np.ndarray:
    """The x4 pixels without the padding's share; as a picture reduced to params.scale (unless "np")."""
    pixels = pixels[: image.height * 4, : image.width * 4]
    if output_type == "np":
        return pixels
    result = pipe.image_processor.numpy_to_pil(pixels[None])[0]
    if params.scale != 4:
        width, height = image.width * params.scale, image.height * params.scale
        result = tiles.resize(result, width, height, *wrap_axes(params.seamless))
    return result


@torch.no_grad()
def run_x4(
    pipe: DiffusionPipeline,
    params: TaskParams,
    image: PIL.Image.Image,
    *,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
    device: torch.device | None = None,
    output_type: str = "pil",
) -> UpscaleOutput:
    """The x4 upscaler on an RGB picture; params.seamless must be resolved ("auto" decided). Scale 2 reduces
    the x4 result by 2. output_type "np": floats in 0..1 (the x4 result, before any reduction)."""
    stages = Stages(on_stage)
    # 1. Check inputs
    check_noise_level(pipe, params)
    small = pad_to(image, x4_multiple(pipe), params.seamless, "image")

    # 2. Seed, scheduler (reporting its steps)
    seed = image_seeds(params, 1)[0]
    generator = torch.Generator("cpu").manual_seed(seed)
    scheduler = make_scheduler(params.scheduler, pipe.scheduler.config)
    _stepping(scheduler, on_step, should_cancel or (lambda: False))

    # 3. Encode the prompt
    with stages.timed("encode", "encoding"):
        guidance = params.guidance_scale > 1  # as the upscale pipeline decides
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            params.prompt, device or pipe._execution_device, 1, guidance, params.negative_prompt or None
        )

    # 4. Denoise: the pipeline's own loop to latents (it noises the small picture to noise_level itself)
    check_not_cancelled(should_cancel)
    with seamless([pipe.unet, pipe.vae], params.seamless):
        with stages.timed("denoise", "denoising"), swapped_scheduler(pipe, scheduler), deep_cache(
            pipe.unet, params.speed
        ):
            latents = pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                image=small,
                **sampling(params),
                noise_level=params.noise_level,
                generator=generator,
                output_type="latent",
            ).images

        # 5. Decode
        with stages.timed("decode", "decoding"):
            pixels = decode_x4(pipe, latents)

    # 6. Crop the padding's share of the result, reduce to the scale asked for
    return UpscaleOutput(image=x4_result(pipe, pixels, image, params, output_type), seed=seed, timings=stages.timings)


# --- tiled img2img ("hires fix") ----------------------------------------------------------------------


def _with_noise(scheduler: SchedulerMixin, noise: torch.Tensor) -> SchedulerMixin:
    """The fresh scheduler noises the picture's latents with the canvas's noise for this tile instead of the
    pipeline's own draw (img2img pipelines take no noise; the SD one takes no noisy latents either)."""
    add_noise = scheduler.add_noise

    def canvas_noise(original_samples: torch.Tensor, _noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return add_noise(original_samples, noise.to(_noise), timesteps)

    scheduler.add_noise = canvas_noise
    return scheduler


def tile_size(pipe: DiffusionPipeline, params: TaskParams) -> int:
    """The tile size (the model's native size unless given), checked against the model and the overlap."""
    multiple = size_multiple(pipe)
    tile = params.tile_size or family_of(pipe).default_size
    if tile < SIZE_MIN or tile % multiple:
        raise _bad(
            "tile_size",
            f"tile_size must be 0 or at least {SIZE_MIN} in multiples of {multiple} for this model, got {tile}",
            tile,
            f"0, or at least {SIZE_MIN} in multiples of {multiple}",
        )
    if 2 * params.tile_overlap >= tile:
        raise _bad(
            "tile_overlap",
            f"tile_overlap must be less than half the tile size ({tile} pixels), got {params.tile_overlap}",
            params.tile_overlap,
            f"less than {tile // 2}",
        )
    return tile


def lay_out(big: PIL.Image.Image, tile: int, overlap: int, axes: str, factor: int) -> tuple[list, str]:
    """The tiles ((row span, column span) each) over the enlarged picture, and the seamless axes a tile wraps on
    by itself: a tile spanning a whole seamless axis is that axis's whole loop."""
    wrap_x, wrap_y = wrap_axes(axes)
    columns = tiles.spans(big.width, tile, overlap, wrap_x, align=factor)
    rows = tiles.spans(big.height, tile, overlap, wrap_y, align=factor)
    tile_axes = ("x" if wrap_x and len(columns) == 1 else "") + ("y" if wrap_y and len(rows) == 1 else "")
    return [(r, c) for r in rows for c in columns], tile_axes or "none"


@dataclass
class TileRepainter:
    """Repaints one tile after another with the same prompt embeddings, generator and canvas noise."""

    pipe: DiffusionPipeline
    params: TaskParams
    embeds: dict
    generator: torch.Generator
    noise: torch.Tensor  # the canvas's: (2, 4, H / f, W / f)
    stages: Stages
    tile_axes: str
    device: torch.device
    on_step: StepCallback | None = None
    should_cancel: Callable[[], bool] | None = None

    def _tile_noise(self, r: tiles.Span, c: tiles.Span) -> torch.Tensor:
        """The canvas noise under the tile (wrapping round a seamless axis), so overlapping tiles share it."""
        factor, (height, width) = self.pipe.vae_scale_factor, self.noise.shape[2:]
        latent_rows = torch.from_numpy((r.start // factor + np.arange(r.size // factor)) % height)
        latent_cols = torch.from_numpy((c.start // factor + np.arange(c.size // factor)) % width)
        return self.noise[:, :, latent_rows][:, :, :, latent_cols]

    def repaint(self, crop: PIL.Image.Image, r: tiles.Span, c: tiles.Span) -> np.ndarray:
        """One tile: its crop encoded with the canvas's noise ([0]), denoised from it noised with [1] to
        params.strength, decoded to floats in 0..1."""
        pipe, params, stages = self.pipe, self.params, self.stages
        tile_noise = self._tile_noise(r, c)
        with seamless([pipe.unet, pipe.vae], self.tile_axes):
            with stages.timed("encode_image"):
                dtype = self.embeds["prompt_embeds"].dtype
                pixels = pixels_of(pipe, crop)
                init_latents = encode_source(pipe, pixels, dtype=dtype, device=self.device, noise=tile_noise[:1])
            with stages.timed("denoise"):
                latents = denoise(
                    pipe,
                    _with_noise(make_scheduler(params.scheduler, pipe.scheduler.config), tile_noise[1:]),
                    on_step=self.on_step,
                    should_cancel=self.should_cancel,
                    **self.embeds,
                    image=init_latents,
                    strength=params.strength,
                    **sampling(params),
                    speed=params.speed,
                    generator=[self.generator],
                )
            with stages.timed("decode"):
                decoded = decode_latents(pipe, latents, output_type="np")[0]
        return decoded


@torch.no_grad()
def run_tiled(
    pipe: DiffusionPipeline,
    params: TaskParams,
    image: PIL.Image.Image,
    *,
    progress: JobProgress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
    device: torch.device | None = None,
    noise: torch.Tensor | None = None,
    output_type: str = "pil",
) -> UpscaleOutput:
    """Tiled img2img on `pipe` (the family's img2img pipeline) over the Lanczos-enlarged picture; params.seamless
    must be resolved. progress (a JobProgress) gets every tile's steps; noise: the canvas's standard normal
    draws, (2, 4, H / f, W / f) for the padded result (f: the VAE factor; [0] samples the VAE's latent
    distribution, [1] noises the latents), drawn from the seed when not given. output_type "np": floats."""
    stages = Stages(on_stage)
    # 1. Check inputs
    tile = tile_size(pipe, params)
    check_strength(params.steps, params.strength)
    factor = pipe.vae_scale_factor
    width, height = image.width * params.scale, image.height * params.scale

    # 2. Enlarge (Lanczos, wrapping on seamless axes), pad to the model's multiple, lay the tiles out
    with stages.timed("resize"):
        enlarged = tiles.resize(image, width, height, *wrap_axes(params.seamless))
        big = pad_to(enlarged, size_multiple(pipe), params.seamless, "upscaled")
    layout, tile_axes = lay_out(big, tile, params.tile_overlap, params.seamless, factor)

    # 3. Seed and the canvas's noise, drawn once: overlapping tiles share it where they overlap
    seed = image_seeds(params, 1)[0]
    generator = torch.Generator("cpu").manual_seed(seed)
    if noise is None:
        noise = randn_tensor((2, 4, big.height // factor, big.width // factor), generator=generator)

    # 4. Encode the prompt, once for every tile
    device = device or pipe._execution_device
    embeds = encode_prompt_stage(pipe, params, stages, device, count=1)

    # 5. Each tile: encode, denoise, decode, blend
    stages.announce("denoising")
    on_step = progress.step if progress is not None else None
    repainter = TileRepainter(pipe, params, embeds, generator, noise, stages, tile_axes, device, on_step, should_cancel)
    pixels, blender = np.asarray(big), tiles.Blender(big.height, big.width)
    if progress is not None:
        progress.passes = len(layout)
    pipe.vae.disable_tiling()  # a tile is small; VAE tiles of tiles would also wrap one by one
    for index, (r, c) in enumerate(layout):
        if progress is not None:
            progress.pass_index = index
        crop = PIL.Image.fromarray(pixels[np.ix_(r.indices(big.height), c.indices(big.width))])
        blender.add(repainter.repaint(crop, r, c), r, c)

    # 6. The blended canvas without its padding
    with stages.timed("blend", "decoding"):
        result = blender.result()[:height, :width]
    if output_type != "np":
        result = PIL.Image.fromarray((result * 255).round().clip(0, 255).astype(np.uint8))
    return UpscaleOutput(image=result, seed=seed, timings=stages.timings, tiles=len(layout))


def run_lanczos(params: TaskParams, image: PIL.Image.Image) -> UpscaleOutput:
    """strength 0 without an upscaler: Lanczos alone, wrapping on the seamless axes."""
    start = time.perf_counter()
    width, height = image.width * params.scale, image.height * params.scale
    result = tiles.resize(image, width, height, *wrap_axes(params.seamless))
    return UpscaleOutput(image=result, seed=None, timings={"resize": time.perf_counter() - start})


# --- the job --------------------------------------------------------------------------------------------


def check_paths(params: UpscaleParams) -> None:
    """A model to run for the path asked for (x4 upscaler, tiled img2img, or Lanczos alone), and tiles that fit."""
    if params.upscaler_model.strip():
        return
    if params.strength > 0 and not params.model.strip():
        raise _bad(
            "model",
            "model or upscaler_model must be given: model upscales in tiles with img2img, upscaler_model runs an "
            "SD x4 upscaler (strength 0 without either: Lanczos alone)",
            params.model,
            "a model (hub id, folder or .safetensors), or an upscaler_model",
        )
    check_strength(params.steps, params.strength)
    if params.tile_size and 2 * params.tile_overlap >= params.tile_size:
        raise _bad(
            "tile_overlap",
            f"tile_overlap must be less than half of tile_size ({params.tile_size}), got {params.tile_overlap}",
            params.tile_overlap,
            f"less than {params.tile_size // 2}",
        )


def upscale(job: ImageJob, image: PIL.Image.Image) -> UpscaleOutput:
    """Load what the path needs (the x4 upscaler, the main model's img2img variant, or nothing) and run it."""
    params, ctx = job.resolved, job.ctx
    if params.upscaler_model.strip():
        pipe = job.load_upscaler()
        return run_x4(pipe, params, image, **job.callbacks())
    if params.strength == 0:
        return run_lanczos(params, image)
    pipe = job.load("img2img", protocol.model_params(job.params.to_dict()))
    progress = job.progress
    return run_tiled(
        pipe, params, image, progress=progress, should_cancel=ctx.is_cancelled, on_stage=progress.stage,
        device=job.device,
    )  # fmt: skip


@runs("upscale")
def run(ctx: JobContext, params: UpscaleParams) -> GenerateResult:
    """The upscale job: check everything that needs no model, pick the path, run it, save and announce."""
    # 1. Check inputs that need no model: a model to use, the image and its limits, the output folder
    check_paths(params)
    image = to_rgb(open_image(ctx.inputs, params.image, "image"))
    check_image(image, params)
    output_folder(params)
    axes = tiling_axes(image) if params.seamless == "auto" else params.seamless
    job = ImageJob(ctx, params, dataclasses.replace(params, seamless=axes))  # "auto" decided: padding, tiles, maps

    # 2. Load the model the path needs (warm, or loaded now), 3. upscale
    output = upscale(job, image)

    # 4. Save: the file (and its maps) announced as soon as each is complete
    name = f"x{params.scale}_{output.seed if output.seed is not None else 'lanczos'}"
    saved = PipelineOutput(images=[output.image], seeds=[output.seed], timings=output.timings)
    return job.save(saved, output.image.width, output.image.height, names=[name])
