"""The SD x4 upscaler (diffusers' StableDiffusionUpscalePipeline), found and checked like any model, kept warm.

`upscaler_model` is located by backend.models.locate, so the same rules hold: a hub id, a local diffusers
folder or a single .safetensors file; pickle weights only with allow_pickle; remote code never. One upscaler
stays loaded beside the worker's main model (one cache per ModelManager), so alternating upscales and
generations reloads nothing; asking for another upscaler, device, dtype or offload mode swaps it.
"""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionUpscalePipeline

from backend.models import (
    TORCH_DTYPES,
    ModelKey,
    ModelManager,
    ModelSource,
    WarmSlot,
    _hub_model_index,
    model_key,
)
from sdtex_contract.protocol import MODEL_LOAD_FAILED, ProtocolError, TaskParams

log = logging.getLogger(__name__)

PARAM = "upscaler_model"
UPSCALER_CLASS = StableDiffusionUpscalePipeline


@dataclass
class LoadedUpscaler:
    pipe: StableDiffusionUpscalePipeline
    key: ModelKey
    device: torch.device
    attention_slicing: bool = False


def _named(exc: ProtocolError) -> ProtocolError:
    """A model error about `model` restated for upscaler_model."""
    return ProtocolError(exc.code, f"{PARAM}: {exc.message}", {**exc.data, "param": PARAM})


def _check_class(index: dict, model: str) -> None:
    name = index.get("_class_name")
    if name != UPSCALER_CLASS.__name__:
        raise ProtocolError(
            MODEL_LOAD_FAILED,
            f"{PARAM}: {model} is a {name}, not an x4 upscaler ({UPSCALER_CLASS.__name__}, e.g. "
            "stabilityai/stable-diffusion-x4-upscaler); leave upscaler_model empty to upscale with model in tiles",
            {"param": PARAM, "value": model},
        )


def load_upscaler(source: ModelSource, device: str, dtype: str, cpu_offload: bool) -> StableDiffusionUpscalePipeline:
    """Load and place an x4 upscaler (no safety checker and no watermarker, as for every model here)."""
    kwargs: dict = {
        "dtype": TORCH_DTYPES[dtype],
        "safety_checker": None,
        "watermarker": None,
        "feature_extractor": None,
    }
    try:
        if source.kind == "single_file":
            pipe = UPSCALER_CLASS.from_single_file(source.location, **kwargs)
        else:
            if source.kind == "folder":
                index = json.loads((Path(source.location) / "model_index.json").read_text(encoding="utf-8"))
            else:
                index = _hub_model_index(source.location)
            _check_class(index, source.location)
            pipe = UPSCALER_CLASS.from_pretrained(
                source.location, use_safetensors=source.use_safetensors or None, **kwargs
            )
    except ProtocolError as exc:
        raise exc if exc.data.get("param") == PARAM else _named(exc) from None
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as exc:
        raise ProtocolError(
            MODEL_LOAD_FAILED,
            f"{PARAM}: could not load {source.location}: {type(exc).__name__}: {exc}",
            {"param": PARAM, "value": source.location},
        ) from exc
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class UpscalerCache(WarmSlot):
    """Keeps one x4 upscaler warm."""

    loaded: LoadedUpscaler | None

    def get(self, params: TaskParams) -> tuple[LoadedUpscaler, float]:
        """The upscaler for these params and the seconds spent loading it (0 when it was warm)."""
        try:
            key = model_key(params.upscaler_model, params)
        except ProtocolError as exc:
            raise _named(exc) if exc.data.get("param") == "model" else exc from None

        def load() -> LoadedUpscaler:
            log.info("loading upscaler %s on %s (%s)", key.source.location, key.device, key.dtype)
            pipe = load_upscaler(key.source, key.device, key.dtype, key.cpu_offload)
            return LoadedUpscaler(pipe, key, pipe._execution_device)

        seconds = self._warm(key, load)
        loaded = self.loaded
        if params.attention_slicing != loaded.attention_slicing:
            if params.attention_slicing:
                loaded.pipe.enable_attention_slicing()
            else:
                loaded.pipe.disable_attention_slicing()
            loaded.attention_slicing = params.attention_slicing
        return loaded, seconds


_caches: weakref.WeakKeyDictionary[ModelManager, UpscalerCache] = weakref.WeakKeyDictionary()


def upscalers(models: ModelManager) -> UpscalerCache:
    """The upscaler cache that lives as long as the worker's model manager."""
    if models not in _caches:
        _caches[models] = UpscalerCache()
    return _caches[models]
