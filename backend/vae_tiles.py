"""Exact tiled VAE decoding: 2K and 4K textures in a fraction of the device memory, seamless kept exact.

diffusers' tiled decode decodes overlapping tiles on their own and blends them: each GroupNorm sees only its
tile, and a seamless latent's wrap-around is lost, so it is approximate and stays off while seamless. Here the
decoder runs layer by layer as diffusers wrote it (AutoencoderKL._decode, Decoder.forward, 0.42.1):
- on the whole latent, where it is small: post_quant_conv, conv_in and the mid block with its attention;
- tile by tile from there: every 3x3 conv reads its tile with a one-pixel halo from the whole tensor, wrapping
  on the axes the seamless patch wraps (backend.seamless.wrap_of) and zero elsewhere, as the untiled conv pads;
  every GroupNorm normalises with the whole tensor's mean and variance (summed in float64 band by band); the
  nearest x2 upsample reads the low-resolution tile with its halo.
So a tiled decode equals the untiled one up to float rounding, and a seamless latent still decodes to a tiling
picture. The whole tensors between layers live in host memory when decoding on a GPU (`store`); only tiles
are on the device. On the CPU they share memory, and the saving is the untiled layers' temporaries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from backend.seamless import wrap_of

log = logging.getLogger(__name__)

TILE = 256  # tile side in each layer's own pixels: 128 channels x 258^2 floats is 34 MB
Span = tuple[int, int]  # [start, stop) along one axis


@dataclass(frozen=True)
class Grid:
    """Where a tiled decode computes (device), keeps the whole tensors (store) and how it cuts them."""

    device: torch.device
    store: torch.device
    dtype: torch.dtype
    wrap: tuple[bool, bool]  # (x, y), from the seamless patch
    tile: int = TILE

    def tiles(self, height: int, width: int) -> Iterator[tuple[Span, Span]]:
        for top in range(0, height, self.tile):
            for left in range(0, width, self.tile):
                yield (top, min(top + self.tile, height)), (left, min(left + self.tile, width))

    def read(self, whole: torch.Tensor, rows: Span, cols: Span, halo: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tile of `whole` with `halo` pixels around it, on the device, and a (h, w) mask of the pixels
        inside the picture (the halo outside it is read clamped and must be zeroed after pointwise layers)."""
        row_index, row_inside = _window(whole.shape[-2], rows, halo, self.wrap[1])
        col_index, col_inside = _window(whole.shape[-1], cols, halo, self.wrap[0])
        tile = whole.index_select(2, row_index.to(whole.device)).index_select(3, col_index.to(whole.device))
        inside = row_inside[:, None] & col_inside[None, :]
        return tile.to(self.device, self.dtype), inside.to(self.device)


def _window(length: int, span: Span, halo: int, wrap: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of span[0]-halo .. span[1]+halo along an axis of `length`: wrapped, or clamped with a mask."""
    index = torch.arange(span[0] - halo, span[1] + halo)
    if wrap:
        return index % length, torch.ones_like(index, dtype=torch.bool)
    return index.clamp(0, length - 1), (index >= 0) & (index < length)


def supports(vae: nn.Module) -> str | None:
    """Why this VAE's decoder cannot be tiled exactly here, or None when it can (SD 1.x/2.x, SDXL, SD3 and
    FLUX's AutoencoderKL all can)."""
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, Decoder) or not isinstance(decoder.conv_norm_out, nn.GroupNorm):
        return f"{type(vae).__name__} has no GroupNorm Decoder"
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            if not isinstance(resnet, ResnetBlock2D) or resnet.upsample or resnet.downsample or resnet.time_emb_proj:
                return f"{type(resnet).__name__} in {type(block).__name__} is not a plain resnet"
        for upsampler in block.upsamplers or ():
            if not isinstance(upsampler, Upsample2D) or upsampler.norm or not upsampler.use_conv:
                return f"{type(upsampler).__name__} is not a nearest x2 upsample with a conv"
            if upsampler.use_conv_transpose or not upsampler.interpolate:
                return f"{type(upsampler).__name__} is not a nearest x2 upsample with a conv"
    return None


def set_tiled(vae: nn.Module, tiled: bool) -> None:
    """Whether decode() tiles this VAE's decodes from now on (a per-request setting on the warm model)."""
    vae.sdtex_tiled_decode = tiled


def decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """vae.decode(latents).sample, in tiles when set_tiled(vae, True) said so and the decoder allows it."""
    if getattr(vae, "sdtex_tiled_decode", False):
        problem = supports(vae)
        if problem is None:
            return tiled_decode(vae, latents)
        log.warning("vae_tiling: decoding whole: %s", problem)
    return vae.decode(latents, return_dict=False)[0]


