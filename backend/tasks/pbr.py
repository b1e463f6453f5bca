"""The pbr task: height, normal, roughness and AO maps derived from a given image (artists already have
albedos). No model is involved; the maps of an image that tiles tile too (see backend/pbr.py)."""

from __future__ import annotations

import time
from pathlib import Path

from backend.context import JobContext
from backend.inputs import open_image
from backend.outputs import output_folder, run_stamp, sanitise_prefix, save_image_set
from backend.registry import runs
from sdtex_contract.protocol import GenerateResult, PbrParams


@runs("pbr")
def run(ctx: JobContext, params: PbrParams) -> GenerateResult:
    start = time.perf_counter()
    # 1. Check inputs: the image decodes within limits, the output folder is writable
    image = open_image(ctx.inputs, params.image, "image").convert("RGB")
    folder = output_folder(params)
    source = params.image.get("path", "")
    ctx.check_cancelled()

    # 2. Derive and write the maps, each announced when complete
    ctx.stage("saving")
    # Maps of a file are named after it, like a generated albedo's maps; maps of uploaded bytes take the prefix.
    stamp = run_stamp()
    stem = sanitise_prefix(Path(source).stem) if source else f"{sanitise_prefix(params.filename_prefix)}_{stamp}"
    record = save_image_set(image, params, folder, stem, albedo=False, announce=ctx.artifact)
    record.path = source
    return GenerateResult(
        images=[record],
        seed=None,
        width=image.width,
        height=image.height,
        model="",
        seamless=params.seamless,
        timings={"total": time.perf_counter() - start},
        params=params.to_dict(),
        task="pbr",
    )
