"""Our txt2img task gives exactly what the stock diffusers pipeline gives for the same settings, for every
model family (tiny SD 1.x and SDXL models: every family branch of the task runs here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from backend.context import Cancelled
from backend.families import SD, SDXL, Family
from backend.steps import encode_prompt
from backend.tasks.txt2img import run_txt2img
from sdtex_contract.protocol import INVALID_PARAMS, GenerateParams, ProtocolError


def load_twice(folder: Path, family: Family, dtype: torch.dtype = torch.float32) -> list[DiffusionPipeline]:
    """Two independent loads, with the worker's load options (no safety checker, no watermark): one for
    our task, one for the reference pipeline call."""
    loaded = [family.txt2img.from_pretrained(folder, dtype=dtype, **family.pipeline_kwargs) for _ in range(2)]
    for pipe in loaded:
        pipe.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def pipes(tiny_model_dir):
    return load_twice(tiny_model_dir, SD)


@pytest.fixture(scope="module")
def sdxl_pipes(tiny_sdxl_model_dir):
    return load_twice(tiny_sdxl_model_dir, SDXL)


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


def reference_image(reference: DiffusionPipeline, p: GenerateParams, scheduler: type, extra: dict) -> PIL.Image.Image:
    """The stock pipeline called as its documentation shows, with the same sampler and settings."""
    original = reference.scheduler
    reference.scheduler = scheduler.from_config(original.config, **extra)
    try:
        return reference(
            p.prompt,
            negative_prompt=p.negative_prompt or None,  # a user without a negative prompt passes none
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            height=p.height,
            width=p.width,
            generator=torch.Generator("cpu").manual_seed(p.seed),
        ).images[0]
    finally:
        reference.scheduler = original


def assert_same_image(image: PIL.Image.Image, expected: PIL.Image.Image) -> None:
    assert image.size == expected.size == (64, 64)
    assert np.array_equal(np.asarray(image), np.asarray(expected))


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
    assert_same_image(run_txt2img(ours, p).images[0], reference_image(reference, p, reference_scheduler, extra))


@pytest.mark.parametrize(
    ("name", "reference_scheduler", "extra", "negative_prompt", "guidance"),
    [
        ("euler", EulerDiscreteScheduler, {}, "text, watermark", 5.0),
        ("euler", EulerDiscreteScheduler, {}, "", 5.0),  # no negative prompt: SDXL zeroes its embeddings
        ("euler_a", EulerAncestralDiscreteScheduler, {}, "text, watermark", 5.0),
        ("dpmpp_2m_karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, "", 1.0),
    ],
)
def test_sdxl_matches_the_diffusers_pipeline(
    sdxl_pipes, tiny_sdxl_model_dir, name, reference_scheduler, extra, negative_prompt, guidance
):
    ours, reference = sdxl_pipes
    config = ours.vae.config
    # The decode's denormalising branch runs only when the VAE has both (SDXL base's has neither).
    assert config.latents_mean is not None and config.latents_std is not None
    assert list(config.latents_mean) != [0.0] * 4 and list(config.latents_std) != [1.0] * 4
    p = params(tiny_sdxl_model_dir, scheduler=name, seed=78, guidance_scale=guidance, negative_prompt=negative_prompt)
    assert_same_image(run_txt2img(ours, p).images[0], reference_image(reference, p, reference_scheduler, extra))


@pytest.mark.filterwarnings("ignore:`upcast_vae` is deprecated:FutureWarning")  # the reference pipeline's own call
def test_sdxl_fp16_decodes_in_fp32_and_matches(tiny_sdxl_model_dir, monkeypatch):
    """The force_upcast branch: SDXL's fp16 VAE decodes in fp32 and is fp16 again afterwards (CPU fp16)."""
    ours, reference = load_twice(tiny_sdxl_model_dir, SDXL, torch.float16)
    assert ours.vae.config.force_upcast
    decode, decoded_in = ours.vae.decode, []

    def spy(latents: torch.Tensor, **kwargs):
        decoded_in.append((latents.dtype, ours.vae.dtype))
        return decode(latents, **kwargs)

    monkeypatch.setattr(ours.vae, "decode", spy)
    p = params(tiny_sdxl_model_dir, scheduler="euler", seed=79, steps=2, guidance_scale=5.0)
    image = run_txt2img(ours, p).images[0]
    assert decoded_in == [(torch.float32, torch.float32)] and ours.vae.dtype == torch.float16
    assert_same_image(image, reference_image(reference, p, EulerDiscreteScheduler, {}))


@pytest.mark.parametrize("negative_prompt", ["", "text, watermark"])
def test_sdxl_zeroes_only_a_missing_negative_prompt(sdxl_pipes, tiny_sdxl_model_dir, negative_prompt):
    ours, _ = sdxl_pipes
    p = params(tiny_sdxl_model_dir, negative_prompt=negative_prompt)
    embeds = encode_prompt(ours, p, guidance=True, device=torch.device("cpu"))
    assert list(embeds) == list(SDXL.prompt_embeds)
    assert embeds["prompt_embeds"].shape[-1] == ours.unet.config.cross_attention_dim  # both encoders, concatenated
    negatives = (embeds["negative_prompt_embeds"], embeds["negative_pooled_prompt_embeds"])
    assert all(bool((n == 0).all()) == (negative_prompt == "") for n in negatives)


def test_each_image_of_a_batch_can_be_redone_alone(pipes, tiny_model_dir):
    ours, _ = pipes
    batch = run_txt2img(ours, params(tiny_model_dir, seed=500, batch_size=3))
    assert batch.seeds == [500, 501, 502]
    alone = run_txt2img(ours, params(tiny_model_dir, seed=502))
    redone, first, second = (np.asarray(image).astype(int) for image in (alone.images[0], *batch.images[:2]))
    # Same noise, same maths; only the CPU's matmul kernels may differ by batch size (seen: one channel of
    # one pixel in 12 288 off by one level on a Xeon), so exact up to a rounding step of the 8-bit picture.
    difference = np.abs(redone - np.asarray(batch.images[2]).astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    assert np.abs(first - second).mean() > 10  # other seeds: other pictures


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


@pytest.mark.parametrize("family_pipes", ["pipes", "sdxl_pipes"])
def test_size_must_suit_the_model(request, family_pipes, tiny_model_dir):
    ours, _ = request.getfixturevalue(family_pipes)
    # The tiny models: VAE factor 2 times one U-Net downsampling = multiples of 4. GenerateParams built
    # directly (as scripts may) skips the protocol's own multiple-of-8 check.
    with pytest.raises(ProtocolError) as info:
        run_txt2img(ours, params(tiny_model_dir, width=66))
    assert info.value.code == INVALID_PARAMS and info.value.data["param"] == "width"
    assert "multiple of 4" in info.value.message
