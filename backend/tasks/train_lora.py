"""The train_lora task: DreamBooth-LoRA training on photos of a subject or a style (backend/training.py), as a job
an artist can watch: progress with the loss and the time left, sample images as they are made, a resumable
checkpoint on cancel (and every `checkpoint_every` steps), and the LoRA as .safetensors at the end, ready for
any generating task's `loras`.

The serving model is released first, so training never shares memory with it; the next generation loads it
again. SD 1.x/2.x models train; SDXL is refused (its two text encoders and size conditioning are not wired up).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from backend import training
from backend.context import Cancelled, JobContext
from backend.families import SD, family_of, size_multiple
from backend.infotext import sampler_of
from backend.models import load_pipeline, locate, pick_device, pick_dtype
from backend.outputs import output_folder, run_stamp, sanitise_prefix, write_png
from backend.registry import runs
from sdtex_contract.protocol import (
    EVENT_PROGRESS,
    INVALID_PARAMS,
    NOT_ENOUGH_SPACE,
    Artifact,
    ProtocolError,
    TrainLoraParams,
    TrainProgress,
    TrainResult,
    invalid,
)
from sdtex_contract.units import size_text

MIN_PHOTOS = 3  # DreamBooth learns a subject from 3 to 5 photos at the least; fewer gives a copy machine
SAMPLE_STEPS = 25  # denoising steps of a sample image
SAMPLE_GUIDANCE = 7.5  # its CFG scale (diffusers' default, named so the sample's metadata can say it)
LOSS_WINDOW = 20  # steps the reported final loss is averaged over
SPACE_MARGIN = 50 * 10**6  # bytes kept free beyond the estimate


def default_class_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "sd-textures" / "class-images"


def check_prompts(params: TrainLoraParams) -> None:
    """The token must be a word of the instance prompt and absent from the class prompt."""
    token = params.token.strip()
    if not re.fullmatch(r"\S+", token):
        raise invalid("token", "one word without spaces (a rare one, like sks)", params.token)
    word = re.compile(rf"(?<!\w){re.escape(token)}(?!\w)")
    if not word.search(params.instance_prompt):
        raise invalid("instance_prompt", f"a prompt containing the token {token!r}", params.instance_prompt)
    if params.class_prompt and word.search(params.class_prompt):
        raise invalid(
            "class_prompt", f"the class without the token {token!r} (e.g. 'a photo of wood')", params.class_prompt
        )


def candidate_files(params: TrainLoraParams) -> list[Path]:
    folder = Path(params.photos_dir).expanduser() if params.photos_dir else None
    if folder is not None and not (folder.is_absolute() and folder.is_dir()):
        raise invalid("photos_dir", "an absolute path of an existing folder", params.photos_dir)
    files = [entry["path"] for entry in params.photo_files]
    for i, path in enumerate(files):
        if not Path(path).is_absolute():
            raise invalid(f"photo_files[{i}].path", "an absolute path", path)
    if folder is None and not files:
        raise invalid("photos_dir", "a folder of photos (or photo_files)", params.photos_dir)
    paths = training.photo_files(folder, files)
    if not paths:
        raise ProtocolError(
            INVALID_PARAMS, f"photos_dir {params.photos_dir!r} is empty: put the photos of the subject in it",
            {"param": "photos_dir", "value": params.photos_dir},
        )  # fmt: skip
    return paths


def check_free_space(folders: dict[Path, int]) -> None:
    """NOT_ENOUGH_SPACE naming the folder when the files this run writes there would not fit."""
    for folder, needed in folders.items():
        free = shutil.disk_usage(folder).free
        if free < needed + SPACE_MARGIN:
            raise ProtocolError(
                NOT_ENOUGH_SPACE,
                f"not enough free space in {folder} for the checkpoints, samples and LoRA: this run needs about "
                f"{size_text(needed + SPACE_MARGIN)} and {size_text(free)} are free; free some space, choose "
                "another output_dir, or save fewer checkpoints (checkpoint_every)",
                {"folder": str(folder), "needed": needed + SPACE_MARGIN, "free": free},
            )


def lora_parameter_count(pipe, rank: int, text_encoder: bool) -> int:
    """LoRA parameters the adapters will have: rank * (in + out) per targeted linear layer."""
    components = [(pipe.unet, training.UNET_TARGETS)]
    if text_encoder:
        components.append((pipe.text_encoder, training.TEXT_ENCODER_TARGETS))
    return sum(
        rank * (module.in_features + module.out_features)
        for component, targets in components
        for name, module in component.named_modules()
        if name.endswith(targets) and isinstance(module, torch.nn.Linear)
    )


def usable_photos(params: TrainLoraParams) -> training.Photos:
    """The photos, opened and prepared at the resolution; refused when fewer than MIN_PHOTOS are usable."""
    photos = training.load_photos(candidate_files(params), params.resolution)
    if len(photos.images) < MIN_PHOTOS:
        listed = "; ".join(f"{Path(s['path']).name}: {s['reason']}" for s in photos.skipped[:5])
        raise ProtocolError(
            INVALID_PARAMS,
            f"photos: {len(photos.images)} usable photo(s), at least {MIN_PHOTOS} are needed"
            + (f" (skipped {len(photos.skipped)}: {listed})" if photos.skipped else ""),
            {"param": "photos_dir", "usable": len(photos.images), "needed": MIN_PHOTOS, "skipped": photos.skipped},
        )
    return photos


def uses_prior(params: TrainLoraParams) -> bool:
    """Prior preservation (class images) is on when a class prompt is given."""
    return bool(params.class_prompt.strip())


def settings_of(params: TrainLoraParams, photos: training.Photos) -> training.TrainSettings:
    prior = uses_prior(params)
    return training.TrainSettings(
        instance_prompt=params.instance_prompt, resolution=params.resolution, learning_rate=params.learning_rate,
        rank=params.rank, batch_size=params.batch_size, train_text_encoder=params.train_text_encoder,
        seed=params.seed, class_prompt=params.class_prompt if prior else "",
        class_images=params.class_images if prior else 0, prior_loss_weight=params.prior_loss_weight,
        photos=tuple(photos.digests),
    )  # fmt: skip


def load_for_training(ctx: JobContext, params: TrainLoraParams):
    """The serving model and estimators released first (training never shares memory with them), then the model to
    train."""
    ctx.stage("loading_model")
    ctx.models.release()
    if ctx.estimators is not None:
        ctx.estimators.release()
    device = pick_device(params.device)
    dtype = pick_dtype(params.dtype, device)
    pipe = load_pipeline(locate(params.model, params.allow_pickle), device, dtype, cpu_offload=False)
    check_model(pipe, params)
    ctx.check_cancelled()
    return pipe


def check_space(params: TrainLoraParams, pipe, folder: Path) -> Path:
    """Refuse a run whose checkpoints, samples, LoRA (and class images) would not fit; the class images' folder."""
    class_root = Path(params.class_images_dir).expanduser() if params.class_images_dir else default_class_dir()
    class_folder = training.class_image_folder(class_root, params.model, params.class_prompt, params.resolution)
    weights = lora_parameter_count(pipe, params.rank, params.train_text_encoder) * 4
    checkpoints = (params.steps // params.checkpoint_every if params.checkpoint_every else 0) + 1  # + one on cancel
    samples = (params.steps // params.sample_every + 1) if params.sample_every else 0
    picture = params.resolution**2 * 3
    needed = {folder: checkpoints * 3 * weights + weights + samples * picture}  # weights + Adam's two moments
    if uses_prior(params):
        class_root.mkdir(parents=True, exist_ok=True)
        missing = sum(not (class_folder / f"{i:05d}.png").is_file() for i in range(params.class_images))
        needed[class_root] = needed.get(class_root, 0) + missing * picture
    check_free_space(needed)
    return class_folder


def class_images_for(ctx: JobContext, pipe, params: TrainLoraParams, class_folder: Path) -> list:
    """Class images for prior preservation, made by the model itself (before any adapter exists), cached."""
    if not uses_prior(params):
        return []
    ctx.stage("class_images")
    made = time.perf_counter()

    def class_image_done(done: int, total: int) -> None:
        ctx.progress(done, total, time.perf_counter() - made)
        ctx.check_cancelled()

    return training.make_class_images(
        pipe, class_folder, params.class_prompt, params.class_images, params.resolution, params.seed,
        on_image=class_image_done,
    )  # fmt: skip


class Training:
    """A training run as a job: the trainer, its losses, and its files (checkpoints, samples, the LoRA), each
    announced as it is complete."""

    def __init__(self, ctx: JobContext, params: TrainLoraParams, pipe, folder: Path, trainer: training.LoraTrainer):
        self.ctx, self.params, self.pipe, self.folder, self.trainer = ctx, params, pipe, folder, trainer
        self.losses: list[float] = []
        self.prefix = f"{sanitise_prefix(params.filename_prefix)}_{sanitise_prefix(params.token)}_{run_stamp()}"
        self.written: dict[str, list[str]] = {"sample": [], "checkpoint": []}

    def resume(self, state: dict) -> None:
        self.trainer.load_state(state)
        self.losses = list(state["losses"])

    def announce(self, path: Path, size: int, digest: str, kind: str) -> None:
        self.written.setdefault(kind, []).append(str(path))
        index = self.trainer.step_count
        self.ctx.artifact(Artifact(path=str(path), kind=kind, size=size, sha256=digest, index=index, role=kind))

    def save_checkpoint(self) -> None:
        self.ctx.stage("saving")
        data = training.checkpoint_bytes(self.trainer, losses=self.losses)
        stem = f"{self.prefix}_step{self.trainer.step_count}"
        self.announce(*training.write_file(data, self.folder, stem, ".pt"), "checkpoint")

    def sample(self) -> None:
        """A sample image from the sample prompt at the current step, with the LoRA as trained so far."""
        params, pipe, trainer = self.params, self.pipe, self.trainer
        self.ctx.stage("sampling")
        generator = torch.Generator("cpu").manual_seed(params.seed)
        with trainer.evaluating():
            image = pipe(
                params.sample_prompt or params.instance_prompt, height=params.resolution, width=params.resolution,
                num_inference_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_GUIDANCE, generator=generator,
            ).images[0]  # fmt: skip
        context = {
            "steps": SAMPLE_STEPS, "sampler": sampler_of(pipe.scheduler), "guidance_scale": SAMPLE_GUIDANCE,
            "step": trainer.step_count,
        }  # fmt: skip
        stem = f"{self.prefix}_sample{trainer.step_count}"
        self.announce(*write_png(image, self.folder, stem, params, params.seed, "sample", context=context), "sample")
        self.ctx.stage("training")

    def train(self) -> None:
        """Progress with the loss and the time left after every step; cancel saves a checkpoint first."""
        ctx, params, trainer = self.ctx, self.params, self.trainer
        ctx.stage("training")
        first, began = trainer.step_count, time.perf_counter()
        while trainer.step_count < params.steps:
            if ctx.is_cancelled():
                self.save_checkpoint()
                raise Cancelled()
            self.losses.append(trainer.step())
            done = trainer.step_count
            elapsed = time.perf_counter() - began
            left = elapsed / (done - first) * (params.steps - done)
            loss = self.losses[-1]
            event = TrainProgress(step=done, total=params.steps, elapsed=elapsed, loss=loss, seconds_left=left)
            ctx.emit(EVENT_PROGRESS, asdict(event))
            if params.checkpoint_every and done % params.checkpoint_every == 0 and done < params.steps:
                self.save_checkpoint()
                ctx.stage("training")
            if params.sample_every and (done % params.sample_every == 0 or done == params.steps):
                self.sample()

    def save_lora(self, photos: training.Photos) -> Path:
        """The LoRA as .safetensors with its training settings in the file's metadata, announced."""
        params, trainer = self.params, self.trainer
        self.ctx.stage("saving")
        metadata = {
            "params": params.to_dict(), "steps": trainer.step_count, "loss": self.losses[-1],
            "base_model": params.model, "photos": len(photos.images), "resolution": params.resolution,
            "rank": params.rank,
        }  # fmt: skip
        path, size, digest = training.write_file(
            training.lora_bytes(trainer, metadata), self.folder, self.prefix, ".safetensors"
        )
        self.announce(path, size, digest, "lora")
        return path


@runs("train_lora")
def run(ctx: JobContext, params: TrainLoraParams) -> TrainResult:
    start = time.perf_counter()
    # 1. Check inputs that need no model: prompts, photos, resume checkpoint, output folder
    check_prompts(params)
    folder = output_folder(params)
    ctx.stage("preparing")
    photos = usable_photos(params)
    settings = settings_of(params, photos)
    resumed = read_resume(params, settings) if params.resume_from else None

    # 2. Release the serving model, then load the one to train (SD 1.x/2.x)
    pipe = load_for_training(ctx, params)

    # 3. Disk space for what this run writes, before any training
    class_folder = check_space(params, pipe, folder)

    # 4. Class images for prior preservation
    class_images = class_images_for(ctx, pipe, params, class_folder)

    # 5. The trainer (continuing a checkpoint when resuming)
    job = Training(ctx, params, pipe, folder, training.LoraTrainer(pipe, settings, photos.images, class_images))
    if resumed is not None:
        job.resume(resumed)

    # 6. Train: progress with the loss and the time left after every step; cancel saves a checkpoint
    job.train()

    # 7. Save the LoRA with its training settings in the file's metadata, and announce it
    lora_path = job.save_lora(photos)
    losses = job.losses
    return TrainResult(
        lora=str(lora_path),
        steps=job.trainer.step_count,
        loss=sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:]),
        losses=losses,
        photos=photos.paths,
        skipped=photos.skipped,
        samples=job.written["sample"],
        checkpoints=job.written["checkpoint"],
        seconds=time.perf_counter() - start,
        params=params.to_dict(),
    )


