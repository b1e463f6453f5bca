"""Estimated PBR maps in every task: each map's method (classical filters or a Marigold model), metallic and the
delit albedo, map_sources, the estimate task, early checks of the estimator models, and seamless estimates.

The estimators are H1a's tiny seeded Marigold pipelines (random weights: the maps are noise, but every call runs
the real diffusers pipeline), so the proofs are equalities: a map equals the documented conversion of the
Estimators' own output, classical maps equal derive_maps, and maps of a rolled tiling image are the rolled maps.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from test_estimators import rolled_noise
from worker_process import WorkerProcess

from backend.context import Cancelled, JobContext
from backend.estimators import EstimateSettings, Estimators
from backend.inputs import InputStore
from backend.models import ModelManager
from backend.pbr import derive_maps, maps_for
from backend.tasks import estimate as estimate_task
from backend.tasks import pbr as pbr_task
from backend.tasks import travel as travel_task
from backend.tasks import txt2img
from backend.tiny_marigold import make_test_estimator
from sdtex_contract import protocol
from sdtex_contract.protocol import GenerateParams, PbrParams, ProtocolError, TravelParams

KINDS = ("depth", "normals", "intrinsics")
ALL_MODEL = {"normal_method": "model", "height_method": "model", "roughness_method": "model",
             "metallic_method": "model", "delight": True}  # fmt: skip
FAST = {"estimate_steps": 1, "processing_resolution": 0}


class CountingEstimators(Estimators):
    """Estimators that record each estimate asked of them (kind, model)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def estimate(self, kind, model, image, settings, **kwargs):
        self.calls.append((kind, model))
        return super().estimate(kind, model, image, settings, **kwargs)


@pytest.fixture(scope="module")
def estimator_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("marigold")
    return {kind: str(make_test_estimator(root / kind, kind)) for kind in KINDS}


@pytest.fixture(scope="module")
def estimators() -> CountingEstimators:
    return CountingEstimators()


@pytest.fixture
def albedo_file(tmp_path) -> Path:
    rng = np.random.default_rng(3)
    path = tmp_path / "bricks.png"
    PIL.Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)  # not square
    return path


def models_of(dirs: dict[str, str]) -> dict[str, str]:
    return {f"{kind}_model": model for kind, model in dirs.items()}


def pbr_params(image: Path, out: Path, dirs: dict[str, str], **settings) -> PbrParams:
    request = {"image": {"path": str(image)}, "output_dir": str(out)} | models_of(dirs) | FAST | settings
    return PbrParams.from_dict(request)


def context(estimators: Estimators | None, events: list | None = None, cancel=lambda: False) -> JobContext:
    emit = (lambda kind, data: events.append((kind, data))) if events is not None else (lambda kind, data: None)
    return JobContext("job", ModelManager(), InputStore(), emit=emit, is_cancelled=cancel, estimators=estimators)


def own_estimate(estimators: Estimators, kind: str, model: str, image: PIL.Image.Image, seamless: str = "none"):
    settings = EstimateSettings(steps=1, ensemble_size=1, processing_resolution=0, seamless=seamless)
    return estimators.estimate(kind, model, image.convert("RGB"), settings)


def documented_normals(n: np.ndarray, strength: float = 1.0, normal_format: str = "opengl") -> np.ndarray:
    """The normal map's 8-bit levels from Marigold's normals (x right, y up, z to the viewer = OpenGL tangent
    space): the tilt scaled by strength, normals facing away laid flat, unit length; DirectX flips green."""
    n = n.astype(np.float64)
    v = np.stack([strength * n[..., 0], strength * n[..., 1], np.clip(n[..., 2], 0, None)], axis=-1)
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    if normal_format == "directx":
        v[..., 1] = -v[..., 1]
    return np.round((v * 0.5 + 0.5) * 255)


def levels(path: str) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image).astype(np.int64)


# --- the pbr task with every method "model" ------------------------------------------------------------------


