"""DreamBooth-LoRA training, the recipe of diffusers' examples/dreambooth/train_dreambooth_lora.py: LoRA adapters
(PEFT) on the U-Net's attention projections (to_q, to_k, to_v, to_out.0) and optionally the text encoder's, the
noise-prediction loss on photos of the subject (plus, with prior preservation, on images the model makes of
its class), AdamW with weight decay 1e-2 and gradient clipping at 1.0, a constant learning rate.

What differs, and why:
- The photos are encoded by the VAE once (the latent distribution's mean and std are kept) and a latent is
  sampled from them at every step: the same distribution the example samples by re-encoding every step, at a
  fraction of the cost. The prompts are encoded once unless the text encoder trains (the example's
  --pre_compute_text_embeddings).
- Every random draw (LoRA start, photo order, latent sample, noise, timesteps) comes from one seeded CPU
  generator whose state is saved in checkpoints, so a run cancelled and resumed ends with the same weights as
  one that was never interrupted, bit for bit on the CPU.
- Mixed precision on GPUs as accelerate does it for one process (frozen weights in half precision, LoRA weights
  in fp32, autocast, a gradient scaler for fp16), without accelerate's Accelerator: its state is process-wide
  and cannot change precision between jobs of one long-lived worker. Gradient checkpointing on GPUs; 8-bit AdamW
  when bitsandbytes is installed (CUDA).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from backend import __version__
from backend.outputs import TEMP_PREFIX, _output_failed, publish

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER = "default"
CHECKPOINT_FORMAT = "sdtex-lora-checkpoint-1"
# Settings a resumed run must share with its checkpoint (steps may grow; sampling and saving may change).
RESUME_KEYS = (
    "instance_prompt", "class_prompt", "class_images", "prior_loss_weight", "resolution", "learning_rate",
    "rank", "batch_size", "train_text_encoder", "seed", "photos",
)  # fmt: skip


@dataclass(frozen=True)
class TrainSettings:
    instance_prompt: str
    resolution: int
    learning_rate: float = 1e-4
    rank: int = 4
    batch_size: int = 1
    train_text_encoder: bool = False
    seed: int = 0
    class_prompt: str = ""  # with class images: prior preservation
    class_images: int = 0
    prior_loss_weight: float = 1.0
    photos: tuple[str, ...] = ()  # sha256 of each photo's bytes, in training order (checked on resume)
    max_grad_norm: float = 1.0  # the example's defaults
    weight_decay: float = 1e-2


# --- photos ------------------------------------------------------------------------------------------------


def photo_files(folder: Path | None, files: list[str]) -> list[Path]:
    """Candidate files: the folder's (not hidden, not in subfolders), then the listed ones, sorted by name."""
    found = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")] if folder else []
    return sorted(found, key=lambda p: p.name.lower()) + [Path(f) for f in files]


def prepare_photo(image: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """Upright (EXIF orientation applied), RGB, scaled so the shorter side is `resolution`, centre-cropped square."""
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return PIL.ImageOps.fit(image, (resolution, resolution), PIL.Image.Resampling.LANCZOS)


@dataclass
class Photos:
    images: list[PIL.Image.Image]  # prepared for training
    paths: list[str]
    digests: list[str]  # sha256 of each file
    skipped: list[dict]  # {"path", "reason"}


def load_photos(paths: list[Path], resolution: int) -> Photos:
    """The usable photos prepared for training; files that are not (JPEG, PNG, WebP that opens) are skipped,
    listed with the reason, and logged."""
    photos, used, digests, skipped = [], [], [], []
    for path in paths:
        if path.suffix.lower() not in PHOTO_SUFFIXES:
            skipped.append(
                {"path": str(path), "reason": f"not a JPEG, PNG or WebP file ({path.suffix or 'no suffix'})"}
            )
            continue
        try:
            data = path.read_bytes()
            with PIL.Image.open(io.BytesIO(data)) as image:
                if image.format not in ("JPEG", "PNG", "WEBP"):
                    raise ValueError(f"a {image.format} image")
                photos.append(prepare_photo(image, resolution))
        except Exception as exc:  # unreadable, truncated, not an image: skipped and listed, not fatal
            skipped.append({"path": str(path), "reason": f"unreadable: {type(exc).__name__}: {str(exc)[:200]}"})
            continue
        digests.append(hashlib.sha256(data).hexdigest())
        used.append(str(path))
    for entry in skipped:
        log.warning("skipped %s: %s", entry["path"], entry["reason"])
    return Photos(photos, used, digests, skipped)


def to_tensor(images: list[PIL.Image.Image]) -> torch.Tensor:
    """Pictures as a (n, 3, h, w) batch in -1..1, as the example's Normalize([0.5], [0.5]) gives."""
    array = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) * 2.0 - 1.0


