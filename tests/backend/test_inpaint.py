"""Inpainting, outpainting and make_seamless, on tiny random models (64 px, 2-3 steps).

- Parity: before paste-back our output equals diffusers' StableDiffusionInpaintPipeline called directly
  with the same components, sampler, seed and strength, for a 9-channel inpainting U-Net and for a plain
  4-channel one (diffusers' latent-mask method), and StableDiffusionXLInpaintPipeline's for a tiny SDXL;
  after paste-back both agree too.
- Paste-back: every pixel farther than mask_blur from the mask comes back byte for byte (diffusers' own
  output changes them: the VAE round trip). A property of the blending, so random weights prove it.
- Outpainting keeps the original area byte for byte; make_seamless changes only the band over the seams.
- Bad inputs are refused with invalid_params naming the parameter, before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path

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
from scipy import ndimage

from backend.context import Cancelled, JobContext
from backend.families import SD, SDXL, Family
from backend.images import to_rgb
from backend.inputs import InputStore
from backend.models import ModelManager
from backend.tasks import TASKS
from backend.tasks.inpaint import inpaint, prepare_inpaint, prepare_make_seamless, run_inpaint
from backend.tiny_model import make_test_model
from sdtex_contract import protocol
from sdtex_contract.protocol import INVALID_PARAMS, ProtocolError

SIZE = 64
MASK_BOX = (slice(16, 40), slice(20, 48))  # rows, columns: repainted


@pytest.fixture(scope="session")
def tiny_inpaint_model_dir(tmp_path_factory) -> Path:
    """A tiny 9-channel inpainting model, saved as a StableDiffusionInpaintPipeline (random weights)."""
    return make_test_model(tmp_path_factory.mktemp("tiny-inpaint") / "tiny-inpaint", architecture="tiny-inpaint")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A smooth non-tiling source picture, a mask for it, and the same picture with the mask as alpha."""
    folder = tmp_path_factory.mktemp("inpaint-inputs")
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 3, y * 3, 120 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0)], -1)  # left != right, top != bottom
    rgb = np.clip(rgb + np.random.default_rng(0).normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[MASK_BOX] = 255
    paths = {"source": folder / "source.png", "mask": folder / "mask.png", "rgba": folder / "erased.png"}
    PIL.Image.fromarray(rgb).save(paths["source"])
    PIL.Image.fromarray(mask).save(paths["mask"])
    PIL.Image.fromarray(np.dstack([rgb, 255 - mask])).save(paths["rgba"])  # erased = transparent = repaint
    return paths


def pixels(path: str | Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def make_params(model: Path, files: dict, tmp_path: Path, task: str = "inpaint", **changes):
    values = dict(
        task=task,
        model=str(model),
        prompt="rusty metal plate",
        negative_prompt="text, watermark",
        steps=2,
        seed=5,
        image={"path": str(files["source"])},
        output_dir=str(tmp_path / "out"),
    )
    if task == "inpaint" and "mask_from" not in changes:
        values["mask"] = {"path": str(files["mask"])}
    return protocol.task_params({**values, **changes})


class LoadingRefused:
    """A model manager that fails the test when asked for a model: inputs must be checked first."""

    def get(self, params):
        raise AssertionError("the model was loaded before the inputs were checked")


def context(models, tmp_path: Path, events: list | None = None) -> JobContext:
    emit = (lambda kind, data: events.append((kind, data))) if events is not None else (lambda kind, data: None)
    return JobContext("job", models, InputStore(tmp_path / "uploads"), emit=emit)


@pytest.fixture(scope="module")
def managers() -> dict:
    return {}


def ours(managers: dict, model_dir: Path, params):
    """Our inpaint pipeline: the warm model's from_pipe variant, as the worker builds it."""
    manager = managers.setdefault(str(model_dir), ModelManager())
    model, _ = manager.get(params)
    return model.pipeline("inpaint")


@pytest.fixture(scope="module")
def references() -> dict:
    return {}


def reference_pipe(references: dict, model_dir: Path, family: Family) -> DiffusionPipeline:
    """diffusers' inpainting pipeline of the family, loaded on its own (an independent copy of the weights)."""
    if str(model_dir) not in references:
        pipe = family.pipelines["inpaint"].from_pretrained(model_dir, **family.pipeline_kwargs)
        pipe.set_progress_bar_config(disable=True)
        references[str(model_dir)] = pipe
    return references[str(model_dir)]


# --- parity with diffusers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "name", "scheduler", "extra", "strength", "guidance"),
    [
        ("tiny_inpaint_model_dir", "euler_a", EulerAncestralDiscreteScheduler, {}, 1.0, 7.5),
        ("tiny_inpaint_model_dir", "ddim", DDIMScheduler, {}, 0.7, 1.0),
        ("tiny_model_dir", "euler", EulerDiscreteScheduler, {}, 1.0, 7.5),
        ("tiny_model_dir", "dpmpp_2m_karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, 0.7, 5.0),
        ("tiny_sdxl_model_dir", "euler", EulerDiscreteScheduler, {}, 0.7, 5.0),
    ],
)
def test_matches_the_diffusers_inpaint_pipeline(
    request, managers, references, files, tmp_path, model, name, scheduler, extra, strength, guidance
):
    model_dir = request.getfixturevalue(model)
    p = make_params(model_dir, files, tmp_path, steps=3, scheduler=name, strength=strength, guidance_scale=guidance)
    pipe = ours(managers, model_dir, p)
    assert pipe.unet.config.in_channels == (9 if model == "tiny_inpaint_model_dir" else 4)
    canvas = prepare_inpaint(InputStore(tmp_path), p)
    mine = run_inpaint(pipe, p, canvas).images[0]

    family = SDXL if model == "tiny_sdxl_model_dir" else SD
    reference = reference_pipe(references, model_dir, family)
    assert type(pipe) is type(reference) is family.pipelines["inpaint"]
    original = reference.scheduler
    reference.scheduler = scheduler.from_config(original.config, **extra)
    try:
        expected = reference(
            p.prompt,
            negative_prompt=p.negative_prompt,
            image=PIL.Image.open(files["source"]),
            mask_image=PIL.Image.open(files["mask"]),
            strength=strength,
            num_inference_steps=p.steps,
            guidance_scale=guidance,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator("cpu").manual_seed(p.seed),
        ).images[0]
    finally:
        reference.scheduler = original
    assert mine.size == expected.size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(mine), np.asarray(expected))

    # Paste-back applied to both agrees too, and changes what diffusers returns outside the mask.
    pasted = inpaint(pipe, p, canvas).images[0]
    assert np.array_equal(np.asarray(pasted), np.asarray(canvas.finish(expected)))
    kept = canvas.feathered == 0
    assert not np.array_equal(np.asarray(expected)[kept], pixels(files["source"])[kept])
    assert np.array_equal(np.asarray(pasted)[kept], pixels(files["source"])[kept])


def test_each_image_of_a_batch_can_be_redone_alone(managers, tiny_model_dir, files, tmp_path):
    batch_params = make_params(tiny_model_dir, files, tmp_path, seed=40, batch_size=2, strength=0.8, steps=3)
    pipe = ours(managers, tiny_model_dir, batch_params)
    store = InputStore(tmp_path)
    batch = run_inpaint(pipe, batch_params, prepare_inpaint(store, batch_params))
    alone_params = make_params(tiny_model_dir, files, tmp_path, seed=41, strength=0.8, steps=3)
    alone = run_inpaint(pipe, alone_params, prepare_inpaint(store, alone_params))
    assert batch.seeds == [40, 41]
    # Same noise and same VAE samples; a batched U-Net may round differently in the last bit (1 level in 8 bits).
    difference = np.abs(np.asarray(batch.images[1]).astype(int) - np.asarray(alone.images[0]).astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    assert not np.array_equal(np.asarray(batch.images[0]), np.asarray(batch.images[1]))


# --- paste-back, outpainting, make_seamless through the job --------------------------------------------


def grown(mask: np.ndarray, radius: int) -> np.ndarray:
    """The mask grown by `radius` pixels (a square neighbourhood): the most the feather may reach."""
    return ndimage.binary_dilation(mask, np.ones((2 * radius + 1,) * 2, bool)) if radius else mask


@pytest.mark.parametrize(
    ("mask_from", "extra"),
    [
        ("image", {}),
        ("alpha", {}),
        ("rect", {"mask_x": 20, "mask_y": 16, "mask_width": 28, "mask_height": 24}),
    ],
)
@pytest.mark.parametrize("blur", [0, 6])
def test_pixels_outside_the_feathered_mask_come_back_byte_for_byte(
    managers, tiny_model_dir, files, tmp_path, mask_from, extra, blur
):
    changes = dict(mask_from=mask_from, mask_blur=blur, **extra)
    if mask_from == "image":
        changes["mask"] = {"path": str(files["mask"])}
    if mask_from == "alpha":
        changes["image"] = {"path": str(files["rgba"])}
    params = make_params(tiny_model_dir, files, tmp_path, **changes)
    ours(managers, tiny_model_dir, params)  # warm
    events: list = []
    result = TASKS["inpaint"](context(managers[str(tiny_model_dir)], tmp_path, events), params)

    out, source = pixels(result.images[0].path), pixels(files["source"])
    mask = np.zeros((SIZE, SIZE), bool)
    mask[MASK_BOX] = True
    outside = ~grown(mask, blur)
    assert out.shape == source.shape
    assert np.array_equal(out[outside], source[outside])  # byte for byte
    assert (out[mask] != source[mask]).any(axis=-1).mean() > 0.5  # and the masked area was repainted
    assert (result.task, result.width, result.height, result.seamless) == ("inpaint", SIZE, SIZE, "none")
    kinds = [kind for kind, _ in events]
    assert kinds.count(protocol.EVENT_PROGRESS) == 2 and kinds.count(protocol.EVENT_ARTIFACT) == 1


@pytest.mark.parametrize("fill", ["edge", "noise"])
def test_outpainting_keeps_the_original_area_byte_for_byte(managers, tiny_model_dir, files, tmp_path, fill):
    params = make_params(
        tiny_model_dir, files, tmp_path, mask_from="none", extend_left=8, extend_bottom=16, outpaint_fill=fill
    )
    canvas = prepare_inpaint(InputStore(tmp_path), params)
    ours(managers, tiny_model_dir, params)
    result = TASKS["inpaint"](context(managers[str(tiny_model_dir)], tmp_path), params)
    out = pixels(result.images[0].path)
    assert out.shape == (SIZE + 16, SIZE + 8, 3) and (result.width, result.height) == (SIZE + 8, SIZE + 16)
    assert np.array_equal(out[:SIZE, 8:], pixels(files["source"]))
    new = np.ones(out.shape[:2], bool)
    new[:SIZE, 8:] = False
    assert np.array_equal(canvas.mask, new) and np.array_equal(canvas.feathered == 255, new)
    assert (out[new] != np.asarray(canvas.image)[new]).any(axis=-1).mean() > 0.5  # the fill was repainted


def test_outpainting_and_a_mask_together(managers, tiny_model_dir, files, tmp_path):
    params = make_params(tiny_model_dir, files, tmp_path, extend_right=8, mask_blur=3)
    canvas = prepare_inpaint(InputStore(tmp_path), params)
    mask = np.zeros((SIZE, SIZE + 8), bool)
    mask[MASK_BOX] = True
    mask[:, SIZE:] = True
    assert np.array_equal(canvas.mask, mask)
    out = inpaint(ours(managers, tiny_model_dir, params), params, canvas).images[0]
    kept = ~grown(mask, 3)
    assert np.array_equal(np.asarray(out)[kept], np.asarray(canvas.image)[kept])
    assert np.array_equal(np.asarray(out)[:, :SIZE][kept[:, :SIZE]], pixels(files["source"])[kept[:, :SIZE]])


@pytest.mark.parametrize(("axes", "band", "blur"), [("xy", 16, 4), ("x", 8, 0)])
def test_make_seamless_changes_only_the_band_over_the_seams(
    managers, tiny_model_dir, files, tmp_path, axes, band, blur
):
    params = make_params(
        tiny_model_dir, files, tmp_path, task="make_seamless", seamless=axes, band_width=band, mask_blur=blur
    )
    canvas = prepare_make_seamless(InputStore(tmp_path), params)
    assert canvas.seamless == axes and canvas.shift == (SIZE // 2 if "y" in axes else 0, SIZE // 2)
    ours(managers, tiny_model_dir, params)
    result = TASKS["make_seamless"](context(managers[str(tiny_model_dir)], tmp_path), params)
    out, source = pixels(result.images[0].path), pixels(files["source"])

    # The band, rolled back: `band / 2` pixels each side of each wrap-around seam, grown by the feather.
    seams = np.zeros((SIZE, SIZE), bool)
    seams[:, : band // 2] = seams[:, -(band // 2) :] = True
    if "y" in axes:
        seams[: band // 2, :] = seams[-(band // 2) :, :] = True
    reach = np.roll(grown(np.roll(seams, (SIZE // 2, SIZE // 2), (0, 1)), blur), (-SIZE // 2, -SIZE // 2), (0, 1))
    changed = (out != source).any(axis=-1)
    assert np.array_equal(out[~reach], source[~reach])  # everything outside the band, byte for byte
    assert changed[seams].mean() > 0.5 and not changed[~reach].any()  # the band is the only changed region
    # The wrap-around edges are wholly repainted pixels, painted side by side (they met in the middle).
    feathered = np.roll(canvas.feathered, (-canvas.shift[0], -canvas.shift[1]), (0, 1))
    assert (feathered[:, [0, -1]] == 255).all()
    assert (result.task, result.seamless) == ("make_seamless", axes)


def test_auto_seamless_takes_the_axes_the_image_tiles_on(managers, tiny_model_dir, files, tmp_path):
    field = ndimage.gaussian_filter(np.random.default_rng(3).random((SIZE, SIZE, 3)), (4, 4, 0), mode="wrap")
    periodic = (field - field.min()) / (field.max() - field.min()) * 255  # a smooth field that wraps around
    path = tmp_path / "tiles.png"
    PIL.Image.fromarray(periodic.astype(np.uint8)).save(path)
    tiling = dict(files, source=path)
    params = make_params(tiny_model_dir, tiling, tmp_path, seamless="auto")
    assert prepare_inpaint(InputStore(tmp_path), params).seamless == "xy"
    assert (
        prepare_inpaint(InputStore(tmp_path), make_params(tiny_model_dir, files, tmp_path, seamless="auto")).seamless
        == "none"
    )
    ours(managers, tiny_model_dir, params)
    result = TASKS["inpaint"](context(managers[str(tiny_model_dir)], tmp_path), params)
    assert result.seamless == "xy" and result.params["seamless"] == "auto"


def test_cancel_stops_before_decoding(managers, tiny_model_dir, files, tmp_path):
    params = make_params(tiny_model_dir, files, tmp_path, steps=10)
    steps, stages = [], []
    with pytest.raises(Cancelled):
        run_inpaint(
            ours(managers, tiny_model_dir, params),
            params,
            prepare_inpaint(InputStore(tmp_path), params),
            on_step=lambda step, total, latents: steps.append(step),
            should_cancel=lambda: len(steps) >= 2,
            on_stage=stages.append,
        )
    assert steps == [1, 2] and stages == ["encoding", "denoising"]


# --- input formats ---------------------------------------------------------------------------------------


def test_cmyk_16_bit_greyscale_and_paletted_images_are_converted(managers, tiny_model_dir, files, tmp_path):
    rgb = PIL.Image.open(files["source"]).convert("RGB")
    grey = np.asarray(rgb.convert("L"))
    variants = {
        "cmyk.jpg": rgb.convert("CMYK"),
        "grey16.png": PIL.Image.fromarray(grey.astype(np.uint16) * 257),
        "grey.png": rgb.convert("L"),
        "palette.png": rgb.convert("P"),
    }
    for name, image in variants.items():
        path = tmp_path / name
        image.save(path)
        params = make_params(tiny_model_dir, dict(files, source=path), tmp_path)
        canvas = prepare_inpaint(InputStore(tmp_path), params)
        with PIL.Image.open(path) as opened:
            expected = np.asarray(to_rgb(opened))
        assert canvas.image.mode == "RGB" and np.array_equal(np.asarray(canvas.image), expected), name
    # One through the whole job: the kept pixels are the converted file's, byte for byte.
    params = make_params(tiny_model_dir, dict(files, source=tmp_path / "grey16.png"), tmp_path)
    ours(managers, tiny_model_dir, params)
    result = TASKS["inpaint"](context(managers[str(tiny_model_dir)], tmp_path), params)
    kept = ~grown(np.asarray(PIL.Image.open(files["mask"])) > 127, 4)
    expected = np.asarray(to_rgb(PIL.Image.open(tmp_path / "grey16.png")))
    assert np.array_equal(pixels(result.images[0].path)[kept], expected[kept])


def test_a_paletted_image_with_transparency_gives_its_mask(tiny_model_dir, files, tmp_path):
    palette = PIL.Image.open(files["source"]).convert("RGB").quantize(colors=200)  # index 255 is free
    indices = np.asarray(palette).copy()
    indices[MASK_BOX] = 255
    picture = PIL.Image.fromarray(indices, "P")
    colours = palette.getpalette()
    picture.putpalette(colours + [0] * (768 - len(colours)))
    path = tmp_path / "palette-alpha.png"
    picture.save(path, transparency=255)
    canvas = prepare_inpaint(
        InputStore(tmp_path), make_params(tiny_model_dir, dict(files, source=path), tmp_path, mask_from="alpha")
    )
    expected = np.zeros((SIZE, SIZE), bool)
    expected[MASK_BOX] = True
    assert np.array_equal(canvas.mask, expected)


# --- bad inputs ------------------------------------------------------------------------------------------


def refused(tmp_path: Path, params, task: str = "inpaint") -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        TASKS[task](context(LoadingRefused(), tmp_path), params)
    assert info.value.code == INVALID_PARAMS
    return info.value


def test_bad_inputs_are_named_before_any_model_is_loaded(tiny_model_dir, files, tmp_path):
    def save(name: str, array: np.ndarray) -> Path:
        path = tmp_path / name
        PIL.Image.fromarray(array).save(path)
        return path

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    small = save("small.png", np.zeros((32, 32), np.uint8))
    black = save("black.png", np.zeros((SIZE, SIZE), np.uint8))
    white = save("white.png", np.full((SIZE, SIZE), 255, np.uint8))
    opaque = save("opaque.png", np.full((SIZE, SIZE, 4), 255, np.uint8))
    cases = [
        ({"image": {"path": str(tmp_path / "missing.png")}}, "image", "no such file"),
        ({"image": {"path": str(text)}}, "image", "an image file"),
        ({"mask": {"path": str(text)}}, "mask", "an image file"),
        ({"mask": {"path": str(small)}}, "mask", "32x32 pixels but the image is 64x64"),
        ({"mask": {"path": str(black)}}, "mask", "nothing to repaint"),
        ({"mask": {"path": str(white)}}, "mask", "use img2img"),
        ({"mask": None}, "mask", "no mask was given"),
        ({"mask_from": "alpha"}, "image", "no alpha channel"),
        ({"mask_from": "alpha", "mask": None, "image": {"path": str(opaque)}}, "image", "no transparent pixels"),
        ({"mask_from": "rect", "mask": {"path": str(files["mask"])}}, "mask_from", "set it to image"),
        ({"mask_from": "rect", "mask_x": 64, "mask_width": 4, "mask_height": 4}, "mask_x", "outside the image"),
        ({"mask_from": "rect", "mask_x": 40, "mask_width": 30, "mask_height": 4}, "mask_width", "from 1 to 24"),
        ({"mask_from": "rect", "mask_width": 4}, "mask_height", "from 1 to 64"),
        ({"mask_from": "none"}, "mask_from", "nothing to repaint"),
        ({"strength": 0.4, "steps": 2}, "strength", "no denoising step"),
        ({"mask_from": "none", "extend_right": 2048}, "extend_right", f"at most {protocol.SIZE_MAX} pixels"),
        ({"resize": "fit", "width": 2048, "height": 2048, "extend_top": 8}, "extend_top", "at most"),
    ]
    for changes, param, words in cases:
        error = refused(tmp_path, make_params(tiny_model_dir, files, tmp_path, **changes))
        assert error.data["param"] == param and words in error.message, (changes, error.message)


def test_make_seamless_bad_inputs(tiny_model_dir, files, tmp_path):
    error = refused(
        tmp_path, make_params(tiny_model_dir, files, tmp_path, task="make_seamless", band_width=64), "make_seamless"
    )
    assert error.data["param"] == "band_width" and "narrower" in error.message
    error = refused(
        tmp_path, make_params(tiny_model_dir, files, tmp_path, task="make_seamless", strength=0.2), "make_seamless"
    )
    assert error.data["param"] == "strength"


@pytest.mark.parametrize(("name", "value"), [("strength", 1.5), ("strength", -0.1), ("mask_from", "lasso"),
                                             ("extend_left", 12), ("mask_blur", -1), ("band_width", 4)])  # fmt: skip
def test_out_of_range_values_are_refused_by_the_protocol(tiny_model_dir, files, tmp_path, name, value):
    task = "make_seamless" if name == "band_width" else "inpaint"
    with pytest.raises(ProtocolError) as info:
        make_params(tiny_model_dir, files, tmp_path, task=task, **{name: value})
    assert info.value.code == INVALID_PARAMS and info.value.data["param"] == name


def test_a_size_the_model_cannot_take_is_named(managers, tiny_model_dir, files, tmp_path):
    odd = tmp_path / "odd.png"
    PIL.Image.open(files["source"]).crop((0, 0, 62, 64)).save(odd)  # the tiny models need multiples of 4
    params = make_params(
        tiny_model_dir, dict(files, source=odd), tmp_path, mask_from="rect", mask_width=8, mask_height=8
    )
    ours(managers, tiny_model_dir, params)
    with pytest.raises(ProtocolError) as info:
        TASKS["inpaint"](context(managers[str(tiny_model_dir)], tmp_path), params)
    assert info.value.data["param"] == "image" and "multiples of 4" in info.value.message
    assert "resize" in info.value.message
