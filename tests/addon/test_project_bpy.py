"""Projection texturing in real Blender (bpy as a module) with the real worker, the tiny model and a tiny
ControlNet: exported cameras agree with Blender's own projection, geometry extraction, bad inputs, a run."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

bpy = pytest.importorskip("bpy")
from bpy_extras.object_utils import world_to_camera_view  # noqa: E402
from mathutils import Vector  # noqa: E402

from blender_sd_addon import api  # noqa: E402
from blender_sd_addon.blender import (  # noqa: E402
    geometry,  # noqa: E402
    projecting,
)


@pytest.fixture(scope="module")
def controlnet(tiny_model_dir, tmp_path_factory) -> str:
    from backend.tiny_model import make_test_controlnet

    return str(make_test_controlnet(tmp_path_factory.mktemp("controlnet") / "cn", tiny_model_dir))


def add(kind: str, name: str, **kwargs):
    getattr(bpy.ops.mesh, f"primitive_{kind}_add")(**kwargs)
    obj = bpy.context.active_object
    obj.name = name
    return obj


def add_camera(location, rotation, **settings):
    bpy.ops.object.camera_add(location=location, rotation=rotation)
    camera = bpy.context.active_object
    for name, value in settings.items():
        setattr(camera.data, name, value)
    bpy.context.scene.camera = camera
    return camera


def test_exported_camera_matrices_agree_with_blenders_world_to_camera_view(scene):
    scene.render.resolution_x, scene.render.resolution_y = 96, 64
    camera = add_camera((3.0, -4.0, 2.0), (math.radians(70), 0.0, math.radians(35)), lens=35.0, shift_x=0.1,
                        shift_y=-0.05)  # fmt: skip
    view, projection = geometry.scene_camera(scene, 96, 64)
    for point in ((0.0, 0.0, 0.0), (0.5, -0.3, 0.2), (-0.4, 0.6, -0.5), (1.0, 1.0, 1.0)):
        camera_space = [sum(view[i][j] * c for j, c in enumerate((*point, 1.0))) for i in range(4)]
        clip = [sum(projection[i][j] * camera_space[j] for j in range(4)) for i in range(4)]
        x, y, depth = world_to_camera_view(scene, camera, Vector(point))
        assert (clip[0] / clip[3] + 1) / 2 == pytest.approx(x, abs=1e-5)  # 0..1 left to right
        assert (clip[1] / clip[3] + 1) / 2 == pytest.approx(y, abs=1e-5)  # 0..1 bottom to top
        assert -camera_space[2] == pytest.approx(depth, abs=1e-5)


def test_collect_gives_world_triangles_and_unwraps_only_meshes_without_uvs(scene):
    plane = add("plane", "Plane", size=2.0, location=(0.0, 0.0, 1.0))
    user_uvs = [tuple(loop.uv) for loop in plane.data.uv_layers.active.data]
    cube = add("cube", "Cube", size=1.0, location=(2.0, 0.0, 0.0))
    cube.data.uv_layers.remove(cube.data.uv_layers[0])
    cube.scale = (2.0, 1.0, 1.0)
    cube.modifiers.new("Subdivide", "SUBSURF").levels = 1

    found = geometry.collect([plane, cube])

    assert found.uv_maps == ["UVMap", geometry.UV_MAP_NAME] and found.made == [(cube, geometry.UV_MAP_NAME)]
    assert [tuple(loop.uv) for loop in plane.data.uv_layers.active.data] == user_uvs
    assert found.count == 2 + 6 * 4 * 2  # the plane's two triangles; the subdivided cube's 24 quads
    xs = found.triangles[0::3]
    zs = found.triangles[2::3]
    plane_z = zs[: 2 * 3]
    assert all(z == pytest.approx(1.0) for z in plane_z)  # moved up one unit: world space
    evaluated = cube.evaluated_get(bpy.context.evaluated_depsgraph_get())
    expected = max((cube.matrix_world @ v.co).x for v in evaluated.to_mesh().vertices)
    evaluated.to_mesh_clear()
    assert max(xs) == pytest.approx(expected) and expected > 2.6  # scaled by 2 round x = 2, then subdivided
    cube_uvs = found.uvs[2 * 6 :]
    assert all(0.0 <= u <= 1.0 for u in cube_uvs) and len(set(cube_uvs)) > 10  # a real unwrap
    found.undo_unwraps()
    assert geometry.UV_MAP_NAME not in cube.data.uv_layers


def test_bad_inputs_are_clear_and_apply_nothing(scene, controlnet):
    cube = add("cube", "Box", size=1.0)
    run = dict(controlnet=controlnet, steps=2, width=64, height=64, texture_size=64, views_per_ring=2,
               elevations=(20.0,))  # fmt: skip

    with pytest.raises(api.SDTexError, match="no camera"):
        api.project_texture([cube], "rust", views="CAMERA", **run)
    bpy.ops.object.light_add(type="POINT")
    with pytest.raises(api.SDTexError, match="Point is a light, not a mesh"):
        api.project_texture([cube, bpy.data.objects["Point"]], "rust", **run)
    empty = bpy.data.objects.new("Empty Mesh", bpy.data.meshes.new("Empty Mesh"))
    scene.collection.objects.link(empty)
    with pytest.raises(api.SDTexError, match="Empty Mesh has no faces"):
        api.project_texture([empty], "rust", **run)

    add_camera((0.0, -5.0, 0.0), (math.radians(-90), 0.0, 0.0))  # looking away from the cube
    cube.data.uv_layers.remove(cube.data.uv_layers[0])  # gets a Smart UV map, removed again on failure
    with pytest.raises(api.BackendError, match="view 0 sees none of the objects"):
        api.project_texture([cube], "rust", views="CAMERA", **run)
    assert not cube.data.uv_layers and not cube.data.materials

    stacked = add("plane", "Stacked", size=1.0, location=(0.0, 0.0, 2.0))
    twin = add("plane", "Twin", size=1.0, location=(0.0, 0.0, 3.0))
    bpy.ops.object.select_all(action="DESELECT")
    stacked.select_set(True)
    twin.select_set(True)
    bpy.context.view_layer.objects.active = stacked
    bpy.ops.object.join()  # two squares on the same UV square: overlapping islands
    with pytest.raises(api.BackendError, match="Stacked's UV islands overlap") as caught:
        api.project_texture([stacked], "rust", **run)
    assert str(caught.value).startswith("uvs: ") and caught.value.code == "invalid_params"
    assert not stacked.data.materials


def test_project_texture_bakes_and_applies_a_material_per_object_on_its_uv_map(scene, controlnet, tmp_path):
    cube = add("cube", "Box", size=1.0, location=(-0.8, 0.0, 0.0))
    cube.data.uv_layers.remove(cube.data.uv_layers[0])
    ball = add("uv_sphere", "Ball", radius=0.5, location=(0.8, 0.0, 0.0), segments=16, ring_count=8)

    result = api.project_texture(
        [cube, ball], "rusty robot", controlnet=controlnet, seed=3, steps=2, width=64, height=64, texture_size=64,
        views_per_ring=2, elevations=(25.0, -25.0), output_dir=str(tmp_path),
    )  # fmt: skip

    assert result.uv_maps == [geometry.UV_MAP_NAME, "UVMap"]
    assert set(result.coverage) == {"Box", "Ball"} and all(c > 0.5 for c in result.coverage.values())
    assert len(result.result.views) == 4 and all(Path(f).is_file() for f in result.files)
    for obj, image, material, uv_name in zip((cube, ball), result.images, result.materials, result.uv_maps,
                                             strict=True):  # fmt: skip
        assert obj.active_material == material and tuple(image.size) == (64, 64)
        nodes = material.node_tree.nodes
        assert nodes["Albedo"].image == image and nodes["UV Map"].uv_map == uv_name
    assert cube.data.uv_layers.active.name == geometry.UV_MAP_NAME  # it had no other map


def test_panel_operator_in_background_mode_bakes_every_visible_mesh(scene, controlnet):
    from blender_sd_addon.blender import project

    cube = add("cube", "Crate", size=1.0, location=(-1.0, 0.0, 0.0))
    other = add("cube", "Barrel", size=1.0, location=(1.0, 0.0, 0.0))
    other.select_set(False)
    settings = scene.sdtex_project
    settings.controlnet, settings.texture_size, settings.views_per_ring, settings.both_sides = controlnet, 64, 2, False
    settings.targets = "VISIBLE"
    assert bpy.ops.sdtex.project() == {"FINISHED"}
    for obj in (cube, other):
        assert obj.active_material and obj.active_material.name == f"SD mossy stone wall.{obj.name}"  # the name once
    assert project.Running.message.startswith("Baked 2 textures; views saw ")


def test_ui_job_reports_the_view_and_step_and_applies_when_done(scene, controlnet):
    import time

    from blender_sd_addon.blender import project, ui_jobs
    from blender_sd_addon.blender.materials import ApplyOptions
    from blender_sd_addon.blender.ui_state import Target

    cube = add("cube", "Crate", size=1.0)
    settings = scene.sdtex_project
    settings.controlnet, settings.texture_size, settings.views_per_ring, settings.both_sides = controlnet, 64, 3, False
    arguments = settings.request(scene.sdtex, [cube])
    objects, prompt = arguments.pop("objects"), arguments.pop("prompt")
    request = projecting.prepare_projection(objects, prompt, output_dir=None, **arguments)
    options = ApplyOptions(shared_material=False)
    job = ui_jobs.submit_ui("project", request.params, Target((cube.name,), options, True, request=request))
    assert project.project_jobs() == [job]  # a row on the UI's one job board
    shown = set()
    while ui_jobs._tick() is not None:
        shown.add(project.progress(job))
        time.sleep(0.02)
    stepping = [(f, t) for f, t in shown if re.fullmatch(r"View [1-3]/3 · step [12]/2", t)]
    assert len({t.split(" · ")[0] for _, t in stepping}) >= 2, shown  # polled every 20 ms: most views are seen
    for fraction, text in stepping:  # the bar is the whole job's: view n of 3 is between (n-1)/3 and n/3
        view = int(text[5])
        assert (view - 1) / 3 <= fraction <= view / 3, (fraction, text)
    assert project.Running.message.startswith("Baked 1 texture;") and cube.active_material is not None


def test_an_object_no_view_sees_keeps_its_material_and_the_warning_names_it(scene, controlnet, tmp_path):
    box = add("cube", "Box", size=1.4)
    inner = add("cube", "Cube.001", size=0.3)  # inside the box: no view sees it
    old = bpy.data.materials.new("Old paint")
    inner.data.materials.append(old)
    run = dict(controlnet=controlnet, seed=3, steps=2, width=64, height=64, texture_size=64, views_per_ring=3,
               elevations=(25.0,), output_dir=str(tmp_path))  # fmt: skip

    result = api.project_texture([box, inner], "rust", **run)

    assert result.coverage["Cube.001"] == 0.0 and result.coverage["Box"] > 0.5
    assert result.warnings == [
        "Cube.001: no view sees it (hidden inside another object or behind the cameras); its texture is a flat "
        "grey fill, left unapplied unless apply_unseen"
    ]
    assert list(inner.data.materials) == [old] and len(result.materials) == 1
    assert box.active_material == result.materials[0]


def test_the_operator_reports_an_unseen_object_and_applies_it_when_asked(scene, controlnet):
    from blender_sd_addon.blender import project

    box = add("cube", "Box", size=1.4)
    inner = add("cube", "Cube.001", size=0.3)
    settings = scene.sdtex_project
    settings.controlnet, settings.texture_size, settings.views_per_ring, settings.both_sides = controlnet, 64, 2, False
    settings.targets = "VISIBLE"
    assert bpy.ops.sdtex.project() == {"FINISHED"}
    assert "Cube.001: no view sees it" in project.Running.message and not inner.data.materials
    assert box.active_material is not None

    settings.apply_unseen = True
    assert bpy.ops.sdtex.project() == {"FINISHED"}
    assert "Cube.001: no view sees it" in project.Running.message
    assert inner.active_material.name.startswith("SD mossy stone wall.Cube.001")


def test_an_empty_controlnet_field_uses_the_model_familys_depth_controlnet():
    assert projecting.default_controlnet("runwayml/stable-diffusion-v1-5")[0] == "lllyasviel/sd-controlnet-depth"
    assert projecting.default_controlnet("stabilityai/stable-diffusion-xl-base-1.0") == (
        "diffusers/controlnet-depth-sdxl-1.0",
        "SDXL",
    )


def test_the_progress_bar_counts_the_views_done():
    from types import SimpleNamespace

    from blender_sd_addon.blender import project

    def job(stage: str, step: int = 0, total: int = 0) -> SimpleNamespace:
        return SimpleNamespace(stage=stage, step=step, total=total)

    assert project.progress(job("loading_model")) == (0.0, "Loading model…")
    assert project.progress(job("view 1/8", 25, 25)) == (1 / 8, "View 1/8 · step 25/25")  # not "100 % · View 1/8"
    assert project.progress(job("view 4/8", 5, 10)) == (3.5 / 8, "View 4/8 · step 5/10")
    assert project.progress(job("saving", 10, 10)) == (1.0, "Saving…")
    # Synchronized: every view steps at once, so the bar is the steps' own fraction
    assert project.progress(job("views 1-5 together", 3, 12)) == (0.25, "Views 1-5 together · step 3/12")
    assert project.progress(job("views 1-5 together")) == (0.0, "Views 1-5 together")


def test_cover_selection_paints_from_the_chosen_views_and_says_how_many(scene, controlnet):
    from blender_sd_addon.blender import project

    add("torus", "Ring")
    settings = scene.sdtex_project
    settings.controlnet, settings.texture_size, settings.views = controlnet, 64, "COVERAGE"
    assert bpy.ops.sdtex.project() == {"FINISHED"}
    (count,) = re.findall(r"Cover Selection: (\d+) views saw 100% of the surface", project.Running.message)
    assert 2 <= int(count) < 6  # orbit rings need 6 for a torus (test_coverage_bpy.py)
    assert bpy.data.objects["Ring"].active_material is not None


def test_the_panels_synchronized_mode_paints_all_views_together(scene, controlnet):
    from blender_sd_addon.blender import project

    cube = add("cube", "Crate", size=1.0)
    settings = scene.sdtex_project
    settings.controlnet, settings.texture_size, settings.views_per_ring, settings.both_sides = controlnet, 64, 3, False
    settings.mode, settings.sync_until = "synchronized", 0.5
    sent = settings.request(scene.sdtex, [cube])
    assert (sent["mode"], sent["sync_until"]) == ("synchronized", 0.5)
    assert bpy.ops.sdtex.project() == {"FINISHED"}
    assert cube.active_material is not None and project.Running.message.startswith("Baked 1 texture")


def test_match_colors_goes_from_the_panel_to_the_request(scene):
    settings = scene.sdtex_project
    assert settings.match_colors is False  # the contract's default
    settings.match_colors = True
    assert settings.request(scene.sdtex, [])["match_colors"] is True
