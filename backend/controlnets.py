"""ControlNets on the warm model: find and load one (hub id, folder, single file; safetensors unless pickle
is allowed) and build the family's ControlNet pipelines (backend.families, tasks "controlnet" and
"controlnet_inpaint") from the loaded weights with `from_pipe`.

The pipelines are cached on the LoadedModel, keyed by the ControlNet: the ControlNet is part of what a
warm pipeline is kept by, and everything goes when the base model is swapped. One ControlNet is kept at a
time; asking for another drops the previous one's pipelines.

A ControlNet is checked against the model when it is loaded (check_fits): one made for another family or
latent layout would otherwise fail in the first denoising step with a bare tensor-shape error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import ControlNetModel, DiffusionPipeline

from backend.models import PICKLE_SUFFIXES, LoadedModel
from sdtex_contract.protocol import (
    HUB_ID,
    INVALID_PARAMS,
    MODEL_LOAD_FAILED,
    MODEL_NOT_FOUND,
    UNSAFE_CHECKPOINT,
    ProtocolError,
)

log = logging.getLogger(__name__)

_PREFIX = "controlnet:"  # keys of the ControlNet pipelines among LoadedModel's variants
# The families real models' cross-attention widths (text encoder hidden sizes) belong to.
WIDTH_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def _error(code: str, message: str, value: str) -> ProtocolError:
    return ProtocolError(code, message, {"param": "controlnet", "value": value})


def locate(name: str, allow_pickle: bool) -> tuple[str, str]:
    """(kind, location) of a ControlNet without loading it: "folder" (config.json and weights), "single_file"
    or "hub". Missing paths and pickle weights (unless allowed) are refused here."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _error(MODEL_LOAD_FAILED, f"{path} is not a ControlNet folder (no config.json)", name)
        if not any(path.glob("*.safetensors")) and not allow_pickle:
            raise _error(
                UNSAFE_CHECKPOINT,
                f"{path} has no .safetensors weights; pickle weights can run code when loaded: convert them or set "
                "allow_pickle if you trust their source",
                name,
            )
        return "folder", str(path.resolve())
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise _error(UNSAFE_CHECKPOINT, f"{path.name} is a pickle checkpoint; set allow_pickle to load it", name)
        if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
            raise _error(MODEL_LOAD_FAILED, f"{path.name}: a single-file ControlNet must be .safetensors", name)
        return "single_file", str(path.resolve())
    if HUB_ID.match(name):
        return "hub", name
    raise _error(
        MODEL_NOT_FOUND,
        f"ControlNet {name!r} not found: no such file or folder, and not a hub id like `owner/name`",
        name,
    )


def load(kind: str, location: str, allow_pickle: bool, dtype: torch.dtype) -> ControlNetModel:
    safetensors = kind != "folder" or any(Path(location).glob("*.safetensors"))
    try:
        if kind == "single_file":
            return ControlNetModel.from_single_file(location, dtype=dtype)
        return ControlNetModel.from_pretrained(location, dtype=dtype, use_safetensors=safetensors or None)
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as exc:
        message = f"could not load ControlNet {location}: {type(exc).__name__}: {exc}"
        raise _error(MODEL_LOAD_FAILED, message, location) from exc


def _family(config) -> str | None:
    """The family a U-Net or ControlNet config is made for, where its layout tells (tiny test models: None)."""
    if config.get("addition_embed_type") == "text_time":
        return "SDXL"
    return WIDTH_FAMILIES.get(config.cross_attention_dim)


def check_fits(controlnet: ControlNetModel, pipe: DiffusionPipeline, controlnet_name: str, model_name: str) -> None:
    """Refuse a ControlNet the model cannot take: another cross-attention width or family, another U-Net block
    layout (its residuals would not add up), other latent channels, or a control image downsampled other
    than the VAE downsamples (the "size of tensor a must match tensor b" error of the first step)."""
    cn, unet, vae_factor = controlnet.config, pipe.unet.config, pipe.vae_scale_factor
    ours, theirs = (f" ({family})" if family else "" for family in (_family(cn), _family(unet)))
    blocks, shrink = list(cn.block_out_channels), 2 ** (len(cn.conditioning_embedding_out_channels) - 1)
    latent = pipe.vae.config.latent_channels
    name, model = f"ControlNet {controlnet_name}", f"the model {model_name}"
    mismatches = (
        (cn.cross_attention_dim != unet.cross_attention_dim,
         f"{name} has cross-attention width {cn.cross_attention_dim}{ours} but {model} has "
         f"{unet.cross_attention_dim}{theirs}"),
        (ours != theirs or blocks != list(unet.block_out_channels),
         f"{name}'s U-Net layout{ours}, blocks {blocks}, differs from {model}'s{theirs}, "
         f"{list(unet.block_out_channels)}"),
        (cn.in_channels != latent, f"{name} takes {cn.in_channels}-channel latents but {model}'s VAE makes {latent}"),
        # One stride-2 convolution per conditioning level after the first.
        (shrink != vae_factor,
         f"{name} shrinks its control image {shrink}x but {model}'s latents are 1/{vae_factor} of the image"),
    )  # fmt: skip
    for mismatch, message in mismatches:
        if mismatch:
            advice = f"pick a ControlNet made for {_family(unet) or 'this model'}"
            raise ProtocolError(
                INVALID_PARAMS, f"controlnet: {message}: {advice}", {"param": "controlnet", "value": controlnet_name}
            )


def pipeline(model: LoadedModel, controlnet: str, task: str, allow_pickle: bool = False) -> DiffusionPipeline:
    """The family's ControlNet pipeline for `task` ("controlnet" | "controlnet_inpaint") on the warm weights,
    with `controlnet` loaded once (placed like the model) and shared by both tasks."""
    family = model.family
    kind, location = locate(controlnet, allow_pickle)
    key = f"{_PREFIX}{task}:{location}"
    variants = model._variants
    if key in variants:
        return variants[key]
    siblings = [k for k in variants if k.startswith(_PREFIX)]
    loaded = next((variants[k].controlnet for k in siblings if k.endswith(f":{location}")), None)
    for stale in (k for k in siblings if not k.endswith(f":{location}")):
        del variants[stale]  # another ControlNet's pipelines: one is kept at a time
    if loaded is None:
        log.info("loading ControlNet %s", location)
        loaded = load(kind, location, allow_pickle, model.pipe.unet.dtype)
        check_fits(loaded, model.pipe, controlnet, model.key.source.location)
        loaded = loaded.to(model.device)
    cls = family.pipelines[task]
    pipe = cls.from_pipe(model.pipe, controlnet=loaded, dtype=model.pipe.unet.dtype, **family.pipeline_kwargs)
    pipe.set_progress_bar_config(disable=True)
    variants[key] = pipe
    return pipe
