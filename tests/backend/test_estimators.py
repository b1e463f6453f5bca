"""The Marigold estimators (backend/estimators.py) on tiny random models built offline (backend/tiny_marigold.py).

Parity is against diffusers' own pipeline loaded from the same folder, so it holds for any weights. Seamless is
proven as the generation tests prove it: with circular convolutions the whole estimate commutes with circular
shifts of the image and of the initial noise together; without them it does not.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from backend.context import Cancelled
from backend.estimators import (
    ESTIMATOR_KINDS,
    PIPELINES,
    Estimate,
    EstimateSettings,
    Estimators,
    seamless_size,
    wrap_resize,
)
from backend.tiny_marigold import make_test_estimator
from backend.tiny_model import make_test_model
from sdtex_contract.protocol import INVALID_PARAMS, MODEL_LOAD_FAILED, ProtocolError

FIELDS = ("depth", "normals", "albedo", "roughness", "metallic")
NOISE_MODULES = {
    kind: f"diffusers.pipelines.marigold.pipeline_marigold_{kind}" for kind in ESTIMATOR_KINDS
}  # where each pipeline draws its initial noise (randn_tensor)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("marigold")
    return {kind: make_test_estimator(root / kind, kind) for kind in ESTIMATOR_KINDS}


@pytest.fixture(scope="module")
def estimators() -> Estimators:
    return Estimators()


@pytest.fixture(scope="module")
def bare(folders: dict[str, Path]) -> dict:
    """diffusers' own pipelines, loaded from the same folders."""
    pipes = {}
    for kind, folder in folders.items():
        pipes[kind] = PIPELINES[kind].from_pretrained(folder, use_safetensors=True)
        pipes[kind].set_progress_bar_config(disable=True)
    return pipes


def picture(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """Structure plus noise; periodic in both axes, so it tiles."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    wave = np.sin(2 * np.pi * x / width)[..., None] * np.cos(4 * np.pi * y / height)[..., None]
    pixels = 128 + 80 * wave * np.array([1.0, -0.5, 0.7]) + rng.normal(0, 30, (height, width, 3))
    return PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def bare_maps(kind: str, prediction: np.ndarray) -> dict[str, np.ndarray]:
    """diffusers' prediction split by hand, from the documented layouts (IID-Appearance: albedo, then a stack of
    roughness, metallicity and an unused channel)."""
    if kind == "depth":
        return {"depth": prediction[0, :, :, 0]}
    if kind == "normals":
        return {"normals": prediction[0]}
    return {"albedo": prediction[0], "roughness": prediction[1, :, :, 0], "metallic": prediction[1, :, :, 1]}


def maps(estimate: Estimate) -> dict[str, np.ndarray]:
    return {name: getattr(estimate, name) for name in FIELDS if getattr(estimate, name) is not None}


# --- 1. parity with diffusers ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ESTIMATOR_KINDS)
@pytest.mark.parametrize(("steps", "ensemble"), [(1, 1), (2, 1), (1, 2)])
def test_equals_diffusers_bit_for_bit(estimators, folders, bare, kind: str, steps: int, ensemble: int) -> None:
    image = picture(60, 44)  # processing at 32 resizes and pads inside the pipeline (23 rows -> 24)
    settings = EstimateSettings(steps=steps, ensemble_size=ensemble, processing_resolution=32)
    ours = maps(estimators.estimate(kind, str(folders[kind]), image, settings, device="cpu"))
    prediction = bare[kind](
        image,
        num_inference_steps=steps,
        ensemble_size=ensemble,
        processing_resolution=32,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).prediction
    expected = bare_maps(kind, prediction)
    assert set(ours) == set(expected)
    for name, array in expected.items():
        assert ours[name].dtype == np.float32 and ours[name].shape == array.shape == (44, 60, *array.shape[2:])
        assert np.array_equal(ours[name], array), name


def test_default_steps_are_the_models(estimators, folders, bare) -> None:
    image = picture(32, 32)
    ours = estimators.estimate("depth", str(folders["depth"]), image, EstimateSettings(processing_resolution=0))
    prediction = bare["depth"](
        image, num_inference_steps=4, processing_resolution=0, generator=torch.Generator("cpu").manual_seed(0)
    ).prediction
    assert bare["depth"].default_denoising_steps == 4
    assert np.array_equal(ours.depth, prediction[0, :, :, 0])


def test_value_ranges(estimators, folders) -> None:
    image = picture(32, 32)
    settings = EstimateSettings(steps=1, processing_resolution=0)
    normals = estimators.estimate("normals", str(folders["normals"]), image, settings).normals
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-4)  # unit vectors
    intrinsics = estimators.estimate("intrinsics", str(folders["intrinsics"]), image, settings)
    for array in (intrinsics.albedo, intrinsics.roughness, intrinsics.metallic):
        assert 0.0 <= array.min() and array.max() <= 1.0
    assert not np.array_equal(intrinsics.roughness, intrinsics.metallic)  # two different channels


# --- 2. seamless: equivariant to circular shifts ---------------------------------------------------------


@contextlib.contextmanager
def rolled_noise(kind: str, shift: tuple[int, int]):
    """The pipeline's initial noise, circularly shifted by `shift` latent cells (dy, dx)."""
    module = importlib.import_module(NOISE_MODULES[kind])
    original = module.randn_tensor

    def rolled(*args, **kwargs):
        return torch.roll(original(*args, **kwargs), shift, dims=(-2, -1))

    module.randn_tensor = rolled
    try:
        yield
    finally:
        module.randn_tensor = original


