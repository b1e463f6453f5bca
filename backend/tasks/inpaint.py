"""Inpainting, outpainting and "make seamless": repaint part of an image, return the rest unchanged.

All three run the family's inpainting pipeline, built from the warm weights (`from_pipe`). An inpainting
model (a 9-channel U-Net: latents, mask, masked-image latents) runs it as designed; a plain model
(4 channels) runs diffusers' latent-mask method in the same pipeline: after every step the latents outside
the mask are replaced by the source's latents noised to that step, so only the masked area is painted.

diffusers does not paste the kept pixels back: outside the mask its output is the VAE's reconstruction,
close to the source but not equal. Here every generated picture is blended into the source by the
feathered mask (backend.masks.paste_back), so pixels outside it come back byte for byte.

- inpaint: the mask comes from a mask image, the image's alpha, a rectangle, or nothing (outpainting
  only). Outpainting (`extend_*`) widens the canvas; the new area is filled (edge or noise) and repainted,
  the original area is kept byte for byte (the new area is pasted hard-edged, never over the original).
- make_seamless: the image is rolled by half its size so its wrap-around seams meet in the middle, a
  cross-shaped band over them is inpainted with circular padding on (the band wraps too), and the result
  is rolled back: the seams now lie inside freshly painted, continuous pixels.

Like txt2img, the pipeline's own loop runs to latents (output_type="latent"), and decoding is done here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline

from backend import masks
from backend.context import JobContext
from backend.families import size_multiple
from backend.images import fit, tiling_axes, to_rgb
from backend.inputs import InputStore, open_image
from backend.jobshell import ImageJob
from backend.outputs import output_folder
from backend.registry import runs
from backend.schedulers import make_scheduler
from backend.steps import (
    PipelineOutput,
    Stages,
    StepCallback,
    circular,
    cpu_generators,
    denoise_and_decode,
    encode_prompt_stage,
    image_seeds,
    sampling,
)
from sdtex_contract.protocol import (
    INVALID_PARAMS,
    SIZE_MAX,
    GenerateResult,
    InpaintParams,
    MakeSeamlessParams,
    ProtocolError,
    TaskParams,
)

SIDES = ("left", "right", "top", "bottom")


def _bad(param: str, message: str, value=None, accepted: str = "") -> ProtocolError:
    data = {"param": param, "value": value} | ({"accepted": accepted} if accepted else {})
    return ProtocolError(INVALID_PARAMS, f"{param}: {message}", data)


@dataclass
class Canvas:
    """A request made ready for the pipeline, before any model is involved."""

    image: PIL.Image.Image  # RGB at the working size: the pixels kept where `feathered` is 0
    mask: np.ndarray  # bool (H, W), True = repaint: the hard-edged mask the pipeline gets
    feathered: np.ndarray  # uint8 (H, W): how much of the generated picture each pixel takes
    seamless: str  # the axes the result tiles on ("auto" resolved)
    size_params: tuple[str, str]  # the parameters to name when the width / height does not suit the model
    shift: tuple[int, int] = (0, 0)  # make_seamless: the roll (rows, columns) undone after paste-back

    def finish(self, generated: PIL.Image.Image) -> PIL.Image.Image:
        """Paste the generated picture back into the source, then undo make_seamless's roll."""
        result = masks.paste_back(self.image, generated, self.feathered)
        return masks.roll(result, self.shift, back=True) if any(self.shift) else result


# --- 1. Inputs: checked and prepared before any model is loaded --------------------------------------


def _source(store: InputStore, params: TaskParams) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """(the image as decoded, with any alpha; the image as RGB at the working size)."""
    image = open_image(store, params.image, "image")
    fitted = fit(to_rgb(image), params.width, params.height, params.resize)
    return image, fitted


def _check_steps(params: TaskParams) -> None:
    """The pipeline denoises int(steps * strength) steps: at least one, or it has nothing to do."""
    if int(params.steps * params.strength) < 1:
        raise _bad(
            "strength",
            f"{params.strength:g} of {params.steps} steps is no denoising step at all; raise strength or steps",
            params.strength,
            f"a number with steps * strength >= 1 (at least {1 / params.steps:.3g} for {params.steps} steps)",
        )


def _check_canvas(width: int, height: int, size_params: tuple[str, str]) -> None:
    for value, name in ((width, size_params[0]), (height, size_params[1])):
        if value > SIZE_MAX:
            raise _bad(
                name,
                f"the picture would be {width}x{height} pixels; at most {SIZE_MAX} pixels a side fit the model "
                "(give width/height with resize fit, fill or stretch, or crop the image)",
                f"{width}x{height}",
                f"at most {SIZE_MAX} pixels a side",
            )


