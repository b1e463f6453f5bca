"""Marigold estimators (diffusers' MarigoldDepth/Normals/IntrinsicsPipeline): depth, normals, albedo,
roughness and metallic maps of an image, each model kept warm in its own slot.

Without seamless, an estimate is exactly diffusers' own pipeline call (same settings, a CPU generator seeded
0), so it equals what the model card's example code gives. With seamless, every conv of the U-Net and the
VAE pads circularly (backend.seamless), and the resizing Marigold does itself is replaced by a wrapping one:
Marigold resizes with edge clamping and pads to a multiple of the VAE factor by repeating the last row and
column, both of which would put a seam back. So a tiling image is resized (wrapping) to a processing size
whose sides are multiples of the whole model's downsampling (VAE x U-Net), handed to the pipeline at that
native size (no resize, no padding inside), and the maps are resized back (wrapping). Then the estimate
commutes with circular shifts, and maps of a tiling image tile.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, MarigoldDepthPipeline, MarigoldIntrinsicsPipeline, MarigoldNormalsPipeline

from backend.models import (
    TORCH_DTYPES,
    ModelKey,
    WarmSlot,
    _hub_model_index,
    hub_snapshot,
    locate,
    pick_device,
    pick_dtype,
    weights_variant,
)
from backend.seamless import AXES, seamless, wrap_axes
from sdtex_contract.protocol import INVALID_PARAMS, MODEL_LOAD_FAILED, ProtocolError
from sdtex_contract.tables import ESTIMATOR_DEFAULTS, ESTIMATORS

log = logging.getLogger(__name__)

ESTIMATOR_KINDS: tuple[str, ...] = ESTIMATORS  # ("depth", "normals", "intrinsics")
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "depth": MarigoldDepthPipeline,
    "normals": MarigoldNormalsPipeline,
    "intrinsics": MarigoldIntrinsicsPipeline,
}
ENSEMBLE_MAX = 10
# IID-Appearance v1-1's layout, for a model whose config does not say (target_properties missing).
DEFAULT_TARGETS = {
    "target_names": ["albedo", "material"],
    "material": {"prediction_space": "stack", "sub_target_names": ["roughness", "metallicity", None]},
}
METALLIC_NAMES = ("metallicity", "metallic", "metalness")


@dataclass(frozen=True)
class EstimateSettings:
    steps: int = 0  # 0: the model's own default (pipeline.default_denoising_steps)
    ensemble_size: int = 1
    processing_resolution: int = 768  # 0: native
    seamless: str = "none"  # "none" | "x" | "y" | "xy"


@dataclass
class Estimate:
    """Maps at the input image's size, float32."""

    depth: np.ndarray | None = None  # HxW in [0,1], Marigold convention (0 = near)
    normals: np.ndarray | None = None  # HxWx3 in [-1,1], Marigold convention (x right, y up, z to viewer)
    albedo: np.ndarray | None = None  # HxWx3 in [0,1], sRGB-encoded
    roughness: np.ndarray | None = None  # HxW in [0,1]
    metallic: np.ndarray | None = None  # HxW in [0,1]


@dataclass
class LoadedEstimator:
    pipe: DiffusionPipeline
    key: ModelKey
    kind: str


def _invalid(param: str, value, message: str, accepted=None) -> ProtocolError:
    data = {"param": param, "value": value}
    if accepted is not None:
        data["accepted"] = accepted
    return ProtocolError(INVALID_PARAMS, f"{param}: {message}", data)


def check_kind(kind: str) -> None:
    if kind not in ESTIMATOR_KINDS:
        raise _invalid("estimator", kind, f"must be one of {', '.join(ESTIMATOR_KINDS)}", list(ESTIMATOR_KINDS))


def check_settings(kind: str, settings: EstimateSettings) -> None:
    """Refuse an unknown kind or impossible settings before anything loads."""
    check_kind(kind)
    if not isinstance(settings.steps, int) or settings.steps < 0:
        raise _invalid("estimate_steps", settings.steps, "must be 0 (the model's default) or a positive integer")
    if not isinstance(settings.ensemble_size, int) or not 1 <= settings.ensemble_size <= ENSEMBLE_MAX:
        raise _invalid("ensemble_size", settings.ensemble_size, f"must be an integer from 1 to {ENSEMBLE_MAX}")
    if not isinstance(settings.processing_resolution, int) or settings.processing_resolution < 0:
        raise _invalid("processing_resolution", settings.processing_resolution, "must be 0 (native) or positive")
    if settings.seamless not in AXES:
        raise _invalid("seamless", settings.seamless, f"must be one of {', '.join(AXES)}", list(AXES))


