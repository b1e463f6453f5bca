"""Estimated PBR maps in Blender (bpy 5.0 as a module): the material gets metallic and roughness from the maps a
job wrote, a delit albedo as its base colour, labels that say where each map came from, one material for many
objects (Apply again too); the panel's methods reach the task parameters and come back from the history; the
Before / After toggle switches the Image Editor. The job results are written by the test (no model runs)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

bpy = pytest.importorskip("bpy")

from test_image_tasks import RecordingLayout  # noqa: E402

from blender_sd_addon.blender import delight_ops, results, status, tasks, ui_state  # noqa: E402
from blender_sd_addon.blender.materials import ApplyOptions  # noqa: E402
from blender_sd_addon.contract import protocol  # noqa: E402
from blender_sd_addon.history import PBR_METHOD_SETTINGS, HistoryRecord  # noqa: E402

NORMALS = "model:prs-eth/marigold-normals-v1-1"
INTRINSICS = "model:prs-eth/marigold-iid-appearance-v1-1"
SOURCES = {"albedo": INTRINSICS, "normal": NORMALS, "roughness": INTRINSICS, "metallic": INTRINSICS,
           "height": "classical", "ao": "classical"}  # fmt: skip
METHODS = {"normal_method": "model", "height_method": "classical", "roughness_method": "model",
           "metallic_method": "model", "delight": True, "estimate_steps": 3, "ensemble_size": 2,
           "processing_resolution": 512}  # fmt: skip


@pytest.fixture
def written(tmp_path) -> dict[str, str]:
    """The files a job with estimated maps writes: the lit albedo, its delit copy and the maps (sizes differ, so a
    wrong image is easy to tell apart)."""
    rng = np.random.default_rng(0)
    paths = {}
    kinds = ("albedo", "delit", "normal", "height", "roughness", "metallic", "ao")
    for i, kind in enumerate(kinds):
        shape = (6 + i, 8, 3) if kind in ("albedo", "delit", "normal") else (6 + i, 8)
        paths[kind] = str(tmp_path / f"job_{kind}.png")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(paths[kind])
    return paths


def job_result(written: dict, task: str, params: dict) -> protocol.GenerateResult:
    maps = {kind: written[kind] for kind in ("normal", "height", "roughness", "metallic", "ao")}
    image = protocol.ImageRecord(written["albedo"], 7, maps | {"albedo": written["delit"]}, dict(SOURCES))
    return protocol.GenerateResult([image], 7, 8, 8, "tiny", "none", {}, params, task=task)


def add_cube(name: str):
    bpy.ops.mesh.primitive_cube_add()
    cube = bpy.context.active_object
    cube.name = name
    return cube


def linked_texture(socket):
    """The Image Texture feeding `socket` directly."""
    (link,) = socket.links
    assert link.from_node.type == "TEX_IMAGE"
    return link.from_node


def path_of(node) -> str:
    return os.path.realpath(bpy.path.abspath(node.image.filepath))


def test_estimated_maps_make_one_material_with_metallic_roughness_and_the_delit_base_colour(scene, written):
    cubes = [add_cube(f"Crate{i}") for i in range(3)]
    params = tasks.task_params("txt2img", scene.sdtex.generate_settings(7))
    texture = results.finish(job_result(written, "txt2img", params), cubes, ApplyOptions(slot="REUSE"), apply=True)

    (material,) = texture.materials
    assert [cube.active_material for cube in cubes] == [material] * 3
    bsdf = next(n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    for socket, kind in (("Metallic", "metallic"), ("Roughness", "roughness")):
        node = linked_texture(bsdf.inputs[socket])
        assert path_of(node) == os.path.realpath(written[kind])
        assert node.image.colorspace_settings.name == "Non-Color"
    base = linked_texture(bsdf.inputs["Base Color"])
    assert path_of(base) == os.path.realpath(written["delit"]) != os.path.realpath(written["albedo"])
    assert base.image.colorspace_settings.name == "sRGB"
    # Names stay the map kinds (the glTF export finds them so); labels say where each came from.
    labels = {n.name: n.label for n in material.node_tree.nodes if n.type == "TEX_IMAGE"}
    assert labels == {"Albedo": "Albedo (delit, Marigold)", "Normal": "Normal (Marigold)",
                      "Roughness": "Roughness (Marigold)", "Metallic": "Metallic (Marigold)",
                      "Height": "Height (derived)", "AO": "AO (derived)"}  # fmt: skip
    # The record keeps the lit original and where each map came from.
    record = HistoryRecord.from_fields(scene.sdtex.history[0])
    (image,) = record.images()
    assert image.path == written["albedo"] and image.map_sources == SOURCES

    # Apply again on all three: still the one material, in the slot it had.
    for cube in cubes:
        cube.select_set(True)
    before = set(bpy.data.materials)
    assert bpy.ops.sdtex.apply_history() == {"FINISHED"}
    assert set(bpy.data.materials) == before
    assert [[s.material for s in cube.material_slots] for cube in cubes] == [[material]] * 3


def test_the_panels_methods_reach_the_task_and_come_back_from_its_history_entry(scene, addon, written, tmp_path):
    settings = scene.sdtex
    for name, value in METHODS.items():
        setattr(settings, name, value)
    own_normals = tmp_path / "my-normals"
    addon.normals_model = str(own_normals)
    try:
        generate = tasks.task_params("txt2img", settings.generate_settings(5))
        pbr = tasks.pbr_params(settings.pbr_settings())
        task, image_task, _ = settings.image_task_settings(5)
    finally:
        addon.property_unset("normals_model")
    for params in (generate, pbr):
        assert {name: params[name] for name in METHODS} == METHODS
        assert params["normals_model"] == str(own_normals)  # the preferences' estimator models
        assert params["depth_model"] == protocol.param("depth_model").default
    assert {name: image_task[name] for name in METHODS} == METHODS  # image tasks take them from the main panel

    image = bpy.data.images.load(written["albedo"])
    for kind, params in (("txt2img", generate), ("pbr", pbr)):
        results.finish(job_result(written, kind, params), [], None, apply=False, source=image.name)
        for name in PBR_METHOD_SETTINGS:
            settings.property_unset(name)
        assert bpy.ops.sdtex.use_history_settings() == {"FINISHED"}
        assert {name: getattr(settings, name) for name in METHODS} == METHODS, kind


def test_before_after_switches_the_image_editor_between_lit_and_delit(scene, written):
    area = bpy.context.window_manager.windows[0].screen.areas[0]
    area.type = "IMAGE_EDITOR"
    with pytest.raises(RuntimeError, match="No delit albedo"):
        bpy.ops.sdtex.delight_toggle()
    drawn: list = []
    layout = type("Layout", (), {"operator": lambda self, idname, **kw: drawn.append(idname)})()
    context = type("Context", (), {"scene": scene, "space_data": area.spaces.active})()
    delight_ops.draw_toggle(layout, context)
    assert drawn == []  # nothing to compare: no button

    params = tasks.task_params("txt2img", scene.sdtex.generate_settings(7))
    results.finish(job_result(written, "txt2img", params), [], None, apply=False)
    delight_ops.draw_toggle(layout, context)
    assert drawn == ["sdtex.delight_toggle"]
    shown = []
    for _ in range(3):
        assert bpy.ops.sdtex.delight_toggle() == {"FINISHED"}
        shown.append(path_of(area.spaces.active))
    delit, lit = os.path.realpath(written["delit"]), os.path.realpath(written["albedo"])
    assert shown == [delit, lit, delit]


def test_a_model_method_with_its_estimator_missing_is_named_before_generate(scene, addon):
    settings = scene.sdtex
    settings.pbr, settings.metallic_method = True, "model"
    addon.intrinsics_model = "nobody/marigold-not-downloaded"
    try:
        ui_state.STATE.readiness = None
        ready = status.check_readiness(bpy.context)
        assert ready.blocker == "Estimator model not ready: nobody/marigold-not-downloaded for Metallic (not on disk)"
        settings.pbr = False  # no maps: the estimator is not needed
        ui_state.STATE.readiness = None
        assert status.check_readiness(bpy.context).blocker == ""
    finally:
        addon.property_unset("intrinsics_model")
        ui_state.STATE.readiness = None


def drawn_by(panel, scene) -> list:
    drawn: list = []
    space = type("Space", (), {"image": None, "type": "IMAGE_EDITOR"})()
    context = type("Context", (), {"scene": scene, "space_data": space, "region": type("R", (), {"width": 280})})()
    panel.draw(type("Panel", (), {"layout": RecordingLayout(drawn)})(), context)
    return drawn


def test_the_pbr_panels_show_each_maps_method_and_the_estimators_only_while_one_uses_a_model(scene):
    from blender_sd_addon.blender import panels

    estimator_settings = {"estimate_steps", "ensemble_size", "processing_resolution"}
    for panel in (panels.PbrPanel, panels.SDTEX_PT_pbr_image_editor):
        scene.sdtex.property_unset("normal_method")
        drawn = drawn_by(panel, scene)
        assert {"normal_method", "height_method", "roughness_method", "metallic_method", "delight"} <= set(drawn)
        assert not estimator_settings & set(drawn) and not any(name.endswith("_model") for name in drawn)
        scene.sdtex.normal_method = "model"
        drawn = drawn_by(panel, scene)
        assert estimator_settings <= set(drawn), panel
        assert [name for name in drawn if name.endswith("_model")] == ["normals_model"]  # only the one needed
