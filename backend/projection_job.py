"""The project job's inputs and outputs, shared by its two modes (backend/tasks/project.py: views in turn;
backend/synchronized.py: views together): the request's geometry checked before any model loads (`prepare`),
coverage warnings, and the writer of views and textures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch

from backend import projection as geometry
from backend.context import JobContext
from backend.inputs import InputStore, open_array
from backend.outputs import output_folder, run_stamp, sanitise_prefix, save_image_set, write_png
from sdtex_contract.protocol import INVALID_PARAMS, Artifact, ProjectParams, ProtocolError, TaskParams

BACKGROUND = 0.5  # grey where the partial render shows no textured surface
OVERLAP_LIMIT = 0.01  # fraction of an object's texels in two UV triangles above which baking is refused
COVERAGE_WARNING = 0.5  # an object the views saw less of than this gets a warning: most of it is filled


def bad(param: str, message: str, value: Any = None) -> ProtocolError:
    return ProtocolError(INVALID_PARAMS, f"{param}: {message}", {"param": param, "value": value})


@dataclass
class Scene:
    """A request's geometry, checked and ready to bake, before any model is involved."""

    mesh: geometry.Mesh
    cameras: list[geometry.Camera]
    texels: list[geometry.Texels]  # per textured object
    warnings: list[str] = field(default_factory=list)


# --- 1. Inputs: checked before any model is loaded ---------------------------------------------------


def _array(store: InputStore, params: TaskParams, name: str, dtype: str, inner: tuple[int, ...]) -> np.ndarray:
    ref = getattr(params, name)
    if ref["dtype"] != dtype or tuple(ref["shape"][len(ref["shape"]) - len(inner) :]) != inner:
        accepted = f"{dtype} [..., {', '.join(map(str, inner))}]" if inner else f"{dtype} [...]"
        raise bad(name, f"must be {accepted}, got {ref['dtype']} {ref['shape']}", ref["shape"])
    return open_array(store, ref, name)


def prepare(store: InputStore, params: ProjectParams) -> Scene:
    """Open and check the arrays: shapes agree, every object has faces and is seen by a view, every view
    sees an object, UV islands do not overlap (unless allowed); compute each object's texels."""
    triangles = _array(store, params, "triangles", "float32", (3, 3))
    leading = triangles.shape[:-2]
    uvs = _array(store, params, "uvs", "float32", (3, 2))
    objects = _array(store, params, "object_index", "int32", ())
    for name, array in (("uvs", uvs[..., 0, 0]), ("object_index", objects)):
        if array.shape != leading:
            raise bad(name, f"must have the triangles' leading sizes {list(leading)}, got {list(array.shape)}")
    cameras = _array(store, params, "cameras", "float32", (2, 4, 4))
    if cameras.ndim != 4:
        raise bad("cameras", f"must be float32 [views, 2, 4, 4], got {list(cameras.shape)}", list(cameras.shape))

    mesh = geometry.Mesh(
        torch.from_numpy(triangles.reshape(-1, 3, 3).copy()),
        torch.from_numpy(uvs.reshape(-1, 3, 2).copy()),
        torch.from_numpy(objects.reshape(-1).astype(np.int64)),
    )
    if (mesh.objects < -1).any():
        raise bad("object_index", "must be -1 (occluder) or an object number from 0", int(mesh.objects.min()))
    count = int(mesh.objects.max()) + 1
    if count < 1:
        raise bad("object_index", "no triangle belongs to a textured object (all are -1, occluders)")
    solid = mesh.normals.norm(dim=-1) > 0
    for obj in range(count):
        if not ((mesh.objects == obj) & solid).any():
            raise bad("object_index", f"object {obj} has no faces (no triangle of non-zero area)", obj)

    views = []
    for index, (view, projection) in enumerate(torch.from_numpy(cameras.copy())):
        if torch.linalg.matrix_rank(view.double()) < 4 or projection[3].abs().sum() == 0:
            raise bad("cameras", f"view {index} has a singular view matrix or no projection", index)
        views.append(geometry.Camera(view, projection, params.width, params.height))
    _check_in_view(mesh, views, count)

    texels = [geometry.texels(mesh, obj, params.texture_size) for obj in range(count)]
    warnings = []
    for obj, found in enumerate(texels):
        if found.overlap > OVERLAP_LIMIT:
            message = (
                f"object {obj}'s UV islands overlap on {found.overlap:.0%} of its texels: baking paints them twice"
            )
            if not params.allow_uv_overlap:
                raise bad("uvs", message + "; give it a UV map without overlaps (Smart UV Project) or set "
                           "allow_uv_overlap", obj)  # fmt: skip
            warnings.append(message)
        outside = mesh.uvs[mesh.objects == obj]
        if ((outside < 0) | (outside > 1)).any():
            warnings.append(f"object {obj} has UVs outside 0..1: those parts are not baked")
    return Scene(mesh, views, texels, warnings)


