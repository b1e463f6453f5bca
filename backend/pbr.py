"""PBR maps of an albedo: height, normal, roughness, ambient occlusion by classical image filters, or (per map,
as a task asks) from a Marigold model's estimate, with metallic and a delit albedo (backend/estimated_maps.py).

The classical filters involve no model, so their maps are a plausible starting point, not a measurement. Every
filter wraps around the axes on which the texture tiles (and reflects on the others), so the maps of a tileable
albedo tile as well: deriving the maps of a shifted albedo gives the shifted maps.

Conventions: height is 0..1 (0.5 = flat), saved as 16-bit; normals are tangent-space, unit length before
8-bit quantisation, encoded as (n * 0.5 + 0.5) * 255, +X right and +Y up (OpenGL, what Blender expects),
or +Y down for DirectX.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
from scipy import ndimage

from backend.estimated_maps import CLASSICAL_MAPS, estimate_maps, map_names, map_sources
from sdtex_contract.protocol import TaskParams

if TYPE_CHECKING:
    from backend.estimators import Estimators

NORMAL_FORMATS = ("opengl", "directx")
LUMA = np.array([0.2126, 0.7152, 0.0722])  # Rec. 709 weights
HEIGHT_SIGMA = 1.0  # pixels: smooths pixel noise out of the height, keeps the texture's detail
RELIEF = 1 / 32  # at strength 1 the full height range is this fraction of the smaller side deep
AO_SIGMA = 1 / 64  # of the smaller side: the neighbourhood a cavity is measured against
AO_GAIN = 4.0  # at strength 1, a point this far below its neighbourhood (in height units) is fully occluded
ROUGHNESS_MID, ROUGHNESS_SPREAD = 0.6, 0.15  # mean luminance -> 0.6; each standard deviation brighter -> 0.15 smoother


def derive_maps(
    albedo: PIL.Image.Image,
    *,
    wrap_x: bool,
    wrap_y: bool,
    normal_format: str = "opengl",
    strength: float = 1.0,
    height_contrast: float = 1.0,
    roughness_contrast: float = 1.0,
    ao_strength: float = 1.0,
) -> dict[str, PIL.Image.Image]:
    """Keys "height", "normal", "roughness", "ao". Deterministic. Every filter wraps on the axes that
    tile (mode="wrap"), reflects/nearest on the others, so maps of a tileable albedo tile too.

    `strength` scales the relief the normal map shows (0 gives a flat normal); `height_contrast` scales the
    height map around its middle (0.5; scale depth in Blender's Displacement node); `roughness_contrast`
    scales roughness around its middle (0 = uniform); `ao_strength` scales how dark cavities get (0 = white).
    Modes: height "I;16", normal "RGB", roughness and AO "L".
    """
    # 1. Check inputs
    _check_controls(normal_format, strength, height_contrast, roughness_contrast, ao_strength)
    modes = ("wrap" if wrap_y else "reflect", "wrap" if wrap_x else "reflect")  # per array axis: rows, columns
    luminance = _luminance(albedo)

    # 2. Height, then 3. normal, 4. roughness, 5. ambient occlusion
    height = _height(luminance, height_contrast, modes)
    return encode_maps(
        {
            "height": height,
            "normal": _normal(height, strength, normal_format, modes),
            "roughness": _roughness(luminance, roughness_contrast),
            "ao": _ambient_occlusion(height, ao_strength, modes),
        }
    )


def maps_for(
    albedo: PIL.Image.Image,
    params: TaskParams,
    estimators: Estimators | None = None,
    *,
    on_step: Callable[[int, int], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
) -> tuple[dict[str, PIL.Image.Image], dict[str, str]]:
    """A task's maps and how each was made ({"normal": "classical" | "model:<model>", ...}), wrapping on the axes
    it tiles on (params.seamless resolved). Each map follows its method: the filters of derive_maps, or a Marigold
    model's estimate (backend/estimated_maps.py; metallic and the delit "albedo" exist only from a model). AO
    is classical, from whichever height is used; so is a classical normal. With every method classical the maps
    are derive_maps'."""
    # 1. Check inputs
    strength, ao_strength = params.normal_strength, params.ao_strength
    _check_controls(params.normal_format, strength, params.height_contrast, params.roughness_contrast, ao_strength)
    wrap_x, wrap_y = params.seamless in ("x", "xy"), params.seamless in ("y", "xy")
    modes = ("wrap" if wrap_y else "reflect", "wrap" if wrap_x else "reflect")

    # 2. The estimates (each estimator at most once), 3. the classical maps for the rest, then AO
    values = estimate_maps(albedo, params, estimators, on_step=on_step, is_cancelled=is_cancelled)
    luminance = _luminance(albedo)
    if "height" not in values:
        values["height"] = _height(luminance, params.height_contrast, modes)
    if "normal" not in values:
        values["normal"] = _normal(values["height"], strength, params.normal_format, modes)
    if "roughness" not in values:
        values["roughness"] = _roughness(luminance, params.roughness_contrast)
    values["ao"] = _ambient_occlusion(values["height"], ao_strength, modes)
    names = map_names(params) or CLASSICAL_MAPS
    sources = map_sources(params) or dict.fromkeys(names, "classical")
    return encode_maps({name: values[name] for name in names}), sources


def _luminance(albedo: PIL.Image.Image) -> np.ndarray:
    return (np.asarray(albedo.convert("RGB"), dtype=np.float64) / 255.0) @ LUMA


def encode_maps(values: dict[str, np.ndarray]) -> dict[str, PIL.Image.Image]:
    """Float maps (0..1; normals -1..1) as images: height and depth 16-bit ("I;16"), normal (n * 0.5 + 0.5) and
    albedo 8-bit RGB, the others 8-bit "L"."""
    images = {}
    for name, value in values.items():
        if name in ("height", "depth"):
            images[name] = PIL.Image.fromarray(_quantise(value, 65535, np.uint16))
        elif name == "normal":
            images[name] = PIL.Image.fromarray(_quantise(value * 0.5 + 0.5, 255, np.uint8))
        else:
            images[name] = PIL.Image.fromarray(_quantise(value, 255, np.uint8))
    return images


def _check_controls(normal_format: str, strength: float, height_contrast: float, roughness_contrast: float,
                    ao_strength: float) -> None:  # fmt: skip
    if normal_format not in NORMAL_FORMATS:
        raise ValueError(f"normal_format must be one of {', '.join(NORMAL_FORMATS)}, got {normal_format!r}")
    controls = {
        "strength": strength,
        "height_contrast": height_contrast,
        "roughness_contrast": roughness_contrast,
        "ao_strength": ao_strength,
    }
    for name, value in controls.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _height(luminance: np.ndarray, contrast: float, modes: tuple[str, str]) -> np.ndarray:
    """Smoothed luminance stretched to 0..1, scaled around its middle by `contrast`."""
    height = ndimage.gaussian_filter(luminance, HEIGHT_SIGMA, mode=modes)
    low, high = height.min(), height.max()
    height = (height - low) / (high - low) if high - low > 1e-6 else np.full_like(height, 0.5)
    return np.clip(0.5 + contrast * (height - 0.5), 0, 1)


def _normal(height: np.ndarray, strength: float, normal_format: str, modes: tuple[str, str]) -> np.ndarray:
    """Unit normals of the surface z = relief * height. Sobel is 8x the per-pixel derivative. Rows run down the
    image while +Y points up, so the up-derivative is minus the row derivative: n = (-dz/dx, +dz/drow, 1)."""
    relief = strength * RELIEF * min(height.shape)
    dz_dx = ndimage.sobel(height, axis=1, mode=modes) / 8 * relief
    dz_drow = ndimage.sobel(height, axis=0, mode=modes) / 8 * relief
    normal = np.stack([-dz_dx, dz_drow, np.ones_like(height)], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    if normal_format == "directx":
        normal[..., 1] *= -1
    return normal


def _roughness(luminance: np.ndarray, contrast: float) -> np.ndarray:
    """Inverted luminance around its mean, contrast set by its spread (bright reads as smoother)."""
    spread = luminance.std()
    deviation = (luminance - luminance.mean()) / spread if spread > 1e-6 else np.zeros_like(luminance)
    return ROUGHNESS_MID - contrast * ROUGHNESS_SPREAD * deviation


def _ambient_occlusion(height: np.ndarray, strength: float, modes: tuple[str, str]) -> np.ndarray:
    """How far each point lies below its wider neighbourhood."""
    cavity = ndimage.gaussian_filter(height, AO_SIGMA * min(height.shape), mode=modes) - height
    return 1 - AO_GAIN * strength * np.clip(cavity, 0, None)


def _quantise(values: np.ndarray, top: int, dtype: type) -> np.ndarray:
    return np.round(np.clip(values, 0, 1) * top).astype(dtype)
