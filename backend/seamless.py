"""Seamless (tileable) generation: circular padding on every convolution, per axis, reversibly.

With every Conv2d of the U-Net and the VAE padding circularly, the whole txt2img pipeline commutes with
circular shifts of the initial latents, so the decoded image wraps around exactly: its left edge continues
its right edge (axis "x") and/or its top edge continues its bottom edge (axis "y").

The VAE encoder's Downsample2D pads (0, 1, 0, 1) with zeros by hand before its stride-2, padding-0 conv,
which no conv patch can see: inside the block that pad wraps too on the tiled axes, so encoding a picture
(img2img, inpainting, upscaling) commutes with circular shifts as exactly as decoding does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from diffusers.models.downsampling import Downsample2D
from torch import nn

AXES = ("none", "x", "y", "xy")


def wrap_axes(axes: str) -> tuple[bool, bool]:
    """(wrap_x, wrap_y) for a seamless value "none", "x", "y" or "xy"."""
    if axes not in AXES:
        raise ValueError(f"seamless axes must be one of {', '.join(AXES)}, got {axes!r}")
    return "x" in axes, "y" in axes


def _padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """The conv's own padding as F.pad's (left, right, top, bottom)."""
    if conv.padding == "valid":
        return 0, 0, 0, 0
    if conv.padding == "same":  # split as torch does: the odd pixel goes right/bottom
        total_y, total_x = (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
        return total_x // 2, total_x - total_x // 2, total_y // 2, total_y - total_y // 2
    height, width = conv.padding
    return width, width, height, height


def _padded_conv_forward(conv: nn.Conv2d, wrap_x: bool, wrap_y: bool):
    """A replacement for conv._conv_forward that pads each axis itself, then convolves with padding 0."""
    left, right, top, bottom = _padding(conv)
    # The axis that does not tile keeps the conv's own padding mode (zeros for every Stable Diffusion conv).
    other = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    mode_x, mode_y = ("circular" if wrap_x else other), ("circular" if wrap_y else other)

    def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = F.pad(x, (left, right, 0, 0), mode=mode_x)
        x = F.pad(x, (0, 0, top, bottom), mode=mode_y)
        return F.conv2d(x, weight, bias, conv.stride, 0, conv.dilation, conv.groups)

    conv_forward.sdtex_seamless = True  # marks a patched conv, to refuse nesting
    conv_forward.sdtex_wrap = (wrap_x, wrap_y)  # read by the exact tiled decode (backend/vae_tiles.py)
    return conv_forward


def _downsamplers(modules: Iterable[nn.Module]) -> dict[int, Downsample2D]:
    """The Downsample2D layers that pad by hand before their conv (the VAE encoder's: conv with padding 0)."""
    return {
        id(sub): sub
        for module in modules
        for sub in module.modules()
        if isinstance(sub, Downsample2D) and sub.use_conv and sub.padding == 0
    }


def _padded_downsample_forward(layer: Downsample2D, wrap_x: bool, wrap_y: bool):
    """A replacement for Downsample2D.forward whose (0, 1, 0, 1) pad wraps on the tiled axes (zeros on the others).

    Adapted from diffusers.models.downsampling.Downsample2D.forward (0.42.1), padding == 0 branch: a stride-2
    conv of a width-W input reads columns 2j..2j+2, so the padded column W is read only by the last output
    column, which now sees column 0 there, as a circular conv would.
    """
    mode_x, mode_y = ("circular" if wrap_x else "constant"), ("circular" if wrap_y else "constant")

    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if layer.norm is not None:
            hidden_states = layer.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        hidden_states = F.pad(hidden_states, (0, 1, 0, 0), mode=mode_x)
        hidden_states = F.pad(hidden_states, (0, 0, 0, 1), mode=mode_y)
        return layer.conv(hidden_states)

    forward.sdtex_seamless = True
    return forward


def wrap_of(conv: nn.Conv2d) -> tuple[bool, bool]:
    """(wrap_x, wrap_y) of a conv inside seamless(): the axes it pads circularly now; (False, False) outside."""
    return getattr(conv.__dict__.get("_conv_forward"), "sdtex_wrap", (False, False))


@contextlib.contextmanager
def seamless(modules: Iterable[nn.Module], axes: str) -> Iterator[None]:
    """Inside the block every nn.Conv2d in `modules` pads circularly on `axes` ("none","x","y","xy")
    and with zeros (its own padding mode) on the other axis, and so does every Downsample2D that pads by hand
    (the VAE encoder's); on exit every conv and layer is exactly as before (reversible, so one warm model
    serves tiled and untiled requests in any order, also after an exception).

    Nesting is refused (RuntimeError) rather than stacking patches. Calling with axes="none" is a no-op.
    Turn diffusers' VAE tiling off while this is on (each of its tiles would wrap on its own); backend.vae_tiles
    decodes in tiles exactly, seamless included.
    """
    wrap_x, wrap_y = wrap_axes(axes)
    if not (wrap_x or wrap_y):
        yield
        return

    # 1. Collect each conv once (a module may be listed twice, or inside another listed module)
    convs: dict[int, nn.Conv2d] = {}
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d) and any(_padding(sub)):  # 1x1 and "valid" convs never pad
                convs[id(sub)] = sub
    layers = _downsamplers(modules)
    patched = [*((c, "_conv_forward") for c in convs.values()), *((d, "forward") for d in layers.values())]
    if any(getattr(m.__dict__.get(name), "sdtex_seamless", False) for m, name in patched):
        raise RuntimeError("seamless() is already active on these modules; nesting is not supported")

    # 2. Patch: instance attributes shadow Conv2d._conv_forward (which Conv2d.forward calls) and
    # Downsample2D.forward (which nn.Module.__call__ looks up on the instance first)
    originals = [(m, name, m.__dict__.get(name)) for m, name in patched]
    try:
        for conv in convs.values():
            conv._conv_forward = _padded_conv_forward(conv, wrap_x, wrap_y)
        for layer in layers.values():
            layer.forward = _padded_downsample_forward(layer, wrap_x, wrap_y)
        yield
    finally:
        # 3. Restore: drop our attribute, or put back one that was there before
        for module, name, original in originals:
            if original is None:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, original)
