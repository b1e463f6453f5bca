"""Our txt2img task gives exactly what the stock diffusers pipeline gives for the same settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
)

from backend.tasks.txt2img import Cancelled, run_txt2img
from blender_sd_addon.protocol import INVALID_PARAMS, GenerateParams, ProtocolError


@pytest.fixture(scope="module")
def pipes(tiny_model_dir):
    """Two independent loads: one for our task, one for the reference pipeline call."""
    loaded = [StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None) for _ in range(2)]
    for pipe in loaded:
        pipe.set_progress_bar_config(disable=True)
    return loaded


def params(tiny_model_dir, **changes) -> GenerateParams:
    values = dict(
        model=str(tiny_model_dir),
        prompt="rusty metal plate",
        negative_prompt="text, watermark",
        steps=3,
        width=64,
        height=64,
        output_dir="/unused",
    )
    return GenerateParams(**{**values, **changes})


@pytest.mark.parametrize(
    ("name", "reference_scheduler", "extra"),
    [
        ("euler_a", EulerAncestralDiscreteScheduler, {}),
        ("ddim", DDIMScheduler, {}),
        ("dpmpp_2m_karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    ],
)
@pytest.mark.parametrize("guidance", [7.5, 1.0])  # 1.0 turns classifier-free guidance off
def test_matches_the_diffusers_pipeline(pipes, tiny_model_dir, name, reference_scheduler, extra, guidance):
    ours, reference = pipes
    p = params(tiny_model_dir, scheduler=name, seed=77, guidance_scale=guidance)
    image = run_txt2img(ours, p).images[0]

    original = reference.scheduler
    reference.scheduler = reference_scheduler.from_config(original.config, **extra)
    try:
        expected = reference(
            p.prompt,
            negative_prompt=p.negative_prompt,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            height=p.height,
            width=p.width,
            generator=torch.Generator("cpu").manual_seed(77),
        ).images[0]
    finally:
        reference.scheduler = original
    assert image.size == expected.size == (64, 64)
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_each_image_of_a_batch_can_be_redone_alone(pipes, tiny_model_dir):
    ours, _ = pipes
    batch = run_txt2img(ours, params(tiny_model_dir, seed=500, batch_size=3))
    assert batch.seeds == [500, 501, 502]
    alone = run_txt2img(ours, params(tiny_model_dir, seed=502))
    assert np.array_equal(np.asarray(batch.images[2]), np.asarray(alone.images[0]))
    assert not np.array_equal(np.asarray(batch.images[0]), np.asarray(batch.images[1]))


def test_cancel_stops_before_decoding(pipes, tiny_model_dir):
    ours, _ = pipes
    steps, stages = [], []
    with pytest.raises(Cancelled):
        run_txt2img(
            ours,
            params(tiny_model_dir, steps=20, seed=1),
            on_step=lambda step, total, latents: steps.append(step),
            should_cancel=lambda: len(steps) >= 2,
            on_stage=stages.append,
        )
    assert steps == [1, 2]
    assert stages == ["encoding", "denoising"]
    assert len(run_txt2img(ours, params(tiny_model_dir, seed=1)).images) == 1  # the pipeline is usable again


def test_size_must_suit_the_model(pipes, tiny_model_dir):
    ours, _ = pipes
    # The tiny model: VAE factor 2 times one U-Net downsampling = multiples of 4. GenerateParams built
    # directly (as scripts may) skips the protocol's own multiple-of-8 check.
    with pytest.raises(ProtocolError) as info:
        run_txt2img(ours, params(tiny_model_dir, width=66))
    assert info.value.code == INVALID_PARAMS and info.value.data["param"] == "width"
    assert "multiple of 4" in info.value.message
