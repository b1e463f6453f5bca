"""Latent travel: an animated texture that morphs through keyframes (prompt, negative prompt, seed).

Every frame is a full txt2img generation whose initial noise is the slerp of two keyframes' noise, whose
prompt embeddings blend the two keyframes' (encoded once per keyframe, not per frame), and whose
per-step sampler noise (ancestral samplers) blends the two seeds' streams the same way. A keyframe's frame
is exactly the plain txt2img of that keyframe: its noise is drawn as txt2img draws it, and at t = 0
nothing is blended.

Frames are written as a numbered sequence (`<prefix>_0001.png`, maps `<prefix>_0001_normal.png`...)
into a folder named by a digest of the settings, each announced (kind "frame") once complete; a re-run
with the same settings finds the finished frames there and skips them, so a cancelled travel resumes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from backend.context import JobContext
from backend.estimated_maps import check_estimators, map_names, map_sources
from backend.jobshell import JobProgress
from backend.outputs import PNG_ROLES, TEMP_PREFIX, _output_failed, job_maps, output_folder, sanitise_prefix, write_png
from backend.preview_decoder import job_previewer
from backend.registry import runs
from backend.schedulers import make_scheduler
from backend.seamless import seamless
from backend.steps import (
    Stages,
    check_model_takes_plain_latents,
    check_size,
    decode_latents,
    denoise,
    encode_prompt,
    sampling,
    uses_guidance,
)
from backend.travel import Frame, blend_embeddings, blend_noise, blended_step_noise, frame_plan
from sdtex_contract.protocol import (
    EVENT_PROGRESS,
    GENERATE_PARAMS,
    INVALID_PARAMS,
    NOT_ENOUGH_SPACE,
    SEED_MAX,
    Artifact,
    GenerateParams,
    GenerateResult,
    ImageRecord,
    ProgressEvent,
    ProtocolError,
    TravelParams,
    invalid,
)

# Settings that never change a frame's pixels: left out of the folder's digest, so changing them re-uses frames.
NOT_IN_DIGEST = ("output_dir", "filename_prefix", "preview_every", "preview_decoder", "export", "fps", "allow_pickle")
DIGEST_LENGTH = 10
# Per pixel, as backend.pbr writes them; metallic and the delit albedo come only from a model.
MAP_BYTES = {"height": 2, "normal": 3, "roughness": 1, "ao": 1, "metallic": 1, "albedo": 3}
PNG_OVERHEAD = 4096  # bytes per file beyond the pixels (chunks, metadata); incompressible pixels may not shrink
EXPORT_SUFFIXES = {"mp4": ".mp4", "webp": ".webp", "gif": ".gif"}


@dataclass
class Key:
    """One keyframe, ready to blend: the txt2img request it is, its embeddings, its initial noise, and its
    generator's state after drawing that noise (ancestral samplers go on drawing from there)."""

    params: GenerateParams
    embeds: dict[str, torch.Tensor]
    noise: torch.Tensor
    generator_state: torch.Tensor

    def generators(self) -> list[torch.Generator]:
        generator = torch.Generator("cpu")
        generator.set_state(self.generator_state)
        return [generator]


@dataclass(frozen=True)
class Sequence:
    """Where a travel's frames go: <output_dir>/<prefix>_<digest>/<prefix>_<number><_map>.png, numbered from 1."""

    folder: Path
    prefix: str
    length: int  # frames

    @property
    def digits(self) -> int:
        return max(4, len(str(self.length)))

    def stem(self, index: int, map_name: str = "") -> str:
        """The frame's own file stem, or one of its maps' ("normal", "albedo" (delit)...)."""
        return f"{self.prefix}_{index + 1:0{self.digits}d}" + (f"_{map_name}" if map_name else "")

    def path(self, index: int, map_name: str = "") -> Path:
        return self.folder / f"{self.stem(index, map_name)}.png"

    def files(self, params: TravelParams) -> tuple[str, ...]:
        """A frame's files: its maps' names, then "" for the frame itself, last: its file on disk says the whole
        frame is."""
        return (*map_names(params), "")

    def done(self, index: int) -> bool:
        return self.path(index).is_file()


# --- 1. checks and plans that need no model ------------------------------------------------------------


def check_keyframes(params: TravelParams) -> None:
    if len(params.keyframes) < 2:
        raise invalid("keyframes", "a list of at least 2 keyframes (prompt, negative_prompt, seed)", params.keyframes)


