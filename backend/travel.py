"""Latent travel math: which keyframes and blend factor each frame gets, and how tensors blend.

A frame is (a, b, t): keyframe a's tensors blended toward keyframe b's by t in [0, 1). t = 0 returns key
a's tensors themselves (not a computation that rounds), so a keyframe's frame is exactly the plain
generation of that keyframe. Noise blends spherically (slerp): a straight line between two Gaussian samples
shrinks their norm mid-way and washes the frames out; slerp keeps it.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

EASINGS = {
    "linear": lambda t: t,
    "ease_in_out": lambda t: (1 - math.cos(math.pi * t)) / 2,  # rests at the keyframes, fastest mid-way
}
PARALLEL = 0.9995  # |cos| of the angle above which slerp falls back to a straight line (sin(angle) ~ 0)


@dataclass(frozen=True)
class Frame:
    start: int  # keyframe index blended from
    end: int  # keyframe index blended toward
    t: float  # 0 = keyframe `start` exactly

    @property
    def is_keyframe(self) -> bool:
        return self.t == 0


def frame_plan(keyframes: int, frames: int, loop: bool, easing: str = "linear") -> list[Frame]:
    """The frames of a travel through `keyframes` keys, `frames` per transition (the start key included, the
    next one not). Open: the last key ends the sequence, (keys - 1) * frames + 1 frames. Loop: one more
    transition, last key back to the first, keys * frames frames; the frame after the last would be frame 0,
    so the sequence plays as a cycle without a jump."""
    ease = EASINGS[easing]
    transitions = keyframes if loop else keyframes - 1
    plan = [Frame(k, (k + 1) % keyframes, ease(j / frames)) for k in range(transitions) for j in range(frames)]
    if not loop:
        plan.append(Frame(keyframes - 1, keyframes - 1, 0.0))
    return plan


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return a if t == 0 else a + (b - a) * t


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """Spherical interpolation over `dims` (the angle between a and b measured there; every other dim is a
    separate vector), computed in float32 at least. t = 0 returns `a` itself."""
    if t == 0:
        return a
    x, y = a.float(), b.float()
    norms = torch.linalg.vector_norm(x, dim=dims, keepdim=True) * torch.linalg.vector_norm(y, dim=dims, keepdim=True)
    cos = (x * y).sum(dims, keepdim=True) / norms
    cos = cos.clamp(-1.0, 1.0).nan_to_num(1.0)  # a zero vector has no direction: blend it straight
    angle = torch.acos(cos)
    sin = torch.sin(angle)
    parallel = cos.abs() > PARALLEL
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, torch.full_like(sin, 1 - t), torch.sin((1 - t) * angle) / safe)
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * angle) / safe)
    return (wa * x + wb * y).to(a.dtype)


def blend_embeddings(a: dict, b: dict, t: float, how: str) -> dict:
    """Prompt embeddings (the pipeline call's keyword arguments) of two keys blended by t: linear, or slerp
    per token vector."""
    if how == "slerp":
        return {name: slerp(a[name], b[name], t) for name in a}
    return {name: lerp(a[name], b[name], t) for name in a}


def blend_noise(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Initial latents (N, C, H, W) of two seeds blended by t: slerp over each sample."""
    return slerp(a, b, t, dims=(1, 2, 3))


@contextlib.contextmanager
def blended_step_noise(
    scheduler: SchedulerMixin, generators: list[torch.Generator], other: torch.Generator, t: float
) -> Iterator[None]:
    """Inside the block, the fresh noise `scheduler` draws at each step with `generators` (the list passed
    to the pipeline; ancestral and stochastic samplers draw some) is slerp(its draw, a draw from `other`, t).

    Both generators advance exactly as in a plain generation of their own seed, so at t = 0 the frame is key
    a's generation and a transition arrives at key b's. diffusers schedulers call the `randn_tensor` of their
    own module, which is swapped for the block (jobs run one at a time); deterministic samplers never call it.
    """
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    if original is None or t == 0:
        yield
        return

    def randn_tensor(shape, *args, generator=None, **kwargs) -> torch.Tensor:
        noise = original(shape, *args, generator=generator, **kwargs)
        if generator is not generators:
            return noise
        return blend_noise(noise, original(shape, *args, generator=other, **kwargs), t)

    module.randn_tensor = randn_tensor
    try:
        yield
    finally:
        module.randn_tensor = original
