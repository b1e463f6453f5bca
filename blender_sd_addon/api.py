"""Headless Python API: generate a texture and put it on objects, from any script.

    import bpy
    from blender_sd_addon.api import generate_texture
    result = generate_texture([bpy.data.objects["Cube"]], "rusty metal plate", seamless="xy", steps=20)
    print(result.files, result.materials)
    maps = derive_pbr_maps(bpy.data.images["bricks.png"], [bpy.data.objects["Wall"]], seamless="xy")
    variation = img2img(bpy.data.images["bricks.png"], "mossy bricks", [bpy.data.objects["Wall"]], strength=0.5)
    patched = inpaint("/textures/wall.png", "moss", mask=bpy.data.images["Wall Mask"], steps=20)
    bigger = upscale(variation.images[0], scale=2, seamless="auto")
    lava = travel_texture([bpy.data.objects["Floor"]], [{"prompt": "lava", "seed": 1}, {"prompt": "basalt", "seed": 2}],
                          frames=24, loop=True, seamless="xy")
    statue = project_texture([bpy.data.objects["Statue"]], "bronze statue",
                             controlnet="lllyasviel/control_v11f1p_sd15_depth", views_per_ring=8)

A backend on another machine (`python -m backend serve --listen HOST:PORT` there): call
`configure_remote("gpu-box:7860", token)` first, or set SDTEX_REMOTE / SDTEX_REMOTE_TOKEN; every call then
works the same, with the files fetched into the output folder.

Run it with `blender -b file.blend -P script.py` (an installed add-on is enabled from the preferences,
also in background mode), or with Blender as a Python module (`import bpy`; enable the add-on first with
`addon_utils.enable("blender_sd_addon", default_set=True)`). See examples/headless_api.py.

Each call blocks until the images are on disk and applied. Problems raise SDTexError with a message that
names the parameter or the setting to fix; errors the backend reports are BackendError, whose `code` is
one of protocol.py's error codes (e.g. "model_not_found", "out_of_memory").

As a Blender 4.2+ extension the package is `bl_ext.<repository>.blender_sd_addon`; while the add-on is
enabled it is also importable as `blender_sd_addon` (see blender/__init__.py), so scripts need not know
the repository name.

The operators use the same functions, so the panels, `bpy.ops.sdtex.generate()`,
`bpy.ops.sdtex.derive_pbr_maps()`, `bpy.ops.sdtex.image_task()` and this API behave alike.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bpy

from . import paths, protocol
from .blender import geometry, images, materials, relocate
from .client import BackendClient, BackendError, SDTexError
from .history import HISTORY_LIMIT, HistoryRecord
from .jobs import DONE, Job
from .remote import RemoteSettings
from .rpc import check_timeout

__all__ = [
    "BackendError",
    "SDTexError",
    "TextureResult",
    "configure_remote",
    "derive_pbr_maps",
    "generate_texture",
    "img2img",
    "inpaint",
    "list_loras",
    "load_model",
    "make_seamless",
    "project_texture",
    "shutdown_backend",
    "train_lora",
    "travel_texture",
    "upscale",
]

ADDON_ID = __package__
# Preferences passed with every request (names match protocol parameters and the preference properties).
BACKEND_SETTINGS = ("device", "dtype", "cpu_offload", "attention_slicing", "vae_tiling", "allow_pickle")
LOAD_MODEL_SETTINGS = ("model", "device", "dtype", "cpu_offload", "attention_slicing", "allow_pickle")

_client: BackendClient | None = None
_remote: RemoteSettings | None = None  # configure_remote()


def _default(name: str, task: str | None = None) -> Any:
    return protocol.param(name, task).default


@dataclass
class TextureResult:
    images: list  # bpy.types.Image, one per image (albedo): generated, or the pbr task's source image
    maps: list[dict]  # per image: "height" | "normal" | "roughness" | "ao" -> bpy.types.Image (empty without maps)
    materials: list  # bpy.types.Material made by applying the first image (empty when not applied)
    files: list[str]  # every file written: albedo images and PBR maps
    seed: int | None  # None for the pbr task
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
    loras: list[dict] = (),
    apply: bool = True,
    shared_material: bool = True,
    slot: str = "NEW",
    projection: str = "UV",
    texture_scale: float = 1.0,
    displacement: str = "BUMP",
    ao_multiply: bool = False,
    pack: bool = False,
    output_dir: str | None = None,
    timeout: float | None = None,
) -> TextureResult:
    """Generate images from `prompt` and (apply=True) put them on the mesh objects as a material.

    model: hub id, diffusers folder or .safetensors file; None uses the add-on preferences.
    loras: LoRAs to apply, each {"model": .safetensors file, folder or hub id, "weight": 1.0} (train_lora makes them).
    seed: None picks one (reported in the result). output_dir: None uses the preferences' output folder.
    shared_material ... pack: how the material is built and assigned (see apply_options).
    timeout: seconds before the request is cancelled and SDTexError raised (None or inf waits; NaN is refused).
    """
    # 1. Check inputs
    options = apply_options(
        shared_material, slot, projection, texture_scale, displacement=displacement, ao_multiply=ao_multiply, pack=pack
    )
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
        loras=[{**lora, "model": bpy.path.abspath(lora.get("model", ""))} for lora in loras],  # "//" blend-relative
    )
    params = generate_params(settings, model=model, output_dir=output_dir)

    # 2. Generate (blocks until the files are written)
    result = run(params, timeout=timeout)

    # 3. Apply and record
    return finish(result, meshes, options, apply=apply)


def derive_pbr_maps(
    image,
    objects=None,
    *,
    seamless: str = "none",
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
    displacement: str = "BUMP",
    ao_multiply: bool = False,
    pack: bool = False,
    output_dir: str | None = None,
    timeout: float | None = None,
) -> TextureResult:
    """Derive height, normal, roughness and AO maps of `image` and, when objects are given and apply=True,
    put the image (as albedo) with its maps on the mesh objects among them.

    image: a bpy.types.Image (file, packed, generated or painted and unsaved: it is read, never changed) or
    the path of an image file. seamless: the axes on which the image tiles ("none", "x", "y", "xy"); the
    maps then tile too. The maps are new images (result.maps[0]); files go to output_dir (None: the
    preferences' output folder). Blocks until the maps are written (and applied).
    """
    # 1. Check inputs (before anything is sent)
    options = apply_options(
        shared_material, slot, projection, texture_scale, displacement=displacement, ao_multiply=ao_multiply, pack=pack
    )
    meshes = mesh_objects(objects) if apply and objects is not None else []
    source = source_image(image)
    check_timeout(timeout)  # before the image is sent
    settings = dict(
        seamless=seamless,
        normal_format=normal_format,
        normal_strength=normal_strength,
        height_contrast=height_contrast,
        roughness_contrast=roughness_contrast,
        ao_strength=ao_strength,
    )
    params = pbr_params(settings, output_dir=output_dir)

    # 2. Send the image and derive the maps (blocks until the files are written)
    result = run(params | {"image": image_reference(source)}, task="pbr", timeout=timeout)

    # 3. Load, apply and record
    return finish(result, meshes, options, apply=bool(meshes), source=source.name)


def img2img(
    image, prompt: str, objects=None, *, strength: float = _default("strength", "img2img"), **options
) -> TextureResult:
    """Variations of `image`: it is noised as much as `strength` says (0: unchanged, 1: from noise), then
    repainted following `prompt`. The results are new images; with objects (and apply=True) the first one
    goes on the mesh objects among them as a material.
    """
    return image_task("img2img", {"image": image}, objects, prompt=prompt, strength=strength, **options)


def inpaint(
    image, prompt: str, mask=None, objects=None, *, mask_from: str = _default("mask_from", "inpaint"), **options
) -> TextureResult:
    """Repaint the masked part of `image` following `prompt`; every pixel farther than mask_blur from the
    mask comes back unchanged. The mask comes from `mask` (white = repaint, the image's size; mask_from
    "image"), the image's alpha ("alpha": transparent = repaint), a rectangle ("rect": mask_x, mask_y,
    mask_width, mask_height) or nowhere ("none": outpaint only, with extend_left ... extend_bottom).
    """
    images = {"image": image} | ({"mask": mask} if mask is not None else {})
    return image_task("inpaint", images, objects, prompt=prompt, mask_from=mask_from, **options)


def upscale(image, objects=None, *, scale: int = _default("scale", "upscale"), **options) -> TextureResult:
    """`image` enlarged `scale` times: by the SD x4 upscaler given as upscaler_model, else in tiles with
    img2img on the model (strength 0: Lanczos alone). A texture that tiles still tiles (seamless, or "auto").
    """
    return image_task("upscale", {"image": image}, objects, scale=scale, **options)


def make_seamless(
    image, objects=None, *, prompt: str, seamless: str = _default("seamless", "make_seamless"), **options
) -> TextureResult:
    """`image` made to tile on the `seamless` axes: a band `band_width` pixels wide over each wrap-around seam
    is repainted following `prompt`; the rest comes back unchanged."""
    return image_task("make_seamless", {"image": image}, objects, prompt=prompt, seamless=seamless, **options)


def image_task(
    task: str,
    images: dict,
    objects=None,
    *,
    apply: bool = True,
    shared_material: bool = True,
    slot: str = "NEW",
    projection: str = "UV",
    texture_scale: float = 1.0,
    displacement: str = "BUMP",
    ao_multiply: bool = False,
    pack: bool = False,
    model: str | None = None,
    output_dir: str | None = None,
    timeout: float | None = None,
    **settings,
) -> TextureResult:
    """Run any image task (protocol.TASK_PARAMS names its parameters) and apply its first result.

    images: the task's image inputs by parameter name ("image", "mask"), each a bpy.types.Image (read,
    never changed), a file path, or None (not given). settings: the task's other parameters; those left out
    take the table's defaults. model and output_dir: None uses the preferences'. The other options are
    derive_pbr_maps'.
    """
    # 1. Check inputs (before anything is sent)
    options = apply_options(
        shared_material, slot, projection, texture_scale, displacement=displacement, ao_multiply=ao_multiply, pack=pack
    )
    meshes = mesh_objects(objects) if apply and objects is not None else []
    params = image_task_params(task, settings, model=model, output_dir=output_dir)
    given = {name: image for name, image in images.items() if image is not None}
    check_inputs(task, params, given)
    check_timeout(timeout)  # before the images are sent
    sources = {name: source_image(image, name) for name, image in given.items()}

    # 2. Send the images and run the task (blocks until the files are written)
    references = {name: image_reference(source, name) for name, source in sources.items()}
    result = run(params | references, task=task, timeout=timeout)

    # 3. Load, apply and record
    mask = sources.get("mask")
    return finish(
        result, meshes, options, apply=bool(meshes), source=sources["image"].name, mask=mask.name if mask else ""
    )


def travel_texture(
    objects,
    keyframes: list[dict],
    *,
    frames: int = _default("frames", "travel"),
    loop: bool = False,
    easing: str = _default("easing", "travel"),
    apply: bool = True,
    shared_material: bool = True,
    slot: str = "NEW",
    projection: str = "UV",
    texture_scale: float = 1.0,
    displacement: str = "BUMP",
    ao_multiply: bool = False,
    model: str | None = None,
    output_dir: str | None = None,
    timeout: float | None = None,
    **settings,
) -> TextureResult:
    """An animated texture morphing through `keyframes` and (apply=True) put on the mesh objects as image
    sequences (albedo and PBR maps) that play with the timeline from the scene's first frame, cycling when
    `loop` is on.

    keyframes: two or more {"prompt", "negative_prompt" (optional), "seed" (optional: None picks one)}.
    frames: frames per transition, from one keyframe (included) to the next. Frames already made by a run
    with the same settings are reused. result.images[0] is the albedo sequence, result.files every frame.
    settings: the travel task's other parameters (protocol.TASK_PARAMS["travel"]: steps, guidance_scale,
    width, height, scheduler, seamless, pbr and the map settings, embedding_interpolation, export, fps...);
    the apply options, model, output_dir and timeout are generate_texture's.
    """
    # 1. Check inputs (before anything is sent)
    options = apply_options(shared_material, slot, projection, texture_scale, displacement, ao_multiply)
    meshes = mesh_objects(objects) if apply else []
    values = {"keyframes": keyframes, "frames": frames, "loop": loop, "easing": easing, **settings}
    params = image_task_params("travel", values, model=model, output_dir=output_dir)

    # 2. Generate the frames (blocks until they are written)
    result = run(params, task="travel", timeout=timeout)

    # 3. Load as sequences and apply
    return finish(result, meshes, options, apply=apply)


def train_lora(
    photos: str | list[str],
    instance_prompt: str,
    *,
    token: str = _default("token", "train_lora"),
    model: str | None = None,
    output_dir: str | None = None,
    timeout: float | None = None,
    **settings,
) -> protocol.TrainResult:
    """Train a LoRA (DreamBooth) on photos of a subject or a style and return the TrainResult; `result.lora` is
    the .safetensors file, ready for any generating call's `loras=[{"model": result.lora, "weight": 0.8}]`.

    photos: a folder of photos (JPEG, PNG, WebP) or a list of photo files. instance_prompt must contain the
    token (e.g. "a photo of sks wood"). settings: the train_lora task's other parameters
    (protocol.TASK_PARAMS["train_lora"]): steps, learning_rate, rank, resolution, batch_size,
    train_text_encoder, class_prompt (prior preservation), sample_prompt, sample_every, checkpoint_every,
    resume_from, seed, ... model and output_dir: None uses the preferences'. Blocks until the LoRA is written;
    a cancelled run leaves a checkpoint to pass as resume_from.
    """
    if isinstance(photos, (list, tuple)):
        settings["photo_files"] = [{"path": bpy.path.abspath(str(path))} for path in photos]
    else:
        settings["photos_dir"] = bpy.path.abspath(str(photos))
    values = {"instance_prompt": instance_prompt, "token": token, **settings}
    params = image_task_params("train_lora", values, model=model, output_dir=output_dir)
    return protocol.TrainResult.from_dict(run_job(params, "train_lora", timeout).data)


def list_loras(folder: str, timeout: float | None = None) -> list[dict]:
    """The LoRA files in a folder (and one level down), each {"model", "name", "size", "base" ("sd1" | "sdxl")};
    pass `model` in a generating call's `loras`."""
    params = {"models_dir": bpy.path.abspath(folder), "include_cache": False}
    return run_job(params, "list_models", timeout).data["loras"]


