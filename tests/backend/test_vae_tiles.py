"""The exact tiled VAE decode (backend/vae_tiles.py): equal to the whole decode, seamless kept, in the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from backend import vae_tiles
from backend.models import ModelManager
from backend.seamless import seamless
from backend.tasks.txt2img import run_txt2img
from sdtex_contract.protocol import GenerateParams


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    """Three up blocks with a channel change (64 -> 32: a 1x1 shortcut) and two x2 upsamples, random weights."""
    torch.manual_seed(0)
    model = AutoencoderKL(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8,
    ).eval()
    assert any(r.conv_shortcut is not None for b in model.decoder.up_blocks for r in b.resnets)
    return model


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(1))  # not square, a batch of 2


@pytest.mark.parametrize("axes", ["none", "x", "y", "xy"])
@pytest.mark.parametrize("tile", [8, 13])  # 13 cuts every layer unevenly
def test_tiled_decode_equals_the_whole_decode(vae, latents, axes, tile):
    with torch.no_grad(), seamless([vae], axes):
        whole = vae.decode(latents).sample
        tiled = vae_tiles.tiled_decode(vae, latents, tile=tile)
    assert tiled.shape == whole.shape == (2, 3, 96, 160)
    assert (tiled - whole).abs().max() < 1e-3


def test_tiles_without_the_wrapping_halo_would_put_seams_back(vae, latents, monkeypatch):
    """The check above is sharp: with the halo read clamped instead of wrapped, the tiled decode of a seamless
    latent leaves the whole decode at the picture's borders."""
    monkeypatch.setattr(vae_tiles, "wrap_of", lambda conv: (False, False))
    with torch.no_grad(), seamless([vae], "xy"):
        whole = vae.decode(latents).sample
        unwrapped = vae_tiles.tiled_decode(vae, latents, tile=8)
    error = (unwrapped - whole).abs()
    assert error[..., :, :2].mean() > 1e-2 and error[..., :2, :].mean() > 1e-2


def test_a_seamless_latent_still_tiles_when_decoded_in_tiles(vae, latents):
    """Roll-equivariance: rolling the latent by (3, 5) rolls the picture by (12, 20), borders included."""
    rolled = torch.roll(latents, (3, 5), (2, 3))
    with torch.no_grad(), seamless([vae], "xy"):
        picture = vae_tiles.tiled_decode(vae, latents, tile=8)
        of_rolled = vae_tiles.tiled_decode(vae, rolled, tile=8)
    assert (of_rolled - torch.roll(picture, (12, 20), (2, 3))).abs().max() < 1e-4


def test_decode_tiles_only_when_set_and_possible(vae, latents):
    with torch.no_grad():
        whole = vae.decode(latents).sample
        vae_tiles.set_tiled(vae, False)
        assert torch.equal(vae_tiles.decode(vae, latents), whole)  # diffusers' own call, bit for bit
        vae_tiles.set_tiled(vae, True)
        tiled = vae_tiles.decode(vae, latents)
        vae_tiles.set_tiled(vae, False)
    assert not torch.equal(tiled, whole) and (tiled - whole).abs().max() < 1e-3  # another path, same picture


def test_a_decoder_without_groupnorm_is_decoded_whole():
    blocks = {"encoder_block_out_channels": (8, 8), "decoder_block_out_channels": (8, 8)}
    tiny = AutoencoderTiny(**blocks, num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).eval()
    assert "AutoencoderTiny" in vae_tiles.supports(tiny)
    with pytest.raises(ValueError, match="vae_tiling"):
        vae_tiles.tiled_decode(tiny, torch.zeros(1, 4, 8, 8))
    vae_tiles.set_tiled(tiny, True)
    with torch.no_grad():
        assert torch.equal(vae_tiles.decode(tiny, torch.ones(1, 4, 8, 8)), tiny.decode(torch.ones(1, 4, 8, 8))[0])


def test_txt2img_with_vae_tiling_gives_the_same_seamless_texture(tiny_model_dir):
    """Through the model manager (vae_tiling is a per-request option) and the whole txt2img task."""
    manager = ModelManager()

    def texture(vae_tiling: bool) -> np.ndarray:
        params = GenerateParams(
            model=str(tiny_model_dir), prompt="bricks", steps=2, width=96, height=64, seed=7,
            seamless="xy", vae_tiling=vae_tiling, output_dir="/unused",
        )  # fmt: skip
        model, _ = manager.get(params)
        return np.asarray(run_txt2img(model.pipe, params).images[0]).astype(int)

    whole, tiled = texture(False), texture(True)
    assert manager.loaded.pipe.vae.sdtex_tiled_decode
    assert np.abs(tiled - whole).max() <= 1  # one 8-bit level of rounding at most
