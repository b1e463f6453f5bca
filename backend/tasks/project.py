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
from dataclasses import asdict

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline

from backend import controlnets, masks, synchronized, view_sync
from backend import projection as geometry
from backend.color_match import match_colors
from backend.context import Cancelled, JobContext
from backend.estimated_maps import check_estimators
from backend.families import size_multiple
from backend.jobshell import JobProgress
from backend.models import LoadedModel
from backend.outputs import output_folder
from backend.preview_decoder import job_previewer
from backend.projection_job import (
    BACKGROUND,
    Scene,
    Writer,
    bad,
    control_call,
    coverage_warnings,
    prepare,
    to_image,
    to_tensor,
)
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
from sdtex_contract.protocol import SEED_MAX, ProjectParams, ProjectResult, ViewRecord, model_params

__all__ = ["coverage_warnings", "encode_prompt", "generate_view", "prepare", "run", "to_image"]  # what tests use

# --- 2. One view's generation --------------------------------------------------------------------------


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
    call = control_call(params, generator=torch.Generator("cpu").manual_seed(seed))
    if source is None:
        call["image"] = control
    else:
        call.update(image=source, mask_image=mask, control_image=control, strength=1.0)
    latents = denoise(
        pipe, scheduler, on_step=on_step, should_cancel=should_cancel, speed=params.speed, **embeds, **call
    )
    return decode_latents(pipe, latents)[0]


# --- 3. The job ------------------------------------------------------------------------------------------


def _check_model(pipe: DiffusionPipeline, params: ProjectParams) -> None:
    check_model_takes_plain_latents(pipe, "project")
    multiple = size_multiple(pipe)
    for name in ("width", "height"):
        value = getattr(params, name)
        if value % multiple:
            raise bad(name, f"must be a multiple of {multiple} for this model, got {value}", value)


class _Painter:
    """Paints a job's views in order onto its objects' bakes, writing each view's files as it goes."""

    def __init__(
        self, ctx: JobContext, params: ProjectParams, scene: Scene, writer: Writer, model: LoadedModel,
        pipes: list[DiffusionPipeline], embeds: dict,
    ) -> None:  # fmt: skip
        self.ctx, self.params, self.mesh, self.writer = ctx, params, scene.mesh, writer
        self.model, (self.text_pipe, self.inpaint_pipe), self.embeds = model, pipes, embeds
        self.bakes = [geometry.Bake.empty(texels) for texels in scene.texels]
        self.previews = job_previewer(ctx, params, model.pipe, model.family.preview_factors, model.device)

    def _render(
        self, camera: geometry.Camera
    ) -> tuple[geometry.Raster, torch.Tensor, torch.Tensor, PIL.Image.Image | None]:
        """(the view's raster, the pixels to paint, those of them earlier views painted already (seen only
        obliquely: the overlap where two views' paint of one surface meet), the render of what is painted so
        far: None for the first)."""
        mesh = self.mesh
        raster = geometry.render(mesh, camera)
        textured = raster.covered & (mesh.objects[raster.triangle.clamp(min=0)] >= 0)
        if not any(bool(b.seen.any()) for b in self.bakes):
            return raster, textured, torch.zeros_like(textured), None
        # What is painted so far, seen from here, and where it is missing or poorly seen.
        seen = geometry.render_textures(raster, mesh, [b.painted() for b in self.bakes])
        coverage = seen[..., 3:4]
        colour = torch.where(coverage > 0, seen[..., :3] / coverage.clamp(min=1e-6), BACKGROUND)
        repaint = textured & (seen[..., 4] <= self.params.refine_below)
        return raster, repaint, repaint & (coverage[..., 0] > 0), to_image(colour)

    def paint(self, index: int, camera: geometry.Camera, view_seed: int) -> ViewRecord:
        params, record = self.params, ViewRecord(index, view_seed, "", "", "", "", 0)
        start = time.perf_counter()
        raster, repaint, overlap, source = self._render(camera)
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
            if params.match_colors:  # fitted where this view repaints earlier paint: both show the same surface
                generated = match_colors(generated, source, overlap.numpy())
            feathered = masks.feather(repaint.numpy(), params.mask_blur)
            generated = masks.paste_back(source, generated, feathered)
            weight = torch.from_numpy(feathered.astype(np.float32) / 255.0)
        image = to_tensor(generated)
        for bake in self.bakes:
            bake.add(image, camera, raster, self.mesh, weight)
        record.timings["bake"] = time.perf_counter() - start

        for role, picture in (("image", generated), ("mask", mask), ("depth", depth), ("normal", normals)):
            setattr(record, role, self.writer.view(index, role, picture, view_seed, not first))
        return record


def _in_turn(ctx: JobContext, painter: _Painter, scene: Scene, writer: Writer, seed: int, timings: dict) -> list:
    """Sequential mode: the views in order, each inpainting what the earlier ones left; their records."""
    views: list[ViewRecord] = []
    try:
        for index, camera in enumerate(scene.cameras):
            ctx.stage(f"view {index + 1}/{len(scene.cameras)}")
            record = painter.paint(index, camera, synchronized.view_seed(seed, index))
            views.append(record)
            if not record.skipped:
                for name in ("render", "generate", "bake"):
                    timings[name] += record.timings[name]
    except Cancelled:
        if any(not v.skipped for v in views):  # keep what the finished views painted
            writer.textures(painter.bakes)
        raise
    return views


@runs("project")
def run(ctx: JobContext, params: ProjectParams) -> ProjectResult:
    """The project job: check the geometry, load the model and ControlNet, paint the views, bake, fill, save."""
    timings = {"render": 0.0, "generate": 0.0, "bake": 0.0}
    # 1. Check inputs that need no model: output folder, the maps' estimator models, arrays, cameras, UV overlap,
    #    the sampler synchronized mode can run
    output_folder(params)
    check_estimators(params)
    scene = prepare(ctx.inputs, params)
    together = params.mode == "synchronized"
    if together:
        _, note = view_sync.sync_scheduler(params.scheduler)  # refuses samplers that cannot synchronize
        scene.warnings += [note] if note else []
    seed = params.seed if params.seed is not None else secrets.randbelow(SEED_MAX + 1)
    writer = Writer(ctx, params, seed)

    # 2. Model, and its ControlNet pipelines sharing the warm weights (a ControlNet that does not fit is refused)
    ctx.stage("loading_model")
    model, timings["load"] = ctx.models.get(model_params(params.to_dict()))
    ctx.check_cancelled()
    _check_model(model.pipe, params)
    start = time.perf_counter()
    pipes = [controlnets.pipeline(model, params.controlnet, task, params.allow_pickle)
             for task in ("controlnet", "controlnet_inpaint")[: 1 if together else 2]]  # fmt: skip
    guidance = uses_guidance(pipes[0], params.guidance_scale)
    embeds = encode_prompt(pipes[0], params, guidance, model.device, count=len(scene.cameras) if together else 1)
    timings["load"] += time.perf_counter() - start

    # 3. The views: together, or in turn
    if together:
        factors = model.family.preview_factors
        bakes, views, done = synchronized.paint(ctx, params, scene, writer, pipes[0], embeds, seed, factors)
        timings.update(done)
    else:
        painter = _Painter(ctx, params, scene, writer, model, pipes, embeds)
        views, bakes = _in_turn(ctx, painter, scene, writer, seed, timings), painter.bakes

    # 4. Fill what no view saw, save each object's texture (and its maps); warn of objects seen little or not
    ctx.stage("saving")
    start = time.perf_counter()
    images = writer.textures(bakes)
    timings["fill_save"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - ctx.started
    coverage = [b.coverage for b in bakes]
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
