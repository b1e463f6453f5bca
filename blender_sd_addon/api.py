"""Headless Python API: generate a texture and put it on objects, from any script.

    import bpy
    from blender_sd_addon.api import generate_texture
    result = generate_texture([bpy.data.objects["Cube"]], "rusty metal plate", seamless="xy", steps=20)
    print(result.files, result.materials)
    maps = derive_pbr_maps(bpy.data.images["bricks.png"], [bpy.data.objects["Wall"]], seamless="xy")
    draft, final = generate_with_draft([bpy.data.objects["Cube"]], "rusty metal plate", draft="lcm",
                                       draft_lora="latent-consistency/lcm-lora-sdv1-5", steps=25)
    variation = img2img(bpy.data.images["bricks.png"], "mossy bricks", [bpy.data.objects["Wall"]], strength=0.5)
    patched = inpaint("/textures/wall.png", "moss", mask=bpy.data.images["Wall Mask"], steps=20)
    bigger = upscale(variation.images[0], scale=2, seamless="auto")
    lava = travel_texture([bpy.data.objects["Floor"]], [{"prompt": "lava", "seed": 1}, {"prompt": "basalt", "seed": 2}],
                          frames=24, loop=True, seamless="xy")
    statue = project_texture([bpy.data.objects["Statue"]], "bronze statue",
                             controlnet="lllyasviel/control_v11f1p_sd15_depth", views_per_ring=8)
    exported = export_for_engines(bpy.context.selected_objects, "/exports/crate", engine="unreal", size=2048)
    anything = run_task("img2img", {"image": "/textures/wall.png", "prompt": "ivy"}, [bpy.data.objects["Wall"]],
                        material=ApplyOptions(slot="REPLACE", projection="BOX"))

How a result goes on the objects is one ApplyOptions (material=...), or its fields as keywords (shared_material,
slot, projection, texture_scale, displacement, ao_multiply, pack), in every call. run_task runs any task of
protocol.SPECS (a new task needs no code here); the named functions are run_task with their task's inputs.

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

This module holds the public functions only; the work is done on the Blender side (blender/tasks.py, results.py,
session.py, projecting.py), which the operators use too, so the panels, `bpy.ops.sdtex.generate()`,
`bpy.ops.sdtex.derive_pbr_maps()`, `bpy.ops.sdtex.image_task()` and this API behave alike.
"""

from __future__ import annotations

import bpy

from .blender import draft_jobs, export, projecting, session, tasks
from .blender.materials import ApplyOptions
from .blender.projecting import ProjectedTexture
from .blender.results import TextureResult, finish
from .blender.ui_jobs import JobRequest
from .client import BackendError, SDTexError
from .contract import protocol
from .engine_export import ExportResult

__all__ = [
    "ApplyOptions",
    "BackendError",
    "ExportResult",
    "ProjectedTexture",
    "SDTexError",
    "TextureResult",
    "configure_remote",
    "derive_pbr_maps",
    "export_for_engines",
    "generate_texture",
    "generate_with_draft",
    "image_task",
    "img2img",
    "inpaint",
    "list_loras",
    "load_model",
    "make_seamless",
    "project_texture",
    "run_task",
    "shutdown_backend",
    "train_lora",
    "travel_texture",
    "upscale",
]

configure_remote = session.configure_remote
shutdown_backend = session.shutdown_backend


