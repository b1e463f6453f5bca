"""Seamless inpainting is exact: with circular padding on (U-Net, VAE decoder and the VAE encoder's hand-made
pad, backend.seamless), inpainting commutes with circular shifts. Roll the source, the mask and the starting
noise by a multiple of the U-Net's downsampling and the output rolls by the same amount (error < 1e-4);
without seamless it does not. Random weights prove it as well as trained ones: the property is the
architecture's. This is what lets make_seamless's band, painted across the rolled picture's edges, wrap.

The VAE encoder samples its latents with fresh noise that no roll can follow, so the test reads the
distribution's mean (sample_mode "argmax"); DDIM (eta 0) adds no noise between steps.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module

from backend.seamless import seamless
from backend.tiny_model import make_test_model

LATENT = 16  # latent cells a side (the tiny VAE's factor is 2: 32 px)
SHIFT = (2, 4)  # latent cells (rows, columns): multiples of the tiny U-Net's downsampling factor (2)


@pytest.fixture(scope="module")
def pipes(tiny_model_dir, tmp_path_factory) -> dict[str, StableDiffusionInpaintPipeline]:
    nine = make_test_model(tmp_path_factory.mktemp("tiny-inpaint-seamless") / "m", architecture="tiny-inpaint")
    loaded = {}
    for name, folder in (("9 channels", nine), ("4 channels", tiny_model_dir)):
        pipe = StableDiffusionInpaintPipeline.from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False
        )
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        loaded[name] = pipe
    return loaded


@pytest.fixture(autouse=True)
def encoder_mean(monkeypatch):
    original = inpaint_module.retrieve_latents
    monkeypatch.setattr(
        inpaint_module,
        "retrieve_latents",
        lambda output, generator=None, sample_mode="sample": original(output, None, "argmax"),
    )


def inpaint(pipe, image: np.ndarray, mask: np.ndarray, noise: torch.Tensor) -> np.ndarray:
    size = LATENT * pipe.vae_scale_factor
    return pipe(
        "mossy cobblestones",
        image=PIL.Image.fromarray(image),
        mask_image=PIL.Image.fromarray(mask),
        latents=noise.clone(),
        height=size,
        width=size,
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="np",
    ).images[0]


def roll_error(pipe, axes: str) -> float:
    """Max difference between the output of rolled inputs and the rolled output (rolled on both axes)."""
    scale = pipe.vae_scale_factor
    size = LATENT * scale
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[4:20, 8:28] = 255
    noise = torch.randn((1, 4, LATENT, LATENT), generator=torch.Generator().manual_seed(9))
    rows, columns = SHIFT
    with seamless([pipe.unet, pipe.vae], axes):  # "none": the plain pipeline
        plain = inpaint(pipe, image, mask, noise)
        pixels = (rows * scale, columns * scale)
        shifted = inpaint(
            pipe,
            np.roll(image, pixels, (0, 1)),
            np.roll(mask, pixels, (0, 1)),
            torch.roll(noise, (rows, columns), (2, 3)),
        )
    return float(np.abs(shifted - np.roll(plain, pixels, (0, 1))).max())


@pytest.mark.parametrize("model", ["9 channels", "4 channels"])
def test_seamless_inpainting_commutes_with_circular_shifts(pipes, model):
    pipe = pipes[model]
    tiled = roll_error(pipe, "xy")
    assert tiled < 1e-4, f"{model}: seamless inpainting is not shift-equivariant (error {tiled})"
    untiled = roll_error(pipe, "none")
    assert untiled > 0.05, f"{model}: without seamless the output already rolls (error {untiled}): proves nothing"
