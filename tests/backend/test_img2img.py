"""img2img: our task gives exactly what diffusers' own img2img pipelines give (tiny SD 1.x and SDXL models,
the warm weights shared through from_pipe), seamless img2img commutes exactly with circular shifts because
the VAE encoder wraps too, and bad inputs are named before any work."""

from __future__ import annotations

import base64
from pathlib import Path

import diffusers.models.autoencoders.vae as vae_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

import backend.seamless
from backend.context import Cancelled
from backend.families import SD, SDXL, Family
from backend.inputs import InputStore, open_image
from backend.models import LoadedModel
from backend.tasks.img2img import run_img2img, source_picture
from sdtex_contract import protocol
from sdtex_contract.protocol import INVALID_PARAMS, Img2ImgParams, ProtocolError


def ours_and_reference(folder: Path, family: Family) -> tuple[DiffusionPipeline, DiffusionPipeline]:
    """Ours: the worker's path (txt2img loaded, its img2img variant built with from_pipe, sharing the weights).
    Reference: the family's img2img pipeline loaded on its own, as a user would call it."""
    loaded = family.txt2img.from_pretrained(folder, **family.pipeline_kwargs)
    loaded.set_progress_bar_config(disable=True)
    ours = LoadedModel(loaded, key=None, device=torch.device("cpu")).pipeline("img2img")
    assert ours.unet is loaded.unet and ours.vae is loaded.vae  # shared, not loaded twice
    reference = family.pipelines["img2img"].from_pretrained(folder, **family.pipeline_kwargs)
    reference.set_progress_bar_config(disable=True)
    return ours, reference


@pytest.fixture(scope="module")
def sd(tiny_model_dir):
    return ours_and_reference(tiny_model_dir, SD)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_model_dir):
    return ours_and_reference(tiny_sdxl_model_dir, SDXL)


