"""DreamBooth-LoRA training on the tiny model with 25 synthetic photos (coloured shapes of different sizes, formats
and EXIF orientations): the optimizer learns (the loss on a fixed batch falls), the saved LoRA changes the image
and gives in diffusers' own `load_lora_weights` what our worker gives, cancel + resume ends bit for bit where an
uninterrupted run ends, and bad inputs are refused naming the problem."""

from __future__ import annotations

import json
import random
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

from backend import training
from backend.context import Cancelled, JobContext
from backend.models import ModelManager
from backend.tasks import train_lora
from backend.tasks.txt2img import run_txt2img
from sdtex_contract import protocol
from sdtex_contract.protocol import INVALID_PARAMS, NOT_ENOUGH_SPACE, GenerateParams, ProtocolError

# EXIF orientation -> the transpose that turns the upright picture into the stored pixels (exif_transpose undoes it)
STORED = {
    1: None,
    3: PIL.Image.Transpose.ROTATE_180,
    6: PIL.Image.Transpose.ROTATE_90,
    8: PIL.Image.Transpose.ROTATE_270,
}
FORMATS = (("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"))


def upright_photo(i: int) -> PIL.Image.Image:
    """A coloured shape on a coloured ground, of its own size and aspect; asymmetric, so a wrong rotation shows."""
    rng = random.Random(i)
    width, height = rng.randint(40, 160), rng.randint(40, 160)
    image = PIL.Image.new("RGB", (width, height), tuple(rng.randint(0, 255) for _ in range(3)))
    draw = PIL.ImageDraw.Draw(image)
    box = (width // 8, height // 8, width // 2, height // 2)  # in the top-left quarter
    colour = tuple(rng.randint(0, 255) for _ in range(3))
    (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colour)
    return image


def write_photos(folder: Path, count: int = 25) -> list[PIL.Image.Image]:
    """`count` photos in PNG, JPEG and WebP with EXIF orientations 1, 3, 6 and 8; returns the upright pictures."""
    folder.mkdir(parents=True, exist_ok=True)
    uprights = []
    for i in range(count):
        upright = upright_photo(i)
        orientation = list(STORED)[i % 4]
        stored = upright.transpose(STORED[orientation]) if STORED[orientation] else upright
        exif = PIL.Image.Exif()
        exif[0x0112] = orientation
        image_format, suffix = FORMATS[i % 3]
        stored.save(folder / f"photo{i:02d}{suffix}", format=image_format, exif=exif.tobytes())
        uprights.append(upright)
    return uprights


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos") / "wood"
    write_photos(folder)
    return folder


def test_photos_are_upright_cropped_and_bad_files_listed(tmp_path):
    uprights = write_photos(tmp_path / "photos", 8)
    (tmp_path / "photos" / "notes.txt").write_text("not a photo")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    paths = training.photo_files(tmp_path / "photos", [])
    photos = training.load_photos(paths, 32)
    assert len(photos.images) == 8 and all(image.size == (32, 32) for image in photos.images)
    assert sorted(Path(s["path"]).name for s in photos.skipped) == ["broken.jpg", "notes.txt"]
    for i, (image, path) in enumerate(zip(photos.images, photos.paths, strict=True)):
        expected = np.asarray(training.prepare_photo(uprights[i], 32), dtype=float)
        error = np.abs(np.asarray(image, dtype=float) - expected).mean()
        # PNG is lossless: the same pixels. JPEG / WebP: compression noise only, far below a wrong rotation's.
        assert error == 0 if path.endswith(".png") else error < 12, (path, error)
        rotated = np.asarray(training.prepare_photo(uprights[i].transpose(PIL.Image.Transpose.ROTATE_90), 32), float)
        assert np.abs(rotated - expected).mean() > 2 * max(error, 5), path


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_loss_on_a_fixed_batch_falls(pipe, photos_dir):
    photos = training.load_photos(training.photo_files(photos_dir, []), 32)
    settings = training.TrainSettings("a photo of sks wood", 32, learning_rate=1e-2, rank=4, batch_size=2, seed=0)
    trainer = training.LoraTrainer(pipe, settings, photos.images)
    before = trainer.fixed_batch_loss(7)
    losses = [trainer.step(fixed_seed=7) for _ in range(30)]
    assert losses[0] == pytest.approx(before)  # the LoRA starts as a no-op (B = 0): the base model's loss
    after = trainer.fixed_batch_loss(7)
    assert after < 0.85 * before, (before, after)
    trainer.unet.delete_adapters("default")  # the module-scoped pipeline goes back to the base model


def job(tmp_path: Path, cancel_at: int = 0) -> tuple[JobContext, list]:
    events = []

    def cancelled() -> bool:
        done = [d["step"] for k, d in events if k == protocol.EVENT_PROGRESS and "loss" in d]
        return bool(cancel_at) and bool(done) and done[-1] >= cancel_at

    return JobContext(
        "job", ModelManager(), None, emit=lambda k, d: events.append((k, d)), is_cancelled=cancelled
    ), events


def train_params(model_dir: Path, photos_dir: Path, out: Path, **changes) -> protocol.TrainLoraParams:
    values = dict(
        task="train_lora", model=str(model_dir), photos_dir=str(photos_dir), token="sks",
        instance_prompt="a photo of sks wood", resolution=32, steps=6, learning_rate=1e-3, rank=4, batch_size=2,
        seed=3, output_dir=str(out), class_images_dir=str(out / "class"),
    )  # fmt: skip
    return protocol.TrainLoraParams.from_dict({**values, **changes})


def generate(manager: ModelManager, model_dir: Path, lora: str | None) -> np.ndarray:
    p = GenerateParams(
        model=str(model_dir), prompt="a photo of sks wood", steps=2, width=32, height=32, seed=11, scheduler="ddim",
        output_dir="/unused", loras=[{"model": lora, "weight": 1.0}] if lora else [],
    )  # fmt: skip
    model, _ = manager.get(p)
    return np.asarray(run_txt2img(model.pipe, p, device=model.device).images[0])


def test_trained_lora_changes_the_image_and_loads_in_diffusers(tiny_model_dir, photos_dir, tmp_path):
    ctx, events = job(tmp_path)
    params = train_params(
        tiny_model_dir, photos_dir, tmp_path / "out", learning_rate=5e-3, train_text_encoder=True, sample_every=3
    )
    result = train_lora.run(ctx, params)

    # The job: progress with loss and time left every step, samples as artifacts, the LoRA announced last
    progress = [d for k, d in events if k == protocol.EVENT_PROGRESS and "loss" in d]
    assert [d["step"] for d in progress] == [1, 2, 3, 4, 5, 6] and progress[-1]["seconds_left"] == 0.0
    artifacts = [d for k, d in events if k == protocol.EVENT_ARTIFACT]
    assert [a["kind"] for a in artifacts] == ["sample", "sample", "lora"]
    assert result.samples == [a["path"] for a in artifacts[:2]] and result.lora == artifacts[-1]["path"]
    assert len(result.losses) == 6 and len(result.photos) == 25 and not result.skipped
    with safetensors.safe_open(result.lora, "pt") as f:
        settings = json.loads(f.metadata()["sdtex_training"])
        keys = list(f.keys())
    assert settings["params"]["rank"] == 4 and settings["steps"] == 6
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)

    # Same seed: the LoRA changes the picture, and diffusers' own loading in a fresh pipeline gives ours exactly
    manager = ModelManager()
    base, ours = generate(manager, tiny_model_dir, None), generate(manager, tiny_model_dir, result.lora)
    assert np.abs(ours.astype(int) - base).max() > 5
    fresh = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    fresh.scheduler = DDIMScheduler.from_config(fresh.scheduler.config)
    fresh.load_lora_weights(result.lora)
    theirs = fresh(
        "a photo of sks wood", num_inference_steps=2, width=32, height=32, generator=torch.Generator().manual_seed(11)
    ).images[0]
    assert np.array_equal(ours, np.asarray(theirs))


