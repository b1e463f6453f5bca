"""PBR maps from Marigold estimates (backend/estimators.py): which estimators a task's maps need, the checks of
their models before any expensive work, and the conversions of each estimate into the maps backend/pbr.py writes.

Conventions (the same as the classical maps', see backend/pbr.py):
- height = 1 - depth (Marigold's depth is 0 near, 1 far: near is high), scaled around 0.5 by height_contrast
  as the classical height is; it is not stretched (the estimate's own range stays).
- normal: Marigold's normals are camera space, x right, y up, z towards the viewer. Looking straight at the
  texture that is the tangent space of an OpenGL normal map (+Y up); DirectX flips Y. normal_strength scales
  the tilt: n = normalise(s * x, s * y, max(z, 0)) (0 = flat; 1 = the estimate), flat where that is zero.
- roughness: the intrinsics model's, scaled around its own mean by roughness_contrast (1 = the estimate).
- metallic and the delit albedo: the intrinsics model's, as they are (the albedo sRGB-encoded, as Marigold
  gives it).
Each estimator runs at most once per image: the intrinsics model serves roughness, metallic and albedo together.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image

from sdtex_contract.protocol import INVALID_PARAMS, MODEL_NOT_FOUND, ProtocolError, TaskParams

if TYPE_CHECKING:
    from backend.context import JobContext
    from backend.estimators import Estimators

CLASSICAL_MAPS = ("height", "normal", "roughness", "ao")
# The estimator each map can come from; AO is always classical (from whichever height is used).
ESTIMATOR_OF = {"height": "depth", "normal": "normals", "roughness": "intrinsics", "metallic": "intrinsics",
                "albedo": "intrinsics"}  # fmt: skip
METHOD_PARAMS = {"height": "height_method", "normal": "normal_method", "roughness": "roughness_method",
                 "metallic": "metallic_method"}  # fmt: skip
ACCEPTED_MODEL = "a hub id (owner/name) or a local diffusers folder of a Marigold {kind} pipeline"
STAGE = "estimating_maps"  # the status stage while estimators run (loading included)


def wants_maps(params: TaskParams) -> bool:
    """Whether the task writes PBR maps: the pbr task always, the others when params.pbr is set."""
    return params.task == "pbr" or bool(getattr(params, "pbr", False))


def modelled_maps(params: TaskParams) -> tuple[str, ...]:
    """The maps a model makes: each one whose method is "model", and the delit albedo when delight is on."""
    names = [name for name, method in METHOD_PARAMS.items() if getattr(params, method, "") == "model"]
    return (*names, "albedo") if getattr(params, "delight", False) else tuple(names)


def map_names(params: TaskParams) -> tuple[str, ...]:
    """Every map the task writes, in writing order; () when it writes none."""
    if not wants_maps(params):
        return ()
    extra = [name for name in ("metallic", "albedo") if name in modelled_maps(params)]
    return (*CLASSICAL_MAPS, *extra)


def needed_estimators(params: TaskParams) -> dict[str, str]:
    """kind -> model (the `<kind>_model` parameter as given) of each estimator the task's maps need, each once."""
    if not wants_maps(params):
        return {}
    kinds = dict.fromkeys(ESTIMATOR_OF[name] for name in modelled_maps(params))
    return {kind: getattr(params, f"{kind}_model") for kind in kinds}


def map_sources(params: TaskParams) -> dict[str, str]:
    """How each map the task writes is made: "classical", or "model:<the model parameter as given>"."""
    estimators = needed_estimators(params)
    modelled = modelled_maps(params)
    return {
        name: f"model:{estimators[ESTIMATOR_OF[name]]}" if name in modelled else "classical"
        for name in map_names(params)
    }


def _users(params: TaskParams, kind: str) -> str:
    """The parameters that ask for this estimator, for error messages: "normal_method model", "delight"..."""
    names = [name for name in modelled_maps(params) if ESTIMATOR_OF[name] == kind]
    return ", ".join("delight" if name == "albedo" else f"{METHOD_PARAMS[name]} model" for name in names)