def _user_mask(store: InputStore, params: InpaintParams, image: PIL.Image.Image) -> tuple[np.ndarray | None, str]:
    """The mask at the source image's size (None for mask_from none), and the parameter it came from."""
    source = params.mask_from
    if params.mask is not None and source != "image":
        raise _bad("mask_from", f"a mask image was given but mask_from is {source!r}; set it to image", source)
    if source == "image":
        if params.mask is None:
            raise _bad(
                "mask",
                "mask_from is image but no mask was given (white = repaint); to outpaint only, set mask_from to none",
                None,
            )
        mask = open_image(store, params.mask, "mask")
        if mask.size != image.size:
            raise _bad(
                "mask",
                f"the mask is {mask.width}x{mask.height} pixels but the image is {image.width}x{image.height}; "
                "they must be the same size",
                f"{mask.width}x{mask.height}",
                f"an image of {image.width}x{image.height} pixels",
            )
        return masks.from_image(mask), "mask"
    if source == "alpha":
        if not masks.has_alpha(image):
            raise _bad(
                "image",
                f"the image ({image.mode}) has no alpha channel to read a mask from (mask_from alpha: "
                "transparent = repaint); give a mask image or a rectangle instead",
                image.mode,
            )
        return masks.from_alpha(image), "image"
    if source == "rect":
        for name, start_name, start, length, size in (
            ("mask_width", "mask_x", params.mask_x, params.mask_width, image.width),
            ("mask_height", "mask_y", params.mask_y, params.mask_height, image.height),
        ):
            if start >= size:
                raise _bad(start_name, f"{start} is outside the image ({image.width}x{image.height})", start)
            if length < 1 or start + length > size:
                raise _bad(
                    name,
                    f"the rectangle must have {name} from 1 to {size - start} to stay inside the "
                    f"{image.width}x{image.height} image at {start_name} {start}, got {length}",
                    length,
                    f"an integer from 1 to {size - start}",
                )
        rect = (params.mask_x, params.mask_y, params.mask_width, params.mask_height)
        return masks.from_rect(image.width, image.height, *rect), "mask_width"
    return None, "mask_from"


EMPTY = {
    "image": "the mask is all black (white = repaint)",
    "alpha": "the image has no transparent pixels (transparent = repaint)",
    "rect": "the rectangle is empty at this size",
    "none": "mask_from is none and no extend_* side is set",
}


def _check_coverage(mask: np.ndarray, param: str, source: str) -> None:
    if not mask.any():
        raise _bad(param, f"nothing to repaint: {EMPTY[source]}", "all black")
    if mask.all():
        raise _bad(
            param,
            "the mask covers the whole image, so nothing of it would be kept: use img2img to vary the whole "
            "image, or txt2img for a new one",
            "all white",
        )


def prepare_inpaint(store: InputStore, params: InpaintParams) -> Canvas:
    """Open and check the image and the mask; fit, extend (outpaint) and feather. No model needed."""
    _check_steps(params)
    image, fitted = _source(store, params)
    keep = params.resize == "keep"
    size_params = ("image", "image") if keep else ("width", "height")
    _check_canvas(fitted.width, fitted.height, size_params)
    mask, mask_param = _user_mask(store, params, image)
    mask = np.zeros(fitted.size[::-1], bool) if mask is None else masks.fit_mask(mask, image, fitted, params.resize)
    axes = tiling_axes(fitted) if params.seamless == "auto" else params.seamless
    wrap_x, wrap_y = "x" in axes, "y" in axes
    feathered = masks.feather(mask, params.mask_blur, wrap_x=wrap_x, wrap_y=wrap_y)

    extends = [getattr(params, f"extend_{side}") for side in SIDES]
    if any(extends):
        canvas, new = masks.extend(fitted, *extends, fill=params.outpaint_fill)
        # Name the side that made the size, for size errors: an added side, else the image itself.
        size_params = (
            next((f"extend_{s}" for s in ("right", "left") if getattr(params, f"extend_{s}")), size_params[0]),
            next((f"extend_{s}" for s in ("bottom", "top") if getattr(params, f"extend_{s}")), size_params[1]),
        )
        _check_canvas(canvas.width, canvas.height, size_params)
        left, top = params.extend_left, params.extend_top
        grown = np.zeros(new.shape, bool)
        grown[top : top + fitted.height, left : left + fitted.width] = mask
        # The new area is pasted hard-edged: a feather would reach into the original, which stays exact.
        soft = np.zeros(new.shape, np.uint8)
        soft[top : top + fitted.height, left : left + fitted.width] = feathered
        mask, feathered, fitted = grown | new, np.where(new, np.uint8(255), soft), canvas
    _check_coverage(mask, mask_param, params.mask_from)
    return Canvas(fitted, mask, feathered, axes, size_params)