def read_resume(params: TrainLoraParams, settings: training.TrainSettings) -> dict:
    """The checkpoint to continue, refused when it cannot continue this run."""
    path = Path(params.resume_from).expanduser()
    if not path.is_file():
        raise invalid("resume_from", "a checkpoint file written by train_lora", params.resume_from)
    try:
        state = training.read_checkpoint(path)
    except Exception as exc:
        raise invalid(
            "resume_from", f"a train_lora checkpoint ({type(exc).__name__}: {str(exc)[:200]})", params.resume_from
        ) from None
    different = training.resume_mismatch(state, settings)
    if different:
        raise invalid(
            "resume_from",
            f"a checkpoint of the same training (these differ: {', '.join(different)})",
            params.resume_from,
        )
    if state["step"] >= params.steps:
        raise invalid("steps", f"more than the checkpoint's {state['step']} steps", params.steps)
    return state


def check_model(pipe, params: TrainLoraParams) -> None:
    family = family_of(pipe)
    if family is not SD:
        raise ProtocolError(
            INVALID_PARAMS,
            f"model: training supports Stable Diffusion 1.x/2.x models, not {family.name} ones (yet)",
            {"param": "model", "value": params.model, "accepted": "an SD 1.x or 2.x model"},
        )
    if pipe.unet.config.in_channels != 4:
        raise ProtocolError(
            INVALID_PARAMS, "model: an inpainting model cannot be trained here; use its base model",
            {"param": "model", "value": params.model},
        )  # fmt: skip
    multiple = size_multiple(pipe)
    if params.resolution % multiple:
        raise invalid("resolution", f"a multiple of {multiple} for this model", params.resolution)
