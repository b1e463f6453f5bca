"""Cached U-Net steps (DeepCache, Ma et al. 2023): the deep features change slowly from one step to the next,
so most U-Net calls reuse the last full call's and compute only the shallow blocks, reversibly.

The deep modules of a diffusers UNet2DConditionModel are its down blocks but the shallowest `branch` ones, its
mid block and the up blocks that match them. A "full" call runs everything and records each deep module's
output; a "cached" call hands the recorded outputs back without computing them, so only conv_in, the time (and
SDXL's added) embeddings, the shallow down and up blocks and conv_out run. The full calls follow DeepCache's
uniform schedule: the first one and every `interval`-th after it, and any call whose input differs in shape,
dtype or device from the recorded one (another batch size, CFG on or off).

What stays exact: the shallow blocks see this step's latents, timestep, prompt, ControlNet residuals (added to
the fresh shallow skip connections; the deep ones come with the recording), LoRA weights and seamless convs
(patched on the modules themselves, which run unchanged). The deep features are those of the last full step:
that is the approximation, and the quality cost the `speed` parameter states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from torch import nn

# speed -> (interval, branch): a full U-Net call every `interval` calls; `branch` shallow blocks always run.
SCHEDULES: dict[str, tuple[int, int] | None] = {"off": None, "fast": (4, 1), "faster": (6, 1)}


@dataclass
class _Recording:
    """The deep modules' outputs of the last full call, and which kind of call runs now."""

    interval: int
    key: tuple | None = None  # the full call's input (shape, dtype, device); None: nothing usable recorded
    cached_calls: int = 0  # cached calls since the last full one
    full: bool = True
    outputs: dict[int, object] = field(default_factory=dict)  # deep module index -> its output


def deep_modules(unet: UNet2DConditionModel, branch: int) -> list[nn.Module]:
    """The down blocks after the shallowest `branch`, the mid block, and the up blocks before the last `branch`."""
    ups = len(unet.up_blocks) - branch
    mid = [] if unet.mid_block is None else [unet.mid_block]
    return [*unet.down_blocks[branch:], *mid, *unet.up_blocks[:ups]]


def _counting_forward(forward: Callable, recording: _Recording) -> Callable:
    """The U-Net's forward, deciding before each call whether it runs full or cached."""

    def counted(sample: torch.Tensor, *args, **kwargs):
        key = (tuple(sample.shape), sample.dtype, sample.device)
        recording.full = key != recording.key or recording.cached_calls + 1 >= recording.interval
        if not recording.full:
            recording.cached_calls += 1
            return forward(sample, *args, **kwargs)
        recording.key = None  # a full call that fails half-way leaves nothing to reuse
        recording.outputs.clear()
        output = forward(sample, *args, **kwargs)
        recording.key, recording.cached_calls = key, 0
        return output

    counted.sdtex_deepcache = True  # marks a patched module, to refuse nesting
    return counted


def _cached_forward(forward: Callable, recording: _Recording, index: int) -> Callable:
    """A deep module's forward: computes and records on full calls, returns the recording on cached ones."""

    def cached(*args, **kwargs):
        if not recording.full:
            return recording.outputs[index]
        output = recording.outputs[index] = forward(*args, **kwargs)
        return output

    cached.sdtex_deepcache = True
    return cached


@contextlib.contextmanager
def reuse_deep_features(unet: UNet2DConditionModel, interval: int, branch: int) -> Iterator[None]:
    """Inside the block the U-Net runs full every `interval` calls and reuses the deep features between
    (branch: how many shallow down/up blocks always run). On exit every module's forward is exactly as before
    (also after an exception or a cancel), so the warm model serves the next request as loaded.

    Enter it once per denoising loop: the recording belongs to one run's latents. Nesting is refused.
    """
    # 1. Check the schedule against the model
    if interval < 1:
        raise ValueError(f"interval must be at least 1, got {interval}")
    if not 1 <= branch < len(unet.down_blocks):
        raise ValueError(f"branch must be 1 to {len(unet.down_blocks) - 1} for this U-Net, got {branch}")
    deep = deep_modules(unet, branch)
    patched = [unet, *deep]
    if any(getattr(module.__dict__.get("forward"), "sdtex_deepcache", False) for module in patched):
        raise RuntimeError("reuse_deep_features() is already active on this U-Net; nesting is not supported")

    # 2. Patch: instance attributes shadow the class's forward (wrapping any hook's forward already there)
    recording = _Recording(interval)
    originals = [(module, module.__dict__.get("forward")) for module in patched]
    try:
        unet.forward = _counting_forward(unet.forward, recording)
        for index, module in enumerate(deep):
            module.forward = _cached_forward(module.forward, recording, index)
        yield
    finally:
        # 3. Restore: drop our attribute, or put back the one that was there before
        for module, original in originals:
            if original is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = original
        recording.outputs.clear()


@contextlib.contextmanager
def deep_cache(unet: UNet2DConditionModel, speed: str) -> Iterator[None]:
    """reuse_deep_features with the schedule of a `speed` setting ("off": the U-Net untouched)."""
    if speed not in SCHEDULES:
        raise ValueError(f"speed must be one of {', '.join(SCHEDULES)}, got {speed!r}")
    schedule = SCHEDULES[speed]
    if schedule is None:
        yield
        return
    with reuse_deep_features(unet, *schedule):
        yield
