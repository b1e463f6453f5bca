"""Seeded random Stable Diffusion pipelines built offline, for tests and benchmarks.

The weights are random, so the images are noise, but every call runs the real diffusers pipeline:
tokenizer, text encoder, U-Net, scheduler and VAE. "tiny" (SD 1.x layout) and "tiny-sdxl" (SDXL layout:
two text encoders, size conditioning, a VAE with latents mean/std) are small enough for CPU tests;
"tiny-inpaint" is "tiny" with a 9-channel inpainting U-Net (latents + mask + masked-image latents), saved
as a StableDiffusionInpaintPipeline like real inpainting models; "sd15" is the real SD-1.5 architecture
(about 1 B parameters) for speed and memory measurements; "tiny-upscaler" is a tiny SD x4 upscaler
(StableDiffusionUpscalePipeline); "tiny-taesd" is a tiny AutoencoderTiny (a TAESD preview decoder) for "tiny"
and "tiny-sdxl" (4 latent channels, upsampling x2 like their VAEs).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ARCHITECTURES = ("tiny", "tiny-sdxl", "tiny-inpaint", "sd15", "tiny-upscaler", "tiny-taesd")
TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32,
)
TINY_VAE = dict(
    block_out_channels=[32, 64],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    norm_num_groups=32,
    sample_size=64,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters byte-level BPE uses for raw bytes (as in GPT-2 and CLIP)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer over single characters (514 ids): no merges, so any text tokenizes offline."""
    chars = _bytes_to_unicode()
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n", encoding="utf-8")
    # transformers 5 ignores the v4 keywords vocab_file=/merges_file=: pass the paths positionally.
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)


# The noise schedule SD 1.5 and SDXL share; each ships its own default sampler.
_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _text_config(tokenizer: CLIPTokenizer, vocab_size: int, **kwargs) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def _components(architecture: str, seed: int, tokenizer: CLIPTokenizer) -> dict:
    """An SD 1.x pipeline's components."""
    tiny = architecture in ("tiny", "tiny-inpaint")
    if tiny:
        unet_kwargs = dict(TINY_UNET, cross_attention_dim=32)
        vae_kwargs = TINY_VAE
        text_kwargs = TINY_TEXT
    else:  # sd15: diffusers' defaults are SD-1.5's U-Net; the VAE and CLIP ViT-L/14 text encoder are spelled out
        unet_kwargs = dict(cross_attention_dim=768, sample_size=64)
        vae_kwargs = dict(
            block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2,
            sample_size=512,
        )
        text_kwargs = dict(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    torch.manual_seed(seed)
    in_channels = 9 if architecture == "tiny-inpaint" else 4  # inpainting: latents + mask + masked image
    unet = UNet2DConditionModel(in_channels=in_channels, out_channels=4, **unet_kwargs)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **vae_kwargs)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer, 1000 if tiny else 49408, **text_kwargs))
    # SD 1.5's own sampler config.
    scheduler = PNDMScheduler(**_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def _tiny_sdxl_components(seed: int, tokenizer: CLIPTokenizer) -> dict:
    """A tiny SDXL pipeline's components, with every input SDXL adds over SD 1.x wired to matching sizes."""
    hidden_1, hidden_2, projection = TINY_TEXT["hidden_size"], 48, 16  # unequal: a mix-up of the encoders fails
    time_embed_dim = 8  # per number of add_time_ids: original size, crop corner, target size (6 numbers)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        **TINY_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=hidden_1 + hidden_2,  # both encoders' penultimate hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection,  # + encoder 2's pooled embedding
    )
    torch.manual_seed(seed)
    # SDXL's VAE scale and fp16 upcast, plus per-channel latents mean/std (as Playground v2.5's VAE has) so
    # decoding runs the denormalising branch too.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        **TINY_VAE,
        scaling_factor=0.13025,
        force_upcast=True,
        latents_mean=(0.2, -0.1, 0.05, -0.3),
        latents_std=(0.9, 1.1, 0.8, 1.2),
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer, 1000, **TINY_TEXT))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer, 1000, **dict(TINY_TEXT, hidden_size=hidden_2, projection_dim=projection))
    )
    # SDXL base's own sampler config.
    scheduler = EulerDiscreteScheduler(**_SCHEDULE, steps_offset=1, timestep_spacing="leading")
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=scheduler,
    )


