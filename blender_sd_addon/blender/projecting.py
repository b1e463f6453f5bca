"""A project job from Blender: the objects' geometry and views collected and uploaded, then the baked textures
loaded and each object given its material on the UV map baked into (api.project_texture and the Project panel)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import bpy

from ..client import BackendError, SDTexError
from ..contract import protocol
from . import geometry, materials, session, tasks
from .results import material_name, written_files

TASK = "project"


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
            made.append(_apply_baked(obj, uv_name, record, options, f"{material_name(request.prompt)}.{obj.name}"))
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