# --- finding and loading ---------------------------------------------------------------------------------


def _restated(exc: ProtocolError, param: str) -> ProtocolError:
    """A model error about `model` restated for the estimator's parameter."""
    message = exc.message if exc.message.startswith(f"{param}:") else f"{param}: {exc.message}"
    return ProtocolError(exc.code, message, {**exc.data, "param": param})


def _is_file(model: str) -> bool:
    try:
        return Path(model).expanduser().is_file()
    except OSError:  # e.g. a name longer than the file system allows: locate says what is wrong
        return False


def estimator_key(kind: str, model: str, device: str, dtype: str, param: str) -> ModelKey:
    """Where the model is and how it will run; refuses single files and unsafe or missing models."""
    model = model or ESTIMATOR_DEFAULTS[kind]
    if _is_file(model):  # any checkpoint file, pickle or not: refused before locate's advice on pickles
        raise _invalid(
            param, model,
            f"a single checkpoint file cannot hold a Marigold model; give a hub id (e.g. {ESTIMATOR_DEFAULTS[kind]}) "
            f"or a local diffusers folder of a {PIPELINES[kind].__name__}",
        )  # fmt: skip
    try:
        source = locate(model, allow_pickle=False)
    except ProtocolError as exc:
        raise _restated(exc, param) from None
    device = pick_device(device)
    return ModelKey(source, device, pick_dtype(dtype, device), False)


def check_class(kind: str, index: dict, model: str, param: str) -> None:
    name = index.get("_class_name")
    expected = PIPELINES[kind].__name__
    if name != expected:
        raise ProtocolError(
            MODEL_LOAD_FAILED,
            f"{param}: {model} is a {name}, not a {kind} estimator; give a hub id or a diffusers folder of a "
            f"{expected} (e.g. {ESTIMATOR_DEFAULTS[kind]})",
            {"param": param, "value": model, "accepted": expected},
        )