# --- class images (prior preservation) ---------------------------------------------------------------------


def class_image_folder(root: Path, model: str, prompt: str, resolution: int) -> Path:
    key = hashlib.sha256(json.dumps([model, prompt, resolution]).encode()).hexdigest()[:16]
    return root / key


def make_class_images(
    pipe: DiffusionPipeline, folder: Path, prompt: str, count: int, resolution: int, seed: int, on_image=None
) -> list[PIL.Image.Image]:
    """`count` images of the class prompt made by the model itself, cached in `folder` (image i: seed + i), so
    later runs with the same model, prompt and size reuse them."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(count):
        path = folder / f"{i:05d}.png"
        if path.is_file():
            with PIL.Image.open(path) as cached:
                images.append(cached.convert("RGB"))
        else:
            generator = torch.Generator("cpu").manual_seed(seed + i)
            with torch.no_grad():
                image = pipe(prompt, height=resolution, width=resolution, generator=generator).images[0]
            temporary = folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}.png"
            image.save(temporary)
            os.replace(temporary, path)  # a cache entry: replacing a half-written one is fine
            images.append(image)
        if on_image:
            on_image(i + 1, count)
    return images


# --- the trainer ---------------------------------------------------------------------------------------------


class LoraTrainer:
    """Adds LoRA adapters to a Stable Diffusion pipeline's U-Net (and text encoder) and trains them.

    step() does one optimizer update and returns its loss; state()/load_state() are a checkpoint (LoRA weights,
    optimizer, generator, photo order); lora_layers() the weights in diffusers' layout for saving.
    """

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        settings: TrainSettings,
        photos: list[PIL.Image.Image],
        class_images: list[PIL.Image.Image] = (),
    ) -> None:
        self.settings = settings
        self.pipe = pipe
        self.unet, self.text_encoder, self.vae = pipe.unet, pipe.text_encoder, pipe.vae
        self.device = self.unet.device
        self.weight_dtype = self.unet.dtype
        self.mixed = self.weight_dtype != torch.float32
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.generator = torch.Generator("cpu").manual_seed(settings.seed)
        self.step_count = 0
        for module in (self.unet, self.text_encoder, self.vae):
            module.requires_grad_(False)

        # 1. LoRA adapters, started from the seed (PEFT's gaussian init draws from torch's global generator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.unet.add_adapter(self._lora_config(UNET_TARGETS))
            if settings.train_text_encoder:
                self.text_encoder.add_adapter(self._lora_config(TEXT_ENCODER_TARGETS))
        self.trained = [self.unet] + ([self.text_encoder] if settings.train_text_encoder else [])
        cast_training_params(self.trained, dtype=torch.float32)  # LoRA weights train in fp32 (no-op in fp32)
        if self.device.type == "cuda":
            self.unet.enable_gradient_checkpointing()
            if settings.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        self.parameters = [p for module in self.trained for p in module.parameters() if p.requires_grad]
        self.optimizer = self._optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if self.weight_dtype == torch.float16 else None

        # 2. Encode once: the photos' (and class images') latent distributions, and the prompts
        self.instance = self._latent_distribution(photos)
        self.prior = self._latent_distribution(class_images) if class_images else None
        self.prompts = [settings.instance_prompt] + ([settings.class_prompt] if self.prior is not None else [])
        self.input_ids = [self._tokenize(prompt) for prompt in self.prompts]
        self.embeddings = None if settings.train_text_encoder else [self._encode(ids) for ids in self.input_ids]
        self.order = torch.randperm(len(photos), generator=self.generator)
        self.cursor = 0

    def _lora_config(self, targets: tuple[str, ...]) -> LoraConfig:
        rank = self.settings.rank
        return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets))

    def _optimizer(self) -> torch.optim.Optimizer:
        cls = torch.optim.AdamW
        if self.device.type == "cuda":
            try:
                import bitsandbytes as bnb

                cls = bnb.optim.AdamW8bit
            except ImportError:
                pass
        return cls(
            self.parameters, lr=self.settings.learning_rate, betas=(0.9, 0.999),
            weight_decay=self.settings.weight_decay, eps=1e-8,
        )  # fmt: skip

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.weight_dtype)

    @torch.no_grad()
    def _latent_distribution(self, images: list[PIL.Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for start in range(0, len(images), 4):
            pixels = to_tensor(images[start : start + 4]).to(self.device, self.vae.dtype)
            distribution = self.vae.encode(pixels).latent_dist
            means.append(distribution.mean.float())
            stds.append(distribution.std.float())
        return torch.cat(means), torch.cat(stds)

    def _tokenize(self, prompt: str) -> torch.Tensor:
        tokenizer = self.pipe.tokenizer
        return tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    def _encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.settings.train_text_encoder), self._autocast():
            return self.text_encoder(input_ids)[0]

    def _next_indices(self) -> torch.Tensor:
        """The next batch of photos: each epoch a new permutation from the generator."""
        picked = []
        while len(picked) < self.settings.batch_size:
            if self.cursor == len(self.order):
                self.order, self.cursor = torch.randperm(len(self.order), generator=self.generator), 0
            picked.append(self.order[self.cursor])
            self.cursor += 1
        return torch.stack(picked)

    def _sample_latents(self, distribution, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = (
            distribution[0][indices.to(distribution[0].device)],
            distribution[1][indices.to(distribution[1].device)],
        )
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        return (mean + std * noise) * self.vae.config.scaling_factor

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The DreamBooth loss of one batch: {"instance": photo indices, "prior": class image indices or None}."""
        latents = [self._sample_latents(self.instance, batch["instance"], generator)]
        conditions = [self._condition(0, len(batch["instance"]))]
        if self.prior is not None:
            latents.append(self._sample_latents(self.prior, batch["prior"], generator))
            conditions.append(self._condition(1, len(batch["prior"])))
        latents, conditions = torch.cat(latents), torch.cat(conditions)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator
        )
        timesteps = timesteps.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with self._autocast():
            prediction = self.unet(noisy.to(self.weight_dtype), timesteps, conditions, return_dict=False)[0]
        if self.prior is None:
            return F.mse_loss(prediction.float(), target.float())
        prediction, prediction_prior = prediction.chunk(2)
        target, target_prior = target.chunk(2)
        prior_loss = F.mse_loss(prediction_prior.float(), target_prior.float())
        return F.mse_loss(prediction.float(), target.float()) + self.settings.prior_loss_weight * prior_loss

    def _condition(self, which: int, count: int) -> torch.Tensor:
        embedding = self.embeddings[which] if self.embeddings is not None else self._encode(self.input_ids[which])
        return embedding.expand(count, -1, -1)

    def next_batch(self) -> dict:
        indices = self._next_indices()
        prior = None
        if self.prior is not None:
            prior = torch.randint(0, len(self.prior[0]), (len(indices),), generator=self.generator)
        return {"instance": indices, "prior": prior}

    def step(self, fixed_seed: int | None = None) -> float:
        """One optimizer update; returns its loss. fixed_seed: on the fixed batch of that seed instead of the next
        one (the same photos, noise and timesteps every time: a check that the optimizer learns)."""
        for module in self.trained:
            module.train()
        if fixed_seed is None:
            loss = self.loss(self.next_batch(), self.generator)
        else:
            loss = self.loss(*self.fixed_batch(fixed_seed))
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, self.settings.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return float(loss.detach())

    def fixed_batch(self, seed: int) -> tuple[dict, torch.Generator]:
        """A fixed batch: the first photos (and class images), and a generator giving the same noise and timesteps."""
        size = self.settings.batch_size
        prior = torch.arange(size) % len(self.prior[0]) if self.prior is not None else None
        return {"instance": torch.arange(size) % len(self.instance[0]), "prior": prior}, torch.Generator().manual_seed(
            seed
        )

    @torch.no_grad()
    def fixed_batch_loss(self, seed: int) -> float:
        """The loss on the fixed batch of this seed."""
        return float(self.loss(*self.fixed_batch(seed)))

    # --- saving and resuming --------------------------------------------------------------------------------

    def lora_layers(self) -> dict[str, dict[str, torch.Tensor]]:
        """The trained weights in diffusers' layout, by component, as save_lora_weights takes them."""
        layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))}
        if self.settings.train_text_encoder:
            te = get_peft_model_state_dict(self.text_encoder)
            layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(te)
        return layers

    def state(self) -> dict:
        """Everything a resumed run needs to continue exactly: LoRA weights, optimizer, generator, photo order."""
        return {
            "format": CHECKPOINT_FORMAT,
            "settings": asdict(self.settings),
            "step": self.step_count,
            "lora": [get_peft_model_state_dict(module) for module in self.trained],
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "generator": self.generator.get_state(),
            "order": self.order,
            "cursor": self.cursor,
        }

    def load_state(self, state: dict) -> None:
        for module, weights in zip(self.trained, state["lora"], strict=True):
            set_peft_model_state_dict(module, {k: v.to(self.device) for k, v in weights.items()})
        cast_training_params(self.trained, dtype=torch.float32)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.order, self.cursor, self.step_count = state["order"], state["cursor"], state["step"]

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Inference mode for sample images, back to training afterwards."""
        for module in self.trained:
            module.eval()
        try:
            with torch.no_grad(), self._autocast():
                yield
        finally:
            for module in self.trained:
                module.train()


def read_checkpoint(path: Path) -> dict:
    """A checkpoint written by write_checkpoint. weights_only: tensors and plain data, never code."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path.name} is not a train_lora checkpoint")
    return state


