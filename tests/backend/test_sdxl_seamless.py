"""Seamless tiling is exact on SDXL too: its extra conditioning (pooled text, size and crop numbers) is
global, so with circular convs the pipeline still commutes with circular shifts of the latents.
The SD 1.x proof and its reasoning are in test_seamless.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from backend.families import SDXL
from backend.seamless import seamless

SHIFT = 2  # latent cells: a multiple of the tiny U-Net's downsampling factor


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_model_dir) -> StableDiffusionXLPipeline:
    pipe = SDXL.txt2img.from_pretrained(tiny_sdxl_model_dir, **SDXL.pipeline_kwargs)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # deterministic (eta 0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: StableDiffusionXLPipeline, latents: torch.Tensor) -> np.ndarray:
    scale = pipe.vae_scale_factor
    return pipe(
        "mossy cobblestones",
        negative_prompt="blur",
        latents=latents.clone(),
        height=latents.shape[2] * scale,
        width=latents.shape[3] * scale,
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="np",
    ).images[0]


def test_rolling_latents_rolls_the_image_exactly_only_when_seamless(pipe):
    latents = torch.randn((1, 4, 16, 24), generator=torch.Generator().manual_seed(7))  # not square

    def roll_error() -> float:
        image_of_rolled = generate(pipe, torch.roll(latents, (SHIFT, SHIFT), (2, 3)))
        pixels = SHIFT * pipe.vae_scale_factor
        return float(np.abs(image_of_rolled - np.roll(generate(pipe, latents), (pixels, pixels), (0, 1))).max())

    with seamless([pipe.unet, pipe.vae], "xy"):
        tiled = roll_error()
    untiled = roll_error()
    assert tiled < 1e-4, f"seamless SDXL image does not wrap (error {tiled})"
    assert untiled > 0.05, f"without seamless the image already wraps (error {untiled}): the test proves nothing"