def check_export(params: TravelParams) -> None:
    if params.export == "mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ProtocolError(
            INVALID_PARAMS,
            "export mp4 needs the imageio-ffmpeg package in the backend's Python (pip install imageio-ffmpeg); "
            "or export webp or gif",
            {"param": "export", "accepted": "none, webp, gif (mp4 with imageio-ffmpeg)", "value": "mp4"},
        )


def resolve_seeds(params: TravelParams) -> TravelParams:
    """The parameters with every unset keyframe seed picked (reported in the result and the files)."""
    keyframes = [
        {**key, "seed": secrets.randbelow(SEED_MAX + 1)} if key["seed"] is None else key for key in params.keyframes
    ]
    return replace(params, keyframes=keyframes)


def params_of(params: TravelParams, keyframe: dict) -> GenerateParams:
    """The txt2img request that keyframe is: the travel's shared settings with its prompt and seed. A keyframe's
    frame is this request's image, bit for bit."""
    names = {p.name for p in GENERATE_PARAMS} - {"task"}
    shared = {name: value for name, value in params.to_dict().items() if name in names}
    return GenerateParams.from_dict(shared | keyframe | {"batch_size": 1})


def sequence_of(params: TravelParams, folder: Path, length: int) -> Sequence:
    """The frames' folder, named by a digest of every setting that changes a frame (seeds resolved), so a
    re-run with the same settings finds its frames and any other run gets a folder of its own."""
    settings = {name: value for name, value in params.to_dict().items() if name not in NOT_IN_DIGEST}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:DIGEST_LENGTH]
    prefix = sanitise_prefix(params.filename_prefix)
    return Sequence(folder / f"{prefix}_{digest}", prefix, length)


def check_disk_space(params: TravelParams, sequence: Sequence, todo: int) -> None:
    """Refuse a travel whose frames (and export) cannot fit on the disk left, before any work."""
    pixels = params.width * params.height
    maps = map_names(params)
    per_frame = 3 * pixels + PNG_OVERHEAD + sum(MAP_BYTES[name] * pixels + PNG_OVERHEAD for name in maps)
    needed = todo * per_frame + (sequence.length * pixels if params.export != "none" else 0)
    free = shutil.disk_usage(sequence.folder.parent).free  # output_dir: made and proven writable
    if needed > free:
        raise ProtocolError(
            NOT_ENOUGH_SPACE,
            f"frames: {todo} frames of {params.width}x{params.height} need about {needed / 2**30:.1f} GiB, and "
            f"{sequence.folder} has {free / 2**30:.1f} GiB free; use fewer frames or keyframes, a smaller size, or "
            "another output_dir",
            {"param": "frames", "folder": str(sequence.folder), "needed": needed, "free": free},
        )


# --- 2. keyframes and frames on the model --------------------------------------------------------------


@torch.no_grad()
def prepare_keys(pipe: DiffusionPipeline, keys: list[GenerateParams], device: torch.device) -> list[Key]:
    """Encode each keyframe's prompt once and draw its initial noise exactly as the txt2img pipeline does
    (prepare_latents: randn_tensor with the seed's CPU generator, the embeddings' dtype, latent size)."""
    prepared = []
    for key in keys:
        embeds = encode_prompt(pipe, key, uses_guidance(pipe, key.guidance_scale), device, count=1)
        scale = pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, key.height // scale, key.width // scale)
        generator = torch.Generator("cpu").manual_seed(key.seed)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=embeds["prompt_embeds"].dtype)
        prepared.append(Key(key, embeds, noise, generator.get_state()))
    return prepared


@torch.no_grad()
def render_latents(
    pipe: DiffusionPipeline, keys: list[Key], frame: Frame, params: TravelParams, *, on_step=None, should_cancel=None
) -> torch.Tensor:
    """One frame's latents: the txt2img denoising loop from blended noise, embeddings and sampler noise.
    Call inside `seamless(...)` when the frames must tile."""
    start, end = keys[frame.start], keys[frame.end]
    scheduler = make_scheduler(params.scheduler, pipe.scheduler.config)
    embeds = blend_embeddings(start.embeds, end.embeds, frame.t, params.embedding_interpolation)
    generators = start.generators()
    with blended_step_noise(scheduler, generators, end.generators()[0], frame.t):
        return denoise(
            pipe,
            scheduler,
            on_step=on_step,
            should_cancel=should_cancel,
            **embeds,
            latents=blend_noise(start.noise, end.noise, frame.t),
            **sampling(params),
            speed=params.speed,
            height=params.height,
            width=params.width,
            generator=generators,
        )