def _tiny_upscaler_components(seed: int, tokenizer: CLIPTokenizer) -> dict:
    """A tiny SD x4 upscaler ("tiny-upscaler"), laid out like stabilityai/stable-diffusion-x4-upscaler: a U-Net
    taking 7 channels (4 latent + the 3-channel small image) with the image's noise level as a class
    embedding, a 3-level VAE (scale factor 4) with scaling 0.08333, a DDPM scheduler that noises the small
    image, and a v-prediction sampler."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        in_channels=7,
        out_channels=4,
        **TINY_UNET,
        cross_attention_dim=TINY_TEXT["hidden_size"],
        attention_head_dim=8,
        use_linear_projection=True,
        num_class_embeds=1000,  # noise levels 0..max_noise_level (350)
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        **dict(
            TINY_VAE,
            block_out_channels=[32, 32, 64],
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
        ),
        scaling_factor=0.08333,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer, 1000, **TINY_TEXT))
    linear = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        low_res_scheduler=DDPMScheduler(**dict(linear, beta_schedule="linear")),
        scheduler=DDIMScheduler(**linear, prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False),
    )


def make_test_model(path: str | Path, *, seed: int = 0, architecture: str = "tiny") -> Path:
    """Write a random-weight pipeline folder (safetensors) to `path` and return it: a
    StableDiffusionXLPipeline for "tiny-sdxl", a StableDiffusionInpaintPipeline for "tiny-inpaint", a
    StableDiffusionUpscalePipeline for "tiny-upscaler", an AutoencoderTiny for "tiny-taesd", a
    StableDiffusionPipeline otherwise."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    if architecture == "tiny-taesd":
        return make_test_preview_decoder(path, seed=seed)
    path = Path(path).resolve()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _tokenizer(Path(scratch))
        pipe: DiffusionPipeline
        if architecture == "tiny-upscaler":
            pipe = StableDiffusionUpscalePipeline(**_tiny_upscaler_components(seed, tokenizer), max_noise_level=350)
        elif architecture == "tiny-sdxl":
            pipe = StableDiffusionXLPipeline(**_tiny_sdxl_components(seed, tokenizer), add_watermarker=False)
        else:
            cls = StableDiffusionInpaintPipeline if architecture == "tiny-inpaint" else StableDiffusionPipeline
            pipe = cls(
                **_components(architecture, seed, tokenizer),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_test_preview_decoder(path: str | Path, *, seed: int = 0, latent_channels: int = 4) -> Path:
    """Write a random-weight AutoencoderTiny folder (safetensors) to `path`: TAESD's layout with fewer, narrower
    blocks (two levels: upsampling x2, the tiny VAEs' factor)."""
    torch.manual_seed(seed)
    path = Path(path).resolve()
    decoder = AutoencoderTiny(
        encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
        num_encoder_blocks=(1, 2), num_decoder_blocks=(2, 1), latent_channels=latent_channels,
    )  # fmt: skip
    decoder.save_pretrained(path, safe_serialization=True)
    return path


def make_test_controlnet(path: str | Path, model: str | Path, *, seed: int = 0) -> Path:
    """Write a random-weight ControlNet for the pipeline folder `model` to `path` (safetensors): built from its
    U-Net by ControlNetModel.from_unet, with a conditioning embedding that downsamples as much as the VAE
    does, and its zero-initialised output convolutions given seeded random weights, so the control image
    changes the result (a fresh ControlNet adds exactly nothing)."""
    from diffusers import ControlNetModel

    path, model = Path(path).resolve(), Path(model)
    if not (model / "unet" / "config.json").is_file() or not (model / "vae" / "config.json").is_file():
        raise ValueError(f"{model} is not a model folder (no unet/ and vae/ configs): make one with make-test-model")
    vae = json.loads((model / "vae" / "config.json").read_text(encoding="utf-8"))
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    if unet.config.in_channels != vae.get("latent_channels", 4):  # an inpainting or upscaler U-Net
        raise ValueError(f"{model}'s U-Net takes {unet.config.in_channels} channels: ControlNets here go with "
                         "text-to-image models (architecture tiny or tiny-sdxl)")  # fmt: skip
    vae_levels = len(vae["block_out_channels"])
    channels = (16, 32, 96, 256)[:vae_levels]  # one stride-2 block per VAE downsampling
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                     controlnet.controlnet_cond_embedding.conv_out):  # fmt: skip
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
    controlnet.save_pretrained(path, safe_serialization=True)
    return path
