"""Upscaling: our x4 path gives exactly what diffusers' StableDiffusionUpscalePipeline gives (a tiny x4 upscaler
built offline); both paths commute exactly with circular shifts when seamless (so a tiling texture still
tiles); tile overlaps blend without steps; bad inputs are named before any work."""

from __future__ import annotations

import base64
from pathlib import Path

import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_upscale as upscale_module
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionUpscalePipeline
from diffusers.utils.torch_utils import randn_tensor

import backend.tasks.upscale as upscale
from backend import tiles
from backend.context import JobContext
from backend.families import SD
from backend.inputs import InputStore
from backend.models import LoadedModel, ModelManager, locate
from backend.tasks.upscale import run_tiled, run_x4
from backend.tiny_model import make_test_model
from backend.upscaler import load_upscaler
from sdtex_contract import protocol
from sdtex_contract.protocol import ProtocolError, UpscaleParams


@pytest.fixture(scope="module")
def tiny_upscaler_dir(tmp_path_factory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("tiny-upscaler") / "x4", seed=0, architecture="tiny-upscaler")


@pytest.fixture(scope="module")
def upscalers(tiny_upscaler_dir):
    """Ours through the worker's loader; the reference loaded as a user would."""
    ours = load_upscaler(locate(str(tiny_upscaler_dir)), "cpu", "fp32", cpu_offload=False)
    reference = StableDiffusionUpscalePipeline.from_pretrained(tiny_upscaler_dir)
    reference.set_progress_bar_config(disable=True)
    return ours, reference


@pytest.fixture(scope="module")
def img2img(tiny_model_dir):
    pipe = SD.txt2img.from_pretrained(tiny_model_dir, **SD.pipeline_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe, key=None, device=torch.device("cpu")).pipeline("img2img")


def picture(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def params(**changes) -> UpscaleParams:
    values = dict(
        image={"path": "/unused.png"},
        prompt="weathered bricks",
        negative_prompt="blur",
        seed=12,
        steps=3,
        output_dir="/unused",
    )
    return UpscaleParams(**{**values, **changes})


# --- the SD x4 upscaler -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "scheduler", "guidance"),
    [("ddim", DDIMScheduler, 7.5), ("euler_a", EulerAncestralDiscreteScheduler, 1.0)],  # 1: no guidance
)
def test_x4_matches_the_diffusers_upscale_pipeline(upscalers, tiny_upscaler_dir, name, scheduler, guidance):
    ours, reference = upscalers
    p = params(upscaler_model=str(tiny_upscaler_dir), scale=4, scheduler=name, guidance_scale=guidance, noise_level=30)
    small = picture(32, 24)
    output = run_x4(ours, p, small)
    original = reference.scheduler
    reference.scheduler = scheduler.from_config(original.config)
    try:
        expected = reference(
            p.prompt,
            image=small,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            noise_level=p.noise_level,
            negative_prompt=p.negative_prompt,
            generator=torch.Generator("cpu").manual_seed(p.seed),
        ).images[0]
    finally:
        reference.scheduler = original
    assert output.image.size == expected.size == (128, 96)
    assert np.array_equal(np.asarray(output.image), np.asarray(expected))


def test_x4_scale_2_and_sizes_it_pads(upscalers, tiny_upscaler_dir):
    ours, _ = upscalers
    p = params(upscaler_model=str(tiny_upscaler_dir), scale=2)
    assert run_x4(ours, p, picture(30, 22)).image.size == (60, 44)  # padded to multiples of 4, cropped back
    with pytest.raises(ProtocolError) as info:  # a seamless axis cannot be padded
        run_x4(ours, params(upscaler_model="x", seamless="x"), picture(30, 24))
    assert info.value.data["param"] == "image" and "multiple of 4" in info.value.message
    with pytest.raises(ProtocolError) as info:
        run_x4(ours, params(upscaler_model="x", noise_level=351), picture(32, 24))
    assert info.value.data["param"] == "noise_level"


SHIFT = 4  # pixels of the small picture: a multiple of the tiny upscaler's U-Net downsampling (2)


