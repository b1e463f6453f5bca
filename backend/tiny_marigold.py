"""Seeded random Marigold pipelines (depth, normals, intrinsics) built offline, for tests and benchmarks.

Laid out like prs-eth's v1-1 models: a U-Net that takes the image latent next to the noisy target latents
(4 + 4 x targets channels in, 4 x targets out), Stable Diffusion's VAE and an empty-prompt CLIP text encoder,
a DDIM sampler with v-prediction, trailing timesteps and a zero-terminal-SNR schedule (Marigold v1-1's
few-step recipe as its paper describes it; the hub's scheduler_config.json could not be read here, and the
estimators take whatever sampler a model folder ships), and the pipeline config a real model ships (default
steps and processing resolution,
prediction type, and for intrinsics the IID-Appearance target layout: albedo, then a "material" stack of
roughness, metallicity and an unused channel). The weights are random, so the maps are noise, but every call
runs the real diffusers pipeline. "tiny" is small enough for CPU tests; "sd2" has Stable Diffusion 2's real
sizes (about 1.3 B parameters) for speed and memory measurements.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    MarigoldDepthPipeline,
    MarigoldIntrinsicsPipeline,
    MarigoldNormalsPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from backend.tiny_model import _SCHEDULE, TINY_TEXT, TINY_UNET, TINY_VAE, _text_config, _tokenizer

KINDS = ("depth", "normals", "intrinsics")
ARCHITECTURES = ("tiny", "sd2")
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "depth": MarigoldDepthPipeline,
    "normals": MarigoldNormalsPipeline,
    "intrinsics": MarigoldIntrinsicsPipeline,
}
# marigold-iid-appearance-v1-1's targets: the albedo image, then roughness and metallicity stacked in one image.
IID_APPEARANCE_TARGETS = {
    "target_names": ["albedo", "material"],
    "albedo": {"prediction_space": "srgb"},
    "material": {"prediction_space": "stack", "sub_target_names": ["roughness", "metallicity", None]},
    "roughness": {"prediction_space": "linear"},
    "metallicity": {"prediction_space": "linear"},
}
DEFAULT_STEPS = 4  # the v1-1 models' default_denoising_steps
DEFAULT_RESOLUTION = 768

SD2_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    cross_attention_dim=1024,
    sample_size=96,
)
SD2_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    sample_size=768,
)
SD2_TEXT = dict(  # OpenCLIP ViT-H/14's text tower, as SD 2 ships it (the penultimate layer: 23 of 24)
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    projection_dim=512,
    hidden_act="gelu",
)


def _config(kind: str) -> dict:
    """The pipeline config a v1-1 model of this kind ships in its model_index.json."""
    common = dict(default_denoising_steps=DEFAULT_STEPS, default_processing_resolution=DEFAULT_RESOLUTION)
    if kind == "depth":
        return dict(common, prediction_type="depth", scale_invariant=True, shift_invariant=True)
    if kind == "normals":
        return dict(common, prediction_type="normals", use_full_z_range=True)
    return dict(common, prediction_type="intrinsics", target_properties=IID_APPEARANCE_TARGETS)


def _components(kind: str, architecture: str, seed: int, tokenizer: CLIPTokenizer) -> dict:
    targets = len(IID_APPEARANCE_TARGETS["target_names"]) if kind == "intrinsics" else 1
    tiny = architecture == "tiny"
    unet_kwargs = dict(TINY_UNET, cross_attention_dim=TINY_TEXT["hidden_size"]) if tiny else SD2_UNET
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4 + 4 * targets, out_channels=4 * targets, **unet_kwargs)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **(TINY_VAE if tiny else SD2_VAE))
    torch.manual_seed(seed)
    text_config = _text_config(tokenizer, 1000 if tiny else 49408, **(TINY_TEXT if tiny else SD2_TEXT))
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(
        **_SCHEDULE,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)


def make_test_estimator(path: str | Path, kind: str, *, seed: int = 0, architecture: str = "tiny") -> Path:
    """Write a random-weight Marigold pipeline folder of `kind` ("depth", "normals", "intrinsics") to `path`
    (safetensors) and return it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    path = Path(path).resolve()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _tokenizer(Path(scratch))
        pipe = PIPELINES[kind](**_components(kind, architecture, seed, tokenizer), **_config(kind))
        pipe.save_pretrained(path, safe_serialization=True)
    return path
