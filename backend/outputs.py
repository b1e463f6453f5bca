"""Write generated images as PNGs with their settings, safely named inside the output folder.

Each PNG carries an A1111-style `parameters` text chunk (read by most SD tools) and an `sdtex` chunk with
the full settings as JSON, so any texture can be regenerated from the file alone.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import PIL.Image
from PIL.PngImagePlugin import PngInfo

from backend import __version__
from backend.pbr import derive_maps
from backend.schedulers import display_name
from blender_sd_addon.protocol import INVALID_PARAMS, PROTOCOL_VERSION, GenerateParams, ImageRecord, ProtocolError

PREFIX_MAX = 64


def sanitise_prefix(prefix: str) -> str:
    """Letters, digits, '-', '_' and inner dots only: no separators, no '..', no hidden files."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", prefix).strip("._")[:PREFIX_MAX]
    return cleaned or "sdtex"


def model_name(model: str) -> str:
    """A short model name for metadata: a hub id as is, a local path by its file or folder name."""
    path = Path(model)
    return path.stem if path.suffix.lower() == ".safetensors" else (path.name if path.is_absolute() else model)


def output_folder(params: GenerateParams) -> Path:
    folder = Path(params.output_dir)
    if not folder.is_absolute():
        raise ProtocolError(
            INVALID_PARAMS,
            f"output_dir must be an absolute path, got {params.output_dir!r}",
            {"param": "output_dir", "accepted": "an absolute path", "value": params.output_dir},
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ProtocolError(
            INVALID_PARAMS,
            f"output_dir {params.output_dir!r} cannot be created: {exc.strerror}",
            {"param": "output_dir", "value": params.output_dir},
        ) from None
    return folder.resolve()


def a1111_parameters(params: GenerateParams, seed: int) -> str:
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    settings = (
        f"Steps: {params.steps}, Sampler: {display_name(params.scheduler)}, CFG scale: {params.guidance_scale:g}, "
        f"Seed: {seed}, Size: {params.width}x{params.height}, Model: {model_name(params.model)}"
    )
    if params.seamless != "none":
        settings += f", Seamless: {params.seamless}"
    lines.append(settings)
    return "\n".join(lines)


def png_info(params: GenerateParams, seed: int) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", a1111_parameters(params, seed))
    settings = {
        "params": params.to_dict(),
        "seed": seed,
        "protocol_version": PROTOCOL_VERSION,
        "backend_version": __version__,
    }
    info.add_text("sdtex", json.dumps(settings))
    return info


def write_png(image: PIL.Image.Image, folder: Path, stem: str, info: PngInfo) -> Path:
    """Write `<stem>.png` (or `<stem>_N.png` if taken) inside `folder`, never overwriting anything."""
    for n in range(10_000):
        path = (folder / f"{stem}{f'_{n}' if n else ''}.png").resolve()
        if path.parent != folder:
            raise ProtocolError(INVALID_PARAMS, f"file name {stem!r} leaves output_dir", {"param": "filename_prefix"})
        try:
            with open(path, "xb") as f:  # exclusive create: a file (or link) already there is never touched
                image.save(f, format="PNG", pnginfo=info)
            return path
        except FileExistsError:
            continue
    raise ProtocolError(INVALID_PARAMS, f"too many files named {stem}_N.png in {folder}", {"param": "output_dir"})


def save_images(images: list[PIL.Image.Image], seeds: list[int], params: GenerateParams) -> list[ImageRecord]:
    """Save each image (and its PBR maps when asked); every file is closed before it is reported."""
    folder = output_folder(params)
    prefix = sanitise_prefix(params.filename_prefix)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    records = []
    for image, seed in zip(images, seeds, strict=True):
        info = png_info(params, seed)
        albedo = write_png(image, folder, f"{prefix}_{stamp}_{seed}", info)
        record = ImageRecord(path=str(albedo), seed=seed)
        if params.pbr:
            maps = derive_maps(
                image,
                wrap_x=params.seamless in ("x", "xy"),
                wrap_y=params.seamless in ("y", "xy"),
                normal_format=params.normal_format,
                strength=params.normal_strength,
                height_contrast=params.height_contrast,
                roughness_contrast=params.roughness_contrast,
                ao_strength=params.ao_strength,
            )
            record.maps = {name: str(write_png(m, folder, f"{albedo.stem}_{name}", info)) for name, m in maps.items()}
        records.append(record)
    return records
