"""Seamless (tileable) generation: circular padding on every convolution, per axis, reversibly.

With every Conv2d of the U-Net and the VAE padding circularly, the whole txt2img pipeline commutes with
circular shifts of the initial latents, so the decoded image wraps around exactly: its left edge continues
its right edge (axis "x") and/or its top edge continues its bottom edge (axis "y").

Only the VAE decoder is covered completely. The VAE encoder's Downsample2D pads with zeros explicitly
before a padding=0 conv, which no conv patch can see; img2img encoding must handle that itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
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
    return conv_forward


@contextlib.contextmanager
def seamless(modules: Iterable[nn.Module], axes: str) -> Iterator[None]:
    """Inside the block every nn.Conv2d in `modules` pads circularly on `axes` ("none","x","y","xy")
    and with zeros (its own padding mode) on the other axis; on exit every conv is exactly as before
    (reversible, so one warm model serves tiled and untiled requests in any order, also after an exception).

    Nesting is refused (RuntimeError) rather than stacking patches. Calling with axes="none" is a no-op.
    Turn VAE tiling off while this is on: each tile would wrap on its own.
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
    if any(getattr(conv.__dict__.get("_conv_forward"), "sdtex_seamless", False) for conv in convs.values()):
        raise RuntimeError("seamless() is already active on these modules; nesting is not supported")

    # 2. Patch: an instance attribute shadows Conv2d._conv_forward, which Conv2d.forward calls
    originals = {key: conv.__dict__.get("_conv_forward") for key, conv in convs.items()}
    try:
        for conv in convs.values():
            conv._conv_forward = _padded_conv_forward(conv, wrap_x, wrap_y)
        yield
    finally:
        # 3. Restore: drop our attribute, or put back one that was there before
        for key, conv in convs.items():
            if originals[key] is None:
                conv.__dict__.pop("_conv_forward", None)
            else:
                conv._conv_forward = originals[key]
