"""The `project` task on tiny random models: parity of the depth-ControlNet generation with diffusers' own
pipeline, a whole job (views in order, files and events, inpainting of what is left), cancel, bad inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import ControlNetModel, EulerAncestralDiscreteScheduler, StableDiffusionControlNetPipeline

from backend import controlnets
from backend import projection as geometry
from backend.context import Cancelled, JobContext
from backend.inputs import InputStore
from backend.models import ModelManager
from backend.tasks import project
from backend.tiny_model import make_test_controlnet
from benchmarks.project import cube, uv_sphere
from blender_sd_addon.projection import orbit_views
from sdtex_contract.protocol import (
    EVENT_ARTIFACT,
    EVENT_PROGRESS,
    EVENT_STATUS,
    INVALID_PARAMS,
    ProjectParams,
    ProtocolError,
    model_params,
)

SIZE = 64


@pytest.fixture(scope="module")
def controlnet_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_test_controlnet(tmp_path_factory.mktemp("controlnet") / "tiny-controlnet", tiny_model_dir, seed=0)


@pytest.fixture(scope="module")
def manager() -> ModelManager:
    return ModelManager()


def scene(*meshes: geometry.Mesh, occluder: geometry.Mesh | None = None) -> dict[str, np.ndarray]:
    """The arrays of a request: the meshes as objects 0, 1, ... (and an occluder as -1)."""
    parts = [(m, i) for i, m in enumerate(meshes)] + ([(occluder, -1)] if occluder is not None else [])
    return {
        "triangles": torch.cat([m.triangles for m, _ in parts]).numpy(),
        "uvs": torch.cat([m.uvs for m, _ in parts]).numpy(),
        "object_index": torch.cat([torch.full((len(m.triangles),), i, dtype=torch.int32) for m, i in parts]).numpy(),
    }


def cameras(centre=(0.0, 0.0, 0.0), radius=1.8, per_ring=3, elevations=(20.0,)) -> np.ndarray:
    views = orbit_views(centre, radius, per_ring=per_ring, elevations=elevations)
    return np.array(views, dtype=np.float32)


def request(store: InputStore, arrays: dict, tiny_model_dir, controlnet_dir, tmp_path, **changes) -> ProjectParams:
    refs = {}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        refs[name] = {"sha256": store.put(array.tobytes()), "dtype": str(array.dtype), "shape": list(array.shape)}
    values = dict(
        model=str(tiny_model_dir),
        controlnet=str(controlnet_dir),
        prompt="weathered bronze statue",
        seed=7,
        steps=2,
        width=SIZE,
        height=SIZE,
        texture_size=64,
        output_dir=str(tmp_path / "out"),
        **refs,
    )
    return ProjectParams.from_dict({**values, **changes})


class Events(list):
    def __call__(self, kind: str, data: dict) -> None:
        self.append((kind, data))

    def of(self, kind: str) -> list[dict]:
        return [data for k, data in self if k == kind]


def depth_of_sphere() -> PIL.Image.Image:
    view, projection = orbit_views((0, 0, 0), 1.0, per_ring=1)[0]
    cam = geometry.Camera(torch.tensor(view), torch.tensor(projection), SIZE, SIZE)
    return project.to_image(geometry.depth_image(geometry.render(uv_sphere(), cam))).convert("RGB")


def test_depth_controlnet_generation_equals_diffusers_own_pipeline(tiny_model_dir, controlnet_dir, manager, tmp_path):
    params = request(InputStore(), scene(cube()) | {"cameras": cameras()}, tiny_model_dir, controlnet_dir, tmp_path)
    model, _ = manager.get(model_params(params.to_dict()))
    pipe = controlnets.pipeline(model, str(controlnet_dir), "controlnet")
    depth = depth_of_sphere()
    embeds = project.encode_prompt(pipe, params, True, model.device, count=1)
    ours = project.generate_view(pipe, params, depth, 11, embeds)

    # diffusers' pipeline on independently loaded components, called as its documentation shows.
    reference = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_model_dir,
        controlnet=ControlNetModel.from_pretrained(controlnet_dir),
        safety_checker=None,
        requires_safety_checker=False,
    )
    reference.scheduler = EulerAncestralDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        params.prompt,
        image=depth,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(expected))

    # The depth steers the picture: another depth map gives another picture.
    flat = PIL.Image.new("RGB", depth.size, (128, 128, 128))
    other = project.generate_view(pipe, params, flat, 11, embeds)
    assert not np.array_equal(np.asarray(other), np.asarray(ours))


def test_a_job_paints_views_in_order_and_bakes_each_object(tiny_model_dir, controlnet_dir, manager, tmp_path):
    store = InputStore()
    sphere = uv_sphere(radius=0.6, segments=24, rings=12)
    sphere.triangles[..., 0] += 0.8
    box = cube(size=0.9)
    box.triangles[..., 0] -= 0.8
    arrays = scene(sphere, box) | {"cameras": cameras()}
    params = request(store, arrays, tiny_model_dir, controlnet_dir, tmp_path)
    events = Events()
    ctx = JobContext("p1", manager, store, emit=events)

    result = project.run(ctx, params)

    assert result.task == "project" and len(result.images) == 2 and len(result.views) == 3
    for record in result.images:
        with PIL.Image.open(record.path) as texture:
            assert texture.size == (64, 64)
            assert len(np.unique(np.asarray(texture).reshape(-1, 3), axis=0)) > 10  # painted, not a flat fill
    assert all(0.2 < c <= 1.0 for c in result.coverage), result.coverage
    stages = [e["stage"] for e in events.of(EVENT_STATUS)]
    assert [s for s in stages if s.startswith("view")] == ["view 1/3", "view 2/3", "view 3/3"]
    steps = [(e["step"], e["total"]) for e in events.of(EVENT_PROGRESS)]
    assert steps.count((2, 2)) == sum(not v["skipped"] for v in result.views)
    artifacts = events.of(EVENT_ARTIFACT)
    for view in result.views:
        if view["skipped"]:
            continue
        roles = {a["role"]: a["path"] for a in artifacts if a["kind"] == "view" and a["index"] == view["index"]}
        assert roles == {r: view[r] for r in ("image", "mask", "depth", "normal")}
        assert all(Path(p).is_file() for p in roles.values())
    assert [a["path"] for a in artifacts if a["kind"] == "image"] == [r.path for r in result.images]

    # The first view paints every surface pixel; a later one only what is left (inside the objects' depth).
    first, later = result.views[0], next(v for v in result.views[1:] if not v["skipped"])
    masks = [np.asarray(PIL.Image.open(v["mask"])) > 127 for v in (first, later)]
    depths = [np.asarray(PIL.Image.open(v["depth"]).convert("L")) > 0 for v in (first, later)]
    assert np.array_equal(masks[0], depths[0])
    assert masks[1].sum() > 0 and masks[1].sum() < depths[1].sum() and not (masks[1] & ~depths[1]).any()


def test_cancel_keeps_the_views_already_painted(tiny_model_dir, controlnet_dir, manager, tmp_path):
    store = InputStore()
    params = request(store, scene(cube()) | {"cameras": cameras()}, tiny_model_dir, controlnet_dir, tmp_path)
    events = Events()
    second_view = ("status", {"stage": "view 2/3"})
    ctx = JobContext("p2", manager, store, emit=events, is_cancelled=lambda: second_view in events)

    with pytest.raises(Cancelled):
        project.run(ctx, params)

    artifacts = events.of(EVENT_ARTIFACT)
    assert {a["role"] for a in artifacts if a["kind"] == "view"} == {"image", "mask", "depth", "normal"}
    assert {a["index"] for a in artifacts if a["kind"] == "view"} == {0}
    textures = [a for a in artifacts if a["kind"] == "image"]
    assert len(textures) == 1 and Path(textures[0]["path"]).is_file()


def bad(store, arrays, tiny_model_dir, controlnet_dir, tmp_path, **changes) -> ProtocolError:
    params = request(store, arrays, tiny_model_dir, controlnet_dir, tmp_path, **changes)
    with pytest.raises(ProtocolError) as caught:
        project.prepare(store, params)
    assert caught.value.code == INVALID_PARAMS
    return caught.value


def test_bad_geometry_is_refused_before_any_model_loads(tiny_model_dir, controlnet_dir, tmp_path):
    store = InputStore()
    views = {"cameras": cameras()}
    args = (tiny_model_dir, controlnet_dir, tmp_path)

    # An object with no faces: object 1's only triangle has no area.
    flat = scene(cube(), cube()) | views
    flat["object_index"][12:] = -1
    flat["object_index"][12] = 1
    flat["triangles"][12] = 0.0
    error = bad(store, flat, *args)
    assert error.data["param"] == "object_index" and "object 1 has no faces" in error.message

    # An object outside every view, and a view that sees nothing.
    far = cube()
    far.triangles += 50.0
    error = bad(store, scene(cube(), far) | views, *args)
    assert error.data["param"] == "cameras" and "object 1 is outside every view" in error.message
    away = cameras()
    away[1, 0, 2, 3] += 100.0  # view 1 moved back past the scene: it lies behind the camera
    error = bad(store, scene(cube()) | {"cameras": away}, *args)
    assert error.data["param"] == "cameras" and "view 1 sees none" in error.message

    # Overlapping UV islands: refused, or a warning when allowed.
    twice = scene(cube()) | views
    twice["uvs"][6:12] = twice["uvs"][0:6]
    error = bad(store, twice, *args)
    assert error.data["param"] == "uvs" and "overlap" in error.message
    allowed = request(store, twice, *args, allow_uv_overlap=True)
    assert any("overlap" in w for w in project.prepare(store, allowed).warnings)

    # Arrays that do not fit together.
    short = scene(cube()) | views
    short["uvs"] = short["uvs"][:5]
    assert bad(store, short, *args).data["param"] == "uvs"
    wrong = scene(cube()) | views
    wrong["object_index"] = wrong["object_index"].astype(np.float32)
    assert bad(store, wrong, *args).data["param"] == "object_index"


def test_a_job_with_bad_geometry_loads_nothing_and_writes_nothing(tiny_model_dir, controlnet_dir, tmp_path):
    store = InputStore()
    far = cube()
    far.triangles += 50.0
    params = request(store, scene(far) | {"cameras": cameras()}, tiny_model_dir, controlnet_dir, tmp_path)
    fresh = ModelManager()
    with pytest.raises(ProtocolError):
        project.run(JobContext("p3", fresh, store), params)
    assert fresh.loaded is None
    assert not any(Path(params.output_dir).glob("*.png"))


def test_orbit_views_frame_the_bounding_sphere():
    # Every point of the sphere projects inside the frame, and its silhouette nearly touches it.
    for view, projection in orbit_views((1.0, 2.0, 3.0), 2.0, per_ring=4, elevations=(0.0, 60.0), aspect=1.5):
        cam = geometry.Camera(torch.tensor(view), torch.tensor(projection), 96, 64)
        sphere = uv_sphere(radius=2.0)
        sphere.triangles += torch.tensor([1.0, 2.0, 3.0])
        clip = cam.clip(sphere.triangles.reshape(-1, 3))
        ndc = clip[:, :2] / clip[:, 3:]
        assert ndc.abs().max() <= 1.0 and ndc[:, 1].abs().max() > 1 / 1.1 - 0.05
        assert math.isclose(float(ndc[:, 0].abs().max()), float(ndc[:, 1].abs().max()) / 1.5, rel_tol=0.05)


def test_controlnets_are_located_safely(tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ProtocolError) as caught:
        controlnets.locate(str(pickled), allow_pickle=False)
    assert caught.value.code == "unsafe_checkpoint" and caught.value.data["param"] == "controlnet"
    assert controlnets.locate(str(pickled), allow_pickle=True) == ("folder", str(pickled))
    checkpoint = tmp_path / "depth.ckpt"
    checkpoint.write_bytes(b"not loaded")
    with pytest.raises(ProtocolError, match="pickle"):
        controlnets.locate(str(checkpoint), allow_pickle=False)
    with pytest.raises(ProtocolError) as caught:
        controlnets.locate(str(tmp_path / "missing"), allow_pickle=False)
    assert caught.value.code == "model_not_found"
    assert controlnets.locate("lllyasviel/control_v11f1p_sd15_depth", allow_pickle=False)[0] == "hub"


def test_an_object_hidden_inside_another_is_flagged_and_named(tiny_model_dir, controlnet_dir, manager, tmp_path):
    store = InputStore()
    inner = cube(size=0.3)  # inside the box: every view's depth test finds the box in front of it
    arrays = scene(cube(size=1.4), inner) | {"cameras": cameras()}
    params = request(store, arrays, tiny_model_dir, controlnet_dir, tmp_path)

    result = project.run(JobContext("p4", manager, store), params)

    assert result.coverage[0] > 0.5 and result.coverage[1] == 0.0
    assert result.unseen == [1]
    assert result.warnings == [
        "object 1: no view sees it (hidden inside another object or behind the cameras); its texture is a flat "
        "grey fill, left unapplied unless apply_unseen"
    ]
    with PIL.Image.open(result.images[1].path) as texture:  # grey, not black, should anyone apply it
        assert np.unique(np.asarray(texture).reshape(-1, 3), axis=0).tolist() == [[128, 128, 128]]


def test_objects_the_views_saw_little_of_get_a_warning_with_their_share():
    assert project.coverage_warnings([0.95, 0.0, 0.3]) == (
        [1],
        [
            "object 1: no view sees it (hidden inside another object or behind the cameras); its texture is a flat "
            "grey fill, left unapplied unless apply_unseen",
            "object 2: the views saw only 30% of it; the rest of its texture is filled from around (add views that "
            "face it)",
        ],
    )


# --- synchronized mode as a job (its maths: tests/backend/test_view_sync.py) ------------------------------


def test_a_synchronized_job_paints_every_view_at_once_and_bakes_each_object(
    tiny_model_dir, controlnet_dir, manager, tmp_path
):
    store = InputStore()
    sphere = uv_sphere(radius=0.6, segments=24, rings=12)
    sphere.triangles[..., 0] += 0.8
    box = cube(size=0.9)
    box.triangles[..., 0] -= 0.8
    params = request(store, scene(sphere, box) | {"cameras": cameras()}, tiny_model_dir, controlnet_dir, tmp_path,
                     mode="synchronized", scheduler="euler_a")  # fmt: skip
    events = Events()

    result = project.run(JobContext("s1", manager, store, emit=events), params)

    stages = [e["stage"] for e in events.of(EVENT_STATUS)]
    assert "views 1-3 together" in stages and not any(s.startswith("view ") for s in stages)
    assert [(e["step"], e["total"]) for e in events.of(EVENT_PROGRESS)] == [(1, 2), (2, 2)]  # one loop for all
    assert any("euler_a" in w and "euler" in w for w in result.warnings), result.warnings
    assert len(result.images) == 2 and all(0.2 < c <= 1.0 for c in result.coverage), result.coverage
    for record in result.images:
        with PIL.Image.open(record.path) as texture:
            assert len(np.unique(np.asarray(texture).reshape(-1, 3), axis=0)) > 10
    for view in result.views:
        assert all(Path(view[role]).is_file() for role in ("image", "mask", "depth", "normal"))
        assert view["seed"] == result.seed  # one noise texture for all views


def test_one_view_without_synchronization_is_todays_projection(tiny_model_dir, controlnet_dir, manager, tmp_path):
    store = InputStore()
    arrays = scene(uv_sphere(radius=0.7)) | {"cameras": cameras(per_ring=1)}
    textures = []
    for mode in ("sequential", "synchronized"):
        params = request(store, arrays, tiny_model_dir, controlnet_dir, tmp_path / mode, mode=mode, sync_until=0.0,
                         scheduler="ddim")  # fmt: skip
        result = project.run(JobContext(mode, manager, store), params)
        textures.append(np.asarray(PIL.Image.open(result.images[0].path)))
    assert np.array_equal(*textures)


def test_a_sampler_that_cannot_synchronize_is_refused_before_any_model_loads(tiny_model_dir, controlnet_dir, tmp_path):
    store = InputStore()
    params = request(store, scene(cube()) | {"cameras": cameras()}, tiny_model_dir, controlnet_dir, tmp_path,
                     mode="synchronized", scheduler="lcm")  # fmt: skip
    fresh = ModelManager()
    with pytest.raises(ProtocolError) as caught:
        project.run(JobContext("s3", fresh, store), params)
    assert caught.value.data["param"] == "scheduler" and "sequential" in str(caught.value)
    assert fresh.loaded is None
    # Sequential mode runs any sampler, and a mode outside the list is named.
    arrays = scene(cube()) | {"cameras": cameras()}
    assert request(store, arrays, tiny_model_dir, controlnet_dir, tmp_path, scheduler="lcm").mode == "sequential"
    with pytest.raises(ProtocolError) as caught:
        request(store, arrays, tiny_model_dir, controlnet_dir, tmp_path, mode="together")
    assert caught.value.data["param"] == "mode"


def test_match_colors_changes_only_the_views_that_repaint_earlier_paint(
    tiny_model_dir, controlnet_dir, manager, tmp_path
):
    store = InputStore()
    arrays = scene(uv_sphere(radius=0.7)) | {"cameras": cameras(per_ring=3)}
    views = {}
    for match in (False, True):
        params = request(store, arrays, tiny_model_dir, controlnet_dir, tmp_path / str(match), match_colors=match,
                         refine_below=0.6)  # fmt: skip  # a wide overlap: later views repaint oblique paint
        result = project.run(JobContext(str(match), manager, store), params)
        views[match] = [np.asarray(PIL.Image.open(v["image"]), dtype=float) for v in result.views if not v["skipped"]]
    assert len(views[False]) == len(views[True]) >= 2
    assert np.array_equal(views[False][0], views[True][0])  # the first view has nothing to match
    assert max(np.abs(off - on).mean() for off, on in zip(views[False][1:], views[True][1:], strict=True)) > 0.5