def test_every_method_model_writes_all_maps_with_their_sources(estimator_dirs, estimators, albedo_file, tmp_path):
    events: list = []
    params = pbr_params(albedo_file, tmp_path / "out", estimator_dirs, **ALL_MODEL)
    estimators.calls.clear()
    result = pbr_task.run(context(estimators, events), params)
    record = result.images[0]
    expected = {"height": "I;16", "normal": "RGB", "roughness": "L", "ao": "L", "metallic": "L", "albedo": "RGB"}
    found = {}
    for name, path in record.maps.items():
        assert Path(path).name == f"bricks_{name}.png"
        with PIL.Image.open(path) as image:
            found[name] = image.mode
            assert image.size == (56, 40)
    assert found == expected
    depth, normals, intrinsics = (f"model:{estimator_dirs[kind]}" for kind in KINDS)
    assert record.map_sources == {"height": depth, "normal": normals, "roughness": intrinsics, "ao": "classical",
                                  "metallic": intrinsics, "albedo": intrinsics}  # fmt: skip
    # Each estimator ran once: intrinsics served roughness, metallic and the albedo together.
    assert sorted(kind for kind, _ in estimators.calls) == ["depth", "intrinsics", "normals"]
    # The original albedo stays; the delit one is a map, not a generated picture (no A1111 chunk).
    assert record.path == str(albedo_file) and levels(str(albedo_file)).shape == (40, 56, 3)
    with PIL.Image.open(record.maps["albedo"]) as delit:
        assert set(delit.text) == {"sdtex"} and json.loads(delit.text["sdtex"])["role"] == "delit_albedo"
    artifacts = [data for kind, data in events if kind == protocol.EVENT_ARTIFACT]
    assert {(a["kind"], a["role"]) for a in artifacts} == {("map", name) for name in expected}
    stages = [data["stage"] for kind, data in events if kind == protocol.EVENT_STATUS]
    assert "estimating_maps" in stages and stages[-1] == "saving"
    steps = [(data["step"], data["total"]) for kind, data in events if kind == protocol.EVENT_PROGRESS]
    assert steps == [(1, 1)] * 3  # one step of each of the three estimators


def test_all_classical_maps_equal_derive_maps(albedo_file, tmp_path):
    image = PIL.Image.open(albedo_file)
    params = PbrParams.from_dict({"image": {"path": str(albedo_file)}, "output_dir": "/o", "seamless": "x",
                                  "normal_strength": 2.0, "ao_strength": 0.5})  # fmt: skip
    maps, sources = maps_for(image, params)
    classical = derive_maps(image, wrap_x=True, wrap_y=False, strength=2.0, ao_strength=0.5)
    assert list(maps) == list(classical) and all(np.array_equal(maps[n], classical[n]) for n in classical)
    assert sources == dict.fromkeys(classical, "classical")


@pytest.mark.parametrize("strength, normal_format", [(1.0, "opengl"), (0.5, "opengl"), (2.0, "directx")])
def test_model_normals_are_the_documented_conversion(estimator_dirs, estimators, albedo_file, strength,
                                                     normal_format):  # fmt: skip
    image = PIL.Image.open(albedo_file)
    params = pbr_params(albedo_file, Path("/o"), estimator_dirs, normal_method="model", normal_strength=strength,
                        normal_format=normal_format)  # fmt: skip
    maps, sources = maps_for(image, params, estimators)
    n = own_estimate(estimators, "normals", estimator_dirs["normals"], image).normals
    expected = documented_normals(n, strength, normal_format)
    assert np.abs(np.asarray(maps["normal"]).astype(np.int64) - expected).max() <= 1
    assert sources["normal"] == f"model:{estimator_dirs['normals']}" and sources["height"] == "classical"