def check_estimator_model(kind: str, model: str, param: str) -> None:
    """Refuse, without loading anything, a model that cannot be this kind's Marigold pipeline: missing, a
    single file, or a folder (or cached hub model) of another pipeline. A hub id that is not cached passes while
    the hub can be reached (it is fetched when the estimator loads; asking the hub now can take a minute)."""
    from backend.estimators import check_class, estimator_key  # torch, diffusers: only when asked
    from backend.models import hub_snapshot

    source = estimator_key(kind, model, "cpu", "fp32", param).source  # found, safe, not a single file
    # A folder, or a hub model's cached copy (asking the hub can take a minute offline: that waits for the load).
    folder = Path(source.location) if source.kind == "folder" else hub_snapshot(source.location)
    if folder is not None:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        check_class(kind, index if isinstance(index, dict) else {}, model, param)
    elif _offline():  # it could only fail when it loads, after the generation it was asked for
        raise ProtocolError(
            MODEL_NOT_FOUND,
            f"{param} {model!r} is not downloaded and the backend is offline (HF_HUB_OFFLINE): download it first "
            "(Download Estimator in the panel, or the download_model task), or give a local diffusers folder",
            {"param": param, "value": model},
        )


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_estimators(params: TaskParams) -> dict[str, str]:
    """needed_estimators, each model checked before any expensive work (generation included): not empty, found,
    the right Marigold pipeline."""
    needed = needed_estimators(params)
    for kind, model in needed.items():
        param = f"{kind}_model"
        if not model.strip():
            accepted = ACCEPTED_MODEL.format(kind=kind)
            raise ProtocolError(
                INVALID_PARAMS,
                f"{param} is empty, but {_users(params, kind)} needs it: give {accepted}, or set the map's method "
                "back to classical",
                {"param": param, "accepted": accepted, "value": model},
            )
        check_estimator_model(kind, model, param)
    return needed


def job_estimators(ctx: JobContext) -> Estimators:
    """The worker's estimators, or (a job run without a worker) the job's own, made on first use."""
    if ctx.estimators is None:
        from backend.estimators import Estimators

        ctx.estimators = Estimators()
    return ctx.estimators


def estimate_maps(
    albedo: PIL.Image.Image,
    params: TaskParams,
    estimators: Estimators | None,
    *,
    on_step: Callable[[int, int], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
) -> dict[str, np.ndarray]:
    """The modelled maps as float arrays at the albedo's size (height, roughness, metallic HxW in 0..1; normal
    HxWx3 unit vectors in the params' normal format; albedo HxWx3 in 0..1). Estimates tile on the params'
    seamless axes. Raises backend.context.Cancelled."""
    needed = needed_estimators(params)
    if not needed:
        return {}
    if estimators is None:
        raise ValueError(f"maps from a model ({', '.join(modelled_maps(params))}) need an Estimators")
    from backend.estimators import EstimateSettings

    settings = EstimateSettings(
        steps=params.estimate_steps,
        ensemble_size=params.ensemble_size,
        processing_resolution=params.processing_resolution,
        seamless=params.seamless,
    )
    image = albedo.convert("RGB")
    hooks = dict(device=getattr(params, "device", "auto"), dtype=getattr(params, "dtype", "auto"),
                 on_step=on_step, is_cancelled=is_cancelled)  # fmt: skip
    estimates = {kind: estimators.estimate(kind, model, image, settings, **hooks) for kind, model in needed.items()}
    return {name: _convert(name, estimates[ESTIMATOR_OF[name]], params) for name in modelled_maps(params)}


def _convert(name: str, estimate: object, params: TaskParams) -> np.ndarray:
    if name == "height":
        return height_from_depth(estimate.depth, params.height_contrast)
    if name == "normal":
        return tangent_normals(estimate.normals, params.normal_strength, params.normal_format)
    if name == "roughness":
        return scaled_around_mean(estimate.roughness, params.roughness_contrast)
    values = estimate.metallic if name == "metallic" else estimate.albedo
    return np.clip(np.asarray(values, dtype=np.float64), 0, 1)


def height_from_depth(depth: np.ndarray, contrast: float) -> np.ndarray:
    """Near is high: 1 - depth, scaled around 0.5 by `contrast` as the classical height."""
    height = 1 - np.asarray(depth, dtype=np.float64)
    return np.clip(0.5 + contrast * (height - 0.5), 0, 1)


def tangent_normals(normals: np.ndarray, strength: float, normal_format: str) -> np.ndarray:
    """Marigold's normals (x right, y up, z to the viewer) as unit tangent-space normals, the tilt scaled by
    `strength`; normals facing away are laid flat on the surface (z = 0). DirectX flips Y."""
    n = np.asarray(normals, dtype=np.float64)
    scaled = np.stack([strength * n[..., 0], strength * n[..., 1], np.maximum(n[..., 2], 0)], axis=-1)
    length = np.linalg.norm(scaled, axis=-1, keepdims=True)
    flat = np.broadcast_to(np.array([0.0, 0.0, 1.0]), scaled.shape)
    unit = np.where(length > 1e-6, scaled / np.maximum(length, 1e-6), flat)
    if normal_format == "directx":
        unit[..., 1] *= -1
    return unit


def scaled_around_mean(values: np.ndarray, contrast: float) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    mean = values.mean()
    return np.clip(mean + contrast * (values - mean), 0, 1)
