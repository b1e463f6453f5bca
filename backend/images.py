"""Input pictures made ready for a pipeline: any mode to RGB, fitted to the requested size, and the axes on
which a picture already tiles ("auto" seamless).

Blender-free and model-free (Pillow and numpy only), shared by every task that starts from an image.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageOps

# A picture tiles on an axis when the step across its wrap-around edge is no larger than the steps between
# neighbouring rows (or columns) inside it: the edge must not stand out from this many typical steps.
SEAM_TOLERANCE = 1.5


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any Pillow mode (CMYK, 16-bit, greyscale, paletted, with alpha) as 8-bit RGB; transparency is dropped
    (a mask, when one is wanted, is read from the alpha channel before this)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits, don't clip
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "I" or values.max() > 255 else 255.0
        image = PIL.Image.fromarray(np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = PIL.Image.fromarray(np.clip(np.asarray(image) * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("RGB")


def fit(image: PIL.Image.Image, width: int, height: int, mode: str) -> PIL.Image.Image:
    """The picture at width x height: "fit" scales it to fit inside and pads the rest with its edge pixels,
    "fill" scales it to cover and crops the middle, "stretch" ignores the aspect ratio, "keep" leaves it
    as it is (the caller then uses the picture's own size)."""
    if mode == "keep" or image.size == (width, height):
        return image
    if mode == "stretch":
        return image.resize((width, height), PIL.Image.LANCZOS)
    if mode == "fill":
        return PIL.ImageOps.fit(image, (width, height), PIL.Image.LANCZOS)
    if mode != "fit":
        raise ValueError(f"mode must be one of fit, fill, stretch, keep, got {mode!r}")
    inner = PIL.ImageOps.contain(image, (width, height), PIL.Image.LANCZOS)
    pixels = np.asarray(inner)
    top, left = (height - inner.height) // 2, (width - inner.width) // 2
    pad = ((top, height - inner.height - top), (left, width - inner.width - left)) + ((0, 0),) * (pixels.ndim - 2)
    return PIL.Image.fromarray(np.pad(pixels, pad, mode="edge"))


def tiling_axes(image: PIL.Image.Image) -> str:
    """The axes ("none", "x", "y" or "xy") on which a picture already tiles: the jump across its wrap-around
    edge is no larger than the typical jump between neighbouring columns (x) or rows (y) inside it."""
    pixels = np.asarray(to_rgb(image), dtype=np.float64)
    axes = ""
    for name, axis in (("x", 1), ("y", 0)):
        inner = np.abs(np.diff(pixels, axis=axis)).mean(axis=tuple(a for a in range(pixels.ndim) if a != axis))
        first, last = np.take(pixels, 0, axis=axis), np.take(pixels, -1, axis=axis)
        seam = np.abs(first - last).mean()
        if seam <= SEAM_TOLERANCE * np.median(inner) + 1e-9:
            axes += name
    return axes or "none"