def resume_mismatch(state: dict, settings: TrainSettings) -> list[str]:
    """The settings a checkpoint was trained with that differ from this run's."""
    saved, now = state["settings"], asdict(settings)
    return [key for key in RESUME_KEYS if (tuple(saved[key]) if key == "photos" else saved[key]) != now[key]]


# --- files ------------------------------------------------------------------------------------------------


def write_file(data: bytes, folder: Path, stem: str, suffix: str) -> tuple[Path, int, str]:
    """Write bytes completely under a temporary name, then publish without overwriting (outputs.publish)."""
    temporary = folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}{suffix}"
    try:
        with open(temporary, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        path = publish(temporary, folder, stem, suffix)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise _output_failed(folder, exc) from None
    return path, len(data), hashlib.sha256(data).hexdigest()


def checkpoint_bytes(trainer: LoraTrainer, losses: list[float]) -> bytes:
    """The trainer's state and the losses so far, as torch.save writes them (read back with weights_only)."""
    buffer = io.BytesIO()
    torch.save({**trainer.state(), "losses": losses}, buffer)
    return buffer.getvalue()


def lora_bytes(trainer: LoraTrainer, metadata: dict) -> bytes:
    """The LoRA as diffusers' save_lora_weights lays it out (unet./text_encoder. prefixes), with the training
    settings in the safetensors metadata (`sdtex_training`)."""
    captured: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as unused:  # save_lora_weights creates its folder; capture writes nothing
        StableDiffusionPipeline.save_lora_weights(
            unused, **trainer.lora_layers(), save_function=lambda weights, filename: captured.update(weights)
        )
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in captured.items()}
    info = {"format": "pt", "sdtex_training": json.dumps(metadata), "sdtex_backend_version": __version__}
    return safetensors.torch.save(tensors, metadata=info)
