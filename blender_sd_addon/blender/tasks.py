"""A task request from Blender: its parameters (checked against the task's table, filled from the preferences),
its image inputs (Blender images or files, sent to the worker), and running it to the end (scripts, background).

Any task of protocol.SPECS goes through the same functions: a new task needs no code here.
"""

from __future__ import annotations

import dataclasses
import os

import bpy

from .. import readiness
from ..client import BackendError, SDTexError
from ..contract import model_catalog, protocol
from ..history import ESTIMATOR_MODELS
from ..jobs import DONE, Job
from ..rpc import check_timeout
from . import images, session
from .materials import ApplyOptions

# The ApplyOptions fields a caller may give as loose keywords (normal_directx follows the job's normal_format).
APPLY_KEYWORDS = tuple(f.name for f in dataclasses.fields(ApplyOptions) if f.name != "normal_directx")
INPUT_KINDS = (protocol.ImageInput, protocol.ArrayInput)  # sent separately, once the rest is known to be good
STAND_INS = {protocol.ImageInput: {"path": "/"}, protocol.ArrayInput: {"path": "/", "dtype": "float32", "shape": [1]}}
PATH_SETTINGS = (*ESTIMATOR_MODELS, "preview_decoder")  # preferences naming a model by hub id or folder


def mesh_objects(objects) -> list:
    meshes = [obj for obj in objects or () if getattr(obj, "type", None) == "MESH"]
    if not meshes:
        raise SDTexError("Select one or more mesh objects (or generate without applying)")
    return meshes


def apply_options(material: ApplyOptions | None = None, **keywords) -> ApplyOptions:
    """How materials are built and assigned: `material` as given, or one made from the loose keywords
    (shared_material, slot "NEW" | "REPLACE", projection "UV" | "BOX", texture_scale, displacement "BUMP" |
    "DISPLACEMENT", ao_multiply, pack)."""
    if material is not None:
        if keywords:
            raise SDTexError(f"material: give ApplyOptions or the keywords {', '.join(sorted(keywords))}, not both")
        if not isinstance(material, ApplyOptions):
            raise SDTexError(f"material must be an ApplyOptions, got {type(material).__name__}")
        return material
    try:
        return ApplyOptions(**keywords)
    except ValueError as exc:
        raise SDTexError(str(exc)) from None


def take_apply_keywords(settings: dict) -> dict:
    """Remove the apply keywords from `settings` (a task's keyword arguments) and return them."""
    return {name: settings.pop(name) for name in APPLY_KEYWORDS if name in settings}


