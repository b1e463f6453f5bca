"""Synchronized multi-view denoising (after SyncMVD, Liu et al. 2023): all views of a projection job are
denoised together, and at every synchronized step each view's predicted clean latent is replaced by the render
of one shared latent texture baked from every view's prediction. The views then agree on every texel.

Why replacing the prediction is enough: the samplers allowed here step linearly and without fresh noise, from
the sample and the predicted clean latents (x_{t-1} = c0 * x0 + c1 * x_t, plus past x0 for multistep ones).
Every view starts from the same noise texture rendered into it, so by induction each view's sample is the
render of one texture sample, and stepping each view is stepping that texture. No latent texture is kept
between steps and no texel is filled: rendering is a lookup (nearest texel), which keeps the noise's statistics.

Conventions are backend.projection's. A latent pixel shows the texel under its centre; a texel takes, from each
view that sees it (depth test, facing), the latents at its position, read bilinearly from the (up to) four
pixels around it that show its own surface nearby (never the background or a surface behind it), weighted by
facing ** exponent. Reading the predictions bilinearly is safe: only the rendering (nearest) must stay one
lookup for the induction. The exponent anneals from 0 (all views alike) to EXPONENT over the synchronized
steps, as SyncMVD's does.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from backend import projection as geometry
from sdtex_contract.protocol import INVALID_PARAMS, ProtocolError

EXPONENT = 6.0  # facing-weight exponent at the end of the synchronized steps (and for the final RGB bake)
# Samplers that add fresh noise per view at every step would pull the views apart: their deterministic twins.
DETERMINISTIC = {"euler_a": "euler", "euler_a_trailing": "ddim_trailing", "ddpm": "ddim"}
REFUSED = ("lcm", "tcd")  # few-step samplers that draw new noise every step and have no deterministic twin


def sync_scheduler(name: str) -> tuple[str, str]:
    """(the sampler synchronized mode runs for `name`, a warning when it is not `name` itself)."""
    if name in REFUSED:
        raise ProtocolError(
            INVALID_PARAMS,
            f"scheduler {name!r} draws fresh noise for every view at every step, which pulls synchronized views "
            "apart: pick another sampler (DDIM Trailing suits few steps) or mode 'sequential'",
            {"param": "scheduler", "accepted": "any sampler but " + ", ".join(REFUSED), "value": name},
        )
    twin = DETERMINISTIC.get(name, name)
    note = "" if twin == name else f"synchronized mode sampled with {twin} ({name} adds noise per view)"
    return twin, note


@dataclass
class LatentViews:
    """Where the views' latent pixels and the objects' latent texels meet (all objects' texels in one list)."""

    shape: tuple[int, int, int]  # views, latent height, latent width
    bake_texel: torch.Tensor  # long [n]: for each (view, texel) sighting, the texel...
    bake_pixel: torch.Tensor  # long [n, 4]: ...the flat pixels (view * h * w + row * w + column) around it...
    bake_tap: torch.Tensor  # float [n, 4]: ...their bilinear weights (0 for a pixel off its surface, sum 1)...
    bake_facing: torch.Tensor  # float [n]: ...and its facing cosine
    shown_pixel: torch.Tensor  # long [m]: textured pixels whose centre lies on a texel...
    shown_texel: torch.Tensor  # long [m]: ...and that texel
    texels: int  # how many texels in all

    @classmethod
    def build(cls, mesh: geometry.Mesh, cameras: list[geometry.Camera], factor: int, texture: int) -> LatentViews:
        """The views' cameras at 1 / factor of their size (the latents'), the objects' texels at `texture`."""
        small = [geometry.Camera(c.view, c.projection, c.width // factor, c.height // factor) for c in cameras]
        h, w = small[0].height, small[0].width
        objects = int(mesh.objects.max()) + 1
        found = [geometry.texels(mesh, obj, texture) for obj in range(objects)]
        offsets = torch.tensor([0] + [len(t.index) for t in found]).cumsum(0)
        lookup = torch.full((objects, texture * texture), -1, dtype=torch.long)  # flat texel -> list position
        for obj, texels in enumerate(found):
            lookup[obj, texels.index] = torch.arange(len(texels.index)) + offsets[obj]
        bake, shown = [], []
        for view, camera in enumerate(small):
            raster = geometry.render(mesh, camera)
            for obj, texels in enumerate(found):
                seen, pixel, tap, facing = geometry.surface_taps(mesh, camera, raster, texels)
                bake.append((seen + offsets[obj], pixel + view * h * w, tap, facing))
            shown.append(_shown(mesh, raster, lookup, texture, view * h * w))
        texel, pixel, tap, facing = (torch.cat(parts) for parts in zip(*bake, strict=True))
        shown_pixel, shown_texel = (torch.cat(parts) for parts in zip(*shown, strict=True))
        seen = torch.zeros(int(offsets[-1]), dtype=torch.bool)
        seen[texel] = True
        keep = seen[shown_texel]  # a pixel shows its view's own prediction where no view saw its texel
        return cls((len(cameras), h, w), texel, pixel, tap, facing, shown_pixel[keep], shown_texel[keep],
                   int(offsets[-1]))  # fmt: skip

    def to(self, device: torch.device) -> LatentViews:
        moved = {name: getattr(self, name).to(device) for name in self.__dataclass_fields__ if name.endswith(
            ("_texel", "_pixel", "_tap", "_facing"))}  # fmt: skip
        return dataclasses.replace(self, **moved)

    def bake(self, latents: torch.Tensor, exponent: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(texture [texels, C]: the views' latents [V, C, h, w] blended by facing ** exponent, bool [texels]:
        seen by some view)."""
        values = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        read = (values[self.bake_pixel] * self.bake_tap.to(values)[..., None]).sum(1)
        weight = self.bake_facing.to(values) ** exponent
        total = torch.zeros(self.texels, dtype=values.dtype, device=values.device)
        total.index_add_(0, self.bake_texel, weight)
        texture = torch.zeros(self.texels, values.shape[1], dtype=values.dtype, device=values.device)
        texture.index_add_(0, self.bake_texel, weight[:, None] * read)
        seen = total > 0
        return texture / total.clamp(min=torch.finfo(total.dtype).tiny)[:, None], seen

    def show(self, texture: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """`latents` [V, C, h, w] with every textured pixel replaced by the texture's texel under it."""
        values = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).clone()
        values[self.shown_pixel] = texture[self.shown_texel].to(values)
        views, h, w = self.shape
        return values.view(views, h, w, -1).permute(0, 3, 1, 2).contiguous()

    def noise(self, generator: torch.Generator, channels: int) -> torch.Tensor:
        """Standard normal latents [V, C, h, w] that agree between views on every texel: one noise texture
        rendered into each view, fresh noise on the rest (background, occluders)."""
        views, h, w = self.shape
        around = torch.randn((views, channels, h, w), generator=generator)
        texture = torch.randn((self.texels, channels), generator=generator)
        return self.show(texture, around)

    def synchronize(self, predicted: torch.Tensor, exponent: float) -> torch.Tensor:
        """The views' predicted clean latents replaced by the render of their common bake."""
        texture, _ = self.bake(predicted, exponent)
        return self.show(texture, predicted)


def _shown(mesh: geometry.Mesh, raster: geometry.Raster, lookup: torch.Tensor, size: int, first: int):
    """(flat pixels, texel list positions) of one view's pixels on a textured object's texel."""
    owner = mesh.objects[raster.triangle.clamp(min=0)]
    textured = raster.covered & (owner >= 0)
    uv = raster.interpolate(mesh.uvs)[textured]
    column = (uv[:, 0] * size).floor().long().clamp(0, size - 1)
    row = ((1 - uv[:, 1]) * size).floor().long().clamp(0, size - 1)
    texel = lookup[owner[textured], row * size + column]
    pixel = torch.nonzero(textured.view(-1)).squeeze(1) + first
    inside = texel >= 0  # a centre just off its UV island takes no texel
    return pixel[inside], texel[inside]


class _NoiseLevel:
    """How a scheduler's sample relates to the clean latents at a step: x_t = a * x0 + b * eps (sigma-space
    samplers: a = 1, b = sigma; the others: a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar)), and the model's
    prediction type (epsilon or v)."""

    def __init__(self, scheduler: SchedulerMixin, timestep: torch.Tensor) -> None:
        self.kind = scheduler.config.prediction_type
        if self.kind not in ("epsilon", "v_prediction"):
            raise ValueError(f"synchronized mode needs an epsilon or v prediction model, not {self.kind}")
        self.sigma_space = isinstance(scheduler, EulerDiscreteScheduler)
        if self.sigma_space:
            self.a, self.b = 1.0, float(scheduler.sigmas[scheduler.step_index])  # scale_model_input set the index
        else:
            alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
            self.a, self.b = alpha_bar**0.5, (1 - alpha_bar) ** 0.5

    def clean(self, output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The predicted clean latents (as the scheduler's own step computes them)."""
        if self.kind == "epsilon":
            return (sample - self.b * output) / self.a
        if self.sigma_space:  # diffusers' Euler: the model saw sample / sqrt(sigma^2 + 1)
            scale = (self.b**2 + 1) ** 0.5
            return output * (-self.b / scale) + sample / scale**2
        return self.a * sample - self.b * output

    def output(self, clean: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The model output that makes the scheduler see `clean` (the inverse of `clean`)."""
        if self.kind == "epsilon":
            return (sample - self.a * clean) / self.b
        if self.sigma_space:
            scale = (self.b**2 + 1) ** 0.5
            return (sample / scale**2 - clean) * scale / self.b
        return (self.a * sample - clean) / self.b


def synchronizing(scheduler: SchedulerMixin, views: LatentViews, until: float) -> SchedulerMixin:
    """`scheduler` (a fresh one, for one run) with its step synchronizing the views' predictions for the first
    `until` fraction of its steps (0: never). The batch is the views, in order."""
    original = scheduler.step
    count = {"done": 0}

    @functools.wraps(original)  # the pipeline reads the step's signature (eta, generator)
    def step(model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, **kwargs):
        total = len(scheduler.timesteps)
        synced = round(until * total)
        if count["done"] < synced:
            level = _NoiseLevel(scheduler, timestep)
            exponent = EXPONENT * count["done"] / max(synced - 1, 1)
            clean = views.synchronize(level.clean(model_output.float(), sample.float()), exponent)
            model_output = level.output(clean, sample.float()).to(model_output.dtype)
        count["done"] += 1
        return original(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = step
    return scheduler
