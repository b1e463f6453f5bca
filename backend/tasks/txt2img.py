"""Text to image, step by step like a diffusers pipeline, with timings, per-image seeds and cancel.

The denoising loop is the pipeline's own (called with output_type="latent"); encoding and decoding are
done here, exactly as the pipeline does them (backend/steps.py), so each stage can be timed and a cancelled
run never pays for a VAE decode. `run_txt2img` is the pipeline (images in memory); `run` is the job around it
(backend/jobshell.py: model, progress, previews, files).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline

from backend.context import JobContext
from backend.jobshell import ImageJob
from backend.outputs import output_folder
from backend.registry import runs
from backend.schedulers import make_scheduler
from backend.steps import (
    PipelineOutput,
    Stages,
    StepCallback,
    check_model_takes_plain_latents,
    check_not_cancelled,
    check_size,
    circular,
    cpu_generators,
    denoise_and_decode,
    encode_prompt_stage,
    image_seeds,
    sampling,
)
from sdtex_contract.protocol import GenerateParams, GenerateResult


def check_inputs(pipe: DiffusionPipeline, params: GenerateParams) -> None:
    check_model_takes_plain_latents(pipe, "txt2img")
    check_size(pipe, params)


@torch.no_grad()
def run_txt2img(
    pipe: DiffusionPipeline,
    params: GenerateParams,
    *,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_stage: Callable[[str], None] | None = None,
    device: torch.device | None = None,
) -> PipelineOutput:
    """Generate params.batch_size images. Raises Cancelled when should_cancel() turns true.

    on_step(step, total, latents) runs after every step, on_stage(name) before "encoding", "denoising"
    and "decoding". device: the pipeline's execution device when the caller knows it (reading it walks
    every module).
    """
    stages = Stages(on_stage, on_step=on_step, should_cancel=should_cancel)
    # 1. Check inputs
    check_inputs(pipe, params)

    # 2. Scheduler: a fresh one from the pipeline's own config, swapped in for this run only
    scheduler = make_scheduler(params.scheduler, pipe.scheduler.config)

    # 3. Seeds: one CPU generator per image
    seeds = image_seeds(params)
    generators = cpu_generators(seeds)

    # 4. Encode the prompt
    embeds = encode_prompt_stage(pipe, params, stages, device or pipe._execution_device)

    # 5. Denoise (the pipeline's loop, stopping at latents; cancel sets its interrupt flag), 6. decode
    check_not_cancelled(should_cancel)
    with circular(pipe, params.seamless):
        images = denoise_and_decode(
            pipe,
            scheduler,
            stages,
            **embeds,
            **sampling(params),
            speed=params.speed,
            height=params.height,
            width=params.width,
            generator=generators,
        )
    return PipelineOutput(images=images, seeds=seeds, timings=stages.timings)


@runs("txt2img")
def run(ctx: JobContext, params: GenerateParams) -> GenerateResult:
    """The txt2img job: load (or reuse) the model, run the pipeline, save and announce each file."""
    # 1. Check inputs that need no model: the output folder must be writable before any denoising
    output_folder(params)
    job = ImageJob(ctx, params)

    # 2. Load the model (warm, or loaded now)
    pipe = job.load()

    # 3. Denoise and decode
    output = run_txt2img(pipe, params, **job.callbacks())

    # 4. Save: every file is announced as soon as it is complete
    return job.save(output, params.width, params.height)
