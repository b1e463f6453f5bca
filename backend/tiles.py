"""Pictures processed in overlapping tiles: the layout along each axis (wrapping around seamless axes), the
raised-cosine weights that blend the overlaps, and a Lanczos resize that wraps on seamless axes.

Model-free (numpy and Pillow). The tiled upscaler (backend/tasks/upscale.py) runs img2img on each tile and
blends the results here; a picture that tiles keeps tiling because on a wrapping axis the tiles go on past
the last pixel into the first, so the wrap-around edge is blended like any other tile border.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image


@dataclass(frozen=True)
class Span:
    """One tile's extent along one axis."""

    start: int  # first pixel; on a wrapping axis start + size may pass the end and continue at 0
    size: int
    fade_in: int  # pixels over which the weight rises from ~0 at `start` (0: no neighbour before it)
    fade_out: int  # pixels over which it falls to ~0 at the tile's end (0: no neighbour after it)

    def indices(self, length: int) -> np.ndarray:
        """The pixel indices the tile covers, wrapped into 0..length-1."""
        return (self.start + np.arange(self.size)) % length


def spans(length: int, tile: int, overlap: int, wrap: bool, align: int = 1) -> list[Span]:
    """Tiles of `tile` pixels covering an axis of `length` pixels, neighbours sharing at least about `overlap`
    pixels, starting on multiples of `align`. An axis no longer than a tile is one tile of its whole length.
    On a wrapping axis the tiles are spread evenly around the loop (the last one overlaps the first);
    otherwise the first starts at 0 and the last ends at `length` (`length` and `tile` multiples of align)."""
    if length <= tile:
        return [Span(0, length, 0, 0)]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be from 0 to {tile - 1} pixels for {tile}-pixel tiles, got {overlap}")
    if wrap:
        count = math.ceil(length / (tile - overlap))
        starts = [round(k * length / count / align) * align for k in range(count)]
        before = [starts[-1] - length, *starts[:-1]]  # the previous tile's start, the last one's moved back a loop
        after = [*starts[1:], starts[0] + length]
    else:
        count = math.ceil((length - tile) / (tile - overlap)) + 1
        starts = [round(k * (length - tile) / (count - 1) / align) * align for k in range(count)]
        before = [None, *starts[:-1]]
        after = [*starts[1:], None]
    result = []
    for start, previous, following in zip(starts, before, after, strict=True):
        fade_in = 0 if previous is None else min(previous + tile - start, tile // 2)
        fade_out = 0 if following is None else min(start + tile - following, tile // 2)
        result.append(Span(start, tile, fade_in, fade_out))
    return result


def ramp(width: int) -> np.ndarray:
    """A raised-cosine rise over `width` pixels, sampled at pixel centres: near 0 at the first, near 1 at the
    last, and with a neighbour's falling ramp over the same pixels it sums to exactly 1."""
    return 0.5 - 0.5 * np.cos(np.pi * (np.arange(width) + 0.5) / width)


def weights(span: Span) -> np.ndarray:
    """A tile's blend weight along one axis: 1 inside, fading at the sides that have a neighbour. Every
    weight is above 0, so each pixel's weights (normalised by their sum) blend smoothly from tile to tile."""
    w = np.ones(span.size)
    if span.fade_in:
        w[: span.fade_in] *= ramp(span.fade_in)
    if span.fade_out:
        w[span.size - span.fade_out :] *= ramp(span.fade_out)[::-1]
    return w


class Blender:
    """Accumulates weighted tiles into a canvas; `result()` divides by the summed weights."""

    def __init__(self, height: int, width: int, channels: int = 3):
        self.sum = np.zeros((height, width, channels), np.float32)  # 800 MB for an 8192 x 8192 result
        self.weight = np.zeros((height, width), np.float32)

    def add(self, tile: np.ndarray, rows: Span, cols: Span) -> None:
        """tile: (rows.size, cols.size, channels) floats."""
        height, width = self.weight.shape
        where = np.ix_(rows.indices(height), cols.indices(width))
        w = np.outer(weights(rows), weights(cols)).astype(np.float32)
        self.sum[where] += tile * w[..., None]
        self.weight[where] += w

    def result(self) -> np.ndarray:
        if not (self.weight > 0).all():
            raise RuntimeError("the tiles do not cover the canvas")
        return self.sum / self.weight[..., None]


def resize(image: PIL.Image.Image, width: int, height: int, wrap_x: bool, wrap_y: bool) -> PIL.Image.Image:
    """Lanczos resize; on a wrapping axis the filter reads across the wrap-around edge (the picture is padded
    circularly, then exactly its own area is resampled), so a picture that tiles still tiles, and rolling it
    by k pixels rolls an integer-factor enlargement by k times the factor, exactly."""
    if not (wrap_x or wrap_y):
        return image.resize((width, height), PIL.Image.LANCZOS)
    # Lanczos reads 3 source pixels each side when enlarging, 3 x the reduction when reducing.
    pad_x = math.ceil(3 * max(1.0, image.width / width)) + 1 if wrap_x else 0
    pad_y = math.ceil(3 * max(1.0, image.height / height)) + 1 if wrap_y else 0
    pixels = np.asarray(image)
    pad = ((pad_y, pad_y), (pad_x, pad_x)) + ((0, 0),) * (pixels.ndim - 2)
    padded = PIL.Image.fromarray(np.pad(pixels, pad, mode="wrap"))
    box = (pad_x, pad_y, pad_x + image.width, pad_y + image.height)
    return padded.resize((width, height), PIL.Image.LANCZOS, box=box)
