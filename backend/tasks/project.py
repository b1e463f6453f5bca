"""Texture meshes by projection: depth-guided views generated one after another, each projected back onto
the meshes and baked into every object's own UV texture.

For each view, in order:
1. Render the meshes from its camera (backend.projection: a z-buffer rasterizer in torch): depth (near
   bright, as depth ControlNets expect), normals, the texture painted so far, and what is still unpainted
   (surface no view saw, or saw only at a facing cosine below `refine_below`).
2. Generate: the first view with the ControlNet text-to-image pipeline, later ones with the ControlNet
   inpainting pipeline, repainting only the unpainted pixels (the rest is pasted back), so the views agree.
   Both pipelines are built from the warm model with `from_pipe` (backend.controlnets).
3. Project the picture back: every texel the camera sees (depth test) takes its colour, weighted by how
   squarely the surface faces the camera (and by the feathered mask: only new paint counts); the views are
   blended by those weights.
Then a margin around the UV islands is dilated and texels no view saw are filled; coverage is reported, with
a warning per object the views saw little or nothing of (an object no view saw, hidden inside another, say,
is flagged `unseen`: its texture is a flat grey fill, and clients leave it unapplied unless `apply_unseen`).
Every view's picture, mask, depth and normals are written and announced as they are made; a cancelled job
still bakes and writes the textures of the views it finished.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline

from backend import controlnets, masks
from backend import projection as geometry
from backend.context import Cancelled, JobContext
from backend.estimated_maps import check_estimators
from backend.families import size_multiple
from backend.inputs import InputStore, open_array
from backend.jobshell import JobProgress
from backend.models import LoadedModel
from backend.outputs import output_folder, run_stamp, sanitise_prefix, save_image_set, write_png
from backend.preview_decoder import job_previewer
from backend.registry import runs
from backend.schedulers import make_scheduler
from backend.steps import (
    StepCallback,
    check_model_takes_plain_latents,
    decode_latents,
    denoise,
    encode_prompt,
    uses_guidance,
)
from sdtex_contract.protocol import (
    INVALID_PARAMS,
    SEED_MAX,
    Artifact,
    ProjectParams,
    ProjectResult,
    ProtocolError,
    TaskParams,
    ViewRecord,
    model_params,
)

BACKGROUND = 0.5  # grey where the partial render shows no textured surface
OVERLAP_LIMIT = 0.01  # fraction of an object's texels in two UV triangles above which baking is refused
COVERAGE_WARNING = 0.5  # an object the views saw less of than this gets a warning: most of it is filled


def _bad(param: str, message: str, value: Any = None) -> ProtocolError:
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
        raise _bad(name, f"must be {accepted}, got {ref['dtype']} {ref['shape']}", ref["shape"])
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
            raise _bad(name, f"must have the triangles' leading sizes {list(leading)}, got {list(array.shape)}")
    cameras = _array(store, params, "cameras", "float32", (2, 4, 4))
    if cameras.ndim != 4:
        raise _bad("cameras", f"must be float32 [views, 2, 4, 4], got {list(cameras.shape)}", list(cameras.shape))

    mesh = geometry.Mesh(
        torch.from_numpy(triangles.reshape(-1, 3, 3).copy()),
        torch.from_numpy(uvs.reshape(-1, 3, 2).copy()),
        torch.from_numpy(objects.reshape(-1).astype(np.int64)),
    )
    if (mesh.objects < -1).any():
        raise _bad("object_index", "must be -1 (occluder) or an object number from 0", int(mesh.objects.min()))
    count = int(mesh.objects.max()) + 1
    if count < 1:
        raise _bad("object_index", "no triangle belongs to a textured object (all are -1, occluders)")
    solid = mesh.normals.norm(dim=-1) > 0
    for obj in range(count):
        if not ((mesh.objects == obj) & solid).any():
            raise _bad("object_index", f"object {obj} has no faces (no triangle of non-zero area)", obj)

    views = []
    for index, (view, projection) in enumerate(torch.from_numpy(cameras.copy())):
        if torch.linalg.matrix_rank(view.double()) < 4 or projection[3].abs().sum() == 0:
            raise _bad("cameras", f"view {index} has a singular view matrix or no projection", index)
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
                raise _bad("uvs", message + "; give it a UV map without overlaps (Smart UV Project) or set "
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
            raise _bad("cameras", f"view {index} sees none of the objects (all are outside its frame)", index)
        seen[owners[inside].unique()] = True
    if not seen.all():
        missing = int(torch.nonzero(~seen)[0])
        raise _bad("cameras", f"object {missing} is outside every view", missing)


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


# --- 2. One view's generation --------------------------------------------------------------------------


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)


def to_image(values: torch.Tensor) -> PIL.Image.Image:
    """A float [H, W] or [H, W, 3] tensor in 0..1 as an 8-bit picture."""
    array = (values.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return PIL.Image.fromarray(array, "L" if array.ndim == 2 else "RGB")


@torch.no_grad()
def generate_view(
    pipe: DiffusionPipeline,
    params: ProjectParams,
    control: PIL.Image.Image,
    seed: int,
    embeds: dict,
    *,
    source: PIL.Image.Image | None = None,
    mask: PIL.Image.Image | None = None,
    on_step: StepCallback | None = None,
    should_cancel=None,
) -> PIL.Image.Image:
    """One depth-guided picture: `pipe` is the ControlNet pipeline (text to image), or with `source` and
    `mask` the ControlNet inpainting pipeline (white = repaint, strength 1). embeds: encode_prompt's."""
    scheduler = make_scheduler(params.scheduler, pipe.scheduler.config)
    call = dict(
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        height=params.height,
        width=params.width,
        generator=torch.Generator("cpu").manual_seed(seed),
        controlnet_conditioning_scale=params.controlnet_scale,
        control_guidance_start=params.control_start,
        control_guidance_end=params.control_end,
    )
    if source is None:
        call["image"] = control
    else:
        call.update(image=source, mask_image=mask, control_image=control, strength=1.0)
    latents = denoise(
        pipe, scheduler, on_step=on_step, should_cancel=should_cancel, speed=params.speed, **embeds, **call
    )
    return decode_latents(pipe, latents)[0]