def test_model_height_roughness_metallic_and_albedo_are_the_estimates(estimator_dirs, estimators, albedo_file):
    image = PIL.Image.open(albedo_file)
    params = pbr_params(albedo_file, Path("/o"), estimator_dirs, **ALL_MODEL)
    maps, _ = maps_for(image, params, estimators)
    depth = own_estimate(estimators, "depth", estimator_dirs["depth"], image).depth
    intrinsics = own_estimate(estimators, "intrinsics", estimator_dirs["intrinsics"], image)
    assert np.abs(np.asarray(maps["height"]).astype(np.int64) - np.round((1 - depth) * 65535)).max() <= 1  # near=high
    for name, value in (("roughness", intrinsics.roughness), ("metallic", intrinsics.metallic),
                        ("albedo", intrinsics.albedo)):  # fmt: skip
        assert np.abs(np.asarray(maps[name]).astype(np.int64) - np.round(np.clip(value, 0, 1) * 255)).max() <= 1
    # Lower contrast narrows the estimated roughness around its mean; the estimate itself is no constant.
    flatter, _ = maps_for(image, replace(params, roughness_contrast=0.25), estimators)
    assert np.std(np.asarray(flatter["roughness"])) < 0.5 * np.std(np.asarray(maps["roughness"])) > 0


# --- checks before expensive work ------------------------------------------------------------------------------


def test_an_empty_model_for_a_model_method_is_refused_naming_it_before_anything(estimator_dirs, tmp_path):
    counting = CountingEstimators()
    missing_image = tmp_path / "not-there.png"  # the model check comes first, before the image is read
    for settings, param in ((dict(normal_method="model", normals_model=""), "normals_model"),
                            (dict(delight=True, intrinsics_model=" "), "intrinsics_model")):  # fmt: skip
        params = pbr_params(missing_image, tmp_path / "out", estimator_dirs, **settings)
        with pytest.raises(ProtocolError) as error:
            pbr_task.run(context(counting), params)
        assert error.value.code == protocol.INVALID_PARAMS and error.value.data["param"] == param
        assert param in error.value.message
    assert counting.calls == [] and not counting.loads


def test_unusable_estimator_models_are_refused_naming_the_param(estimator_dirs, tiny_model_dir, tmp_path):
    checkpoint = tmp_path / "marigold.safetensors"
    checkpoint.write_bytes(b"not really")
    cases = {
        "single file": (dict(normal_method="model", normals_model=str(checkpoint)), "normals_model"),
        "another pipeline": (dict(height_method="model", depth_model=str(tiny_model_dir)), "depth_model"),
        "the wrong estimator": (dict(roughness_method="model", intrinsics_model=estimator_dirs["depth"]),
                                "intrinsics_model"),
        "missing": (dict(metallic_method="model", intrinsics_model=str(tmp_path / "nope")), "intrinsics_model"),
    }  # fmt: skip
    for case, (settings, param) in cases.items():
        with pytest.raises(ProtocolError) as error:
            pbr_task.run(context(CountingEstimators()), pbr_params(tmp_path / "x.png", tmp_path, estimator_dirs,
                                                                   **settings))  # fmt: skip
        assert error.value.data["param"] == param and param in error.value.message, case


def test_txt2img_refuses_a_bad_estimator_before_the_generator_loads(tiny_model_dir, tmp_path):
    events: list = []
    params = GenerateParams.from_dict({"model": str(tiny_model_dir), "prompt": "moss", "steps": 1, "width": 64,
                                       "height": 64, "output_dir": str(tmp_path), "pbr": True,
                                       "normal_method": "model", "normals_model": str(tiny_model_dir)})  # fmt: skip
    with pytest.raises(ProtocolError) as error:
        txt2img.run(context(None, events), params)
    assert error.value.data["param"] == "normals_model"
    assert not any(kind == protocol.EVENT_STATUS for kind, _ in events)  # nothing loaded, nothing generated