def test_seamless_x4_commutes_with_circular_shifts(upscalers, tiny_upscaler_dir, monkeypatch):
    ours, _ = upscalers
    roll = [0]

    def draw(shape, generator=None, device=None, dtype=None, layout=None):  # the small picture's noise, the latents
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype, layout=layout)
        return torch.roll(noise, (roll[0], roll[0]), (2, 3))

    monkeypatch.setattr(upscale_module, "randn_tensor", draw)
    small = np.asarray(picture(32, 24, seed=3))

    def error(axes: str) -> float:
        p = params(upscaler_model=str(tiny_upscaler_dir), scale=4, scheduler="ddim", seamless=axes)
        roll[0] = 0
        big = run_x4(ours, p, PIL.Image.fromarray(small), output_type="np").image
        roll[0] = SHIFT
        big_of_rolled = run_x4(ours, p, PIL.Image.fromarray(np.roll(small, (SHIFT, SHIFT), (0, 1))), output_type="np")
        return float(np.abs(big_of_rolled.image - np.roll(big, (4 * SHIFT, 4 * SHIFT), (0, 1))).max())

    tiled, untiled = error("xy"), error("none")
    assert tiled < 1e-4, f"seamless x4 upscaling does not commute with shifts (error {tiled})"
    assert untiled > 0.05, f"without seamless the result already wraps (error {untiled}): the test proves nothing"


# --- tiled img2img ----------------------------------------------------------------------------------


def tiled_params(model, **changes) -> UpscaleParams:
    values = dict(
        model=str(model), scale=2, steps=4, strength=0.5, scheduler="ddim", guidance_scale=3.0, tile_size=64,
        tile_overlap=24,
    )  # fmt: skip
    return params(**{**values, **changes})


def test_tiled_upscaling_commutes_with_circular_shifts_only_when_seamless(img2img, tiny_model_dir):
    """128 px result, 64 px tiles, overlap 24: four tiles per axis, 32 px apart around the loop. Rolling the
    picture by one tile step (16 px, 32 after upscaling) and the canvas noise alike must roll the result:
    every tile then sees what its neighbour saw, the wrap-around tile included."""
    source = np.asarray(picture(64, 64, seed=1))
    noise = torch.randn((2, 4, 64, 64), generator=torch.Generator().manual_seed(0))  # latent canvas (VAE factor 2)

    def error(axes: str) -> tuple[float, int]:
        p = tiled_params(tiny_model_dir, seamless=axes)
        first = run_tiled(img2img, p, PIL.Image.fromarray(source), noise=noise, output_type="np")
        rolled = np.roll(source, (16, 16), (0, 1))
        second = run_tiled(img2img, p, PIL.Image.fromarray(rolled), noise=torch.roll(noise, (16, 16), (2, 3)),
                           output_type="np")  # fmt: skip
        return float(np.abs(second.image - np.roll(first.image, (32, 32), (0, 1))).max()), first.tiles

    (tiled, count), (untiled, _) = error("xy"), error("none")
    assert count == 16
    assert tiled < 1e-4, f"seamless tiled upscaling does not commute with shifts (error {tiled})"
    assert untiled > 0.05, f"without seamless the result already wraps (error {untiled}): the test proves nothing"


@pytest.mark.parametrize("axes", ["none", "xy"])
def test_tile_overlaps_blend_without_a_step(img2img, tiny_model_dir, monkeypatch, axes):
    """Tiles that disagree (each decodes to its own flat grey, as real tiles drift in colour) still meet without
    a step where blended; the same layout with flat weights (a plain average) shows the steps."""
    values = iter(np.tile([0.2, 0.8, 0.5, 0.35, 0.65], 10))

    def flat_tiles(pipe, latents, output_type="pil"):
        size = latents.shape[-1] * pipe.vae_scale_factor
        return np.full((1, size, size, 3), next(values), dtype=np.float32)

    def largest_step(weights_flat: bool) -> float:
        nonlocal values
        values = iter(np.tile([0.2, 0.8, 0.5, 0.35, 0.65], 10))
        with monkeypatch.context() as m:
            m.setattr(upscale, "decode_latents", flat_tiles)
            if weights_flat:
                m.setattr(tiles, "ramp", np.ones)
            image = run_tiled(img2img, tiled_params(tiny_model_dir, seamless=axes), picture(64, 64), output_type="np")
        wrapped = np.concatenate([image.image, image.image[:, :1]], axis=1) if axes == "xy" else image.image
        return float(np.abs(np.diff(wrapped, axis=1)).max())

    blended, plain = largest_step(False), largest_step(True)
    # Raised cosine over >= 24 px: the steepest step is at most (0.8 - 0.2) * pi / (2 * 24) ~ 0.04.
    assert blended < 0.05, f"blended tiles still step by {blended}"
    assert plain > 0.1, f"flat weights show no step ({plain}): the test proves nothing"