def run_task(
    task: str,
    params: dict | None = None,
    objects=None,
    *,
    apply: bool = True,
    material: ApplyOptions | None = None,
    model: str | None = None,
    output_dir: str | None = None,
    timeout: float | None = None,
    **settings,
):
    """Run any task of protocol.SPECS and wait for it: a TextureResult for tasks that make images (the first one
    applied to the mesh objects among `objects`), project_texture's ProjectedTexture for "project", else the
    task's result class (TrainResult, DownloadResult, ModelList).

    params and settings: the task's parameters (protocol.TASK_PARAMS[task]; those left out take the table's
    defaults), image inputs ("image", "mask") as a bpy.types.Image (read, never changed) or a file path.
    material: how materials are built (ApplyOptions; or its fields as keywords: shared_material, slot,
    projection, texture_scale, displacement, ao_multiply, pack). model and output_dir: None uses the
    preferences'. timeout: seconds before the request is cancelled and SDTexError raised (None or inf waits).
    """
    # 1. Check inputs (before anything is sent)
    values = {**(params or {}), **settings}
    options = tasks.apply_options(material, **tasks.take_apply_keywords(values))
    if task == "project":
        return project_texture(objects, apply=apply, material=options, model=model, output_dir=output_dir,
                               timeout=timeout, **values)  # fmt: skip
    spec = protocol.SPECS.get(task)
    makes_images = spec is not None and spec.result is protocol.GenerateResult
    inputs = [p.name for p in tasks.image_inputs(task)] if spec else []
    needs_objects = makes_images and apply and (objects is not None or not inputs)
    meshes = tasks.mesh_objects(objects) if needs_objects else []
    given = {name: values.pop(name) for name in inputs if name in values}
    checked = _checked(task, values, model, output_dir)

    # 2. Send the images and run the task (blocks until the files are written)
    sources, checked = tasks.send_images(task, checked, given, timeout)
    job = tasks.run_job(checked, task, timeout)
    if not makes_images:
        return spec.result.from_dict(job.data)

    # 3. Load, apply and record
    source, mask = sources.get("image"), sources.get("mask")
    names = {"source": source.name if source else "", "mask": mask.name if mask else ""}
    return finish(job.result, meshes, options, apply=bool(meshes), **names)


def _checked(task: str, values: dict, model: str | None, output_dir: str | None) -> dict:
    """The task's checked parameters (tasks.task_params), "//" LoRA paths made blend-relative first."""
    if "loras" in values:
        values["loras"] = [{**lora, "model": bpy.path.abspath(lora.get("model", ""))} for lora in values["loras"]]
    return tasks.task_params(task, values, model=model, output_dir=output_dir)


def generate_with_draft(
    objects, prompt: str, *, draft: str = "steps", draft_lora: str | None = None, apply: bool = True,
    material: ApplyOptions | None = None, model: str | None = None, output_dir: str | None = None,
    timeout: float | None = None, **settings,
) -> tuple[TextureResult, TextureResult]:  # fmt: skip
    """A few-step draft, then the full generation with the same seed and settings: returns (draft, final).

    The draft is loaded (draft.images) but never applied nor recorded in the history; the final is
    generate_texture's result. draft: a preset of sdtex_contract.drafts.DRAFT_PRESETS ("steps": 8 steps of any
    model; "lcm", "tcd", "hyper": 4, 4 and 8 steps with that LoRA, given as draft_lora (file, folder or hub id);
    "turbo": 1 step of a Turbo model). An unset seed is picked once, here, for both. timeout: for each of the two.
    The other options are generate_texture's.
    """
    values = {"prompt": prompt, **settings}
    options = tasks.apply_options(material, **tasks.take_apply_keywords(values))
    meshes = tasks.mesh_objects(objects) if apply else []
    values["seed"] = draft_jobs.pick_seed(values.get("seed"))
    final = JobRequest("txt2img", _checked("txt2img", values, model, output_dir), meshes, options, apply)
    return draft_jobs.run_now(draft_jobs.draft_request(final, draft, draft_lora), final, timeout)


def generate_texture(objects, prompt: str, **options) -> TextureResult:
    """Generate images from `prompt` and (apply=True) put them on the mesh objects as a material.

    model: hub id, diffusers folder or .safetensors file; None uses the add-on preferences.
    loras: LoRAs to apply, each {"model": .safetensors file, folder or hub id, "weight": 1.0} (train_lora makes them).
    seed: None picks one (reported in the result). output_dir: None uses the preferences' output folder.
    """
    return run_task("txt2img", {"prompt": prompt}, objects, **options)


def derive_pbr_maps(image, objects=None, **options) -> TextureResult:
    """Derive height, normal, roughness and AO maps of `image` and, when objects are given and apply=True,
    put the image (as albedo) with its maps on the mesh objects among them.

    image: a bpy.types.Image (file, packed, generated or painted and unsaved: it is read, never changed) or
    the path of an image file. seamless: the axes on which the image tiles ("none", "x", "y", "xy"); the
    maps then tile too. The maps are new images (result.maps[0]).
    normal_method, height_method, roughness_method: "classical" (filters) or "model" (a Marigold estimate);
    metallic_method "model" adds a metallic map; delight=True adds a delit albedo (maps["albedo"]), the material's
    base colour. The estimator models default to the preferences' (normals_model, depth_model, intrinsics_model).
    """
    return run_task("pbr", {"image": image}, objects, **options)