def picture(width: int = 64, height: int = 64, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def params(model: Path | str, **changes) -> Img2ImgParams:
    values = dict(
        model=str(model),
        image={"path": "/unused.png"},
        prompt="rusty metal plate",
        negative_prompt="text, watermark",
        steps=4,
        strength=0.5,
        width=64,
        height=64,
        seed=31,
        output_dir="/unused",
    )
    return Img2ImgParams(**{**values, **changes})


def reference_images(reference: DiffusionPipeline, p: Img2ImgParams, image, scheduler: type, extra: dict) -> list:
    """The stock img2img pipeline called as its documentation shows, with the same sampler and settings."""
    original = reference.scheduler
    reference.scheduler = scheduler.from_config(original.config, **extra)
    try:
        return reference(
            p.prompt,
            image=image,
            strength=p.strength,
            negative_prompt=p.negative_prompt or None,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            num_images_per_prompt=p.batch_size,
            generator=[torch.Generator("cpu").manual_seed(p.seed + i) for i in range(p.batch_size)],
        ).images
    finally:
        reference.scheduler = original


def assert_same(images: list, expected: list) -> None:
    assert len(images) == len(expected)
    for image, reference in zip(images, expected, strict=True):
        assert image.size == reference.size
        assert np.array_equal(np.asarray(image), np.asarray(reference))


@pytest.mark.parametrize(
    ("name", "scheduler", "extra", "guidance", "strength", "batch"),
    [
        ("euler_a", EulerAncestralDiscreteScheduler, {}, 7.5, 0.5, 2),
        ("ddim", DDIMScheduler, {}, 1.0, 0.75, 1),  # guidance 1 turns classifier-free guidance off
        ("dpmpp_2m_karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, 7.5, 1.0, 1),
    ],
)
def test_matches_the_diffusers_img2img_pipeline(sd, tiny_model_dir, name, scheduler, extra, guidance, strength, batch):
    ours, reference = sd
    p = params(tiny_model_dir, scheduler=name, guidance_scale=guidance, strength=strength, batch_size=batch)
    image = picture()
    output = run_img2img(ours, p, image)
    assert output.seeds == [31 + i for i in range(batch)]
    assert_same(output.images, reference_images(reference, p, image, scheduler, extra))


@pytest.mark.parametrize("negative_prompt", ["text, watermark", ""])
def test_sdxl_matches_the_diffusers_img2img_pipeline(sdxl, tiny_sdxl_model_dir, negative_prompt):
    ours, reference = sdxl
    # The tiny SDXL VAE has latents mean/std: encoding runs the normalising branch, decoding the inverse.
    assert ours.vae.config.latents_mean is not None and ours.vae.config.force_upcast
    p = params(tiny_sdxl_model_dir, scheduler="euler", guidance_scale=5.0, negative_prompt=negative_prompt)
    image = picture(64, 64, seed=2)
    assert_same(run_img2img(ours, p, image).images, reference_images(reference, p, image, EulerDiscreteScheduler, {}))


def test_each_variation_of_a_batch_can_be_redone_alone(sd, tiny_model_dir):
    ours, _ = sd
    image = picture(seed=3)
    batch = run_img2img(ours, params(tiny_model_dir, seed=500, batch_size=3), image, output_type="np")
    alone = run_img2img(ours, params(tiny_model_dir, seed=502), image, output_type="np")
    # Equal up to float rounding: the U-Net's sums run in another order for a batch of 3 than for 1.
    assert np.abs(batch.images[2] - alone.images[0]).max() < 1e-4
    assert np.abs(batch.images[0] - batch.images[1]).max() > 0.05
    assert set(batch.timings) == {"encode", "encode_image", "denoise", "decode"}


def test_strength_zero_keeps_the_picture_and_one_step_minimum_is_enforced(sd, tiny_model_dir):
    ours, _ = sd
    image = picture(seed=4)
    kept = run_img2img(ours, params(tiny_model_dir, strength=0.0, batch_size=2), image)
    assert all(np.array_equal(np.asarray(k), np.asarray(image)) for k in kept.images)
    with pytest.raises(ProtocolError) as info:  # int(4 * 0.2) = 0 steps: nothing would run
        run_img2img(ours, params(tiny_model_dir, strength=0.2), image)
    assert info.value.code == INVALID_PARAMS and info.value.data["param"] == "strength"
    assert "no denoising step" in info.value.message
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ProtocolError) as info:
            protocol.task_params({"task": "img2img", "model": "m", "prompt": "p", "image": {"path": "/a.png"},
                                  "output_dir": "/o", "strength": bad})  # fmt: skip
        assert info.value.data["param"] == "strength" and "from 0 to 1" in info.value.message


def test_cancel_stops_before_decoding(sd, tiny_model_dir):
    ours, _ = sd
    steps, stages = [], []
    with pytest.raises(Cancelled):
        run_img2img(
            ours,
            params(tiny_model_dir, steps=20, strength=0.5),
            picture(),
            on_step=lambda step, total, latents: steps.append((step, total)),
            should_cancel=lambda: len(steps) >= 2,
            on_stage=stages.append,
        )
    assert steps == [(1, 10), (2, 10)]  # strength 0.5 of 20 steps: 10 to run
    assert stages == ["encoding", "denoising"]


def test_sizes_must_suit_the_model(sd, tiny_model_dir):
    ours, _ = sd
    # Params built directly (as scripts may) skip the protocol's multiple-of-8 check; the tiny model needs 4.
    with pytest.raises(ProtocolError) as info:
        run_img2img(ours, params(tiny_model_dir, width=66), picture(66, 64))
    assert info.value.data["param"] == "width" and "multiple of 4" in info.value.message
    with pytest.raises(ProtocolError) as info:  # resize keep: the image's own size is named
        run_img2img(ours, params(tiny_model_dir, resize="keep"), picture(70, 64))
    assert info.value.data["param"] == "image" and "resize fit" in info.value.message


@pytest.mark.parametrize(("size", "words"), [((2050, 64), "from 64 to 2048"), ((48, 64), "from 64 to 2048")])
def test_an_image_the_model_cannot_take_names_the_limit(tiny_model_dir, size, words):
    with pytest.raises(ProtocolError) as info:
        source_picture(picture(*size), params(tiny_model_dir, resize="keep"))
    assert info.value.code == INVALID_PARAMS and info.value.data["param"] == "image"
    assert words in info.value.message and f"{size[0]}x{size[1]}" in info.value.message


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("CMYK", ".jpg"), ("CMYK", ".tif"), ("I;16", ".png"), ("L", ".png"), ("P", ".png"), ("RGBA", ".png"),
     ("LA", ".png")],
)  # fmt: skip
def test_any_file_mode_is_converted_not_refused(tmp_path, tiny_model_dir, mode, suffix):
    base = picture(96, 80)
    if mode == "I;16":
        source = PIL.Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)  # 16-bit greyscale
    else:
        source = base.convert(mode)
    path = tmp_path / f"input{suffix}"
    source.save(path)
    opened = open_image(InputStore(tmp_path / "uploads"), {"path": str(path)}, "image")
    assert opened.mode != "RGB"
    fitted = source_picture(opened, params(tiny_model_dir, resize="fill", width=64, height=64))
    assert fitted.mode == "RGB" and fitted.size == (64, 64)
    if mode in ("L", "I;16"):  # greyscale stays grey, 16 bits scaled to 8 (not clipped)
        pixels = np.asarray(fitted).astype(int)
        assert (pixels[..., 0] == pixels[..., 1]).all() and pixels.max() > 200


