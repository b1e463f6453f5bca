"""Seamless tiling is exact: with circular convs the whole pipeline commutes with circular shifts.

Rolling the initial latents by a multiple of the U-Net's downsampling factor must roll the decoded image
by that times the VAE's scale factor, on the tiled axes only; leaving the context must restore every conv.
A random-weight model proves this as well as a trained one: the property is the architecture's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from torch import nn

from backend.seamless import seamless, wrap_axes
from backend.tasks.txt2img import run_txt2img
from sdtex_contract.protocol import GenerateParams

LATENT_H, LATENT_W = 16, 24  # not square, so swapped axes cannot pass
SHIFT = 2  # latent cells: a multiple of the tiny U-Net's downsampling factor (2 levels -> 2)
DIMS = {"x": (3,), "y": (2,), "xy": (2, 3)}  # latent (N, C, H, W) dims rolled per axis


def load_pipe(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # deterministic (eta 0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path) -> StableDiffusionPipeline:
    return load_pipe(tiny_model_dir)


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn((1, 4, LATENT_H, LATENT_W), generator=torch.Generator().manual_seed(7))


def generate(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> np.ndarray:
    """The real pipeline from given latents: (H, W, 3) floats in 0..1."""
    scale = pipe.vae_scale_factor
    return pipe(
        "mossy cobblestones",
        latents=latents.clone(),
        height=LATENT_H * scale,
        width=LATENT_W * scale,
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="np",
    ).images[0]


def roll_error(pipe: StableDiffusionPipeline, latents: torch.Tensor, dims: tuple[int, ...]) -> float:
    """Max abs difference between the image of rolled latents and the rolled image."""
    image = generate(pipe, latents)
    image_of_rolled = generate(pipe, torch.roll(latents, (SHIFT,) * len(dims), dims))
    pixels = SHIFT * pipe.vae_scale_factor
    rolled_image = np.roll(image, (pixels,) * len(dims), tuple(d - 2 for d in dims))  # (H, W, C) vs (N, C, H, W)
    return float(np.abs(image_of_rolled - rolled_image).max())


def patched_convs(*modules: nn.Module) -> list[str]:
    return [name for m in modules for name, sub in m.named_modules() if "_conv_forward" in sub.__dict__]


@pytest.mark.parametrize("axes", ["x", "y", "xy"])
def test_rolling_latents_rolls_the_image_exactly_only_when_seamless(pipe, latents, axes):
    with seamless([pipe.unet, pipe.vae], axes):
        tiled = roll_error(pipe, latents, DIMS[axes])
    untiled = roll_error(pipe, latents, DIMS[axes])
    assert tiled < 1e-4, f"seamless {axes}: image does not wrap (error {tiled})"
    assert untiled > 0.05, f"without seamless the image already wraps (error {untiled}): the test proves nothing"


@pytest.mark.parametrize("axes, other", [("x", "y"), ("y", "x")])
def test_one_axis_leaves_the_other_untiled(pipe, latents, axes, other):
    with seamless([pipe.unet, pipe.vae], axes):
        error = roll_error(pipe, latents, DIMS[other])
    assert error > 0.05, f"seamless {axes} also wraps along {other} (error {error})"


def test_every_padded_conv_is_patched_inside_and_restored_after(pipe):
    padded = [n for n, m in pipe.unet.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    with seamless([pipe.unet, pipe.vae], "xy"):
        inside = patched_convs(pipe.unet)
    assert padded and sorted(inside) == sorted(padded)
    assert patched_convs(pipe.unet, pipe.vae, pipe.text_encoder) == []


def test_leaving_restores_bit_for_bit_also_after_an_exception(tiny_model_dir, pipe, latents):
    reference = generate(load_pipe(tiny_model_dir), latents)  # a fresh model that was never patched
    with seamless([pipe.unet, pipe.vae], "xy"):
        tiled = generate(pipe, latents)
    after_exit = generate(pipe, latents)
    with pytest.raises(KeyError), seamless([pipe.unet, pipe.vae], "xy"):
        raise KeyError("boom inside the block")
    after_exception = generate(pipe, latents)

    assert np.abs(tiled - reference).max() > 0.05
    assert np.array_equal(after_exit, reference)
    assert np.array_equal(after_exception, reference)
    assert patched_convs(pipe.unet, pipe.vae) == []


def test_nesting_is_refused_and_leaves_the_outer_patch_intact(pipe, latents):
    with seamless([pipe.unet, pipe.vae], "x"):
        tiled = generate(pipe, latents)
        with pytest.raises(RuntimeError, match="nesting"), seamless([pipe.vae], "y"):
            pass
        assert np.array_equal(generate(pipe, latents), tiled)
    assert patched_convs(pipe.unet, pipe.vae) == []


def test_none_is_a_no_op(pipe, latents):
    before = generate(pipe, latents)
    with seamless([pipe.unet, pipe.vae], "none"):
        assert patched_convs(pipe.unet, pipe.vae) == []
        assert np.array_equal(generate(pipe, latents), before)


@pytest.mark.parametrize("bad", ["both", "", "XY", None])
def test_bad_axes_are_refused_by_name(bad):
    conv = nn.Conv2d(1, 1, 3, padding=1)
    with pytest.raises(ValueError, match="seamless axes must be one of none, x, y, xy"), seamless([conv], bad):
        pass
    assert patched_convs(conv) == []


def test_wrap_axes():
    expected = [(False, False), (True, False), (False, True), (True, True)]
    assert [wrap_axes(a) for a in ("none", "x", "y", "xy")] == expected


# Single convs against torch's own circular padding, for the padding forms SD models do not use.
CONVS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 5), padding=(1, 2)),
    dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=3, padding=1, stride=2),
    dict(kernel_size=4, padding="same"),  # even kernel: torch pads one more on the right/bottom
    dict(kernel_size=3, padding=1, groups=2),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own, for its conv
@pytest.mark.parametrize("spec", CONVS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_xy_matches_torch_circular_padding(spec):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **spec)
    circular = nn.Conv2d(4, 6, padding_mode="circular", **spec)
    circular.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 12, 14)
    with seamless([conv], "xy"):
        assert torch.allclose(conv(x), circular(x), atol=1e-6)
    assert not torch.allclose(conv(x), circular(x), atol=1e-2)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_one_axis_wraps_and_the_other_keeps_its_own_padding(padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=(3, 5), padding=(1, 2), padding_mode=padding_mode)
    x = torch.randn(1, 3, 10, 11)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    # Reference built from torch alone: pad x circularly, y with the conv's own mode, then an unpadded conv.
    wrapped_x = nn.functional.pad(nn.functional.pad(x, (2, 2, 0, 0), mode="circular"), (0, 0, 1, 1), mode=mode)
    expected = nn.functional.conv2d(wrapped_x, conv.weight, conv.bias)
    with seamless([conv], "x"):
        assert torch.allclose(conv(x), expected, atol=1e-6)


def test_txt2img_untiled_tiled_untiled(tiny_model_dir, pipe):
    """Through the worker's own task code, one warm model serves tiled and untiled requests in any order."""

    def run(axes: str) -> np.ndarray:
        params = GenerateParams(
            model=str(tiny_model_dir),
            prompt="mossy cobblestones",
            output_dir="/unused",
            seed=11,
            steps=2,
            guidance_scale=3.0,
            width=64,
            height=64,
            scheduler="ddim",
            seamless=axes,
        )
        return np.asarray(run_txt2img(pipe, params).images[0])

    first, tiled, last = run("none"), run("xy"), run("none")
    assert np.array_equal(first, last)
    assert np.abs(tiled.astype(int) - first.astype(int)).max() > 10