def img2img(image, prompt: str, objects=None, **options) -> TextureResult:
    """Variations of `image`: it is noised as much as `strength` says (0: unchanged, 1: from noise), then
    repainted following `prompt`. The results are new images; with objects (and apply=True) the first one
    goes on the mesh objects among them as a material.
    """
    return run_task("img2img", {"image": image, "prompt": prompt}, objects, **options)


def inpaint(image, prompt: str, mask=None, objects=None, **options) -> TextureResult:
    """Repaint the masked part of `image` following `prompt`; every pixel farther than mask_blur from the
    mask comes back unchanged. The mask comes from `mask` (white = repaint, the image's size; mask_from
    "image"), the image's alpha ("alpha": transparent = repaint), a rectangle ("rect": mask_x, mask_y,
    mask_width, mask_height) or nowhere ("none": outpaint only, with extend_left ... extend_bottom).
    """
    return run_task("inpaint", {"image": image, "mask": mask, "prompt": prompt}, objects, **options)


def upscale(image, objects=None, **options) -> TextureResult:
    """`image` enlarged `scale` times: by the SD x4 upscaler given as upscaler_model, else in tiles with
    img2img on the model (strength 0: Lanczos alone). A texture that tiles still tiles (seamless, or "auto").
    """
    return run_task("upscale", {"image": image}, objects, **options)


def make_seamless(image, objects=None, *, prompt: str, **options) -> TextureResult:
    """`image` made to tile on the `seamless` axes: a band `band_width` pixels wide over each wrap-around seam
    is repainted following `prompt`; the rest comes back unchanged."""
    return run_task("make_seamless", {"image": image, "prompt": prompt}, objects, **options)


def image_task(task: str, images: dict, objects=None, **options) -> TextureResult:
    """Run any image task with its image inputs by parameter name ("image", "mask"): run_task's."""
    return run_task(task, images, objects, **options)


def travel_texture(objects, keyframes: list[dict], **options) -> TextureResult:
    """An animated texture morphing through `keyframes` and (apply=True) put on the mesh objects as image
    sequences (albedo and PBR maps) that play with the timeline from the scene's first frame, cycling when
    `loop` is on.

    keyframes: two or more {"prompt", "negative_prompt" (optional), "seed" (optional: None picks one)}.
    frames: frames per transition, from one keyframe (included) to the next. Frames already made by a run
    with the same settings are reused. result.images[0] is the albedo sequence, result.files every frame.
    """
    return run_task("travel", {"keyframes": keyframes}, objects, **options)


def train_lora(photos: str | list[str], instance_prompt: str, **options) -> protocol.TrainResult:
    """Train a LoRA (DreamBooth) on photos of a subject or a style and return the TrainResult; `result.lora` is
    the .safetensors file, ready for any generating call's `loras=[{"model": result.lora, "weight": 0.8}]`.

    photos: a folder of photos (JPEG, PNG, WebP) or a list of photo files. instance_prompt must contain the
    token (e.g. "a photo of sks wood"). Blocks until the LoRA is written; a cancelled run leaves a checkpoint
    to pass as resume_from.
    """
    if isinstance(photos, (list, tuple)):
        given = {"photo_files": [{"path": bpy.path.abspath(str(path))} for path in photos]}
    else:
        given = {"photos_dir": bpy.path.abspath(str(photos))}
    return run_task("train_lora", given | {"instance_prompt": instance_prompt}, **options)


def list_loras(folder: str, timeout: float | None = None) -> list[dict]:
    """The LoRA files in a folder (and one level down), each {"model", "name", "size", "base" ("sd1" | "sdxl")};
    pass `model` in a generating call's `loras`."""
    params = {"models_dir": bpy.path.abspath(folder), "include_cache": False}
    return tasks.run_job(params, "list_models", timeout).data["loras"]