def _document(function, task: str) -> None:
    """Append the task's parameters, from its protocol table, to the docstring of its function."""
    table = protocol.TASK_PARAMS[task]
    filled = {"task", "model", "output_dir", *(p.name for p in table if p.kind is protocol.ImageInput)}
    lines = [
        f"        {p.name} = {p.default!r}: {p.help} Accepts {p.accepted()}." for p in table if p.name not in filled
    ]
    function.__doc__ += (
        "\n    image (and mask): a bpy.types.Image (file, packed, generated or painted and unsaved: read, never\n"
        "    changed) or an image file path. Blocks until the files are written (and applied). Options:\n"
        "        apply, shared_material, slot, projection, texture_scale, displacement, ao_multiply, pack: as\n"
        "        derive_pbr_maps; model, output_dir: None uses the preferences'; timeout: seconds (None/inf wait).\n"
        f"    The {task} task's parameters (protocol.TASK_PARAMS[{task!r}]), as keywords:\n" + "\n".join(lines) + "\n"
    )


for _task, _function in {
    "img2img": img2img,
    "inpaint": inpaint,
    "upscale": upscale,
    "make_seamless": make_seamless,
}.items():
    _document(_function, _task)


@dataclass
class ProjectedTexture:
    """project_texture's outcome, per object in the order given."""

    images: list  # bpy.types.Image: the baked texture of each object
    materials: list  # bpy.types.Material made for each object applied (none for unseen ones, unless apply_unseen)
    uv_maps: list[str]  # the UV map each texture is baked into
    coverage: dict[str, float]  # object name -> fraction of its texels some view saw (the rest was filled)
    warnings: list[str]  # e.g. overlapping UV islands (allow_uv_overlap), objects no view saw (not applied)
    files: list[str]  # every file written: textures, maps, and each view's image, mask, depth and normals
    result: protocol.ProjectResult


