"""Cheap step previews: a linear 4 -> 3 projection of the latents, no VAE decode.

The factors are per family (backend.families: Family.preview_factors). Good enough to watch an image
form; they cost microseconds.
"""

from __future__ import annotations

import base64

import torch

from backend.families import Factors
from sdtex_contract.protocol import PreviewEvent


def latents_to_rgb(latents: torch.Tensor, factors: Factors) -> torch.Tensor:
    """(4, h, w) latents of one image -> (h, w, 3) uint8 RGB."""
    weights = torch.tensor(factors, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents.float(), weights)
    return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu()


def preview_event(step: int, latents: torch.Tensor, factors: Factors) -> PreviewEvent:
    """A preview of the first image of a batch of latents (B, 4, h, w)."""
    rgb = latents_to_rgb(latents[0], factors)
    height, width, _ = rgb.shape
    return PreviewEvent(step=step, width=width, height=height, rgb=base64.b64encode(rgb.numpy().tobytes()).decode())
