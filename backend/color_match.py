"""Colour matching between projection views (sequential mode): a later view's picture moved so that, where
it overlaps what earlier views painted, its colours have the same statistics as the paint there (Reinhard
et al. 2001, "Color Transfer between Images": per-channel mean and standard deviation in a perceptual
space; Lab here, through Pillow's ImageCms). Fitted on the overlap, where both pictures show the same
surface and should agree; applied to the whole picture, so the newly painted part shifts with it."""

from __future__ import annotations

import numpy as np
import PIL.Image
from PIL import ImageCms

MIN_OVERLAP = 64  # pixels: fewer give statistics too noisy to move a whole picture by
_SRGB, _LAB = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
_TO_LAB = ImageCms.buildTransform(_SRGB, _LAB, "RGB", "LAB")
_FROM_LAB = ImageCms.buildTransform(_LAB, _SRGB, "LAB", "RGB")


def to_lab(picture: PIL.Image.Image) -> np.ndarray:
    """float [H, W, 3]: L, a, b as Pillow's 8-bit LAB mode stores them (L 0..255, a and b offset by 128)."""
    lab = np.asarray(ImageCms.applyTransform(picture.convert("RGB"), _TO_LAB), dtype=np.float64)
    return np.where(np.arange(3) == 0, lab, (lab + 128) % 256)  # a, b are stored as signed bytes


def from_lab(lab: np.ndarray) -> PIL.Image.Image:
    stored = np.where(np.arange(3) == 0, lab, lab - 128) % 256  # back to signed bytes for a and b
    picture = PIL.Image.fromarray(np.rint(stored).astype(np.uint8), "LAB")
    return ImageCms.applyTransform(picture, _FROM_LAB)


def match_colors(picture: PIL.Image.Image, reference: PIL.Image.Image, overlap: np.ndarray) -> PIL.Image.Image:
    """`picture` with its Lab channels shifted and scaled so that on `overlap` (bool [H, W]) their mean and
    standard deviation equal `reference`'s there; unchanged when the overlap has under MIN_OVERLAP pixels."""
    if picture.size != reference.size or overlap.shape != (picture.height, picture.width):
        raise ValueError(f"sizes differ: picture {picture.size}, reference {reference.size}, overlap {overlap.shape}")
    if int(overlap.sum()) < MIN_OVERLAP:
        return picture.convert("RGB")
    lab, target = to_lab(picture), to_lab(reference)
    mean, std = lab[overlap].mean(0), lab[overlap].std(0)
    goal_mean, goal_std = target[overlap].mean(0), target[overlap].std(0)
    scale = np.where(std > 1e-3, goal_std / np.maximum(std, 1e-3), 1.0)
    moved = (lab - mean) * scale + goal_mean
    low, high = np.array([0.0, 1.0, 1.0]), np.array([255.0, 255.0, 255.0])  # a, b: -127..127 around 128
    return from_lab(np.clip(moved, low, high))