# --- 3. The job ------------------------------------------------------------------------------------------


@dataclass
class _AsSaved:
    """The params as outputs.save_image_set reads them: a UV texture tiles on no axis."""

    params: TaskParams
    seamless: str = "none"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.params, name)


def _check_model(pipe: DiffusionPipeline, params: ProjectParams) -> None:
    check_model_takes_plain_latents(pipe, "project")
    multiple = size_multiple(pipe)
    for name in ("width", "height"):
        value = getattr(params, name)
        if value % multiple:
            raise _bad(name, f"must be a multiple of {multiple} for this model, got {value}", value)


class _Writer:
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
            records.append(save_image_set(to_image(filled), _AsSaved(self.params), self.folder, stem, **where))
        return records


class _Painter:
    """Paints a job's views in order onto its objects' bakes, writing each view's files as it goes."""

    def __init__(
        self, ctx: JobContext, params: ProjectParams, scene: Scene, writer: _Writer, model: LoadedModel,
        pipes: list[DiffusionPipeline], embeds: dict,
    ) -> None:  # fmt: skip
        self.ctx, self.params, self.mesh, self.writer = ctx, params, scene.mesh, writer
        self.model, (self.text_pipe, self.inpaint_pipe), self.embeds = model, pipes, embeds
        self.bakes = [geometry.Bake.empty(texels) for texels in scene.texels]
        self.previews = job_previewer(ctx, params, model.pipe, model.family.preview_factors, model.device)

    def _render(self, camera: geometry.Camera) -> tuple[geometry.Raster, torch.Tensor, PIL.Image.Image | None]:
        """(the view's raster, the pixels to paint, the render of what is painted so far: None for the first)."""
        mesh = self.mesh
        raster = geometry.render(mesh, camera)
        textured = raster.covered & (mesh.objects[raster.triangle.clamp(min=0)] >= 0)
        if not any(bool(b.seen.any()) for b in self.bakes):
            return raster, textured, None
        # What is painted so far, seen from here, and where it is missing or poorly seen.
        seen = geometry.render_textures(raster, mesh, [b.painted() for b in self.bakes])
        coverage = seen[..., 3:4]
        colour = torch.where(coverage > 0, seen[..., :3] / coverage.clamp(min=1e-6), BACKGROUND)
        return raster, textured & (seen[..., 4] <= self.params.refine_below), to_image(colour)

    def paint(self, index: int, camera: geometry.Camera, view_seed: int) -> ViewRecord:
        params, record = self.params, ViewRecord(index, view_seed, "", "", "", "", 0)
        start = time.perf_counter()
        raster, repaint, source = self._render(camera)
        first = source is None
        depth = to_image(geometry.depth_image(raster))
        normals = to_image(geometry.normal_image(raster, self.mesh, camera))
        record.timings["render"] = time.perf_counter() - start
        record.new_pixels = int(repaint.sum())
        if not record.new_pixels:
            record.skipped = True
            return record

        start = time.perf_counter()
        progress = JobProgress(self.ctx, params.preview_every, self.previews)
        mask = to_image(repaint.float())
        generated = generate_view(
            self.text_pipe if first else self.inpaint_pipe, params, depth.convert("RGB"), view_seed, self.embeds,
            source=source, mask=None if first else mask, on_step=progress.step, should_cancel=self.ctx.is_cancelled,
        )  # fmt: skip
        record.timings["generate"] = time.perf_counter() - start

        start = time.perf_counter()
        weight = None
        if not first:
            feathered = masks.feather(repaint.numpy(), params.mask_blur)
            generated = masks.paste_back(source, generated, feathered)
            weight = torch.from_numpy(feathered.astype(np.float32) / 255.0)
        image = to_tensor(generated)
        for bake in self.bakes:
            bake.add(image, camera, raster, weight)
        record.timings["bake"] = time.perf_counter() - start

        for role, picture in (("image", generated), ("mask", mask), ("depth", depth), ("normal", normals)):
            setattr(record, role, self.writer.view(index, role, picture, view_seed, not first))
        return record