def lora_tensors(path: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path)


def test_cancel_then_resume_ends_bit_for_bit_where_one_run_ends(tiny_model_dir, photos_dir, tmp_path):
    classes = tmp_path / "class"  # shared: the first run makes the class images, the others reuse them
    common = dict(
        train_text_encoder=True, class_prompt="a photo of wood", class_images=3, steps=5, class_images_dir=str(classes)
    )
    whole = train_lora.run(job(tmp_path)[0], train_params(tiny_model_dir, photos_dir, tmp_path / "a", **common))
    made = {path: path.stat().st_mtime_ns for path in classes.rglob("*.png")}
    assert len(made) == 3

    ctx, events = job(tmp_path, cancel_at=2)
    with pytest.raises(Cancelled):
        train_lora.run(ctx, train_params(tiny_model_dir, photos_dir, tmp_path / "b", **common))
    (checkpoint,) = [d for k, d in events if k == protocol.EVENT_ARTIFACT]
    assert checkpoint["kind"] == "checkpoint" and checkpoint["path"].endswith("_step2.pt")
    resumed = train_lora.run(
        job(tmp_path)[0],
        train_params(tiny_model_dir, photos_dir, tmp_path / "b", resume_from=checkpoint["path"], **common),
    )
    expected, got = lora_tensors(whole.lora), lora_tensors(resumed.lora)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert resumed.losses == whole.losses and resumed.steps == 5
    assert {path: path.stat().st_mtime_ns for path in classes.rglob("*.png")} == made  # cached, not made again


def refused(ctx, params) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        train_lora.run(ctx, params)
    return info.value


Case = namedtuple("Case", "changes, param, words")