@dataclass
class FrameProgress(JobProgress):
    """Progress events that name the frame: step of total within frame `frame` (image_index) of `frames`."""

    frame: int = 0
    frames: int = 0

    def step(self, step: int, total: int, latents: torch.Tensor) -> None:
        elapsed = time.perf_counter() - self.denoise_start
        event = ProgressEvent(step=step, total=total, elapsed=elapsed, image_index=self.frame, frames=self.frames)
        self.ctx.emit(EVENT_PROGRESS, asdict(event))
        self.preview(step, latents)


# --- 3. files --------------------------------------------------------------------------------------------


def announce_file(ctx: JobContext, path: Path, index: int, map_name: str) -> None:
    """Announce the frame (map_name "": kind "frame", role "albedo") or one of its maps (kind "map")."""
    data = path.read_bytes()
    kind, role = ("map", map_name) if map_name else ("frame", "albedo")
    ctx.artifact(Artifact(str(path), kind, len(data), hashlib.sha256(data).hexdigest(), index=index, role=role))


def save_frame(
    ctx: JobContext,
    image: PIL.Image.Image,
    frame: Frame,
    index: int,
    sequence: Sequence,
    params: TravelParams,
    seed: int | None,
) -> None:
    """Write a frame's maps, then its albedo (the albedo's file marks the frame complete), each announced once
    complete; files an interrupted run already finished are kept and announced. frame: the keyframes it blends
    (its A1111 metadata names them)."""
    context = {"frame": frame}
    maps = job_maps(image, params, ctx)[0] if params.pbr else {}
    albedo = str(sequence.path(index))
    for name, picture in (*maps.items(), ("", image)):
        path = sequence.path(index, name)
        if not path.is_file():
            role, source = (PNG_ROLES.get(name, name), albedo) if name else ("albedo", "")
            stem = sequence.stem(index, name)
            path = write_png(picture, sequence.folder, stem, params, seed, role, source=source, context=context)[0]
        announce_file(ctx, path, index, name)


def record_of(sequence: Sequence, index: int, params: TravelParams, seed: int | None) -> ImageRecord:
    maps = {name: str(sequence.path(index, name)) for name in map_names(params)}
    return ImageRecord(path=str(sequence.path(index)), seed=seed, maps=maps, map_sources=map_sources(params))


def export_animation(sequence: Sequence, params: TravelParams) -> Path:
    """The frames as one animation file, <prefix>.<format> beside them (kept when a re-run finds it): written
    completely under a temporary name, then linked to its final name."""
    final = sequence.folder / f"{sequence.prefix}{EXPORT_SUFFIXES[params.export]}"
    if final.is_file():
        return final
    temporary = sequence.folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}{final.suffix}"
    frames = [PIL.Image.open(sequence.path(i)).convert("RGB") for i in range(sequence.length)]
    try:
        if params.export == "mp4":
            import imageio_ffmpeg

            # Sizes are multiples of 8: no rescaling to the codec's macro blocks. yuv420p: players everywhere.
            writer = imageio_ffmpeg.write_frames(
                str(temporary), (params.width, params.height), fps=params.fps, codec="libx264",
                pix_fmt_out="yuv420p", macro_block_size=8, quality=8,
            )  # fmt: skip
            writer.send(None)
            for frame in frames:
                writer.send(np.ascontiguousarray(np.asarray(frame)))
            writer.close()
        else:
            # WebP lossless: a texture's detail survives; GIF has 256 colours per frame whatever is asked.
            extra = {"lossless": True} if params.export == "webp" else {}
            duration = round(1000 / params.fps)
            frames[0].save(temporary, save_all=True, append_images=frames[1:], duration=duration, loop=0, **extra)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.link(temporary, final)
        except FileExistsError:
            pass  # a run beside this one wrote the same animation
    except OSError as exc:
        raise _output_failed(sequence.folder, exc) from None
    finally:
        temporary.unlink(missing_ok=True)
    return final


# --- the job ---------------------------------------------------------------------------------------------


@dataclass
class TravelPlan:
    """A travel checked and planned before any model is involved."""

    params: TravelParams  # every keyframe seed resolved
    frames: list[Frame]
    sequence: Sequence
    todo: list[int]  # the frames not on disk yet
    frame_seeds: list[int | None]  # a keyframe's frame has its seed, the frames between have none
    key_params: list[GenerateParams]  # the txt2img request each keyframe is