def prepare_make_seamless(store: InputStore, params: MakeSeamlessParams) -> Canvas:
    """The image rolled by half its size on the chosen axes, and the band over the seams now in the middle."""
    _check_steps(params)
    _, fitted = _source(store, params)
    size_params = ("image", "image") if params.resize == "keep" else ("width", "height")
    _check_canvas(fitted.width, fitted.height, size_params)
    for axis, size in (("x", fitted.width), ("y", fitted.height)):
        if axis in params.seamless and params.band_width >= size:
            raise _bad(
                "band_width",
                f"a {params.band_width} px band covers the whole {fitted.width}x{fitted.height} image; "
                "make it narrower than the image",
                params.band_width,
                f"less than {size}",
            )
    shift = masks.half_shift(fitted.width, fitted.height, params.seamless)
    rolled = masks.roll(fitted, shift)
    band = masks.seam_band(fitted.width, fitted.height, params.band_width, params.seamless)
    wrap_x, wrap_y = "x" in params.seamless, "y" in params.seamless
    feathered = masks.feather(band, params.mask_blur, wrap_x=wrap_x, wrap_y=wrap_y)
    return Canvas(rolled, band, feathered, params.seamless, size_params, shift)


# --- 2. The pipeline ---------------------------------------------------------------------------------


def check_size(pipe: DiffusionPipeline, canvas: Canvas) -> None:
    multiple = size_multiple(pipe)
    for value, name, what in ((canvas.image.width, canvas.size_params[0], "width"),
                              (canvas.image.height, canvas.size_params[1], "height")):  # fmt: skip
        if value % multiple:
            hint = " (or resize it: fit, fill or stretch to width/height)" if name == "image" else ""
            raise _bad(
                name,
                f"the picture's {what} is {value} pixels; this model needs multiples of {multiple}{hint}",
                value,
                f"a {what} in multiples of {multiple}",
            )


@torch.no_grad()
def run_inpaint(
    pipe: DiffusionPipeline,
    params: TaskParams,
    canvas: Canvas,
    *,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
    device: torch.device | None = None,
) -> PipelineOutput:
    """The inpainting pipeline (`pipe`: the family's inpaint class) on a prepared canvas: the generated
    pictures as decoded, before paste-back (`canvas.finish` pastes them back). Raises Cancelled."""
    stages = Stages(on_stage, on_step=on_step, should_cancel=should_cancel)
    # 1. Check inputs
    check_size(pipe, canvas)

    # 2. Scheduler: a fresh one from the pipeline's own config, swapped in for this run only
    scheduler = make_scheduler(params.scheduler, pipe.scheduler.config)

    # 3. Seeds: one CPU generator per image. Each image gets its own copy of the source, so the pipeline
    # encodes it with that image's generator: image i of a batch can be redone alone with seed + i.
    seeds = image_seeds(params)
    generators = cpu_generators(seeds)
    sources = [canvas.image] * len(seeds)
    mask_image = PIL.Image.fromarray(canvas.mask.astype(np.uint8) * 255, "L")

    # 4. Encode the prompt
    embeds = encode_prompt_stage(pipe, params, stages, device or pipe._execution_device)

    # 5. Denoise: the pipeline's loop (it VAE-encodes the source first), stopping at latents; 6. decode
    with circular(pipe, canvas.seamless):  # the VAE encoder's hand-made pad wraps too
        images = denoise_and_decode(
            pipe,
            scheduler,
            stages,
            **embeds,
            image=sources,
            mask_image=mask_image,
            strength=params.strength,
            **sampling(params),
            speed=params.speed,
            height=canvas.image.height,
            width=canvas.image.width,
            generator=generators,
        )
    return PipelineOutput(images=images, seeds=seeds, timings=stages.timings)


def inpaint(pipe: DiffusionPipeline, params: TaskParams, canvas: Canvas, **callbacks) -> PipelineOutput:
    """run_inpaint, then paste-back (and make_seamless's roll back): the finished pictures."""
    output = run_inpaint(pipe, params, canvas, **callbacks)
    start = time.perf_counter()
    output.images = [canvas.finish(image) for image in output.images]
    output.timings["decode"] += time.perf_counter() - start
    return output


# --- 3. The jobs --------------------------------------------------------------------------------------


Prepare = Callable[[InputStore, TaskParams], Canvas]


def _run_job(ctx: JobContext, params: TaskParams, prepare: Prepare) -> GenerateResult:
    # 1. Check inputs that need no model: the output folder, the image, the mask
    output_folder(params)
    canvas = prepare(ctx.inputs, params)
    job = ImageJob(ctx, params, dataclasses.replace(params, seamless=canvas.seamless))  # "auto" decided

    # 2. Load the model (warm, or loaded now) and its inpainting variant, sharing the weights
    pipe = job.load("inpaint")

    # 3. Denoise, decode, paste back
    output = inpaint(pipe, params, canvas, **job.callbacks())

    # 4. Save: every file is announced as soon as it is complete
    return job.save(output, *canvas.image.size)


@runs("inpaint")
def run(ctx: JobContext, params: InpaintParams) -> GenerateResult:
    """The inpaint job (outpainting included)."""
    return _run_job(ctx, params, prepare_inpaint)


@runs("make_seamless")
def run_make_seamless(ctx: JobContext, params: MakeSeamlessParams) -> GenerateResult:
    """The make_seamless job."""
    return _run_job(ctx, params, prepare_make_seamless)