def project_texture(
    objects,
    prompt: str,
    *,
    views=("ORBIT",),
    controlnet: str | None = None,
    views_per_ring: int = 8,
    elevations=(20.0, -20.0),
    fov: float = 40.0,
    occlude: bool = True,
    uv_map: str = "ACTIVE",
    apply: bool = True,
    slot: str = "NEW",
    pack: bool = False,
    model: str | None = None,
    output_dir: str | None = None,
    timeout: float | None = None,
    **settings,
) -> ProjectedTexture:
    """Texture the mesh `objects` themselves: views generated one after another with depth guidance (a depth
    ControlNet), projected back and baked into each object's UV texture, then (apply=True) one material per
    object showing it.

    views: "ORBIT" (views_per_ring views on a ring at each of `elevations`, degrees, round the objects'
    bounding sphere, `fov` degrees wide), "CAMERA" (the scene camera), camera objects, or a list of these,
    run in that order. controlnet: a depth ControlNet for the model (hub id, folder or .safetensors).
    occlude: the other visible meshes hide what they cover. uv_map: "ACTIVE" bakes into each object's active
    UV map (an object without one gets a Smart UV Project map), "NEW" always makes a fresh one. The task's
    other parameters (steps, width, height, texture_size, margin, refine_below, controlnet_scale, pbr, ...;
    protocol.TASK_PARAMS["project"]) go as keywords. Problems raise SDTexError (or BackendError) before
    anything is applied; UV maps made for the request are removed again then.
    """
    request = prepare_projection(
        objects, prompt, views=views, controlnet=controlnet, views_per_ring=views_per_ring, elevations=elevations,
        fov=fov, occlude=occlude, uv_map=uv_map, model=model, output_dir=output_dir, **settings,
    )  # fmt: skip
    try:
        job = run_job(request.params, task="project", timeout=timeout)
    except SDTexError as exc:
        raise request.failed(exc) from None
    return finish_projection(job.data, request, apply=apply, slot=slot, pack=pack)