def plan_travel(params: TravelParams) -> TravelPlan:
    """Check everything that needs no model, before any work: keyframes, export, the maps' estimator models,
    output folder, disk space."""
    check_keyframes(params)
    check_export(params)
    check_estimators(params)
    folder = output_folder(params)
    params = resolve_seeds(params)
    plan = frame_plan(len(params.keyframes), params.frames, params.loop, params.easing)
    sequence = sequence_of(params, folder, len(plan))
    todo = [i for i in range(len(plan)) if not sequence.done(i)]
    check_disk_space(params, sequence, len(todo))
    output_folder(replace(params, output_dir=str(sequence.folder)))  # made and proven writable
    seeds = [key["seed"] for key in params.keyframes]
    frame_seeds = [seeds[frame.start] if frame.is_keyframe else None for frame in plan]
    key_params = [params_of(params, key) for key in params.keyframes]
    return TravelPlan(params, plan, sequence, todo, frame_seeds, key_params)


def announce_finished(ctx: JobContext, travel: TravelPlan) -> None:
    """The files of the frames a run before this one finished: announced, not made again."""
    for index in range(len(travel.frames)):
        if index not in travel.todo:
            for name in travel.sequence.files(travel.params):
                announce_file(ctx, travel.sequence.path(index, name), index, name)


def render_frames(ctx: JobContext, travel: TravelPlan, timings: dict[str, float]) -> None:
    """Load the model, encode every keyframe once, then make each missing frame: denoise, decode, save (each
    announced as soon as its files are complete)."""
    params = travel.params
    # The model (warm, or loaded now); the size must suit it
    ctx.stage("loading_model")
    model, timings["load"] = ctx.models.get(travel.key_params[0])
    pipe = model.pipe
    check_model_takes_plain_latents(pipe, "txt2img")
    check_size(pipe, travel.key_params[0])
    ctx.check_cancelled()
    previews = job_previewer(ctx, params, pipe, model.family.preview_factors, model.device)
    progress = FrameProgress(ctx, params.preview_every, previews, frames=len(travel.frames))
    stages = Stages(progress.stage, timings)

    # Every keyframe's prompt encoded once, its noise drawn
    with stages.timed("encode", "encoding"):
        keys = prepare_keys(pipe, travel.key_params, model.device)

    with seamless([pipe.unet, pipe.vae], params.seamless):
        for index in travel.todo:
            frame = travel.frames[index]
            progress.frame = index
            with stages.timed("denoise", "denoising"):
                latents = render_latents(
                    pipe, keys, frame, params, on_step=progress.step, should_cancel=ctx.is_cancelled
                )
            with stages.timed("decode", "decoding"):
                image = decode_latents(pipe, latents)[0]
            with stages.timed("save", "saving"):
                save_frame(ctx, image, frame, index, travel.sequence, params, travel.frame_seeds[index])
            ctx.check_cancelled()


def export(ctx: JobContext, travel: TravelPlan) -> float:
    """The whole sequence as one animation, announced; the seconds it took."""
    ctx.stage("saving")
    start = time.perf_counter()
    path = export_animation(travel.sequence, travel.params)
    data = path.read_bytes()
    role = travel.params.export
    ctx.artifact(Artifact(str(path), "animation", len(data), hashlib.sha256(data).hexdigest(), role=role))
    return time.perf_counter() - start


@runs("travel")  # registers the no_grad runner: frames decode with no autograd graph
@torch.no_grad()
def run(ctx: JobContext, params: TravelParams) -> GenerateResult:
    """The travel job: check everything, load the model, make the frames not on disk yet, export."""
    # 1. Check inputs that need no model, before any work, and plan the frames
    travel = plan_travel(params)
    params = travel.params
    timings = {"load": 0.0, "encode": 0.0, "denoise": 0.0, "decode": 0.0, "save": 0.0}

    # 2. Frames a run before this one finished: announced, not made again
    announce_finished(ctx, travel)

    # 3. The model, the keyframes, and each missing frame
    if travel.todo:
        render_frames(ctx, travel, timings)

    # 4. Export the whole sequence as one animation
    if params.export != "none":
        timings["export"] = export(ctx, travel)
    timings["total"] = time.perf_counter() - ctx.started

    return GenerateResult(
        images=[record_of(travel.sequence, i, params, travel.frame_seeds[i]) for i in range(len(travel.frames))],
        seed=params.keyframes[0]["seed"],
        width=params.width,
        height=params.height,
        model=params.model,
        seamless=params.seamless,
        timings=timings,
        params=params.to_dict(),
        task="travel",
    )
