"""Headless Python API: generate a texture and put it on objects, from any script.

    import bpy
    from blender_sd_addon.api import generate_texture
    result = generate_texture([bpy.data.objects["Cube"]], "rusty metal plate", seamless="xy", steps=20)
    print(result.files, result.materials)

Run it with `blender -b file.blend -P script.py` (an installed add-on is enabled from the preferences,
also in background mode), or with Blender as a Python module (`import bpy`; enable the add-on first with
`addon_utils.enable("blender_sd_addon", default_set=True)`). See examples/headless_api.py.

Each call blocks until the images are on disk and applied. Problems raise SDTexError with a message that
names the parameter or the setting to fix; errors the backend reports are BackendError, whose `code` is
one of protocol.py's error codes (e.g. "model_not_found", "out_of_memory").

As a Blender 4.2+ extension the package is `bl_ext.<repository>.blender_sd_addon`; while the add-on is
enabled it is also importable as `blender_sd_addon` (see blender/__init__.py), so scripts need not know
the repository name.

The operators use the same functions, so the panel, `bpy.ops.sdtex.generate()` and this API behave alike.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bpy

from . import paths, protocol
from .blender import materials
from .client import BackendClient, BackendError, SDTexError
from .history import HISTORY_LIMIT, HistoryRecord
from .jobs import DONE, Job

__all__ = ["BackendError", "SDTexError", "TextureResult", "generate_texture", "load_model", "shutdown_backend"]

ADDON_ID = __package__
# Preferences passed with every request (names match protocol parameters and the preference properties).
BACKEND_SETTINGS = ("device", "dtype", "cpu_offload", "attention_slicing", "vae_tiling", "allow_pickle")
LOAD_MODEL_SETTINGS = ("model", "device", "dtype", "cpu_offload", "attention_slicing", "allow_pickle")

_client: BackendClient | None = None


def _default(name: str) -> Any:
    return protocol.param(name).default


@dataclass
class TextureResult:
    images: list  # bpy.types.Image, one per generated image (albedo)
    materials: list  # bpy.types.Material made by applying the first image (empty when apply=False)
    files: list[str]  # every file written: albedo images and PBR maps
    seed: int
    result: protocol.GenerateResult


def generate_texture(
    objects,
    prompt: str,
    *,
    model: str | None = None,
    negative_prompt: str = "",
    seed: int | None = None,
    steps: int = _default("steps"),
    guidance_scale: float = _default("guidance_scale"),
    width: int = _default("width"),
    height: int = _default("height"),
    scheduler: str = _default("scheduler"),
    batch_size: int = 1,
    seamless: str = "none",
    pbr: bool = False,
    normal_format: str = _default("normal_format"),
    normal_strength: float = _default("normal_strength"),
    height_contrast: float = _default("height_contrast"),
    roughness_contrast: float = _default("roughness_contrast"),
    ao_strength: float = _default("ao_strength"),
    apply: bool = True,
    shared_material: bool = True,
    slot: str = "NEW",
    projection: str = "UV",
    texture_scale: float = 1.0,
    output_dir: str | None = None,
    timeout: float | None = None,
) -> TextureResult:
    """Generate images from `prompt` and (apply=True) put them on the mesh objects as a material.

    model: hub id, diffusers folder or .safetensors file; None uses the add-on preferences.
    seed: None picks one (reported in the result). output_dir: None uses the preferences' output folder.
    timeout: seconds before the request is cancelled and SDTexError raised (None waits).
    """
    # 1. Check inputs
    options = apply_options(shared_material=shared_material, slot=slot, projection=projection, scale=texture_scale)
    meshes = mesh_objects(objects) if apply else []
    settings = dict(
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        width=width,
        height=height,
        scheduler=scheduler,
        batch_size=batch_size,
        seamless=seamless,
        pbr=pbr,
        normal_format=normal_format,
        normal_strength=normal_strength,
        height_contrast=height_contrast,
        roughness_contrast=roughness_contrast,
        ao_strength=ao_strength,
    )
    params = generate_params(settings, model=model, output_dir=output_dir)

    # 2. Generate (blocks until the files are written)
    result = run(params, timeout=timeout)

    # 3. Apply and record
    return finish(result, meshes, options, apply=apply)


def load_model(model: str | None = None, timeout: float | None = None) -> dict:
    """Start the backend and load `model` (None: the preferences' model) so the next request starts warm.

    Returns {"model", "load_seconds", "warmup_seconds", "device", "dtype"}. A model that is not there raises
    BackendError with code "model_not_found" and a message that says how to get it.
    """
    params = load_model_params()
    if model:
        params["model"] = bpy.path.abspath(model)
    return get_client().request(protocol.LOAD_MODEL, params, timeout=timeout)


def shutdown_backend() -> None:
    """Stop the backend worker (it starts again on the next request)."""
    if _client is not None:
        _client.shutdown()


# --- shared with the operators --------------------------------------------------------------------


def preferences():
    addon = bpy.context.preferences.addons.get(ADDON_ID)
    if addon is None:
        raise SDTexError(f"The SD Textures add-on is not enabled: call addon_utils.enable({ADDON_ID!r}) first")
    return addon.preferences


def user_data_dir() -> Path:
    try:  # Blender 4.2+ extension
        return Path(bpy.utils.extension_path_user(ADDON_ID, create=True))
    except (AttributeError, ValueError):  # older Blender, or installed as a legacy add-on
        return Path(bpy.utils.user_resource("DATAFILES", path="sd_textures", create=True))


def get_client() -> BackendClient:
    """The client for the configured interpreter (a new one when the preference changed)."""
    global _client
    data = user_data_dir()
    python = paths.find_backend_python(bpy.path.abspath(preferences().backend_python), data)
    command = [python, "-m", "backend", "serve"]
    if _client is None or _client.command != command:
        shutdown_backend()
        _client = BackendClient(command, paths.backend_pythonpath(), log_path=data / "backend.log")
    return _client


def current_client() -> BackendClient | None:
    return _client


def mesh_objects(objects) -> list:
    meshes = [obj for obj in objects or () if getattr(obj, "type", None) == "MESH"]
    if not meshes:
        raise SDTexError("Select one or more mesh objects (or generate without applying)")
    return meshes


def apply_options(shared_material: bool, slot: str, projection: str, scale: float) -> materials.ApplyOptions:
    try:
        return materials.ApplyOptions(
            shared_material=shared_material, slot=slot, projection=projection, texture_scale=scale
        )
    except ValueError as exc:
        raise SDTexError(str(exc)) from None


def generate_params(settings: dict, model: str | None = None, output_dir: str | None = None) -> dict:
    """Validated generate parameters: `settings` plus the preferences' model, device and memory options."""
    prefs = preferences()
    params = {name: getattr(prefs, name) for name in BACKEND_SETTINGS} | settings
    params["model"] = bpy.path.abspath(model or prefs.model)
    if output_dir:
        params["output_dir"] = os.path.abspath(bpy.path.abspath(output_dir))
    else:
        params["output_dir"] = str(paths.resolve_output_dir(prefs.output_folder, bpy.data.filepath, user_data_dir()))
    try:
        return protocol.GenerateParams.from_dict(params).to_dict()
    except protocol.ProtocolError as exc:
        raise SDTexError(exc.message) from None


def load_model_params() -> dict:
    prefs = preferences()
    params = {name: getattr(prefs, name) for name in LOAD_MODEL_SETTINGS}
    params["model"] = bpy.path.abspath(params["model"])
    return params


def submit(params: dict) -> Job:
    """Start a generate request; the caller feeds the job with the client's messages."""
    client = get_client()
    return Job(client.submit(protocol.GENERATE, params), params)


def run(params: dict, timeout: float | None = None) -> protocol.GenerateResult:
    """Generate and wait (background mode and scripts)."""
    job = submit(params)
    job.handle(_client.wait(job.request_id, on_event=job.handle, timeout=timeout))
    if job.state != DONE:
        raise BackendError(job.error_code, job.error) if job.error_code else SDTexError(job.error)
    return job.result


def finish(
    result: protocol.GenerateResult, meshes: list, options: materials.ApplyOptions, apply: bool
) -> TextureResult:
    """Load the written images, apply the first one to the meshes, and record the generation."""
    missing = [i.path for i in result.images if not os.path.isfile(i.path)]
    if missing:
        raise SDTexError(f"The backend reported images that are not on disk: {', '.join(missing)}")
    images = [bpy.data.images.load(i.path, check_existing=True) for i in result.images]
    made = apply_image(result.images[0], meshes, options, result.params) if apply else []
    add_history(bpy.context.scene, HistoryRecord.from_result(result))
    files = [path for i in result.images for path in (i.path, *i.maps.values())]
    return TextureResult(images=images, materials=made, files=files, seed=result.seed, result=result)


def apply_image(image: protocol.ImageRecord, meshes: list, options: materials.ApplyOptions, params: dict) -> list:
    options = dataclasses.replace(options, normal_directx=params.get("normal_format") == "directx")
    name = material_name(params["prompt"])
    try:
        return materials.apply_images(meshes, {"albedo": image.path, **image.maps}, options, name)
    except ValueError as exc:
        raise SDTexError(str(exc)) from None


def material_name(prompt: str) -> str:
    words = " ".join(prompt.split())
    return "SD " + (words[:40].rstrip() + "…" if len(words) > 40 else words)


def add_history(scene, record: HistoryRecord) -> None:
    """Newest first; the oldest entries beyond HISTORY_LIMIT are dropped (their files stay on disk)."""
    entries = scene.sdtex.history
    item = entries.add()
    for name, value in record.to_fields().items():
        setattr(item, name, value)
    entries.move(len(entries) - 1, 0)
    while len(entries) > HISTORY_LIMIT:
        entries.remove(len(entries) - 1)
    scene.sdtex.history_index = 0