@runs("project")
def run(ctx: JobContext, params: ProjectParams) -> ProjectResult:
    """The project job: check the geometry, load the model and ControlNet, paint the views, bake, fill, save."""
    timings = {"render": 0.0, "generate": 0.0, "bake": 0.0}
    # 1. Check inputs that need no model: output folder, the maps' estimator models, arrays, cameras, UV overlap
    output_folder(params)
    check_estimators(params)
    scene = prepare(ctx.inputs, params)
    seed = params.seed if params.seed is not None else secrets.randbelow(SEED_MAX + 1)
    writer = _Writer(ctx, params, seed)

    # 2. Model, and its ControlNet pipelines sharing the warm weights (a ControlNet that does not fit is refused)
    ctx.stage("loading_model")
    model, timings["load"] = ctx.models.get(model_params(params.to_dict()))
    ctx.check_cancelled()
    _check_model(model.pipe, params)
    start = time.perf_counter()
    pipes = [controlnets.pipeline(model, params.controlnet, task, params.allow_pickle)
             for task in ("controlnet", "controlnet_inpaint")]  # fmt: skip
    embeds = encode_prompt(pipes[0], params, uses_guidance(pipes[0], params.guidance_scale), model.device, count=1)
    timings["load"] += time.perf_counter() - start

    # 3. The views, in order
    painter = _Painter(ctx, params, scene, writer, model, pipes, embeds)
    views: list[ViewRecord] = []
    try:
        for index, camera in enumerate(scene.cameras):
            ctx.stage(f"view {index + 1}/{len(scene.cameras)}")
            record = painter.paint(index, camera, (seed + index) % (SEED_MAX + 1))
            views.append(record)
            if not record.skipped:
                for name in ("render", "generate", "bake"):
                    timings[name] += record.timings[name]
    except Cancelled:
        if any(not v.skipped for v in views):  # keep what the finished views painted
            writer.textures(painter.bakes)
        raise

    # 4. Fill what no view saw, save each object's texture (and its maps); warn of objects seen little or not
    ctx.stage("saving")
    start = time.perf_counter()
    images = writer.textures(painter.bakes)
    timings["fill_save"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - ctx.started
    coverage = [b.coverage for b in painter.bakes]
    unseen, warnings = coverage_warnings(coverage, params.apply_unseen)
    return ProjectResult(
        images=images,
        seed=seed,
        width=params.width,
        height=params.height,
        model=params.model,
        seamless="none",
        timings=timings,
        params=params.to_dict(),
        texture_size=params.texture_size,
        coverage=coverage,
        unseen=unseen,
        views=[asdict(v) for v in views],
        warnings=scene.warnings + warnings,
    )
