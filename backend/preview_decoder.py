"""The preview decoder: a tiny autoencoder (TAESD: diffusers' AutoencoderTiny, e.g. madebyollin/taesd for SD 1.x/2.x,
madebyollin/taesdxl for SDXL) that decodes step previews so they look like the result, kept warm in its own slot
next to the generator (backend.models.WarmSlot: released first on memory pressure, like the estimators).

Loaded from disk only (a diffusers folder, or a hub id's cached snapshot; download it like a model), safetensors
only, never remote code, on the pipeline's device and dtype. A decoder that is not on disk or does not load falls
back to the latent approximation, said once (a log line and the first preview's `note`); the job goes on. One
whose latent channels differ from the model's is refused before it loads.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, DiffusionPipeline

from backend.context import JobContext
from backend.families import Factors
from backend.models import DTYPE_NAMES, ModelKey, ModelSource, WarmSlot
from backend.previews import Previewer
from sdtex_contract import model_catalog
from sdtex_contract.protocol import INVALID_PARAMS, ProtocolError, TaskParams, is_hub_id

log = logging.getLogger(__name__)

PARAM = "preview_decoder"
CLASS_NAME, WEIGHTS = model_catalog.PREVIEW_DECODER_CLASS, model_catalog.PREVIEW_DECODER_WEIGHTS


class NotUsable(Exception):
    """The decoder cannot be used (not on disk, not an AutoencoderTiny, no safetensors): previews are approximate."""


@dataclass
class LoadedDecoder:
    vae: AutoencoderTiny
    key: ModelKey


def decoder_folder(model: str) -> Path:
    """The folder `model` names on disk: a local diffusers folder, or a hub id's cached snapshot (never fetched)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if is_hub_id(model):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        if isinstance(cached, str):
            return Path(cached).parent
        raise NotUsable(f"{model} is not downloaded (download it: python -m backend download --model {model})")
    raise NotUsable(f"no folder {model}")


def decoder_config(folder: Path) -> dict:
    """config.json of an AutoencoderTiny folder with safetensors weights."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NotUsable(f"{folder} has no readable config.json ({type(exc).__name__})") from None
    if not isinstance(config, dict) or config.get("_class_name") != CLASS_NAME:
        name = config.get("_class_name") if isinstance(config, dict) else None
        raise NotUsable(f"{folder} holds a {name or 'model of no known class'}, not an {CLASS_NAME}")
    if not (folder / WEIGHTS).is_file():
        raise NotUsable(f"{folder} has no {WEIGHTS} (pickle weights are never loaded)")
    return config


def check_channels(model: str, config: dict, latent_channels: int) -> None:
    """Refuse a decoder made for another latent space (e.g. TAESD3's 16 channels on an SD model's 4)."""
    channels = config.get("latent_channels", 4)
    if channels != latent_channels:
        raise ProtocolError(
            INVALID_PARAMS,
            f"{PARAM}: {model} decodes {channels}-channel latents and this model makes {latent_channels}; give the "
            "tiny autoencoder of the model's family (madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for "
            "SDXL), or leave it empty for the approximation",
            {"param": PARAM, "value": model, "accepted": latent_channels},
        )


class PreviewDecoders(WarmSlot):
    """The warm preview decoder (one at a time)."""

    loaded: LoadedDecoder | None

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0  # decoders loaded (a warm one loads nothing)

    def get(self, folder: Path, device: torch.device, dtype: torch.dtype) -> AutoencoderTiny:
        key = ModelKey(ModelSource("folder", str(folder), True), device.type, DTYPE_NAMES[dtype], False)

        def load() -> LoadedDecoder:
            log.info("loading preview decoder %s on %s (%s)", folder, device, key.dtype)
            self.loads += 1
            vae = AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
            return LoadedDecoder(vae.to(device).eval(), key)

        self._warm(key, load)
        return self.loaded.vae


def job_decoders(ctx: JobContext) -> PreviewDecoders:
    """The worker's preview decoders, or (a job run without a worker) the job's own, made on first use."""
    if ctx.preview_decoders is None:
        ctx.preview_decoders = PreviewDecoders()
    return ctx.preview_decoders


def job_previewer(
    ctx: JobContext, params: TaskParams, pipe: DiffusionPipeline, factors: Factors, device: torch.device
) -> Previewer:
    """The job's previews: `params.preview_decoder`'s decode (on the pipeline's `device`, in its U-Net's dtype) when
    it is set and usable, else the approximation (with the reason as the first preview's note). Nothing loads when
    the job sends no previews."""
    model = getattr(params, PARAM, "")
    if not (model and factors and params.preview_every):
        return Previewer(factors)
    try:
        folder = decoder_folder(model)
        config = decoder_config(folder)
        check_channels(model, config, pipe.vae.config.latent_channels)
        decoder = job_decoders(ctx).get(folder, device, pipe.unet.dtype)
    except (torch.OutOfMemoryError, MemoryError, ProtocolError):
        raise
    except Exception as exc:  # NotUsable, or weights that fail to load: previews stay approximate
        note = f"{PARAM} {model}: {_reason(exc)}; previews are approximate"
        log.warning("%s", note)
        return Previewer(factors, note=note)
    return Previewer(factors, decoder, model)


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, NotUsable) else f"could not load it ({type(exc).__name__}: {exc})"
