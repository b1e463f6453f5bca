"""The A1111 `parameters` text of a generated PNG, the settings chunk most SD tools read (A1111, Forge, Civitai,
InvokeAI's import): the prompt, a "Negative prompt:" line, and one line of "Key: value" pairs spelled as A1111
spells them. Each task says what it ran: img2img its "Denoising strength", inpainting its "Mask blur", upscaling
its "Hires upscale" and "Hires upscaler", travel frames the keyframe seeds they blend, and so on.

Only generated pictures get this text (`GENERATED_ROLES`): derived maps, masks and depth images are not
pictures another tool should list, or offer to regenerate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backend.schedulers import SCHEDULER_SPECS, display_name
from sdtex_contract.protocol import TaskParams

GENERATED_ROLES = ("albedo", "image", "sample")  # albedos, projection views, training samples
Fields = dict[str, Any]


def model_name(model: str) -> str:
    """A short model name for metadata: a hub id as is, a local path by its file or folder name."""
    path = Path(model)
    return path.stem if path.suffix.lower() == ".safetensors" else (path.name if path.is_absolute() else model)


def quote(value: Any) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a comma, colon or line break (its parser splits there)."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def render(prompt: str, negative_prompt: str, fields: Fields) -> str:
    """The text itself; fields that are None (a seed nothing was drawn from) are left out."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def sampler_of(scheduler: object) -> str:
    """A1111's name of a scheduler object (a pipeline's own), else its class name."""
    for spec in SCHEDULER_SPECS.values():
        if type(scheduler) is spec.cls and all(scheduler.config.get(k) == v for k, v in spec.overrides.items()):
            return spec.display
    return type(scheduler).__name__


def with_loras(prompt: str, params: TaskParams) -> str:
    """A1111 names the LoRAs of a picture in its prompt: `<lora:name:weight>`."""
    tags = [f"<lora:{model_name(lora['model'])}:{lora['weight']:g}>" for lora in getattr(params, "loras", ())]
    return " ".join([prompt, *tags]) if tags else prompt


def sampling(params: TaskParams, seed: int | None, size: tuple[int, int], model: str = "") -> Fields:
    fields = {
        "Steps": params.steps,
        "Sampler": display_name(params.scheduler),
        "CFG scale": params.guidance_scale,
        "Seed": seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model": model_name(model or params.model),
    }
    if getattr(params, "seamless", "none") != "none":
        fields["Seamless"] = params.seamless
    return fields


def _txt2img(params: TaskParams, seed: int | None, size: tuple[int, int], context: Mapping) -> Fields:
    return sampling(params, seed, size)


def _inpaint(params: TaskParams, seed: int | None, size: tuple[int, int], context: Mapping) -> Fields:
    return sampling(params, seed, size) | {"Denoising strength": params.strength, "Mask blur": params.mask_blur}


def _img2img(params: TaskParams, seed: int | None, size: tuple[int, int], context: Mapping) -> Fields:
    return sampling(params, seed, size) | {"Denoising strength": params.strength}


def _upscale(params: TaskParams, seed: int | None, size: tuple[int, int], context: Mapping) -> Fields:
    """A1111's hires spelling: Size is the picture before upscaling, "Hires upscale" the factor."""
    source = (size[0] // params.scale, size[1] // params.scale)
    if params.upscaler_model.strip():
        hires = {"Hires upscale": params.scale, "Hires upscaler": model_name(params.upscaler_model)}
        return sampling(params, seed, source, params.upscaler_model) | hires | {"Noise level": params.noise_level}
    hires = {"Hires upscale": params.scale, "Hires upscaler": "Lanczos"}
    return sampling(params, seed, source) | hires | {"Denoising strength": params.strength}


def _project(params: TaskParams, seed: int | None, size: tuple[int, int], context: Mapping) -> Fields:
    """Views and bakes: the view size and the depth ControlNet as A1111's ControlNet extension writes it; views
    after the first inpaint what earlier ones left unseen."""
    control = (
        f"Module: depth, Model: {model_name(params.controlnet)}, Weight: {params.controlnet_scale:g}, "
        f"Guidance Start: {params.control_start:g}, Guidance End: {params.control_end:g}"
    )
    fields = sampling(params, seed, (params.width, params.height)) | {"ControlNet 0": control}
    if context.get("inpainted"):
        fields["Mask blur"] = params.mask_blur
    return fields


TASK_FIELDS = {
    "txt2img": _txt2img,
    "img2img": _img2img,
    "inpaint": _inpaint,
    "make_seamless": _inpaint,
    "upscale": _upscale,
    "project": _project,
}


def travel_text(params: TaskParams, size: tuple[int, int], frame: Any) -> str:
    """A travel frame: the keyframe it starts from; between keyframes, A1111's variation seed (its noise is a
    slerp toward that seed's, as ours is) plus the prompt it travels to and how far."""
    start, end = params.keyframes[frame.start], params.keyframes[frame.end]
    fields = sampling(params, start["seed"], size)
    if not frame.is_keyframe:
        fields |= {"Variation seed": end["seed"], "Variation seed strength": round(frame.t, 6)}
        fields |= {"Travel prompt": end["prompt"], "Travel weight": round(frame.t, 6)}
    return render(with_loras(start["prompt"], params), start["negative_prompt"], fields)


def train_sample_text(params: TaskParams, seed: int | None, size: tuple[int, int], context: Mapping) -> str:
    """A training sample: the sample prompt through the base model with the LoRA as trained so far."""
    fields = {
        "Steps": context["steps"],
        "Sampler": context["sampler"],
        "CFG scale": context["guidance_scale"],
        "Seed": seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model": model_name(params.model),
        "Training step": context["step"],
    }
    return render(params.sample_prompt or params.instance_prompt, "", fields)


def a1111_parameters(
    params: TaskParams, seed: int | None, size: tuple[int, int], context: Mapping | None = None
) -> str:
    """The `parameters` text of one generated picture of `size` (width, height). context: what the params alone
    do not tell: a travel frame's `frame`, a projection view's `inpainted`, a training sample's settings."""
    context = context or {}
    if params.task == "travel":
        return travel_text(params, size, context["frame"])
    if params.task == "train_lora":
        return train_sample_text(params, seed, size, context)
    if params.task == "upscale" and seed is None:  # Lanczos alone: no model ran, A1111's extras spelling
        source = f"{size[0] // params.scale}x{size[1] // params.scale}"
        fields = {"Size": source, "Postprocess upscale by": params.scale, "Postprocess upscaler": "Lanczos"}
        return render(params.prompt, params.negative_prompt, fields)
    fields = TASK_FIELDS[params.task](params, seed, size, context)
    return render(with_loras(params.prompt, params), params.negative_prompt, fields)
