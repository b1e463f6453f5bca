"""Cheap step previews: a linear 4 -> 3 projection of the latents, no VAE decode.

The factors are the widely used least-squares fits from latent channels to RGB for the SD 1.x/2.x and
SDXL VAEs. Good enough to watch an image form; they cost microseconds.
"""

from __future__ import annotations

import base64

import torch

from blender_sd_addon.protocol import PreviewEvent

SD_FACTORS = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)


def latents_to_rgb(latents: torch.Tensor, factors: tuple = SD_FACTORS) -> torch.Tensor:
    """(4, h, w) latents of one image -> (h, w, 3) uint8 RGB."""
    weights = torch.tensor(factors, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents.float(), weights)
    return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu()


def preview_event(step: int, latents: torch.Tensor, factors: tuple = SD_FACTORS) -> PreviewEvent:
    """A preview of the first image of a batch of latents (B, 4, h, w)."""
    rgb = latents_to_rgb(latents[0], factors)
    height, width, _ = rgb.shape
    return PreviewEvent(step=step, width=width, height=height, rgb=base64.b64encode(rgb.numpy().tobytes()).decode())
