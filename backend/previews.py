"""Step previews of the first image of a batch: the latent approximation (a linear 4 -> 3 projection, no VAE:
microseconds; the factors are per family, backend.families: Family.preview_factors), or a tiny autoencoder's
decode (TAESD, backend.preview_decoder) when one is set and on disk, at half the picture's side (POOL).
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny

from backend.families import Factors
from sdtex_contract.protocol import PreviewEvent


def latents_to_rgb(latents: torch.Tensor, factors: Factors) -> torch.Tensor:
    """(4, h, w) latents of one image -> (h, w, 3) uint8 RGB."""
    weights = torch.tensor(factors, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents.float(), weights)
    return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu()


@torch.no_grad()
def decode_to_rgb(decoder: AutoencoderTiny, latents: torch.Tensor) -> torch.Tensor:
    """(C, h, w) latents of one image, as the denoising loop holds them -> (H, W, 3) uint8 RGB: the decode a
    pipeline with this AutoencoderTiny as its `vae` makes (latents / scaling_factor), through diffusers'
    VaeImageProcessor's own conversion (denormalize, then float, x255, round)."""
    latents = latents[None].to(decoder.device, decoder.dtype) / decoder.config.scaling_factor
    image = decoder.decode(latents, return_dict=False)[0][0]
    image = (image * 0.5 + 0.5).clamp(0, 1)
    return (image.permute(1, 2, 0).float() * 255).round().to(torch.uint8).cpu()


# A decoded preview is made from the latents averaged over POOL x POOL: half the picture's side and a quarter of the
# decode's arithmetic. At full size one TAESD decode is 9-10 % of an SD-1.5 CFG step's FLOPs, at half size under 3 %
# (benchmarks/previews.py). The viewport scales it up; it still has 4x the approximation's resolution.
POOL = 2
# Decoded previews may take at most this share of the job's time since its previews were set up: where a decode is
# slow for its step anyway (a CPU under load) some previews are skipped.
DECODE_BUDGET = 0.05


def pooled(latents: torch.Tensor) -> torch.Tensor:
    """(C, h, w) latents averaged over POOL x POOL cells (the last row or column alone where h or w is odd)."""
    return F.avg_pool2d(latents[None], POOL, ceil_mode=True)[0]


@dataclass
class Previewer:
    """How a job's previews are made. No factors: no previews (latents that are no image's, like the x4
    upscaler's)."""

    factors: Factors
    decoder: AutoencoderTiny | None = None
    decoder_name: str = ""  # the preview_decoder setting the decoder came from
    note: str = ""  # why previews are approximate although a decoder was set: sent once, with the first preview
    started: float = field(default_factory=time.perf_counter)  # set up just before denoising
    decoding: float = 0.0  # seconds spent decoding previews

    def __bool__(self) -> bool:
        return bool(self.factors)

    def due(self) -> bool:
        """Whether a preview fits the budget now: always for the approximation (microseconds); a decoded one while
        decoding took at most DECODE_BUDGET of the time so far (the first one always)."""
        return self.decoder is None or self.decoding <= DECODE_BUDGET * (time.perf_counter() - self.started)

    def event(self, step: int, latents: torch.Tensor) -> PreviewEvent:
        """A preview of the first image of a batch of latents (B, C, h, w)."""
        if self.decoder is not None:
            begun = time.perf_counter()
            rgb = decode_to_rgb(self.decoder, pooled(latents[0]))
            self.decoding += time.perf_counter() - begun
        else:
            rgb = latents_to_rgb(latents[0], self.factors)
        note, self.note = self.note, ""
        height, width, _ = rgb.shape
        data = base64.b64encode(rgb.numpy().tobytes()).decode()
        decoder = self.decoder_name if self.decoder is not None else ""
        return PreviewEvent(step=step, width=width, height=height, rgb=data, decoder=decoder, note=note)


def preview_event(step: int, latents: torch.Tensor, factors: Factors) -> PreviewEvent:
    """The latent approximation's preview of the first image of a batch of latents (B, 4, h, w)."""
    return Previewer(factors).event(step, latents)
