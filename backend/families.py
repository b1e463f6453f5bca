"""What differs between model families (SD 1.x/2.x, SDXL), written down once.

Code elsewhere asks `family_of(pipe)` instead of testing pipeline classes, so a new family is a new row
in FAMILIES, not a hunt for isinstance checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from diffusers import (
    DiffusionPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

Factors = tuple[tuple[float, float, float], ...]  # one RGB row per latent channel


@dataclass(frozen=True, eq=False)  # eq=False: compared and hashed by identity (its dicts are unhashable)
class Family:
    name: str
    pipelines: Mapping[str, type[DiffusionPipeline]]  # task -> pipeline class; "txt2img" is the one loaded
    # Extra arguments for loading and for from_pipe. SD: no safety checker (on textures it mostly blacks
    # out harmless images). SDXL: no invisible watermark (it alters pixels and breaks seamless tiling).
    pipeline_kwargs: Mapping[str, Any]
    prompt_embeds: tuple[str, ...]  # encode_prompt's outputs, named as the pipeline call takes them
    # Least-squares fits from latent channels to RGB (the widely used ones), for step previews.
    preview_factors: Factors
    default_size: int  # the training resolution, in pixels
    default_guidance: float  # the pipeline's own default guidance_scale
    # SDXL's decode honours the VAE config's force_upcast and latents_mean/std; SD 1.x/2.x's ignores both.
    decode_honours_vae_config: bool

    @property
    def txt2img(self) -> type[DiffusionPipeline]:
        return self.pipelines["txt2img"]


SD = Family(
    name="sd",
    pipelines=MappingProxyType(
        {
            "txt2img": StableDiffusionPipeline,
            "img2img": StableDiffusionImg2ImgPipeline,
            "inpaint": StableDiffusionInpaintPipeline,
            # Built with a ControlNet by backend.controlnets (LoadedModel.pipeline cannot: it has none).
            "controlnet": StableDiffusionControlNetPipeline,
            "controlnet_inpaint": StableDiffusionControlNetInpaintPipeline,
        }
    ),
    pipeline_kwargs=MappingProxyType({"safety_checker": None, "requires_safety_checker": False}),
    prompt_embeds=("prompt_embeds", "negative_prompt_embeds"),
    preview_factors=(
        (0.298, 0.207, 0.208),
        (0.187, 0.286, 0.173),
        (-0.158, 0.189, 0.264),
        (-0.184, -0.271, -0.473),
    ),
    default_size=512,
    default_guidance=7.5,
    decode_honours_vae_config=False,
)
SDXL = Family(
    name="sdxl",
    pipelines=MappingProxyType(
        {
            "txt2img": StableDiffusionXLPipeline,
            "img2img": StableDiffusionXLImg2ImgPipeline,
            "inpaint": StableDiffusionXLInpaintPipeline,
            "controlnet": StableDiffusionXLControlNetPipeline,
            "controlnet_inpaint": StableDiffusionXLControlNetInpaintPipeline,
        }
    ),
    pipeline_kwargs=MappingProxyType({"add_watermarker": False}),
    prompt_embeds=("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
    preview_factors=(
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    default_size=1024,
    default_guidance=5.0,
    decode_honours_vae_config=True,
)
FAMILIES: dict[str, Family] = {family.name: family for family in (SD, SDXL)}


def family_of_pipeline_class(cls: type) -> Family:
    """The family of a pipeline class, for any of its tasks."""
    for family in FAMILIES.values():
        if issubclass(cls, tuple(family.pipelines.values())):
            return family
    raise ValueError(f"{cls.__name__} belongs to no supported model family ({', '.join(FAMILIES)})")


def family_of(pipe: DiffusionPipeline) -> Family:
    return family_of_pipeline_class(type(pipe))


def family_of_class_name(name: str | None) -> Family | None:
    """The family whose txt2img or inpainting pipeline is called `name` (a model_index.json `_class_name`),
    else None. An inpainting folder has the txt2img components (its U-Net takes 9 channels: latents, mask,
    masked image), so the family's txt2img class loads it and the inpaint task uses it as designed. A folder
    saved as an img2img pipeline may lack components (SDXL's refiner has one text encoder): not loadable."""
    return next((f for f in FAMILIES.values() if name in (f.txt2img.__name__, f.pipelines["inpaint"].__name__)), None)


def size_multiple(pipe: DiffusionPipeline) -> int:
    """Pixels per latent cell times the U-Net's downsampling: sizes must divide by this to stay valid
    all the way down the U-Net (and for circular padding to tile)."""
    downsampling = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return pipe.vae_scale_factor * downsampling
