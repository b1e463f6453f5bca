"""A project job from Blender: the objects' geometry and views collected and uploaded, then the baked textures
loaded and each object given its material on the UV map baked into (api.project_texture and the Project panel)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import bpy

from ..client import BackendError, SDTexError
from ..contract import model_catalog, protocol
from ..history import HistoryRecord
from ..jobs import Job
from . import geometry, materials, relocate, session, tasks
from .history_store import add_history
from .results import material_name, written_files

TASK = "project"
# The standard depth ControlNet of each family: what an empty ControlNet field uses (hub ids, fetched on first use).
DEPTH_CONTROLNETS = {
    "sd1": "lllyasviel/sd-controlnet-depth",
    "sd2": "thibaud/controlnet-sd21-depth-diffusers",
    "sdxl": "diffusers/controlnet-depth-sdxl-1.0",
}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def default_controlnet(model: str) -> tuple[str, str]:
    """(hub id, family name) of the depth ControlNet that suits `model`, its family told by its name."""
    base = model_catalog.guess_base(model)
    return DEPTH_CONTROLNETS[base], FAMILY_NAMES[base]


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
    views_note: str = ""  # how views chosen by coverage did ("COVERAGE")


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
    # 1. Parameters, checked with stand-ins for the arrays; no ControlNet given: the model family's depth one
    controlnet = controlnet or default_controlnet(model or session.preferences().model)[0]
    values = settings | {"prompt": prompt, "controlnet": bpy.path.abspath(controlnet)}
    params = tasks.task_params(TASK, values, model=model, output_dir=output_dir)

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
        client = session.get_client()
        for name, (data, dtype, shape) in (found.arrays() | {"cameras": geometry.cameras_bytes(cameras)}).items():
            params[name] = {"sha256": client.upload(data), "dtype": dtype, "shape": shape}
    except (geometry.GeometryError, SDTexError) as exc:
        raise request.failed(SDTexError(str(exc)) if isinstance(exc, geometry.GeometryError) else exc) from None
    return request


def run_projection(
    request: ProjectionRequest, *, timeout: float | None = None, apply: bool = True, slot: str = "NEW",
    pack: bool = False,
) -> ProjectedTexture:  # fmt: skip
    """Run a prepared project job, wait for it and apply it (scripts, background mode)."""
    try:
        job = tasks.run_job(request.params, task=TASK, timeout=timeout)
    except SDTexError as exc:
        raise request.failed(exc) from None
    return finish_projection(job.data, request, apply=apply, slot=slot, pack=pack)


def finish_projection(
    data: dict, request: ProjectionRequest, *, apply: bool = True, slot: str = "NEW", pack: bool = False
) -> ProjectedTexture:
    """Load a finished project job's textures and give each object its material on the UV map baked into."""
    options = tasks.apply_options(shared_material=False, slot=slot, pack=pack)
    result = protocol.ProjectResult.from_dict(data)
    found = request.geometry
    textures = [materials.load_image(record.path, "albedo", pack) for record in result.images]
    made = []
    if apply:
        for index, (obj, uv_name, record) in enumerate(zip(found.objects, found.uv_maps, result.images, strict=True)):
            if index in result.unseen and not request.params.get("apply_unseen"):
                continue  # no view saw it: its texture is a flat fill, and its own material beats that
            # apply_images names a per-object material "<name>.<object>" itself
            made.append(_apply_baked(obj, uv_name, record, options, material_name(request.prompt)))
    add_history(bpy.context.scene, history_record(result, request))
    views_files = [v[role] for v in result.views for role in ("image", "mask", "depth", "normal") if v[role]]
    relocate.remember(written_files(result) + views_files)
    return ProjectedTexture(
        images=textures,
        materials=made,
        uv_maps=list(found.uv_maps),
        coverage=dict(zip(request.names, result.coverage, strict=True)),
        warnings=[request.named(w) for w in result.warnings],
        files=written_files(result) + views_files,
        result=result,
        views_note=found.views_note,
    )


def _apply_baked(obj, uv_name: str, record, options: materials.ApplyOptions, name: str) -> bpy.types.Material:
    """One object's material showing its baked texture, read through the UV map it was baked into."""
    try:
        (material,) = materials.apply_images([obj], {"albedo": record.path, **record.maps}, options, name)
    except (ValueError, ReferenceError) as exc:  # ReferenceError: the object was deleted meanwhile
        raise SDTexError(str(exc)) from None
    for node in material.node_tree.nodes:
        if node.type in ("UVMAP", "NORMAL_MAP"):
            node.uv_map = uv_name  # the map the texture was baked into, which need not be the active one
    return material


# --- a cancelled job: what its finished views baked ------------------------------------------------------


def views_done(job: Job) -> int:
    """How many views a project job finished (each announces its picture when done)."""
    return sum(a.kind == "view" and a.role == "image" for a in job.artifacts)


def partial_result(job: Job, request: ProjectionRequest) -> dict | None:
    """A cancelled project job's result, from the textures it announced: on cancel the worker still bakes and
    writes every object's texture from the views finished so far. None when it baked none (no view finished).
    Coverage is unknown (the worker reports it only at the end): 0 for each object."""
    textures: dict[int, dict] = {}
    for artifact in job.artifacts:
        if artifact.kind in ("image", "map"):
            texture = textures.setdefault(artifact.index, {"path": "", "seed": request.params.get("seed"), "maps": {}})
            if artifact.kind == "image":
                texture["path"] = artifact.path
            else:
                texture["maps"][artifact.role] = artifact.path
    count = len(request.names)
    if sorted(textures) != list(range(count)) or not all(t["path"] for t in textures.values()):
        return None
    params = request.params
    return {
        "images": [textures[i] for i in range(count)], "seed": params.get("seed"), "width": params["width"],
        "height": params["height"], "model": params.get("model", ""), "seamless": "none", "timings": {},
        "params": params, "texture_size": params.get("texture_size", 0), "coverage": [0.0] * count,
    }  # fmt: skip


def cancelled_text(job: Job, request: ProjectionRequest) -> str:
    total = request.params["cameras"]["shape"][0]
    return f"Cancelled after {views_done(job)} of {total} views: applied what was baked"


# --- history: a project record and applying it again -----------------------------------------------------


def history_record(result: protocol.ProjectResult, request: ProjectionRequest) -> HistoryRecord:
    """The record of a project job: its baked textures (files, in object order), its settings, and the objects
    and UV maps they belong to (Apply Again puts each back on its object)."""
    record = HistoryRecord.from_result(result)
    arrays = {p.name for p in protocol.TASK_PARAMS[TASK] if p.kind is protocol.ArrayInput}
    record.params = {name: value for name, value in record.params.items() if name not in arrays} | {
        "objects": request.names,
        "uv_maps": list(request.geometry.uv_maps),
    }
    return record


def apply_project_record(record: HistoryRecord, options: materials.ApplyOptions) -> list:
    """Apply Again for a project record: each baked texture on its object, through the UV map it was baked into.
    Objects no longer in the file (or without that UV map) are named in the error; the others are applied."""
    made, missing = [], []
    for name, uv_name, image in zip(record.params["objects"], record.params["uv_maps"], record.images(), strict=True):
        obj = bpy.data.objects.get(name)
        if obj is None or obj.type != "MESH" or uv_name not in obj.data.uv_layers:
            missing.append(name)
            continue
        made.append(_apply_baked(obj, uv_name, image, options, material_name(record.prompt)))  # ".<object>" added
    if missing:
        raise SDTexError(f"Not applied to {', '.join(missing)}: no longer in this file or without its UV map")
    return made