@dataclass
class ProjectionRequest:
    """A project job ready to run: its parameters (arrays uploaded) and what it will be applied to."""

    params: dict
    geometry: geometry.Geometry
    prompt: str

    @property
    def names(self) -> list[str]:
        return [obj.name for obj in self.geometry.objects]

    def named(self, text: str) -> str:
        """The worker numbers the objects; people know their names."""
        names = self.names
        return re.sub(r"object (\d+)", lambda m: names[int(m[1])] if int(m[1]) < len(names) else m[0], text)

    def failed(self, exc: SDTexError) -> SDTexError:
        """The job failed: undo the request's UV maps and name the objects in the message."""
        self.geometry.undo_unwraps()
        if isinstance(exc, BackendError):
            return BackendError(exc.code, self.named(str(exc)), exc.data)
        return SDTexError(self.named(str(exc)))


def prepare_projection(
    objects, prompt: str, *, views, controlnet, views_per_ring, elevations, fov, occlude, uv_map, model, output_dir,
    **settings,
) -> ProjectionRequest:  # fmt: skip
    """Check a project_texture request, collect the geometry and views, and upload them (starts the backend)."""
    # 1. Parameters, checked with stand-ins for the arrays
    if not controlnet:
        raise SDTexError("controlnet: give a depth ControlNet (hub id, e.g. lllyasviel/control_v11f1p_sd15_depth, "
                         "a folder or a .safetensors file)")  # fmt: skip
    table = {p.name: p for p in protocol.TASK_PARAMS["project"]}
    arrays = [name for name, p in table.items() if p.kind is protocol.ArrayInput]
    unknown = sorted(set(settings) - set(table) - {"task", "model", "output_dir", "controlnet", *arrays})
    if unknown:
        raise SDTexError(f"project has no parameter {unknown[0]!r}; it takes {', '.join(sorted(table))}")
    prefs = preferences()
    values = {name: getattr(prefs, name) for name in BACKEND_SETTINGS if name in table} | settings
    values.update(prompt=prompt, controlnet=bpy.path.abspath(controlnet), model=bpy.path.abspath(model or prefs.model))
    values["output_dir"] = output_folder(output_dir)
    stand_in = {"path": "/", "dtype": "float32", "shape": [1]}
    try:
        checked = protocol.ProjectParams.from_dict(values | dict.fromkeys(arrays, stand_in)).to_dict()
    except protocol.ProtocolError as exc:
        raise SDTexError(exc.message) from None
    params = {name: value for name, value in checked.items() if name not in arrays}

    # 2. Geometry (objects without UVs are unwrapped) and views
    scene = bpy.context.scene
    others = [o for o in scene.objects if o.type == "MESH" and o.visible_get()] if occlude else []
    try:
        found = geometry.collect(objects, occluders=others, uv_map=uv_map)
    except geometry.GeometryError as exc:
        raise SDTexError(str(exc)) from None
    request = ProjectionRequest(params, found, prompt)
    items = [views] if isinstance(views, str) or not isinstance(views, (list, tuple)) else list(views)
    try:
        cameras = geometry.views_for(
            items, scene, found, params["width"], params["height"], per_ring=views_per_ring, elevations=elevations,
            fov=fov, context=bpy.context,
        )  # fmt: skip

        # 3. Upload the arrays (the worker starts if needed)
        client = get_client()
        for name, (data, dtype, shape) in (found.arrays() | {"cameras": geometry.cameras_bytes(cameras)}).items():
            params[name] = {"sha256": client.upload(data), "dtype": dtype, "shape": shape}
    except (geometry.GeometryError, SDTexError) as exc:
        raise request.failed(SDTexError(str(exc)) if isinstance(exc, geometry.GeometryError) else exc) from None
    return request


