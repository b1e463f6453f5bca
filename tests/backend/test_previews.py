"""Step previews: latents to a small RGB image, rows top to bottom, no VAE."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from backend.families import FAMILIES, SD
from backend.previews import latents_to_rgb, pooled, preview_event


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES)
def test_zero_latents_are_mid_grey_and_channels_mix_linearly(family):
    factors = family.preview_factors
    assert torch.equal(latents_to_rgb(torch.zeros(4, 2, 3), factors), torch.full((2, 3, 3), 127, dtype=torch.uint8))
    one_channel = torch.zeros(4, 1, 1)
    one_channel[0] = 1.0
    expected = [int((1 + f) * 127.5) for f in factors[0]]  # channel 0's row of the table
    assert latents_to_rgb(one_channel, factors)[0, 0].tolist() == expected


def test_preview_event_keeps_orientation_and_size():
    latents = torch.zeros(2, 4, 3, 5)  # a batch of two 3x5 latents; only the first is previewed
    latents[0, 0, 0, :] = 2.0  # top row bright
    latents[1] = -5.0
    event = preview_event(7, latents, SD.preview_factors)
    assert (event.step, event.width, event.height) == (7, 5, 3)
    rgb = np.frombuffer(base64.b64decode(event.rgb), dtype=np.uint8).reshape(event.height, event.width, 3)
    assert (rgb[0] > rgb[1]).all() and (rgb[1] == 127).all()


def test_decoded_previews_average_two_by_two_cells_and_odd_edges_alone():
    latents = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    half = pooled(latents)
    assert half.shape == (2, 2, 3)
    assert half[1, 0, 0] == latents[1, :2, :2].mean()  # a whole cell
    assert half[0, 0, 2] == latents[0, :2, 4].mean()  # the odd last column: its own 2 values
    assert half[0, 1, 2] == latents[0, 2, 4]  # the odd corner: one value