def test_strength_zero_is_lanczos_alone_and_wraps(tmp_path):
    ctx = JobContext(job_id="t", models=ModelManager(), inputs=InputStore(tmp_path / "uploads"))
    source = tmp_path / "small.png"
    picture(40, 24).save(source)
    request = {"task": "upscale", "image": {"path": str(source)}, "strength": 0.0, "seamless": "xy"}
    p = protocol.task_params({**request, "output_dir": str(tmp_path / "out")})
    result = upscale.run(ctx, p)
    assert (result.width, result.height, result.model, result.seed) == (80, 48, "", None)
    assert ctx.models.loaded is None  # no model was needed
    with PIL.Image.open(result.images[0].path) as image:
        assert image.size == (80, 48)


def test_wrapping_lanczos_commutes_with_shifts_exactly():
    source = picture(40, 24, seed=6)
    rolled = PIL.Image.fromarray(np.roll(np.asarray(source), (3, 5), (0, 1)))
    for wrap, equal in ((True, True), (False, False)):
        big = np.asarray(tiles.resize(source, 80, 48, wrap, wrap))
        big_of_rolled = np.asarray(tiles.resize(rolled, 80, 48, wrap, wrap))
        assert np.array_equal(big_of_rolled, np.roll(big, (6, 10), (0, 1))) == equal


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize(("length", "tile", "overlap"), [(128, 64, 24), (200, 64, 16), (1024, 512, 64), (64, 64, 8)])
def test_tile_layout_covers_and_overlaps(length, tile, overlap, wrap):
    spans = tiles.spans(length, tile, overlap, wrap, align=8)
    covered = np.zeros(length, int)
    for span in spans:
        covered[span.indices(length)] += 1
        assert span.start % 8 == 0 and span.size == min(tile, length)
    assert covered.min() >= 1
    if len(spans) > 1:
        assert all(s.fade_in >= overlap - 8 and s.fade_out >= overlap - 8 for s in spans[1:-1])
        assert (spans[0].fade_in == 0) != wrap and (spans[-1].fade_out == 0) != wrap
        assert wrap or spans[-1].start + tile == length


# --- the job: bad inputs, the worker process --------------------------------------------------------------


def job_error(tmp_path: Path, image: PIL.Image.Image, **request) -> ProtocolError:
    path = tmp_path / "input.png"
    image.save(path)
    ctx = JobContext(job_id="t", models=ModelManager(), inputs=InputStore(tmp_path / "uploads"))
    values = {"task": "upscale", "image": {"path": str(path)}, "output_dir": str(tmp_path / "out"), **request}
    with pytest.raises(ProtocolError) as info:
        upscale.run(ctx, protocol.task_params(values))
    assert ctx.models.loaded is None  # named before any model was loaded
    return info.value


def test_bad_inputs_are_named(tmp_path, tiny_model_dir):
    small = picture(32, 32)
    error = job_error(tmp_path, small)
    assert error.data["param"] == "model" and "upscaler_model" in error.message
    error = job_error(tmp_path, picture(4100, 8), model=str(tiny_model_dir))
    assert error.data["param"] == "image" and "8192" in error.message and "4096" in error.message
    error = job_error(tmp_path, picture(1100, 8), upscaler_model=str(tiny_model_dir))
    assert error.data["param"] == "image" and "1024" in error.message
    error = job_error(tmp_path, small, model=str(tiny_model_dir), tile_size=128, tile_overlap=64)
    assert error.data["param"] == "tile_overlap"
    error = job_error(tmp_path, small, model=str(tiny_model_dir), steps=2, strength=0.3)
    assert error.data["param"] == "strength"
    with pytest.raises(ProtocolError) as info:
        protocol.task_params({"task": "upscale", "image": {"path": "/a.png"}, "output_dir": "/o", "scale": 3})
    assert info.value.data["param"] == "scale"