# --- seamless: the proof ----------------------------------------------------------------------------

SHIFT = 2  # latent cells: a multiple of the tiny U-Net's downsampling (2); the image rolls SHIFT x VAE factor (2)


@pytest.fixture
def rolled_noise(monkeypatch):
    """Every random draw of the VAE's sampling and of the pipeline's noise, rolled by `roll[0]` latent cells:
    the same seed gives the same noise, moved with the picture."""
    roll = [0]

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype, layout=layout)
        return torch.roll(noise, (roll[0], roll[0]), (2, 3)) if roll[0] else noise

    monkeypatch.setattr(vae_module, "randn_tensor", draw)
    monkeypatch.setattr(img2img_module, "randn_tensor", draw)
    return roll


def roll_error(pipe, model, rolled_noise, axes: str) -> float:
    """Max abs difference (0..1 floats) between img2img of the rolled picture (noise rolled alike) and the
    rolled img2img of the picture. DDIM: no noise is drawn between steps."""
    source = np.asarray(picture(96, 64, seed=5))  # not square, so swapped axes cannot pass
    p = params(model, scheduler="ddim", steps=4, strength=0.75, guidance_scale=3.0, resize="keep", seamless=axes)
    pixels = SHIFT * pipe.vae_scale_factor

    def generate(image: np.ndarray, shift: int) -> np.ndarray:
        rolled_noise[0] = shift
        return run_img2img(pipe, p, PIL.Image.fromarray(image), output_type="np").images[0]

    image = generate(source, 0)
    image_of_rolled = generate(np.roll(source, (pixels, pixels), (0, 1)), SHIFT)
    return float(np.abs(image_of_rolled - np.roll(image, (pixels, pixels), (0, 1))).max())


def test_seamless_img2img_commutes_with_circular_shifts_only_with_the_encoder_patch(
    sd, tiny_model_dir, rolled_noise, monkeypatch
):
    ours, _ = sd
    tiled = roll_error(ours, tiny_model_dir, rolled_noise, "xy")
    untiled = roll_error(ours, tiny_model_dir, rolled_noise, "none")
    # The same with circular convs everywhere but the encoder's Downsample2D pad left at zeros.
    monkeypatch.setattr(backend.seamless, "_downsamplers", lambda modules: {})
    without_encoder_patch = roll_error(ours, tiny_model_dir, rolled_noise, "xy")
    assert tiled < 1e-4, f"seamless img2img does not commute with shifts (error {tiled})"
    assert untiled > 0.05, f"without seamless the result already wraps (error {untiled}): the test proves nothing"
    assert without_encoder_patch > 1e-3, f"the encoder patch changes nothing (error {without_encoder_patch})"