def test_an_uncached_hub_estimator_is_refused_first_while_offline(tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    events: list = []
    params = GenerateParams.from_dict({"model": str(tiny_model_dir), "prompt": "moss", "steps": 1, "width": 64,
                                       "height": 64, "output_dir": str(tmp_path), "pbr": True,
                                       "delight": True, "intrinsics_model": "someone/marigold-iid"})  # fmt: skip
    with pytest.raises(ProtocolError) as error:
        txt2img.run(context(None, events), params)
    assert error.value.code == protocol.MODEL_NOT_FOUND and error.value.data["param"] == "intrinsics_model"
    assert "download" in error.value.message and not events  # refused before the generation it would have wasted


# --- other tasks take the methods ----------------------------------------------------------------------------


def test_txt2img_with_a_model_method_gets_its_maps(estimator_dirs, estimators, tiny_model_dir, tmp_path):
    events: list = []
    request = {
        "model": str(tiny_model_dir),
        "prompt": "moss",
        "steps": 1,
        "width": 64,
        "height": 64,
        "seed": 5,
        "output_dir": str(tmp_path),
        "pbr": True,
        "normal_method": "model",
        "metallic_method": "model",
    }
    params = GenerateParams.from_dict(request | models_of(estimator_dirs) | FAST)  # fmt: skip
    record = txt2img.run(context(estimators, events), params).images[0]
    assert set(record.maps) == {"height", "normal", "roughness", "ao", "metallic"}
    assert record.map_sources["normal"] == f"model:{estimator_dirs['normals']}"
    assert record.map_sources["metallic"] == f"model:{estimator_dirs['intrinsics']}"
    assert record.map_sources["roughness"] == "classical"
    # The normal map is the conversion of the estimate of the albedo the job wrote.
    n = own_estimate(estimators, "normals", estimator_dirs["normals"], PIL.Image.open(record.path)).normals
    assert np.abs(levels(record.maps["normal"]) - documented_normals(n)).max() <= 1
    stages = [data["stage"] for kind, data in events if kind == protocol.EVENT_STATUS]
    assert stages[-3:] == ["saving", "estimating_maps", "saving"]


def test_travel_frames_get_estimated_maps_next_to_their_own_albedo(estimator_dirs, estimators, tiny_model_dir,
                                                                   tmp_path):  # fmt: skip
    keys = [{"prompt": "red clay", "seed": 1}, {"prompt": "blue waves", "seed": 2}]
    request = {
        "model": str(tiny_model_dir),
        "output_dir": str(tmp_path),
        "keyframes": keys,
        "frames": 2,
        "steps": 1,
        "width": 64,
        "height": 64,
        "pbr": True,
        "normal_method": "model",
        "delight": True,
    }
    result = travel_task.run(context(estimators), TravelParams.from_dict(request | models_of(estimator_dirs) | FAST))
    for record in result.images:
        assert set(record.maps) == {"height", "normal", "roughness", "ao", "albedo"}
        assert record.maps["albedo"] == record.path.removesuffix(".png") + "_albedo.png"
        assert all(Path(path).is_file() for path in (record.path, *record.maps.values()))
        assert record.map_sources["albedo"] == f"model:{estimator_dirs['intrinsics']}"
        assert not np.array_equal(levels(record.path), levels(record.maps["albedo"]))


# --- the estimate task -----------------------------------------------------------------------------------------


def estimate_request(kind: str, image: Path, out: Path, model: str, **settings) -> dict:
    return {"task": "estimate", "estimator": kind, "model": model, "image": {"path": str(image)},
            "output_dir": str(out)} | FAST | settings  # fmt: skip


def test_the_estimate_task_through_the_worker(estimator_dirs, albedo_file, tmp_path):
    worker = WorkerProcess()
    try:
        reply, events = worker.call(
            protocol.RUN, estimate_request("normals", albedo_file, tmp_path, estimator_dirs["normals"], ensemble_size=2)
        )
    finally:
        worker.close()
    assert "result" in reply, reply
    result = protocol.GenerateResult.from_dict(reply["result"])
    record = result.images[0]
    assert result.task == "estimate" and record.path == str(albedo_file)
    assert record.maps == {"normal": str(tmp_path / "bricks_normal.png")}
    assert record.map_sources == {"normal": f"model:{estimator_dirs['normals']}"}
    assert {"load", "estimate", "save", "total"} <= set(result.timings)
    artifacts = [e["data"] for e in events if e["event"] == protocol.EVENT_ARTIFACT]
    assert [(a["path"], a["kind"], a["role"]) for a in artifacts] == [(record.maps["normal"], "map", "normal")]
    progress = [(e["data"]["step"], e["data"]["total"]) for e in events if e["event"] == protocol.EVENT_PROGRESS]
    assert progress == [(1, 2), (2, 2)]  # one step per ensemble member
    stages = [e["data"]["stage"] for e in events if e["event"] == protocol.EVENT_STATUS]
    assert stages == ["loading_model", "estimating_maps", "saving"]


def test_the_estimate_task_writes_depth_near_bright_and_the_intrinsics(estimator_dirs, estimators, albedo_file,
                                                                       tmp_path):  # fmt: skip
    image = PIL.Image.open(albedo_file)
    run = lambda kind: estimate_task.run(  # noqa: E731
        context(estimators), protocol.task_params(estimate_request(kind, albedo_file, tmp_path, estimator_dirs[kind]))
    ).images[0]
    depth = run("depth")
    with PIL.Image.open(depth.maps["depth"]) as written:
        assert written.mode == "I;16" and json.loads(written.text["sdtex"])["role"] == "depth"
    own = own_estimate(estimators, "depth", estimator_dirs["depth"], image).depth
    assert np.abs(levels(depth.maps["depth"]) - np.round((1 - own) * 65535)).max() <= 1
    intrinsics = run("intrinsics")
    assert set(intrinsics.maps) == {"albedo", "roughness", "metallic"}
    own = own_estimate(estimators, "intrinsics", estimator_dirs["intrinsics"], image)
    assert np.abs(levels(intrinsics.maps["metallic"]) - np.round(own.metallic * 255)).max() <= 1
    assert set(intrinsics.map_sources.values()) == {f"model:{estimator_dirs['intrinsics']}"}


def test_the_estimate_task_refuses_another_kinds_model_and_honours_cancel(estimator_dirs, albedo_file, tmp_path):
    request = estimate_request("normals", albedo_file, tmp_path, estimator_dirs["depth"])
    with pytest.raises(ProtocolError) as error:
        estimate_task.run(context(CountingEstimators()), protocol.task_params(request))
    assert error.value.data["param"] == "model" and "MarigoldNormalsPipeline" in error.value.message
    cancelled = protocol.task_params(request | {"model": estimator_dirs["normals"]})
    with pytest.raises(Cancelled):
        estimate_task.run(context(CountingEstimators(), cancel=lambda: True), cancelled)
    assert not list(tmp_path.glob("bricks_*.png"))


def test_cancel_stops_the_estimated_maps(estimator_dirs, estimators, albedo_file, tmp_path):
    events: list = []
    cancel = lambda: any(kind == protocol.EVENT_STATUS and d["stage"] == "estimating_maps" for kind, d in events)  # noqa: E731
    with pytest.raises(Cancelled):
        pbr_task.run(
            context(estimators, events, cancel), pbr_params(albedo_file, tmp_path, estimator_dirs, **ALL_MODEL)
        )
    assert not any(kind == protocol.EVENT_ARTIFACT for kind, _ in events)


# --- seamless ----------------------------------------------------------------------------------------------------


def tiling_image(size: int = 64) -> PIL.Image.Image:
    """Whole periods across the image: it tiles by construction."""
    y, x = np.mgrid[0:size, 0:size] / size
    waves = [np.sin(2 * np.pi * (2 * x + y)), np.cos(2 * np.pi * 3 * y), np.sin(2 * np.pi * (x - 2 * y))]
    return PIL.Image.fromarray(np.round((0.5 + 0.4 * np.stack(waves, axis=-1)) * 255).astype(np.uint8))


def roll_mismatch(estimator_dirs, estimators, seamless: str, shift=(16, 24)) -> dict[str, int]:
    """Per map: max level difference between the maps of the rolled image and the rolled maps. Each estimator's
    initial noise rolls with the image (by the shift over the tiny VAE's factor 2), as H1a's estimator test does:
    then a seamless estimate commutes with the shift exactly."""
    image = tiling_image()
    rolled = PIL.Image.fromarray(np.roll(np.asarray(image), shift, axis=(0, 1)))
    params = pbr_params(Path("/x.png"), Path("/o"), estimator_dirs, seamless=seamless, **ALL_MODEL)
    maps, _ = maps_for(image, params, estimators)
    with contextlib.ExitStack() as stack:
        for kind in KINDS:
            stack.enter_context(rolled_noise(kind, (shift[0] // 2, shift[1] // 2)))
        maps_of_rolled, _ = maps_for(rolled, params, estimators)
    return {
        name: int(np.abs(np.asarray(maps_of_rolled[name]).astype(np.int64)
                         - np.roll(np.asarray(maps[name]).astype(np.int64), shift, axis=(0, 1))).max())
        for name in maps
    }  # fmt: skip


def test_seamless_estimated_maps_tile(estimator_dirs, estimators):
    tiled = roll_mismatch(estimator_dirs, estimators, "xy")
    # Rounding: 1 level (the estimates agree within 1e-4, 6.5 levels of 16 bits; measured: 1).
    assert max(tiled.values()) <= 1 and tiled["height"] <= 2, tiled
    seams = roll_mismatch(estimator_dirs, estimators, "none")
    assert seams["normal"] > 5 and seams["height"] > 500, seams  # without wrapping the same check fails


def test_seamless_x_estimated_maps_tile_along_x_only(estimator_dirs, estimators):
    along_x = roll_mismatch(estimator_dirs, estimators, "x", shift=(0, 24))
    assert max(along_x.values()) <= 1 and along_x["height"] <= 2, along_x
    along_y = roll_mismatch(estimator_dirs, estimators, "x", shift=(16, 0))
    assert along_y["normal"] > 5, along_y


def test_projection_bakes_get_estimated_maps_and_bad_models_are_refused_first(estimator_dirs, estimators,
                                                                              tiny_model_dir, tmp_path):  # fmt: skip
    from test_project_task import cameras, request, scene

    from backend.tasks import project
    from backend.tiny_model import make_test_controlnet
    from benchmarks.project import cube

    controlnet = make_test_controlnet(tmp_path / "controlnet", tiny_model_dir, seed=0)
    store = InputStore()
    arrays = scene(cube(size=1.0)) | {"cameras": cameras(per_ring=1)}
    methods = {"pbr": True, "roughness_method": "model", "metallic_method": "model"} | models_of(estimator_dirs) | FAST
    params = request(store, arrays, tiny_model_dir, controlnet, tmp_path, **methods)
    events: list = []
    bad = replace(params, intrinsics_model=str(tiny_model_dir))
    with pytest.raises(ProtocolError) as error:
        project.run(JobContext("p", ModelManager(), store, emit=lambda k, d: events.append(k)), bad)
    assert error.value.data["param"] == "intrinsics_model" and protocol.EVENT_STATUS not in events
    texture = project.run(JobContext("p", ModelManager(), store, estimators=estimators), params).images[0]
    assert set(texture.maps) == {"height", "normal", "roughness", "ao", "metallic"}
    assert (
        texture.map_sources["metallic"] == texture.map_sources["roughness"] == f"model:{estimator_dirs['intrinsics']}"
    )
    with PIL.Image.open(texture.maps["metallic"]) as metallic, PIL.Image.open(texture.path) as albedo:
        assert metallic.mode == "L" and metallic.size == albedo.size