def finish_projection(
    data: dict, request: ProjectionRequest, *, apply: bool = True, slot: str = "NEW", pack: bool = False
) -> ProjectedTexture:
    """Load a finished project job's textures and give each object its material on the UV map baked into."""
    options = apply_options(shared_material=False, slot=slot, pack=pack)
    result = protocol.ProjectResult.from_dict(data)
    found = request.geometry
    textures = [materials.load_image(record.path, "albedo", pack) for record in result.images]
    made = []
    if apply:
        for index, (obj, uv_name, record) in enumerate(zip(found.objects, found.uv_maps, result.images, strict=True)):
            if index in result.unseen and not request.params.get("apply_unseen"):
                continue  # no view saw it: its texture is a flat fill, and its own material beats that
            maps = {"albedo": record.path, **record.maps}
            try:
                made += materials.apply_images([obj], maps, options, f"{material_name(request.prompt)}.{obj.name}")
            except (ValueError, ReferenceError) as exc:  # ReferenceError: the object was deleted meanwhile
                raise SDTexError(str(exc)) from None
            for node in made[-1].node_tree.nodes:
                if node.type in ("UVMAP", "NORMAL_MAP"):
                    node.uv_map = uv_name  # the map the texture was baked into, which need not be the active one
    views_files = [v[role] for v in result.views for role in ("image", "mask", "depth", "normal") if v[role]]
    return ProjectedTexture(
        images=textures,
        materials=made,
        uv_maps=list(found.uv_maps),
        coverage=dict(zip(request.names, result.coverage, strict=True)),
        warnings=[request.named(w) for w in result.warnings],
        files=written_files(result) + views_files,
        result=result,
    )


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