def roll_error(estimators, folders, kind: str, axes: str, shift: tuple[int, int], resolution: int = 0) -> float:
    """max |estimate(roll(image)) - roll(estimate(image))| over every map; the noise rolls with the image."""
    image = picture(64, 64, seed=3)
    settings = EstimateSettings(steps=2, processing_resolution=resolution, seamless=axes)
    plain = maps(estimators.estimate(kind, str(folders[kind]), image, settings))
    scale = 2 * (64 // (resolution or 64))  # pixels per latent cell: VAE factor 2 x the resize
    shifted_image = PIL.Image.fromarray(np.roll(np.asarray(image), shift, axis=(0, 1)))
    with rolled_noise(kind, (shift[0] // scale, shift[1] // scale)):
        shifted = maps(estimators.estimate(kind, str(folders[kind]), shifted_image, settings))
    return max(float(np.abs(shifted[k] - np.roll(plain[k], shift, axis=(0, 1))).max()) for k in plain)


def test_seamless_xy_commutes_with_shifts(estimators, folders) -> None:
    assert roll_error(estimators, folders, "normals", "xy", (8, 20)) < 1e-4
    assert roll_error(estimators, folders, "normals", "none", (8, 20)) > 1e-2  # zero padding: the test can fail


def test_seamless_x_only(estimators, folders) -> None:
    assert roll_error(estimators, folders, "depth", "x", (0, 24)) < 1e-4
    assert roll_error(estimators, folders, "depth", "x", (8, 0)) > 1e-2  # y does not wrap


def test_seamless_with_resizing(estimators, folders) -> None:
    """At half the size, our wrapping resize keeps the estimate shift-equivariant; Marigold's own does not."""
    assert roll_error(estimators, folders, "intrinsics", "xy", (16, 8), resolution=32) < 1e-4
    assert roll_error(estimators, folders, "intrinsics", "none", (16, 8), resolution=32) > 1e-2


def test_seamless_rounds_processing_size(estimators, folders) -> None:
    """A size the U-Net cannot halve evenly is processed at a multiple of 4 (VAE 2 x U-Net 2); the maps come back
    at the image's size, still unit normals."""
    image = picture(30, 30, seed=5)
    settings = EstimateSettings(steps=1, processing_resolution=0, seamless="xy")
    estimate = estimators.estimate("normals", str(folders["normals"]), image, settings)
    assert estimate.normals.shape == (30, 30, 3)
    np.testing.assert_allclose(np.linalg.norm(estimate.normals, axis=-1), 1.0, atol=1e-4)


@pytest.mark.parametrize(("source", "target", "antialias"), [(60, 48, True), (32, 64, False), (45, 30, True)])
def test_wrap_resize_is_the_plain_resize_of_the_repeated_image(source: int, target: int, antialias: bool) -> None:
    """Resizing with wrapping equals resizing three copies side by side with torch and keeping the middle one."""
    image = torch.rand(1, 3, source, source, generator=torch.Generator().manual_seed(0))
    tiled = torch.nn.functional.interpolate(
        image.repeat(1, 1, 3, 3), (3 * target, 3 * target), mode="bilinear", antialias=antialias
    )[:, :, target : 2 * target, target : 2 * target]
    torch.testing.assert_close(wrap_resize(image, (target, target), "xy", antialias), tiled, atol=1e-5, rtol=0)
    plain = torch.nn.functional.interpolate(image, (target, target), mode="bilinear", antialias=antialias)
    assert (wrap_resize(image, (target, target), "none", antialias) == plain).all()  # "none": torch's own
    assert (wrap_resize(image, (target, target), "xy", antialias) - plain).abs().max() > 1e-2  # the edges differ


def test_seamless_size() -> None:
    assert seamless_size(64, 64, 0, 4) == (64, 64)
    assert seamless_size(1000, 600, 768, 64) == (768, 448)  # 768 x 460 rounded to the U-Net's 64 px cells
    assert seamless_size(30, 1000, 0, 64) == (64, 1024)  # never below one cell


def test_alpha_and_grey_pictures_are_read_as_rgb(estimators, folders) -> None:
    image, settings = picture(16, 16), EstimateSettings(steps=1, processing_resolution=0)
    rgb = estimators.estimate("depth", str(folders["depth"]), image, settings).depth
    rgba = estimators.estimate("depth", str(folders["depth"]), image.convert("RGBA"), settings).depth
    assert np.array_equal(rgb, rgba)
    grey = estimators.estimate("depth", str(folders["depth"]), image.convert("L"), settings).depth
    assert grey.shape == (16, 16)


# --- 3. errors -------------------------------------------------------------------------------------------


def refusal(estimators, kind: str, model: str, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        estimators.estimate(kind, model, picture(16, 16), EstimateSettings(steps=1), **kwargs)
    return info.value


def test_single_file_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "marigold.safetensors"
    checkpoint.write_bytes(b"\0" * 16)
    fresh = Estimators()
    error = refusal(fresh, "normals", str(checkpoint))
    assert error.code == INVALID_PARAMS and error.data["param"] == "normals_model"
    assert "hub id" in error.message and "diffusers folder" in error.message and "normals_model" in error.message
    assert refusal(fresh, "depth", str(checkpoint), param="model").data["param"] == "model"
    pickle = tmp_path / "marigold.ckpt"
    pickle.write_bytes(b"\0" * 16)
    assert refusal(fresh, "intrinsics", str(pickle)).code == INVALID_PARAMS  # a file either way, not "unsafe"
    assert not fresh.loads


def test_wrong_pipeline_refused(folders, tmp_path: Path) -> None:
    fresh = Estimators()
    error = refusal(fresh, "normals", str(folders["depth"]))
    assert error.code == MODEL_LOAD_FAILED and error.data["param"] == "normals_model"
    assert "MarigoldDepthPipeline" in error.message and "MarigoldNormalsPipeline" in error.message
    generator = make_test_model(tmp_path / "sd")
    error = refusal(fresh, "intrinsics", str(generator))
    assert "StableDiffusionPipeline" in error.message and error.data["param"] == "intrinsics_model"


def test_missing_folder_named_by_the_estimators_param(tmp_path: Path) -> None:
    error = refusal(Estimators(), "depth", str(tmp_path / "nowhere"))
    assert error.data["param"] == "depth_model"


@pytest.mark.parametrize(
    ("kind", "settings", "param"),
    [
        ("albedo", EstimateSettings(), "estimator"),
        ("normals", EstimateSettings(ensemble_size=0), "ensemble_size"),
        ("normals", EstimateSettings(steps=-1), "estimate_steps"),
        ("normals", EstimateSettings(processing_resolution=-8), "processing_resolution"),
        ("normals", EstimateSettings(seamless="z"), "seamless"),
    ],
)
def test_bad_settings_refused_before_loading(folders, kind: str, settings: EstimateSettings, param: str) -> None:
    fresh = Estimators()
    with pytest.raises(ProtocolError) as info:
        fresh.estimate(kind, str(folders["normals"]), picture(16, 16), settings)
    assert info.value.code == INVALID_PARAMS and info.value.data["param"] == param
    assert not fresh.loads


def test_processing_resolution_must_fit_the_vae(estimators, folders) -> None:
    with pytest.raises(ProtocolError, match="multiple of 2") as info:
        estimators.estimate("normals", str(folders["normals"]), picture(16, 16), EstimateSettings(1, 1, 33))
    assert info.value.data["param"] == "processing_resolution"


# --- 4. progress and cancel ------------------------------------------------------------------------------


def test_progress_counts_every_step(estimators, folders) -> None:
    calls: list[tuple[int, int]] = []
    settings = EstimateSettings(steps=2, ensemble_size=2, processing_resolution=0)
    estimators.estimate(
        "normals", str(folders["normals"]), picture(16, 16), settings, on_step=lambda *a: calls.append(a)
    )
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    calls.clear()
    estimators.estimate("depth", str(folders["depth"]), picture(16, 16), EstimateSettings(processing_resolution=0),
                        on_step=lambda *a: calls.append(a))  # fmt: skip
    assert calls == [(step, 4) for step in range(1, 5)]  # steps 0: the model's default, 4


def test_cancel_stops_and_leaves_the_model_clean(estimators, folders) -> None:
    image, folder = picture(32, 32), str(folders["normals"])
    settings = EstimateSettings(steps=2, processing_resolution=0)
    before = estimators.estimate("normals", folder, image, settings).normals
    calls: list[tuple[int, int]] = []
    with pytest.raises(Cancelled):
        estimators.estimate("normals", folder, image, EstimateSettings(2, 1, 0, "xy"),
                            on_step=lambda *a: calls.append(a), is_cancelled=lambda: bool(calls))  # fmt: skip
    assert calls == [(1, 2)]
    calls.clear()
    after = estimators.estimate("normals", folder, image, settings, on_step=lambda *a: calls.append(a)).normals
    assert np.array_equal(before, after)  # no seamless patch left behind
    assert calls == [(1, 2), (2, 2)]  # and no hook left counting


# --- 5. warm ---------------------------------------------------------------------------------------------


def test_models_stay_warm_side_by_side(folders, tmp_path: Path) -> None:
    fresh = Estimators()
    settings, image = EstimateSettings(steps=1, processing_resolution=0), picture(16, 16)
    for _ in range(2):
        fresh.estimate("normals", str(folders["normals"]), image, settings)
        fresh.estimate("depth", str(folders["depth"]), image, settings)
    assert fresh.loads == {"normals": 1, "depth": 1}
    assert set(fresh.warm()) == {"normals", "depth"}
    other = make_test_estimator(tmp_path / "normals-2", "normals", seed=1)
    fresh.estimate("normals", str(other), image, settings)  # another normals model replaces the first one only
    assert fresh.loads == {"normals": 2, "depth": 1}
    assert fresh.warm() == {"normals": str(other), "depth": str(folders["depth"])}
    fresh.release()
    assert fresh.warm() == {}