def test_upscaler_model_is_checked_like_a_model(tmp_path, tiny_model_dir):
    small = picture(32, 32)
    error = job_error(tmp_path, small, upscaler_model=str(tiny_model_dir))  # a txt2img model, not an upscaler
    assert error.code == protocol.MODEL_LOAD_FAILED and error.data["param"] == "upscaler_model"
    assert "StableDiffusionUpscalePipeline" in error.message
    pickle = tmp_path / "x4.ckpt"
    pickle.write_bytes(b"not really")
    error = job_error(tmp_path, small, upscaler_model=str(pickle))
    assert error.code == protocol.UNSAFE_CHECKPOINT and error.data["param"] == "upscaler_model"
    error = job_error(tmp_path, small, upscaler_model=str(tmp_path / "missing"))
    assert error.code == protocol.MODEL_NOT_FOUND and error.data["param"] == "upscaler_model"


def test_upscale_jobs_in_the_worker_process(worker, tiny_model_dir, tiny_upscaler_dir, tmp_path):
    source = tmp_path / "tile.png"
    y, x = np.mgrid[0:64, 0:64]
    value = 128 + 60 * np.cos(2 * np.pi * x / 64 * 2) + 50 * np.cos(2 * np.pi * y / 64 * 3)  # tiles on x and y
    PIL.Image.fromarray(np.stack([value, value * 0.7, value * 0.5], -1).astype(np.uint8)).save(source)
    upload, _ = worker.call(protocol.UPLOAD, {"data": base64.b64encode(source.read_bytes()).decode()})
    common = {"task": "upscale", "image": {"sha256": upload["result"]["sha256"]}, "seed": 5, "steps": 4,
              "output_dir": str(tmp_path / "out")}  # fmt: skip

    # Tiled img2img: 64 px -> 128 px in 64 px tiles wrapping around both axes ("auto" finds them).
    request = {**common, "model": str(tiny_model_dir), "scale": 2, "strength": 0.5, "tile_size": 64,
               "tile_overlap": 24, "seamless": "auto", "pbr": True}  # fmt: skip
    reply, events = worker.call(protocol.RUN, request)
    result = reply["result"]
    assert result["task"] == "upscale" and result["seamless"] == "xy"
    assert (result["width"], result["height"]) == (128, 128)
    assert result["model"] == str(tiny_model_dir) and result["seed"] == 5
    announced = [e["data"] for e in events if e["event"] == protocol.EVENT_ARTIFACT]
    assert announced == result["artifacts"] and len(announced) == 5  # the picture and its four maps
    with PIL.Image.open(result["images"][0]["path"]) as image:
        assert image.size == (128, 128)
    progress = [(e["data"]["step"], e["data"]["total"]) for e in events if e["event"] == protocol.EVENT_PROGRESS]
    assert progress == [(step, 32) for step in range(1, 33)]  # 16 tiles x 2 steps (strength 0.5 of 4), in order
    stages = [e["data"]["stage"] for e in events if e["event"] == protocol.EVENT_STATUS]
    assert stages == ["loading_model", "encoding", "denoising", "decoding", "saving"]

    # The SD x4 upscaler, scale 4.
    reply, events = worker.call(protocol.RUN, {**common, "upscaler_model": str(tiny_upscaler_dir), "scale": 4})
    result = reply["result"]
    assert result["model"] == str(tiny_upscaler_dir) and (result["width"], result["height"]) == (256, 256)
    assert result["seamless"] == "none" and len(result["artifacts"]) == 1
    progress = [(e["data"]["step"], e["data"]["total"]) for e in events if e["event"] == protocol.EVENT_PROGRESS]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