@pytest.mark.parametrize(
    "case",
    [
        Case({"instance_prompt": "a photo of wood"}, "instance_prompt", "containing the token 'sks'"),
        Case({"class_prompt": "a photo of sks"}, "class_prompt", "without the token"),
        Case({"resume_from": "/no/such.pt"}, "resume_from", "checkpoint"),
        Case({"photos_dir": ""}, "photos_dir", "a folder of photos"),
    ],
)
def test_bad_inputs_are_named(tiny_model_dir, photos_dir, tmp_path, case):
    params = train_params(tiny_model_dir, photos_dir, tmp_path / "out").to_dict() | case.changes
    error = refused(job(tmp_path)[0], protocol.TrainLoraParams.from_dict(params))
    assert error.code == INVALID_PARAMS and error.data["param"] == case.param and case.words in error.message


def test_photo_folder_problems(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    error = refused(job(tmp_path)[0], train_params(tiny_model_dir, empty, tmp_path / "out"))
    assert error.data["param"] == "photos_dir" and "is empty" in error.message
    few = tmp_path / "few"
    write_photos(few, 2)
    (few / "scan.tiff").write_bytes(b"II*\x00")
    error = refused(job(tmp_path)[0], train_params(tiny_model_dir, few, tmp_path / "out"))
    assert "2 usable photo(s), at least 3" in error.message and "scan.tiff" in error.message
    assert [Path(s["path"]).name for s in error.data["skipped"]] == ["scan.tiff"]


def test_resolution_the_model_cannot_take(tiny_model_dir, photos_dir, tmp_path):
    """A VAE with four levels (scale 8) and the U-Net's two: sizes must be multiples of 16."""
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=8, latent_channels=4,
    )  # fmt: skip
    vae.save_pretrained(model / "vae")
    error = refused(job(tmp_path)[0], train_params(model, photos_dir, tmp_path / "out", resolution=40))
    assert error.data["param"] == "resolution" and "a multiple of 16" in error.message


def test_not_enough_disk_space(tiny_model_dir, photos_dir, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10**6))
    error = refused(job(tmp_path)[0], train_params(tiny_model_dir, photos_dir, tmp_path / "out", checkpoint_every=1))
    assert error.code == NOT_ENOUGH_SPACE and str(tmp_path / "out") in error.message


def test_sdxl_is_refused(tiny_sdxl_model_dir, photos_dir, tmp_path):
    error = refused(job(tmp_path)[0], train_params(tiny_sdxl_model_dir, photos_dir, tmp_path / "out"))
    assert error.data["param"] == "model" and "1.x/2.x" in error.message


def test_resolution_must_be_a_multiple_of_8():
    with pytest.raises(ProtocolError) as info:
        protocol.TrainLoraParams.from_dict(
            {"model": "m", "instance_prompt": "sks", "output_dir": "/o", "photos_dir": "/p", "resolution": 100}
        )
    assert info.value.data["param"] == "resolution"


def test_the_worker_releases_the_serving_model_and_answers_a_train_result(tiny_model_dir, photos_dir, tmp_path):
    from backend.worker import Worker

    replies = []
    worker = Worker(replies.append)
    worker.handle(protocol.request("warm", protocol.LOAD_MODEL, {"model": str(tiny_model_dir)}))
    assert worker.models.loaded is not None
    params = train_params(tiny_model_dir, photos_dir, tmp_path / "out", steps=2).to_dict()
    worker.handle(protocol.request("train", protocol.RUN, params))
    result = protocol.TrainResult.from_dict(replies[-1]["result"])
    assert worker.models.loaded is None  # released before training: the next generation loads it again
    assert result.lora == result.artifacts[-1]["path"] and Path(result.lora).is_file() and result.steps == 2
    progress = [r["data"] for r in replies if r.get("event") == protocol.EVENT_PROGRESS]
    assert [p["step"] for p in progress] == [1, 2] and all(p["loss"] > 0 for p in progress)


def test_cancel_through_the_worker_announces_the_checkpoint_before_the_reply(tiny_model_dir, photos_dir, tmp_path):
    from backend.worker import Worker

    replies = []

    def reply(message: dict) -> None:  # the reader thread's part: a cancel arrives while step 2 is reported
        replies.append(message)
        if message.get("event") == protocol.EVENT_PROGRESS and message["data"]["step"] == 2:
            worker.cancel_all()

    worker = Worker(reply)
    params = train_params(tiny_model_dir, photos_dir, tmp_path / "out", steps=50).to_dict()
    worker.handle(protocol.request("train", protocol.RUN, params))
    assert replies[-1] == protocol.cancelled("train")
    artifacts = [r["data"] for r in replies if r.get("event") == protocol.EVENT_ARTIFACT]
    assert [a["kind"] for a in artifacts] == ["checkpoint"] and Path(artifacts[0]["path"]).is_file()
    assert training.read_checkpoint(Path(artifacts[0]["path"]))["step"] == 2