def configure_remote(address: str | None, token: str = "", *, tls: bool = False, cafile: str = "") -> None:
    """Use the backend served by `python -m backend serve --listen HOST:PORT` on another machine from now on
    (None: back to the preferences). Every call works as with the local worker: inputs are uploaded, result
    files are fetched into the output folder. cafile: the server's certificate when it is self-signed (tls).
    Without code: $SDTEX_REMOTE=HOST:PORT, $SDTEX_REMOTE_TOKEN, $SDTEX_REMOTE_TLS=1, $SDTEX_REMOTE_CAFILE, or
    the preferences' Backend: Remote."""
    global _remote
    _remote = RemoteSettings(address, token, tls, cafile) if address else None


def remote_settings() -> RemoteSettings | None:
    """The remote backend to use: configure_remote(), else the environment, else the preferences; or None."""
    if _remote is not None:
        return _remote
    if (from_env := RemoteSettings.from_env()) is not None:
        return from_env
    prefs = preferences()
    if getattr(prefs, "backend_mode", "LOCAL") != "REMOTE":
        return None
    cafile = bpy.path.abspath(prefs.remote_cafile) if prefs.remote_cafile else ""
    return RemoteSettings(prefs.remote_address, prefs.remote_token, prefs.remote_tls, cafile)


def get_client() -> BackendClient:
    """The client for the configured backend: remote (remote_settings) or the local interpreter's worker; a new
    one when the setting changed."""
    global _client
    if (remote := remote_settings()) is not None:
        if _client is None or _client.remote != remote:
            shutdown_backend()
            _client = BackendClient.connect_remote(remote)
        return _client
    data = user_data_dir()
    python = paths.find_backend_python(bpy.path.abspath(preferences().backend_python), data)
    command = paths.worker_command(python)
    if _client is None or _client.remote is not None or _client.command != command:
        # Jobs keep the client that took them, so they finish (or fail) on the old worker by themselves.
        shutdown_backend()
        _client = BackendClient(command, log_path=data / "backend.log")
    return _client


def current_client() -> BackendClient | None:
    return _client


def mesh_objects(objects) -> list:
    meshes = [obj for obj in objects or () if getattr(obj, "type", None) == "MESH"]
    if not meshes:
        raise SDTexError("Select one or more mesh objects (or generate without applying)")
    return meshes


def apply_options(
    shared_material: bool = True,
    slot: str = "NEW",
    projection: str = "UV",
    texture_scale: float = 1.0,
    displacement: str = "BUMP",
    ao_multiply: bool = False,
    pack: bool = False,
) -> materials.ApplyOptions:
    """How materials are built and assigned. slot: "NEW" or "REPLACE"; projection: "UV" or "BOX";
    displacement: "BUMP" or "DISPLACEMENT" (true displacement, Cycles); ao_multiply: darken the base colour
    with the AO map; pack: store the written images in the .blend."""
    try:
        return materials.ApplyOptions(
            shared_material=shared_material,
            slot=slot,
            projection=projection,
            texture_scale=texture_scale,
            displacement=displacement,
            ao_multiply=ao_multiply,
            pack=pack,
        )
    except ValueError as exc:
        raise SDTexError(str(exc)) from None


def generate_params(settings: dict, model: str | None = None, output_dir: str | None = None) -> dict:
    """Validated generate parameters: `settings` plus the preferences' model, device and memory options."""
    prefs = preferences()
    params = {name: getattr(prefs, name) for name in BACKEND_SETTINGS} | settings
    params["model"] = bpy.path.abspath(model or prefs.model)
    params["output_dir"] = output_folder(output_dir)
    try:
        return protocol.GenerateParams.from_dict(params).to_dict()
    except protocol.ProtocolError as exc:
        raise SDTexError(exc.message) from None


def pbr_params(settings: dict, output_dir: str | None = None) -> dict:
    """Checked pbr task parameters, all but the image (sent once the rest is known to be good)."""
    params = settings | {"output_dir": output_folder(output_dir)}
    try:
        return {name: protocol.param(name).check(value) for name, value in params.items()}
    except protocol.ProtocolError as exc:
        raise SDTexError(exc.message) from None


