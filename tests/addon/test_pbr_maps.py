"""PBR maps of any image (api.derive_pbr_maps, sdtex.derive_pbr_maps) and the material options, in real
Blender (bpy 5.0 as a module) with the real backend worker. The pbr task runs no model: each job is quick."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

bpy = pytest.importorskip("bpy")
from blender_sd_addon import api, jobs  # noqa: E402
from blender_sd_addon.blender import tasks, ui_jobs, ui_state  # noqa: E402
from blender_sd_addon.history import HistoryRecord  # noqa: E402

MAP_KINDS = {"height", "normal", "roughness", "ao"}


@pytest.fixture
def png_file(tmp_path) -> str:
    path = tmp_path / "bricks.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8), "RGB").save(path)
    return str(path)


def add_cube(name: str = "Cube"):
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    obj = bpy.context.active_object
    obj.name = name
    return obj


def pixels_of(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def node_images(material) -> dict[str, bpy.types.Image]:
    return {node.name: node.image for node in material.node_tree.nodes if node.type == "TEX_IMAGE"}


def unsaved_copy(image, name: str):
    """A generated image holding the same pixels: it has no file, so it is sent as bytes."""
    copy = bpy.data.images.new(name, *image.size, alpha=True)
    values = np.empty(len(image.pixels), dtype=np.float32)
    image.pixels.foreach_get(values)
    copy.pixels.foreach_set(values)
    return copy


def test_an_image_sent_by_path_and_by_bytes_gives_the_same_maps(scene, png_file, tmp_path):
    on_disk = bpy.data.images.load(png_file)
    by_path = api.derive_pbr_maps(on_disk, seamless="xy", output_dir=str(tmp_path / "path"))
    by_bytes = api.derive_pbr_maps(unsaved_copy(on_disk, "Unsaved"), seamless="xy", output_dir=str(tmp_path / "up"))

    assert by_path.result.images[0].path == png_file  # the worker read the file itself
    assert by_bytes.result.images[0].path == ""  # the worker got uploaded bytes
    path_maps, byte_maps = by_path.result.images[0].maps, by_bytes.result.images[0].maps
    assert set(path_maps) == set(byte_maps) == MAP_KINDS
    for kind in MAP_KINDS:
        np.testing.assert_array_equal(pixels_of(path_maps[kind]), pixels_of(byte_maps[kind]), err_msg=kind)


def test_maps_of_an_unsaved_image_become_its_material_and_a_history_entry(scene, tmp_path):
    source = bpy.data.images.new("Painted", 32, 16)
    source.pixels.foreach_set(np.random.default_rng(2).random(32 * 16 * 4, dtype=np.float32))
    before = np.empty(len(source.pixels), dtype=np.float32)
    source.pixels.foreach_get(before)
    cube = add_cube()

    result = api.derive_pbr_maps(source, [cube], normal_format="directx", output_dir=str(tmp_path))

    # The maps are new images; the source is the albedo, untouched and still unsaved.
    (maps,) = result.maps
    assert set(maps) == MAP_KINDS and source not in maps.values()
    assert all(image.colorspace_settings.name == "Non-Color" for image in maps.values())
    assert result.images == [source] and result.seed is None
    assert sorted(result.files) == sorted(bpy.path.abspath(image.filepath) for image in maps.values())
    assert all(Path(f).parent == tmp_path for f in result.files)
    after = np.empty(len(source.pixels), dtype=np.float32)
    source.pixels.foreach_get(after)
    np.testing.assert_array_equal(after, before)
    assert source.is_dirty and source.filepath == "" and source.packed_file is None

    (material,) = result.materials
    assert cube.active_material == material and material.name == "SD Painted"
    textures = node_images(material)
    assert textures["Albedo"] == source and textures["Normal"] == maps["normal"]
    assert "DirectX Green" in material.node_tree.nodes  # the normal format reached the material

    record = HistoryRecord.from_fields(scene.sdtex.history[0])
    assert (record.task, record.seed, record.source, record.title) == ("pbr", None, "Painted", "Maps of Painted")
    assert record.normal_format == "directx" and (record.width, record.height) == (32, 16)
    assert record.images()[0].maps == result.result.images[0].maps


def test_history_apply_again_and_use_these_settings_work_for_a_pbr_entry(scene, png_file):
    settings = scene.sdtex
    image = bpy.data.images.load(png_file)
    api.derive_pbr_maps(image, seamless="x", height_contrast=2.5)
    settings.pbr_seamless, settings.height_contrast, settings.seamless = "none", 1.0, "xy"
    prompt, seed = settings.prompt, settings.seed

    assert bpy.ops.sdtex.use_history_settings() == {"FINISHED"}
    assert (settings.pbr_seamless, settings.height_contrast) == ("x", 2.5)
    assert (settings.seamless, settings.prompt, settings.seed) == ("xy", prompt, seed)  # generation untouched

    cube = add_cube()
    cube.select_set(True)
    assert bpy.ops.sdtex.apply_history() == {"FINISHED"}
    textures = node_images(cube.active_material)
    assert textures["Albedo"] == image and set(textures) == {"Albedo", "Height", "Normal", "Roughness", "AO"}
    assert bpy.ops.sdtex.tile_preview() == {"FINISHED"}  # the source is a file: it can be tiled

    # Without its source image the entry says what is missing (its maps stay on disk).
    bpy.data.images.remove(image)
    os.remove(png_file)
    with pytest.raises(RuntimeError, match="The image 'bricks.png' these maps were made from is no longer"):
        bpy.ops.sdtex.apply_history()


def test_operator_uses_the_named_image_and_the_scene_settings(scene, png_file):
    settings = scene.sdtex
    settings.pbr_seamless, settings.normal_strength = "xy", 3.0
    settings.displacement, settings.ao_multiply, settings.pack = "DISPLACEMENT", True, True
    cube = add_cube()
    cube.select_set(True)
    image = bpy.data.images.load(png_file)

    assert bpy.ops.sdtex.derive_pbr_maps(image=image.name) == {"FINISHED"}

    record = HistoryRecord.from_fields(settings.history[0])
    assert (record.seamless, record.normal_strength, record.source) == ("xy", 3.0, "bricks.png")
    material = cube.active_material
    nodes = material.node_tree.nodes
    assert nodes["Material Output"].inputs["Displacement"].links[0].from_node.bl_idname == "ShaderNodeDisplacement"
    assert nodes["Principled BSDF"].inputs["Base Color"].links[0].from_node.name == "AO Multiply"
    textures = node_images(material)
    assert all(textures[kind].packed_file is not None for kind in ("Height", "Normal", "Roughness", "AO"))
    assert textures["Albedo"] == image and image.packed_file is None  # the artist's image: used, not packed


@pytest.mark.parametrize(
    ("options", "check"),
    [
        ({"displacement": "DISPLACEMENT"}, lambda m: m.node_tree.nodes["Displacement"].outputs[0].is_linked),
        ({"displacement": "BUMP"}, lambda m: "Displacement" not in m.node_tree.nodes and "Bump" in m.node_tree.nodes),
        ({"ao_multiply": True}, lambda m: any(s.is_linked for s in m.node_tree.nodes["AO Multiply"].outputs)),
        ({"ao_multiply": False}, lambda m: "AO Multiply" not in m.node_tree.nodes),
        ({"pack": True}, lambda m: m.node_tree.nodes["Height"].image.packed_file is not None),
        ({"pack": False}, lambda m: m.node_tree.nodes["Height"].image.packed_file is None),
    ],
)
def test_each_material_option_of_the_api_changes_the_material(scene, png_file, options, check):
    (material,) = api.derive_pbr_maps(png_file, [add_cube()], **options).materials
    assert check(material)


def test_generate_texture_takes_the_material_options(scene, tmp_path):
    cube = add_cube()
    result = api.generate_texture(
        [cube], "slate", steps=2, width=64, height=64, pbr=True, displacement="DISPLACEMENT", pack=True
    )
    nodes = result.materials[0].node_tree.nodes
    assert nodes["Displacement"].outputs[0].is_linked and nodes["Albedo"].image.packed_file is not None
    assert set(result.maps[0]) == MAP_KINDS and result.maps[0]["ao"].colorspace_settings.name == "Non-Color"


def test_one_apply_options_argument_builds_the_same_material_as_the_keywords(scene, png_file):
    by_keywords = api.derive_pbr_maps(png_file, [add_cube("A")], shared_material=False, displacement="DISPLACEMENT")
    options = api.ApplyOptions(shared_material=False, displacement="DISPLACEMENT")
    by_options = api.derive_pbr_maps(png_file, [add_cube("B")], material=options)
    assert by_keywords.materials[0].name.endswith(".A") and by_options.materials[0].name.endswith(".B")
    assert all(r.materials[0].node_tree.nodes["Displacement"].outputs[0].is_linked for r in (by_keywords, by_options))
    with pytest.raises(api.SDTexError, match="material: give ApplyOptions or the keywords slot, not both"):
        api.derive_pbr_maps(png_file, [add_cube()], material=options, slot="REPLACE")
    with pytest.raises(api.SDTexError, match="material must be an ApplyOptions, got dict"):
        api.derive_pbr_maps(png_file, [add_cube()], material={"slot": "NEW"})


def test_run_task_runs_any_task_of_the_protocol(scene, png_file, tmp_path):
    cube = add_cube()
    texture = api.run_task("pbr", {"image": png_file, "seamless": "xy"}, [cube], output_dir=str(tmp_path))
    assert set(texture.maps[0]) == MAP_KINDS and texture.materials == [cube.active_material]
    assert all(os.path.dirname(path) == str(tmp_path) for path in texture.files)
    listing = api.run_task("list_models", {"models_dir": str(tmp_path), "include_cache": False})
    assert type(listing).__name__ == "ModelList" and listing.loras == []
    with pytest.raises(api.SDTexError, match="task must be one of txt2img, pbr, .*; got 'paint'"):
        api.run_task("paint", {"image": png_file})
    with pytest.raises(api.SDTexError, match="pbr has no parameter 'strength'"):
        api.run_task("pbr", {"image": png_file, "strength": 0.5})


def test_bad_options_and_images_name_the_parameter(scene, png_file, tmp_path):
    with pytest.raises(api.SDTexError, match="displacement must be one of BUMP, DISPLACEMENT"):
        api.derive_pbr_maps(png_file, [add_cube()], displacement="PARALLAX")
    with pytest.raises(api.SDTexError, match="normal_strength must be a number from 0 to 10"):
        api.derive_pbr_maps(png_file, normal_strength=11.0)
    with pytest.raises(api.SDTexError, match="image must be a bpy.types.Image or an image file path; no such"):
        api.derive_pbr_maps(str(tmp_path / "nothing.png"))


def test_operator_errors_are_clear_reports(scene, tmp_path):
    with pytest.raises(RuntimeError, match="No image to make maps of: show one in the Image Editor"):
        bpy.ops.sdtex.derive_pbr_maps(apply=False)
    missing = bpy.data.images.new("Missing", 4, 4)
    missing.source, missing.filepath = "FILE", str(tmp_path / "gone.png")
    with pytest.raises(RuntimeError, match="image 'Missing' has no pixels"):
        bpy.ops.sdtex.derive_pbr_maps(image="Missing", apply=False)
    with pytest.raises(RuntimeError, match="there is none called 'Nope'"):
        bpy.ops.sdtex.derive_pbr_maps(image="Nope", apply=False)


def test_objects_in_edit_mode_get_the_material_and_the_history_entry(scene, png_file):
    cube = add_cube()
    cube.data.uv_layers.remove(cube.data.uv_layers[0])
    bpy.ops.object.mode_set(mode="EDIT")

    result = api.derive_pbr_maps(png_file, [cube])

    assert HistoryRecord.from_fields(scene.sdtex.history[0]).source == "bricks.png"
    bpy.ops.object.mode_set(mode="OBJECT")  # leaving Edit Mode keeps what was written to the edit mesh
    assert cube.active_material == result.materials[0]
    assert {p.material_index for p in cube.data.polygons} == {cube.active_material_index}
    assert [uv.name for uv in cube.data.uv_layers] == ["UVMap"]


def follow_ui_jobs():
    """Drive the UI timer by hand (timers do not tick in background mode) until it stops."""

    while (delay := ui_jobs._tick()) is not None:
        time.sleep(delay)
    ui_jobs.stop_polling()


@pytest.mark.parametrize("kind", ["file", "unsaved"])
def test_ui_job_uploads_when_needed_and_applies_by_the_timer(scene, png_file, kind):

    image = bpy.data.images.load(png_file)
    image = image if kind == "file" else unsaved_copy(image, "Unsaved")
    cube = add_cube()
    params = tasks.pbr_params(scene.sdtex.pbr_settings())
    started = ui_jobs.start_ui_pbr_job(image, params, [cube], tasks.apply_options(), apply=True)
    assert isinstance(started, ui_state.Upload if kind == "unsaved" else jobs.Job)
    follow_ui_jobs()

    assert not ui_state.STATE.is_error, ui_state.STATE.message
    assert ui_state.STATE.message.startswith("Saved 4 files in ") and "seed" not in ui_state.STATE.message
    textures = node_images(cube.active_material)
    assert textures["Albedo"] == image and len(textures) == 5


def test_ui_job_whose_image_cannot_be_sent_says_why(scene, monkeypatch):
    from blender_sd_addon.client import BackendClient

    def refuse(client, data, timeout=None):
        raise api.SDTexError("The upload is too large")

    monkeypatch.setattr(BackendClient, "upload", refuse)
    cube, image = add_cube(), bpy.data.images.new("Unsaved", 8, 8)
    ui_jobs.start_ui_pbr_job(image, tasks.pbr_params({}), [cube], tasks.apply_options(), apply=True)
    follow_ui_jobs()
    assert ui_state.STATE.is_error and ui_state.STATE.message == "Could not send the image: The upload is too large"
    assert cube.active_material is None and not scene.sdtex.history


def test_the_operator_queues_on_the_job_board_in_the_ui_and_blocks_in_background_mode(scene, png_file, monkeypatch):
    from types import SimpleNamespace

    from blender_sd_addon.blender import operator_base

    image, cube = bpy.data.images.load(png_file), add_cube()
    assert bpy.ops.sdtex.derive_pbr_maps(image=image.name) == {"FINISHED"}  # background mode: applied on return
    assert len(scene.sdtex.history) == 1 and not ui_state.STATE.board.jobs and cube.active_material is not None
    monkeypatch.setattr(operator_base, "bpy", SimpleNamespace(app=SimpleNamespace(background=False)))
    assert bpy.ops.sdtex.derive_pbr_maps(image=image.name) == {"FINISHED"}  # the UI: returns at once, queued
    assert [job.task for job in ui_state.STATE.board.jobs] == ["pbr"] and len(scene.sdtex.history) == 1
    follow_ui_jobs()
    assert len(scene.sdtex.history) == 2 and ui_state.STATE.message.startswith("Saved 4 files in ")
    with pytest.raises(RuntimeError, match="there is none called 'Nope'"):
        bpy.ops.sdtex.derive_pbr_maps(image="Nope")
    assert ui_state.STATE.is_error and "Nope" in ui_state.STATE.message  # the panel shows it too