def project_texture(
    objects, prompt: str, *, views=("ORBIT",), controlnet: str | None = None, views_per_ring: int = 8,
    elevations=(20.0, -20.0), fov: float = 40.0, occlude: bool = True, uv_map: str = "ACTIVE", apply: bool = True,
    material: ApplyOptions | None = None, model: str | None = None, output_dir: str | None = None,
    timeout: float | None = None, **settings,
) -> ProjectedTexture:  # fmt: skip
    """Texture the mesh `objects` themselves: views generated with depth guidance (a depth ControlNet),
    projected back and baked into each object's UV texture, then (apply=True) one material per object showing
    it. mode="sequential" (the default) paints the views one after another, each inpainting what is left;
    mode="synchronized" denoises all views together through one shared latent texture for the first
    `sync_until` (0.8) of the steps, so the views agree where they overlap (no seams from view to view).

    views: "ORBIT" (views_per_ring views on a ring at each of `elevations`, degrees, round the objects'
    bounding sphere, `fov` degrees wide), "COVERAGE" (up to 16 views of the same framing chosen from 128 spread
    over a sphere, each the one that newly sees the most surface, squarely, until 99 % of what any of them sees is
    seen; ProjectedTexture.views_note says how many and how much), "CAMERA" (the scene camera), camera objects, or
    a list of these, run in that order. controlnet: a depth ControlNet for the model (hub id, folder or .safetensors).
    occlude: the other visible meshes hide what they cover. uv_map: "ACTIVE" bakes into each object's active
    UV map (an object without one gets a Smart UV Project map), "NEW" always makes a fresh one. material: its
    slot and pack are used (or the keywords slot, pack); each object gets its own material. Problems raise
    SDTexError (or BackendError) before anything is applied; UV maps made for the request are removed again then.
    """
    options = tasks.apply_options(material, **tasks.take_apply_keywords(settings))
    request = projecting.prepare_projection(
        objects, prompt, views=views, controlnet=controlnet, views_per_ring=views_per_ring, elevations=elevations,
        fov=fov, occlude=occlude, uv_map=uv_map, model=model, output_dir=output_dir, **settings,
    )  # fmt: skip
    return projecting.run_projection(request, timeout=timeout, apply=apply, slot=options.slot, pack=options.pack)


def load_model(model: str | None = None, timeout: float | None = None) -> dict:
    """Start the backend and load `model` (None: the preferences' model) so the next request starts warm.

    Returns {"model", "load_seconds", "warmup_seconds", "device", "dtype"}. A model that is not there raises
    BackendError with code "model_not_found" and a message that says how to get it.
    """
    params = session.load_model_params()
    if model:
        params["model"] = bpy.path.abspath(model)
    return session.get_client().request(protocol.LOAD_MODEL, params, timeout=timeout)


def export_for_engines(
    objects, folder: str, *, engine: str = "gltf", size: int = 0, glb: bool = True, name: str = "scene"
) -> ExportResult:
    """Export the generated materials on the mesh `objects` for a game engine: one texture set per material (not per
    object) in `folder`, `<material>_BaseColor.png` (sRGB), `_Normal.png`, `_ORM.png` (R ambient occlusion, 1 without
    an AO map; G roughness; B metallic, the BSDF's values without maps) and `_Height.png` (16-bit, when there is a
    height map), and (glb=True) `<folder>/<name>.glb` of the objects with those maps.

    engine: "gltf", "unity", "godot" (OpenGL normal maps, green up) or "unreal" (DirectX, green down); the GLB's
    normal map is OpenGL whatever the engine, as glTF says. size: 0 keeps each map's size, else 512, 1024, 2048 or
    4096 for the longest side. The user's materials, images and files are left as they were. Returns an
    ExportResult (glb, texture_sets[i].files by kind, objects; message() says what was written). Problems raise
    SDTexError naming the parameter before anything is written.
    """
    return export.export_for_engines(objects, folder, engine=engine, size=size, glb=glb, name=name)


def _document(function, task: str) -> None:
    """Append the task's parameters, from its protocol table, to the docstring of its function."""
    table = protocol.TASK_PARAMS[task]
    filled = {"task", "output_dir", *(p.name for p in table if p.kind is protocol.ImageInput)}
    lines = [
        f"        {p.name} = {p.default!r}: {p.help} Accepts {p.accepted()}." for p in table if p.name not in filled
    ]
    function.__doc__ += (
        "\n    Blocks until the files are written (and applied). Options, as keywords:\n"
        "        apply (True): put the result on the objects; material: ApplyOptions (or its fields as keywords:\n"
        "        shared_material, slot, projection, texture_scale, displacement, ao_multiply, pack); model,\n"
        "        output_dir: None uses the preferences'; timeout: seconds (None/inf wait).\n"
        f"    The {task} task's parameters (protocol.TASK_PARAMS[{task!r}]):\n" + "\n".join(lines) + "\n"
    )


for _task, _function in {
    "txt2img": generate_texture,
    "pbr": derive_pbr_maps,
    "img2img": img2img,
    "inpaint": inpaint,
    "upscale": upscale,
    "make_seamless": make_seamless,
    "travel": travel_texture,
    "train_lora": train_lora,
}.items():
    _document(_function, _task)