def image_task_params(task: str, settings: dict, model: str | None = None, output_dir: str | None = None) -> dict:
    """Checked parameters of an image task, all but its images (sent once the rest is known to be good):
    `settings` plus the preferences' model, device and memory options; defaults for everything left out."""
    table = protocol.TASK_PARAMS[task]
    inputs = {p.name for p in table if p.kind is protocol.ImageInput}
    known = {p.name for p in table} - inputs - {"task"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SDTexError(f"{task} has no parameter {unknown[0]!r}; it takes {', '.join(sorted(known))}")
    prefs = preferences()
    params = {name: getattr(prefs, name) for name in BACKEND_SETTINGS if name in known} | settings
    params["model"] = bpy.path.abspath(model or prefs.model)
    params["output_dir"] = output_folder(output_dir)
    # The images are checked by the worker once sent: stand-ins let the table check everything else now.
    stand_ins = {p.name: {"path": "/"} for p in table if p.kind is protocol.ImageInput and p.required}
    try:
        checked = protocol.PARAMS_CLASSES[task].from_dict(params | stand_ins).to_dict()
    except protocol.ProtocolError as exc:
        raise SDTexError(exc.message) from None
    return {name: value for name, value in checked.items() if name not in inputs}


def check_inputs(task: str, params: dict, images: dict) -> None:
    """`images` (input name -> image) are the task's, its required ones among them, and a mask is given when
    the mask is to come from one (checked before the worker starts; the worker checks the pixels)."""
    inputs = [p for p in protocol.TASK_PARAMS[task] if p.kind is protocol.ImageInput]
    for name in images:
        if name not in {p.name for p in inputs}:
            raise SDTexError(f"{task} takes no image {name!r}; its images: {', '.join(p.name for p in inputs)}")
    for p in inputs:
        if p.required and images.get(p.name) is None:
            raise SDTexError(f"{p.name} is required: {p.help}")
    if params.get("mask_from") == "image" and images.get("mask") is None:
        raise SDTexError(
            "mask: mask_from is image but no mask image was given (white = repaint); give one, or set mask_from "
            "to alpha, rect or none"
        )


def output_folder(output_dir: str | None) -> str:
    """The absolute folder files go to: `output_dir`, or the preferences' output folder when None."""
    if output_dir:
        return os.path.abspath(bpy.path.abspath(output_dir))
    return str(paths.resolve_output_dir(preferences().output_folder, bpy.data.filepath, user_data_dir()))


def source_image(image, name: str = "image") -> bpy.types.Image:
    """The Image a task reads as its input `name`: `image` itself, or the image file at that path (loaded, or
    the datablock already showing it)."""
    if isinstance(image, bpy.types.Image):
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise SDTexError(f"{name} must be a bpy.types.Image or an image file path, got {type(image).__name__}")
    path = os.path.abspath(bpy.path.abspath(os.fspath(image)))
    if not os.path.isfile(path):
        raise SDTexError(f"{name} must be a bpy.types.Image or an image file path; no such file: {path}")
    try:
        return bpy.data.images.load(path, check_existing=True)
    except RuntimeError as exc:  # Blender cannot read it
        raise SDTexError(f"{name}: Blender cannot read {path} ({exc})") from None


def image_reference(image: bpy.types.Image, name: str = "image") -> dict:
    """`image` as a job input: its file's path, or its bytes uploaded to the worker (blocks while it starts)."""
    try:
        return images.image_reference(image, get_client())
    except ValueError as exc:
        raise SDTexError(str(exc) if name == "image" else f"{name}: {exc}") from None


def load_model_params() -> dict:
    prefs = preferences()
    params = {name: getattr(prefs, name) for name in LOAD_MODEL_SETTINGS}
    params["model"] = bpy.path.abspath(params["model"])
    return params


def run(params: dict, task: str = "txt2img", timeout: float | None = None) -> protocol.GenerateResult:
    """Run a job and wait for it (background mode and scripts)."""
    return run_job(params, task, timeout).result


def run_job(params: dict, task: str, timeout: float | None = None) -> Job:
    """Run a job, wait for it and return it done (its `data` is the task's whole result); raise otherwise."""
    timeout = check_timeout(timeout)  # before the job is sent
    job = Job.submit(get_client(), task, params)
    job.handle(job.client.wait(job.request_id, on_event=job.handle, timeout=timeout))
    if job.state != DONE:
        raise BackendError(job.error_code, job.error) if job.error_code else SDTexError(job.error)
    return job


def finish(
    result: protocol.GenerateResult,
    meshes: list,
    options: materials.ApplyOptions,
    apply: bool,
    source: str = "",
    mask: str = "",
) -> TextureResult:
    """Load the written images, record the job, and apply its first image (with its maps) to the meshes.

    source: the name of the image a pbr job derived its maps from (the material's albedo), or an image task
    started from (its results are new images: the source is never changed). mask: an inpaint job's mask.
    A travel job's frames become image sequences instead (blender/travel.py).
    """
    if result.task == "travel":
        from .blender import travel  # its panel imports the operators, which import this module

        return travel.finish(result, meshes, options, apply)
    files = written_files(result)
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise SDTexError(f"The backend reported images that are not on disk: {', '.join(missing)}")
    if result.task == "pbr":  # the source is gone when deleted while a UI job ran: applying says so
        albedos = [image] if (image := bpy.data.images.get(source)) else []
    else:
        albedos = [bpy.data.images.load(i.path, check_existing=True) for i in result.images]
    maps = [{kind: materials.load_image(path, kind) for kind, path in i.maps.items()} for i in result.images]
    # Recorded before applying: if applying fails, the files are still found in the history.
    record = HistoryRecord.from_result(result, source=source, mask=mask)
    add_history(bpy.context.scene, record)
    relocate.remember(files)
    made = apply_record(record, meshes, options) if apply else []
    return TextureResult(images=albedos, maps=maps, materials=made, files=files, seed=result.seed, result=result)


def written_files(result: protocol.GenerateResult) -> list[str]:
    """Every file a job wrote: albedos (not the pbr task's source) and maps."""
    albedos = result.task != "pbr"
    return [path for i in result.images for path in ([i.path] if albedos else []) + list(i.maps.values())]


def apply_record(record: HistoryRecord, meshes: list, options: materials.ApplyOptions) -> list:
    """Put a record's first image, with its maps, on the meshes (Apply again). The albedo of a pbr record is
    its source image, found by name (or by its file, when it came from one)."""
    image = record.images()[0]
    albedo, name = image.path, record.title
    if record.task == "pbr":
        source = bpy.data.images.get(record.source)
        if source is None and not os.path.isfile(image.path):
            raise SDTexError(f"The image {record.source!r} these maps were made from is no longer in this file")
        albedo, name = source or image.path, record.source
    options = dataclasses.replace(options, normal_directx=record.normal_format == "directx")
    try:
        return materials.apply_images(meshes, {"albedo": albedo, **image.maps}, options, material_name(name))
    except ValueError as exc:
        raise SDTexError(str(exc)) from None


def material_name(text: str) -> str:
    words = " ".join(text.split())
    return "SD " + (words[:40].rstrip() + "…" if len(words) > 40 else words)


# History lives outside undo: every record is kept here too (scene name -> records, oldest first), and after an
# undo or redo the scene's list is rebuilt from it, so Ctrl+Z removes a material but never its history entry.
_history: dict[str, list[HistoryRecord]] = {}
HISTORY_FILE = "sdtex-history.jsonl"  # beside the images: one JSON record per line, even if Blender crashes


def add_history(scene, record: HistoryRecord) -> None:
    """Newest first; the oldest entries beyond HISTORY_LIMIT are dropped (their files stay on disk)."""
    if scene.name not in _history:  # first record since the file was loaded: the scene's list is the truth
        _history[scene.name] = [HistoryRecord.from_fields(e) for e in reversed(scene.sdtex.history)]
    kept = _history[scene.name]
    kept.append(record)
    del kept[:-HISTORY_LIMIT]
    _append_history_file(record)
    _mirror_history(scene, kept)
    scene.sdtex.history_index = 0


def restore_history() -> None:
    """Put back the records an undo took out of the scenes' lists (undo_post/redo_post handler)."""
    for scene in bpy.data.scenes:
        kept = _history.get(scene.name)
        if kept is not None and [e.created + e.files for e in scene.sdtex.history] != [
            r.created + r.to_fields()["files"] for r in reversed(kept)
        ]:
            _mirror_history(scene, kept)


def forget_history() -> None:
    """A file was loaded: its scenes' lists are the truth again (load_post handler)."""
    _history.clear()


def _mirror_history(scene, records: list[HistoryRecord]) -> None:
    entries = scene.sdtex.history
    entries.clear()
    for record in reversed(records):
        item = entries.add()
        for name, value in record.to_fields().items():
            setattr(item, name, value)


def _append_history_file(record: HistoryRecord) -> None:
    paths_ = [i.path or next(iter(i.maps.values()), "") for i in record.images()]
    folder = os.path.dirname(paths_[0]) if paths_ and paths_[0] else ""
    if not folder:
        return
    try:
        with open(os.path.join(folder, HISTORY_FILE), "a", encoding="utf-8") as log:
            log.write(record.to_json() + "\n")
    except OSError as exc:  # the images are written and recorded in the scene: a missing log loses nothing
        print(f"SD Textures: could not append to {HISTORY_FILE} in {folder}: {exc}")
