"""The estimate task: what a Marigold model estimates from an image, written as maps next to it.

depth -> `<stem>_depth.png`: 16-bit, near = bright (1 - Marigold's depth, which is 0 near), as depth-conditioned
models expect; normals -> `<stem>_normal.png`: the tangent-space normal map in normal_format (as the pbr task's
"model" normals at strength 1, see backend/estimated_maps.py); intrinsics -> `<stem>_albedo.png` (the delit
albedo, sRGB), `<stem>_roughness.png` and `<stem>_metallic.png` (8-bit). With seamless the estimate tiles.
"""

from __future__ import annotations

import time

import numpy as np
import PIL.Image

from backend.context import JobContext
from backend.estimated_maps import STAGE, check_estimator_model, job_estimators, tangent_normals
from backend.estimators import Estimate, EstimateSettings
from backend.inputs import open_image
from backend.outputs import input_stem, output_folder, write_maps
from backend.pbr import encode_maps
from backend.registry import runs
from sdtex_contract.protocol import EstimateParams, GenerateResult, ImageRecord
from sdtex_contract.tables import ESTIMATOR_DEFAULTS


def maps_of_estimate(kind: str, estimate: Estimate, normal_format: str) -> dict[str, np.ndarray]:
    """The estimate as float maps, by file name: depth (near = 1), normal, or albedo, roughness and metallic."""
    if kind == "depth":
        return {"depth": 1 - estimate.depth}
    if kind == "normals":
        return {"normal": tangent_normals(estimate.normals, 1.0, normal_format)}
    maps = {"albedo": estimate.albedo, "roughness": estimate.roughness, "metallic": estimate.metallic}
    return {name: value for name, value in maps.items() if value is not None}


@runs("estimate")
def run(ctx: JobContext, params: EstimateParams) -> GenerateResult:
    # 1. Check inputs: the model found and the right Marigold pipeline, the image decodes, the output folder
    kind = params.estimator
    model = params.model or ESTIMATOR_DEFAULTS[kind]
    check_estimator_model(kind, model, "model")
    image = open_image(ctx.inputs, params.image, "image").convert("RGB")
    folder = output_folder(params)
    source = params.image.get("path", "")
    ctx.check_cancelled()

    # 2. Load the model (warm, or now)
    timings = {}
    ctx.stage("loading_model")
    estimators = job_estimators(ctx)
    _, timings["load"] = estimators.pipeline(kind, model, device=params.device, dtype=params.dtype, param="model")
    ctx.check_cancelled()

    # 3. Estimate, the steps as progress
    ctx.stage(STAGE)
    start = time.perf_counter()
    settings = EstimateSettings(params.estimate_steps, params.ensemble_size, params.processing_resolution,
                                params.seamless)  # fmt: skip
    on_step = lambda step, total: ctx.progress(step, total, time.perf_counter() - start)  # noqa: E731
    estimate = estimators.estimate(kind, model, image, settings, device=params.device, dtype=params.dtype,
                                   on_step=on_step, is_cancelled=ctx.is_cancelled, param="model")  # fmt: skip
    timings["estimate"] = time.perf_counter() - start

    # 4. Write the maps, each announced when complete
    ctx.stage("saving")
    start = time.perf_counter()
    maps: dict[str, PIL.Image.Image] = encode_maps(maps_of_estimate(kind, estimate, params.normal_format))
    paths = write_maps(maps, folder, input_stem(params, source), params, seed=None, source=source,
                       announce=ctx.artifact)  # fmt: skip
    timings["save"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - ctx.started
    record = ImageRecord(path=source, seed=None, maps=paths, map_sources=dict.fromkeys(paths, f"model:{model}"))
    return GenerateResult(
        images=[record],
        seed=None,
        width=image.width,
        height=image.height,
        model=model,
        seamless=params.seamless,
        timings=timings,
        params=params.to_dict(),
        task="estimate",
    )