def load_estimator(kind: str, key: ModelKey, param: str) -> DiffusionPipeline:
    """Load and place a Marigold pipeline of `kind`: safetensors only, never remote code."""
    source = key.source
    if source.kind == "folder":
        folder: Path | None = Path(source.location)
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    else:
        try:
            index = _hub_model_index(source.location)
        except ProtocolError as exc:
            raise _restated(exc, param) from None
        folder = hub_snapshot(source.location)
    check_class(kind, index, source.location, param)
    kwargs: dict = {"dtype": TORCH_DTYPES[key.dtype], "use_safetensors": True}
    if folder is not None:
        kwargs["variant"] = weights_variant(folder, key.dtype)
    try:
        pipe = PIPELINES[kind].from_pretrained(source.location, **kwargs)
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as exc:
        raise ProtocolError(
            MODEL_LOAD_FAILED,
            f"{param}: could not load {source.location}: {type(exc).__name__}: {exc}",
            {"param": param, "value": source.location},
        ) from exc
    pipe.to(key.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- seamless resizing -----------------------------------------------------------------------------------


def downsampling(pipe: DiffusionPipeline) -> int:
    """How many pixels one U-Net cell at its coarsest level covers: VAE factor x U-Net factor."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def seamless_size(height: int, width: int, resolution: int, align: int) -> tuple[int, int]:
    """The processing size for a tiling image: Marigold's (longer side = resolution, 0 = native), each side
    rounded to a multiple of `align` so that nothing is padded and the U-Net's downsampling wraps evenly."""
    if resolution > 0:
        longest = max(height, width)
        height, width = height * resolution // longest, width * resolution // longest
    return tuple(max(align, align * round(side / align)) for side in (height, width))


def _wrap_pad(source: int, target: int) -> tuple[int, int]:
    """Pixels to add on each side before resizing `source` to `target` and after: the smallest pair with
    pad_source / pad_target == source / target (so the resize maps the core exactly as without padding) that
    covers the resampling filter's reach."""
    unit = math.gcd(source, target)
    reach = 2 * max(1.0, source / target) + 2
    count = math.ceil(reach / (source // unit))
    return count * (source // unit), count * (target // unit)


def wrap_resize(image: torch.Tensor, size: tuple[int, int], axes: str, antialias: bool) -> torch.Tensor:
    """Bilinear resize of [N,C,H,W] to `size` that wraps around on the seamless axes (edge-clamped on the
    others), as if the image repeated on them forever."""
    wraps = wrap_axes(axes)[::-1]  # (y, x) in the order of the tensor's axes
    pads = []
    for axis, (wrap, target) in enumerate(zip(wraps, size, strict=True)):
        source = image.shape[2 + axis]
        pad = _wrap_pad(source, target) if wrap and source != target else (0, 0)
        if pad[0]:
            index = torch.arange(-pad[0], source + pad[0], device=image.device) % source
            image = image.index_select(2 + axis, index)
        pads.append(pad[1])
    padded = (size[0] + 2 * pads[0], size[1] + 2 * pads[1])
    image = F.interpolate(image, padded, mode="bilinear", align_corners=False, antialias=antialias)
    return image[:, :, pads[0] : pads[0] + size[0], pads[1] : pads[1] + size[1]]


def _as_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """[1,3,H,W] float32 in [0,1], as Marigold's own preprocessing reads a PIL image."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def _resize_maps(prediction: np.ndarray, size: tuple[int, int], axes: str, normals: bool) -> np.ndarray:
    """[N,h,w,C] maps back to the input's size, wrapping on the seamless axes."""
    maps = torch.from_numpy(prediction).permute(0, 3, 1, 2)
    maps = wrap_resize(maps, size, axes, antialias=False)
    if normals:  # as Marigold does after its own resize: unit length again
        maps = maps / maps.norm(dim=1, keepdim=True).clamp(min=1e-6)
    return maps.permute(0, 2, 3, 1).contiguous().numpy()


# --- running ---------------------------------------------------------------------------------------------


def _counting_hook(
    unet: torch.nn.Module,
    total: int,
    on_step: Callable[[int, int], None] | None,
    is_cancelled: Callable[[], bool] | None,
) -> torch.utils.hooks.RemovableHandle:
    """Marigold has no step callback: count U-Net calls (one per denoising step and ensemble member)."""
    from backend.context import Cancelled  # lazily: the job context may come to import this module

    count = 0

    def before_step(module, args) -> None:
        nonlocal count
        if is_cancelled is not None and is_cancelled():
            raise Cancelled()
        count += 1
        if on_step is not None:
            on_step(count, total)

    return unet.register_forward_pre_hook(before_step)


def _call(
    pipe: DiffusionPipeline, image: PIL.Image.Image | torch.Tensor, settings: EstimateSettings, resolution: int
) -> np.ndarray:
    """The pipeline called as its documentation shows, with a CPU generator seeded 0."""
    output = pipe(
        image,
        num_inference_steps=settings.steps or None,
        ensemble_size=settings.ensemble_size,
        processing_resolution=resolution,
        match_input_resolution=True,
        batch_size=1,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    )
    return output.prediction


def predict(pipe: DiffusionPipeline, image: PIL.Image.Image, settings: EstimateSettings) -> np.ndarray:
    """The pipeline's prediction [N,H,W,C] at the image's size; seamless as the module docstring says."""
    if image.mode != "RGB":  # Marigold reads 1 or 3 channels: no alpha, no palette
        image = image.convert("RGB")
    if settings.seamless == "none":
        return _call(pipe, image, settings, settings.processing_resolution)
    width, height = image.size
    size = seamless_size(height, width, settings.processing_resolution, downsampling(pipe))
    pixels = _as_tensor(image)
    if size != (height, width):
        pixels = wrap_resize(pixels, size, settings.seamless, antialias=True).clamp(0.0, 1.0)
    with seamless([pipe.unet, pipe.vae], settings.seamless):
        prediction = _call(pipe, pixels, settings, 0)  # native: no resize and no padding inside
    if size == (height, width):
        return prediction
    return _resize_maps(prediction, (height, width), settings.seamless, isinstance(pipe, MarigoldNormalsPipeline))


def _intrinsics(pipe: DiffusionPipeline, prediction: np.ndarray) -> Estimate:
    """Split [T,H,W,3] by the model's targets: an albedo image, and roughness and metallic channels of a stack."""
    targets = pipe.target_properties or DEFAULT_TARGETS
    estimate = Estimate()
    for image, name in zip(prediction, targets["target_names"], strict=True):
        properties = targets.get(name) or {}
        if name == "albedo":
            linear = properties.get("prediction_space") == "linear"
            estimate.albedo = np.ascontiguousarray(image ** (1 / 2.2) if linear else image)  # Marigold's encoding
        elif properties.get("prediction_space") == "stack":
            for channel, sub in enumerate(properties.get("sub_target_names") or ()):
                if sub == "roughness":
                    estimate.roughness = np.ascontiguousarray(image[..., channel])
                elif sub in METALLIC_NAMES:
                    estimate.metallic = np.ascontiguousarray(image[..., channel])
    return estimate


def to_estimate(kind: str, pipe: DiffusionPipeline, prediction: np.ndarray) -> Estimate:
    prediction = prediction.astype(np.float32, copy=False)
    if kind == "depth":
        return Estimate(depth=np.ascontiguousarray(prediction[0, ..., 0]))
    if kind == "normals":
        return Estimate(normals=prediction[0])
    return _intrinsics(pipe, prediction)


class Estimators:
    """One warm slot per kind (backend.models.WarmSlot): the depth, normals and intrinsics models stay loaded
    side by side, and next to the generator (ctx.models)."""

    def __init__(self) -> None:
        self._slots = {kind: WarmSlot() for kind in ESTIMATOR_KINDS}
        self.loads: Counter[str] = Counter()  # models loaded per kind (a warm estimate loads nothing)

    def pipeline(
        self, kind: str, model: str = "", *, device: str = "auto", dtype: str = "auto", param: str = ""
    ) -> tuple[DiffusionPipeline, float]:
        """The warm pipeline of `kind` for `model` ("" = the kind's default) and the seconds spent loading it."""
        check_kind(kind)
        param = param or f"{kind}_model"
        key = estimator_key(kind, model, device, dtype, param)
        slot = self._slots[kind]

        def load() -> LoadedEstimator:
            log.info("loading %s estimator %s on %s (%s)", kind, key.source.location, key.device, key.dtype)
            self.loads[kind] += 1
            return LoadedEstimator(load_estimator(kind, key, param), key, kind)

        seconds = slot._warm(key, load)
        return slot.loaded.pipe, seconds

    def estimate(
        self,
        kind: str,
        model: str,
        image: PIL.Image.Image,
        settings: EstimateSettings,
        *,
        device: str = "auto",
        dtype: str = "auto",
        on_step: Callable[[int, int], None] | None = None,  # (step, total) over all denoising steps
        is_cancelled: Callable[[], bool] | None = None,
        param: str = "",  # the request's name for `model` in errors (default "<kind>_model")
    ) -> Estimate:
        check_settings(kind, settings)
        pipe, _ = self.pipeline(kind, model, device=device, dtype=dtype, param=param)
        factor = pipe.vae_scale_factor
        if settings.processing_resolution % factor:
            raise _invalid("processing_resolution", settings.processing_resolution, f"must be a multiple of {factor}")
        steps = settings.steps or pipe.default_denoising_steps
        if not steps:
            raise _invalid("estimate_steps", 0, "this model's config has no default number of steps: give 1 or more")
        handle = _counting_hook(pipe.unet, steps * settings.ensemble_size, on_step, is_cancelled)
        try:
            prediction = predict(pipe, image, settings)
        finally:
            handle.remove()
        return to_estimate(kind, pipe, prediction)

    def warm(self) -> dict[str, str]:
        """The loaded model of each warm kind."""
        return {kind: slot.loaded.key.source.location for kind, slot in self._slots.items() if slot.loaded}

    def release(self) -> None:
        for slot in self._slots.values():
            slot.release()