@torch.no_grad()
@apply_forward_hook  # model CPU offload moves the VAE onto the GPU first, as it does for vae.decode
def tiled_decode(vae: nn.Module, latents: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """vae.decode(latents).sample, computed tile by tile past the mid block (see the module's docstring);
    `latents` are scaled as vae.decode takes them. The picture comes back on the latents' device."""
    problem = supports(vae)
    if problem is not None:
        raise ValueError(f"vae_tiling: cannot decode exactly in tiles: {problem}")
    if tile < 8:
        raise ValueError(f"vae_tiling: tile must be at least 8 pixels, got {tile}")
    decoder = vae.decoder
    # 1. The whole latent: small, and the mid block's attention sees all of it
    sample = latents if vae.post_quant_conv is None else vae.post_quant_conv(latents)
    sample = decoder.mid_block(decoder.conv_in(sample), None)
    dtype = next(iter(decoder.up_blocks.parameters())).dtype
    store = torch.device("cpu") if sample.device.type == "cuda" else sample.device
    grid = Grid(sample.device, store, dtype, wrap_of(decoder.conv_out), tile)
    whole = sample.to(store, dtype)
    del sample
    # 2. The up blocks, layer by layer, tile by tile
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            whole = _resnet(grid, whole, resnet)
        for upsampler in block.upsamplers or ():
            whole = _conv_layer(grid, whole, upsampler.conv, None, upsample=True)
    # 3. Out: norm, activation, conv
    pre = _norm_act(grid, whole, decoder.conv_norm_out, decoder.conv_act)
    return _conv_layer(grid, whole, decoder.conv_out, pre).to(latents.device)


def _resnet(grid: Grid, whole: torch.Tensor, resnet: ResnetBlock2D) -> torch.Tensor:
    """ResnetBlock2D.forward without a time embedding: (shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))) / s."""
    hidden = _conv_layer(grid, whole, resnet.conv1, _norm_act(grid, whole, resnet.norm1, resnet.nonlinearity))
    act = resnet.nonlinearity

    def pre(tile: torch.Tensor) -> torch.Tensor:
        return resnet.dropout(act(_normalize(tile, resnet.norm2, mean, rstd)))

    def add_shortcut(rows: Span, cols: Span, out: torch.Tensor) -> torch.Tensor:
        skip, _ = grid.read(whole, rows, cols, halo=0)  # a 1x1 conv or none: no halo
        if resnet.conv_shortcut is not None:
            skip = resnet.conv_shortcut(skip)
        return (skip + out) / resnet.output_scale_factor

    mean, rstd = _group_stats(hidden, resnet.norm2)
    # Each tile reads `whole` only where it writes, so the output may overwrite it when the shapes agree.
    into = whole if resnet.conv_shortcut is None else None
    return _conv_layer(grid, hidden, resnet.conv2, pre, post=add_shortcut, into=into)


def _norm_act(grid: Grid, whole: torch.Tensor, norm: nn.GroupNorm, act: nn.Module) -> Callable:
    """act(norm(tile)) with the whole tensor's statistics."""
    mean, rstd = _group_stats(whole, norm)
    return lambda tile: act(_normalize(tile, norm, mean, rstd))


def _group_stats(whole: torch.Tensor, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1/sqrt(var + eps) per (sample, group) of the whole tensor, as nn.GroupNorm computes them
    (biased variance), summed in float64 over bands of rows."""
    batch, channels, height, width = whole.shape
    groups = norm.num_groups
    total = torch.zeros(batch, groups, dtype=torch.float64, device=whole.device)
    squares = torch.zeros_like(total)
    band = max(1, 2**24 // (batch * channels * width))  # rows per band: 128 MB of float64
    for top in range(0, height, band):
        values = whole[:, :, top : top + band].to(torch.float64).reshape(batch, groups, -1)
        total += values.sum(-1)
        squares += values.square().sum(-1)
    count = channels // groups * height * width
    mean = total / count
    variance = (squares / count - mean.square()).clamp_min(0)
    return mean, (variance + norm.eps).rsqrt()


def _normalize(tile: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """norm(tile) with the given statistics, in float32 as torch's GroupNorm computes half precision."""
    batch, channels = tile.shape[:2]
    grouped = tile.to(torch.float32).reshape(batch, norm.num_groups, -1)
    mean, rstd = mean.to(tile.device, torch.float32), rstd.to(tile.device, torch.float32)
    normal = ((grouped - mean[..., None]) * rstd[..., None]).reshape(tile.shape)
    if norm.affine:
        normal = normal * norm.weight.float()[None, :, None, None] + norm.bias.float()[None, :, None, None]
    return normal.to(tile.dtype)


def _conv_layer(
    grid: Grid,
    whole: torch.Tensor,
    conv: nn.Conv2d,
    pre: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    upsample: bool = False,
    post: Callable[[Span, Span, torch.Tensor], torch.Tensor] | None = None,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """conv(pre(whole)) with the conv's padding of 1 (x2 nearest upsampled first when `upsample`), tile by
    tile into a new whole tensor (or `into`); post(rows, cols, out) adds a residual on the output tile."""
    if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.dilation != (1, 1):
        raise ValueError(f"vae_tiling: expected a 3x3 conv with padding 1, got {conv}")
    batch, _, height, width = whole.shape
    scale = 2 if upsample else 1
    out = into
    if out is None:
        shape = (batch, conv.out_channels, height * scale, width * scale)
        out = torch.empty(shape, dtype=grid.dtype, device=grid.store)
    for rows, cols in grid.tiles(height, width):
        tile, inside = grid.read(whole, rows, cols, halo=1)
        if pre is not None:
            tile = pre(tile)
        if upsample:  # the upsampled halo is 2 pixels; the conv reads 1 of them
            tile = F.interpolate(tile, scale_factor=2.0, mode="nearest")[..., 1:-1, 1:-1]
            inside = inside.repeat_interleave(2, 0).repeat_interleave(2, 1)[1:-1, 1:-1]
        tile = torch.where(inside, tile, torch.zeros((), dtype=tile.dtype, device=tile.device))
        result = F.conv2d(tile, conv.weight, conv.bias)
        if post is not None:
            result = post(rows, cols, result)
        out[:, :, rows[0] * scale : rows[1] * scale, cols[0] * scale : cols[1] * scale] = result.to(grid.store)
    return out