def test_the_encoder_patch_is_reversible(sd):
    ours, _ = sd
    layers = [m for m in ours.vae.encoder.modules() if type(m).__name__ == "Downsample2D"]
    assert layers and all(layer.padding == 0 for layer in layers)  # the hand-padded kind
    pixels = torch.rand(1, 3, 32, 48) * 2 - 1
    before = ours.vae.encode(pixels).latent_dist.mean
    with backend.seamless.seamless([ours.vae], "xy"):
        assert all("forward" in layer.__dict__ for layer in layers)
        inside = ours.vae.encode(pixels).latent_dist.mean
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert not torch.equal(before, inside) and torch.equal(before, ours.vae.encode(pixels).latent_dist.mean)


# --- through the worker process -----------------------------------------------------------------------


def tiling_picture(path: Path, width: int = 64, height: int = 64) -> Path:
    y, x = np.mgrid[0:height, 0:width]
    value = 128 + 60 * np.cos(2 * np.pi * x / width * 2) + 50 * np.cos(2 * np.pi * y / height * 3)
    PIL.Image.fromarray(np.stack([value, value * 0.7, value * 0.5], -1).astype(np.uint8)).save(path)
    return path


def test_img2img_job_in_the_worker_process(worker, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    request = {
        "task": "img2img", "model": str(tiny_model_dir), "prompt": "mossy bricks", "image": None, "steps": 4,
        "strength": 0.5, "width": 64, "height": 64, "seed": 9, "batch_size": 2, "seamless": "auto", "pbr": True,
        "output_dir": str(out),
    }  # fmt: skip
    # A picture that tiles: "auto" finds both axes. Sent as uploaded bytes (an unsaved Blender image).
    data = tiling_picture(tmp_path / "tiles.png").read_bytes()
    upload, _ = worker.call(protocol.UPLOAD, {"data": base64.b64encode(data).decode()})
    reply, events = worker.call(protocol.RUN, {**request, "image": {"sha256": upload["result"]["sha256"]}})
    result = reply["result"]
    assert result["task"] == "img2img" and result["seamless"] == "xy" and result["params"]["seamless"] == "auto"
    assert (result["width"], result["height"], result["seed"]) == (64, 64, 9)
    assert [image["seed"] for image in result["images"]] == [9, 10]
    announced = [e["data"] for e in events if e["event"] == protocol.EVENT_ARTIFACT]
    assert announced == result["artifacts"] and len(announced) == 2 * 5  # two albedos and their four maps
    for image in result["images"]:
        assert Path(image["path"]).is_file() and set(image["maps"]) == {"height", "normal", "roughness", "ao"}
    progress = [(e["data"]["step"], e["data"]["total"]) for e in events if e["event"] == protocol.EVENT_PROGRESS]
    assert progress == [(1, 2), (2, 2)]  # strength 0.5 of 4 steps
    stages = [e["data"]["stage"] for e in events if e["event"] == protocol.EVENT_STATUS]
    assert stages == ["loading_model", "encoding", "denoising", "decoding", "saving"]
    assert {"encode", "encode_image", "denoise", "decode", "save", "total"} <= set(result["timings"])

    # A picture that does not tile (a ramp: its wrap-around edges jump): "auto" finds none, and the image
    # (80 x 64) is fitted to 64 x 64. A bad image is named before any work.
    ramp = tmp_path / "ramp.png"
    y, x = np.mgrid[0:64, 0:80]
    PIL.Image.fromarray(np.stack([x * 3, y * 3, x + y], -1).astype(np.uint8)).save(ramp)
    reply, _ = worker.call(protocol.RUN, {**request, "image": {"path": str(ramp)}, "batch_size": 1, "pbr": False})
    assert reply["result"]["seamless"] == "none" and len(reply["result"]["artifacts"]) == 1
    reply, events = worker.call(protocol.RUN, {**request, "image": {"path": str(tmp_path / "missing.png")}})
    assert reply["error"]["code"] == INVALID_PARAMS and reply["error"]["data"]["param"] == "image"
    assert [e["data"]["stage"] for e in events if e["event"] == protocol.EVENT_STATUS] == []
