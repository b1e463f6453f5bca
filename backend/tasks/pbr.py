"""The pbr task: height, normal, roughness and AO maps of a given image (artists already have albedos), each from
classical filters or a Marigold model's estimate, with metallic and a delit albedo from a model (see
backend/pbr.py and backend/estimated_maps.py). The maps of an image that tiles tile too."""

from __future__ import annotations

import time

from backend.context import JobContext
from backend.estimated_maps import check_estimators
from backend.inputs import open_image
from backend.outputs import input_stem, output_folder, save_image_set
from backend.registry import runs
from sdtex_contract.protocol import GenerateResult, PbrParams


@runs("pbr")
def run(ctx: JobContext, params: PbrParams) -> GenerateResult:
    start = time.perf_counter()
    # 1. Check inputs: the estimator models found, the image decodes within limits, the output folder is writable
    check_estimators(params)
    image = open_image(ctx.inputs, params.image, "image").convert("RGB")
    folder = output_folder(params)
    source = params.image.get("path", "")
    ctx.check_cancelled()

    # 2. Derive (or estimate) and write the maps, each announced when complete
    ctx.stage("saving")
    # Maps of a file are named after it, like a generated albedo's maps; maps of uploaded bytes take the prefix.
    record = save_image_set(image, params, folder, input_stem(params, source), albedo=False, announce=ctx.artifact,
                            ctx=ctx)  # fmt: skip
    record.path = source
    return GenerateResult(
        images=[record],
        seed=None,
        width=image.width,
        height=image.height,
        model="",  # no generator; the estimator models are in each record's map_sources
        seamless=params.seamless,
        timings={"total": time.perf_counter() - start},
        params=params.to_dict(),
        task="pbr",
    )