def task_params(task: str, settings: dict, model: str | None = None, output_dir: str | None = None) -> dict:
    """Checked parameters of `task`, all but its image and array inputs (sent once the rest is known to be
    good): `settings` plus the preferences' model, device and memory options; defaults for everything left out."""
    if task not in protocol.SPECS:
        raise SDTexError(f"task must be one of {', '.join(protocol.SPECS)}; got {task!r}")
    table = protocol.TASK_PARAMS[task]
    inputs = {p.name for p in table if p.kind in INPUT_KINDS}
    known = {p.name for p in table} - inputs - {"task"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise SDTexError(f"{task} has no parameter {unknown[0]!r}; it takes {', '.join(sorted(known))}")
    prefs = session.preferences()
    # The estimator models and the preview decoder live in the preferences, like the generator's: sent with every
    # task that makes maps or previews.
    names = (*session.BACKEND_SETTINGS, *PATH_SETTINGS)
    params = {name: estimator_path(getattr(prefs, name)) if name in PATH_SETTINGS else getattr(prefs, name)
              for name in names if name in known} | settings  # fmt: skip
    if "model" in known:
        params["model"] = bpy.path.abspath(model or settings.get("model") or prefs.model)
    if "output_dir" in known:
        params["output_dir"] = session.output_folder(output_dir)
    # The inputs are checked by the worker once sent: stand-ins let the table check everything else now.
    stand_ins = {p.name: STAND_INS[p.kind] for p in table if p.kind in INPUT_KINDS and p.required}
    try:
        checked = protocol.PARAMS_CLASSES[task].from_dict(params | stand_ins).to_dict()
    except protocol.ProtocolError as exc:
        raise SDTexError(exc.message) from None
    return {name: value for name, value in checked.items() if name not in inputs}


def estimator_path(model: str) -> str:
    """An estimator model (or preview decoder) setting as sent: a hub id as it is, a folder made absolute (// =
    beside the .blend)."""
    model = model.strip()
    return model if protocol.HUB_ID.match(model) else bpy.path.abspath(model)


def preview_decoder_facts(remote: bool) -> dict:
    """readiness.Facts' preview decoder fields: the setting as sent and its local_status ("remote": the server's)."""
    model = estimator_path(session.preferences().preview_decoder)
    state = "remote" if remote else model_catalog.local_status(model) if model else ""
    return {"preview_decoder": model, "preview_decoder_state": state}


def estimator_facts(settings, remote: bool) -> tuple[tuple[str, str, str], ...]:
    """readiness.Facts.estimators for the scene's map methods: (maps, model setting, its local_status) of each
    estimator a Model method needs ("remote": the server's disk answers for it)."""
    prefs = session.preferences()
    needed = readiness.estimators_needed({name: getattr(settings, name) for name in readiness.METHOD_ESTIMATORS})
    facts = []
    for kind, users in needed.items():
        model = estimator_path(getattr(prefs, f"{kind}_model"))
        facts.append((", ".join(users), model, "remote" if remote else model_catalog.local_status(model)))
    return tuple(facts)


def generate_params(settings: dict, model: str | None = None, output_dir: str | None = None) -> dict:
    """Checked txt2img parameters: `settings` plus the preferences' model, device and memory options."""
    return task_params("txt2img", settings, model=model, output_dir=output_dir)


def pbr_params(settings: dict, output_dir: str | None = None) -> dict:
    """Checked pbr task parameters, all but the image."""
    return task_params("pbr", settings, output_dir=output_dir)


def image_inputs(task: str) -> list[protocol.Param]:
    return [p for p in protocol.TASK_PARAMS[task] if p.kind is protocol.ImageInput]


def check_inputs(task: str, params: dict, given: dict) -> None:
    """`given` (input name -> image) are the task's, its required ones among them, and a mask is given when
    the mask is to come from one (checked before the worker starts; the worker checks the pixels)."""
    inputs = image_inputs(task)
    for name in given:
        if name not in {p.name for p in inputs}:
            raise SDTexError(f"{task} takes no image {name!r}; its images: {', '.join(p.name for p in inputs)}")
    for p in inputs:
        if p.required and given.get(p.name) is None:
            raise SDTexError(f"{p.name} is required: {p.help}")
    if params.get("mask_from") == "image" and given.get("mask") is None:
        raise SDTexError(
            "mask: mask_from is image but no mask image was given (white = repaint); give one, or set mask_from "
            "to alpha, rect or none"
        )


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
        return images.image_reference(image, session.get_client())
    except ValueError as exc:
        raise SDTexError(str(exc) if name == "image" else f"{name}: {exc}") from None


def send_images(task: str, params: dict, given: dict, timeout: float | None) -> tuple[dict, dict]:
    """Check a task's images and send them: (name -> source Image, params with their references)."""
    given = {name: image for name, image in given.items() if image is not None}
    check_inputs(task, params, given)
    check_timeout(timeout)  # before the images are sent
    sources = {name: source_image(image, name) for name, image in given.items()}
    references = {name: image_reference(source, name) for name, source in sources.items()}
    return sources, params | references


def run(params: dict, task: str = "txt2img", timeout: float | None = None) -> protocol.GenerateResult:
    """Run an image job and wait for it (background mode and scripts)."""
    return run_job(params, task, timeout).result


def run_job(params: dict, task: str, timeout: float | None = None) -> Job:
    """Run a job, wait for it and return it done (its `data` is the task's whole result); raise otherwise."""
    timeout = check_timeout(timeout)  # before the job is sent
    job = Job.submit(session.get_client(), task, params)
    job.handle(job.client.wait(job.request_id, on_event=job.handle, timeout=timeout))
    if job.state != DONE:
        raise BackendError(job.error_code, job.error) if job.error_code else SDTexError(job.error)
    return job
