"""The project job's synchronized mode: every view denoised at once, in one batch through the ControlNet
pipeline's own loop, with the scheduler's step sharing the views' predictions through one latent texture for
the first `sync_until` of the steps (backend/view_sync.py); then every view decoded and all of them baked in
RGB with the synchronization's final weights (facing ** EXPONENT).

With `sync_until` 0 the views are independent: each starts from its own seed's noise, as a sequential job's
first view does, so one view gives a sequential job's texture.
"""

from __future__ import annotations

import time

import PIL.Image
import torch
from diffusers import DiffusionPipeline

from backend import projection as geometry
from backend import view_sync
from backend.context import JobContext
from backend.jobshell import JobProgress
from backend.preview_decoder import job_previewer
from backend.projection_job import Scene, Writer, control_call, to_image, to_tensor
from backend.schedulers import make_scheduler
from backend.steps import decode_latents, denoise
from sdtex_contract.protocol import SEED_MAX, ProjectParams, ViewRecord


def latent_texture_size(texture_size: int) -> int:
    """The shared latent texture's side: half the baked texture's, so it is finer than the views' latents on
    the surface (a latent pixel covers 8 picture pixels) and neighbouring pixels rarely share a texel's noise."""
    return max(32, texture_size // 2)


@torch.no_grad()
def denoise_views(
    pipe: DiffusionPipeline, params: ProjectParams, scene: Scene, controls: list[PIL.Image.Image], embeds: dict,
    seed: int, progress: JobProgress | None = None, should_cancel=None,
) -> torch.Tensor:  # fmt: skip
    """The views' final latents [V, C, h, w], denoised together (synchronized for `params.sync_until`)."""
    name, _ = view_sync.sync_scheduler(params.scheduler)
    scheduler = make_scheduler(name, pipe.scheduler.config)
    factor = pipe.vae_scale_factor
    channels = pipe.unet.config.in_channels
    if params.sync_until > 0:
        views = view_sync.LatentViews.build(scene.mesh, scene.cameras, factor, latent_texture_size(params.texture_size))
        start = {"latents": views.noise(torch.Generator("cpu").manual_seed(seed), channels).to(pipe.unet.dtype)}
        scheduler = view_sync.synchronizing(scheduler, views.to(pipe.device), params.sync_until)
    else:
        start = {"generator": [torch.Generator("cpu").manual_seed(view_seed(seed, v)) for v in range(len(controls))]}
    call = control_call(params, image=controls, **start)
    return denoise(
        pipe, scheduler, on_step=progress.step if progress else None, should_cancel=should_cancel,
        speed=params.speed, **embeds, **call,
    )  # fmt: skip


def view_seed(seed: int, index: int) -> int:
    return (seed + index) % (SEED_MAX + 1)


@torch.no_grad()
def paint(
    ctx: JobContext, params: ProjectParams, scene: Scene, writer: Writer, pipe: DiffusionPipeline, embeds: dict,
    seed: int, factors,
) -> tuple[list[geometry.Bake], list[ViewRecord], dict[str, float]]:  # fmt: skip
    """All views painted together: (each object's bake, each view's record, the stages' seconds)."""
    timings = {}
    # 1. Render every view: depth for its ControlNet, and its normals
    start = time.perf_counter()
    rasters = [geometry.render(scene.mesh, camera) for camera in scene.cameras]
    depths = [to_image(geometry.depth_image(raster)) for raster in rasters]
    timings["render"] = time.perf_counter() - start

    # 2. Denoise them together (the latent views are built in this stage's time)
    start = time.perf_counter()
    ctx.stage(f"views 1-{len(scene.cameras)} together")
    progress = JobProgress(ctx, params.preview_every, job_previewer(ctx, params, pipe, factors, pipe.device))
    controls = [depth.convert("RGB") for depth in depths]
    latents = denoise_views(pipe, params, scene, controls, embeds, seed, progress, ctx.is_cancelled)
    pictures = [decode_latents(pipe, latents[v : v + 1])[0] for v in range(len(latents))]
    timings["generate"] = time.perf_counter() - start

    # 3. Bake every view with the synchronization's final weights, and write each view's files
    start = time.perf_counter()
    bakes = [geometry.Bake.empty(texels) for texels in scene.texels]
    records = []
    for index, (camera, raster, picture) in enumerate(zip(scene.cameras, rasters, pictures, strict=True)):
        for bake in bakes:
            bake.add(to_tensor(picture), camera, raster, scene.mesh, exponent=view_sync.EXPONENT)
        textured = raster.covered & (scene.mesh.objects[raster.triangle.clamp(min=0)] >= 0)
        normals = to_image(geometry.normal_image(raster, scene.mesh, camera))
        own = seed if params.sync_until > 0 else view_seed(seed, index)
        record = ViewRecord(index, own, "", "", "", "", int(textured.sum()))
        for role, image in (("image", picture), ("mask", to_image(textured.float())), ("depth", depths[index]),
                            ("normal", normals)):  # fmt: skip
            setattr(record, role, writer.view(index, role, image, own, False))
        records.append(record)
    timings["bake"] = time.perf_counter() - start
    return bakes, records, timings