def _check_in_view(mesh: geometry.Mesh, cameras: list[geometry.Camera], count: int) -> None:
    """Every view sees some textured object and every object is seen by some view (a corner in the frustum)."""
    corners = mesh.triangles.reshape(-1, 3)
    owners = mesh.objects.repeat_interleave(3)
    seen = torch.zeros(count, dtype=torch.bool)
    for index, camera in enumerate(cameras):
        clip = camera.clip(corners)
        w = clip[:, 3]
        inside = (w > 0) & (clip[:, :3].abs() <= w[:, None]).all(-1) & (owners >= 0)
        if not inside.any():
            raise bad("cameras", f"view {index} sees none of the objects (all are outside its frame)", index)
        seen[owners[inside].unique()] = True
    if not seen.all():
        missing = int(torch.nonzero(~seen)[0])
        raise bad("cameras", f"object {missing} is outside every view", missing)


def coverage_warnings(coverage: list[float], apply_unseen: bool = False) -> tuple[list[int], list[str]]:
    """(the objects no view saw, a warning per object the views saw nothing or little of)."""
    unseen, warnings = [], []
    fate = "applied as asked (apply_unseen)" if apply_unseen else "left unapplied unless apply_unseen"
    for obj, share in enumerate(coverage):
        if share == 0:
            unseen.append(obj)
            warnings.append(f"object {obj}: no view sees it (hidden inside another object or behind the cameras); "
                            f"its texture is a flat grey fill, {fate}")  # fmt: skip
        elif share < COVERAGE_WARNING:
            warnings.append(f"object {obj}: the views saw only {share:.0%} of it; the rest of its texture is filled "
                            "from around (add views that face it)")  # fmt: skip
    return unseen, warnings


def control_call(params: ProjectParams, **call) -> dict:
    """The ControlNet pipeline's arguments for the views, and `call` (generator or latents, images)."""
    return dict(
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        height=params.height,
        width=params.width,
        controlnet_conditioning_scale=params.controlnet_scale,
        control_guidance_start=params.control_start,
        control_guidance_end=params.control_end,
        **call,
    )


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)


def to_image(values: torch.Tensor) -> PIL.Image.Image:
    """A float [H, W] or [H, W, 3] tensor in 0..1 as an 8-bit picture."""
    array = (values.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return PIL.Image.fromarray(array, "L" if array.ndim == 2 else "RGB")


@dataclass
class AsSaved:
    """The params as outputs.save_image_set reads them: a UV texture tiles on no axis."""

    params: TaskParams
    seamless: str = "none"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.params, name)


class Writer:
    """Writes a view's files under the job's stem and announces each."""

    def __init__(self, ctx: JobContext, params: ProjectParams, seed: int):
        self.ctx, self.params, self.seed = ctx, params, seed
        self.folder = output_folder(params)
        self.stem = f"{sanitise_prefix(params.filename_prefix)}_{run_stamp()}_{seed}"

    def view(self, index: int, role: str, image: PIL.Image.Image, seed: int, inpainted: bool) -> str:
        """inpainted: the view repainted only what earlier views left (its metadata names the mask blur)."""
        stem = f"{self.stem}_view{index + 1:02d}_{role}"
        context = {"inpainted": inpainted}
        path, size, digest = write_png(image, self.folder, stem, self.params, seed, role, context=context)
        self.ctx.artifact(Artifact(path=str(path), kind="view", size=size, sha256=digest, index=index, role=role))
        return str(path)

    def textures(self, bakes: list[geometry.Bake]) -> list:
        records = []
        for index, bake in enumerate(bakes):
            size = bake.texels.size
            texture, known = bake.texture(torch.full((size, size, 3), BACKGROUND))  # stays where no view saw any
            filled = geometry.fill(texture, known, self.params.margin)
            where = dict(index=index, seed=self.seed, announce=self.ctx.artifact, ctx=self.ctx)
            stem = f"{self.stem}_object{index}"
            records.append(save_image_set(to_image(filled), AsSaved(self.params), self.folder, stem, **where))
        return records
