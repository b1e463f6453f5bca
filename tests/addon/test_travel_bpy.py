"""Latent travel in real Blender (bpy 5.0 as a module) with the real worker and the tiny model: the frames
become image-sequence textures of the right length, cyclic when looped, and the scene frame picks the file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

bpy = pytest.importorskip("bpy")

from blender_sd_addon import api, jobs  # noqa: E402
from blender_sd_addon.blender import session, tasks, ui_jobs, ui_state  # noqa: E402

KEYS = [{"prompt": "lava", "seed": 1}, {"prompt": "basalt", "seed": 2}]
SMALL = {"steps": 1, "width": 64, "height": 64}


def add_cube(name: str = "Cube"):
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    obj = bpy.context.active_object
    obj.name = name
    return obj


def shown_file(material, label: str, frame: int) -> str:
    """The file the Image Texture node `label` shows (and renders) at scene frame `frame`: the depsgraph's
    evaluated node, whose image user follows the frame (use_auto_refresh)."""
    bpy.context.scene.frame_set(frame)
    evaluated = material.evaluated_get(bpy.context.evaluated_depsgraph_get())
    node = evaluated.node_tree.nodes[label]
    return os.path.basename(node.image.filepath_from_user(image_user=node.image_user))


def test_looped_travel_is_a_cyclic_sequence_that_follows_the_scene_frame(scene, tmp_path):
    scene.frame_start = 10
    cube = add_cube()
    result = api.travel_texture([cube], KEYS, frames=2, loop=True, pbr=True, output_dir=str(tmp_path), **SMALL)

    assert len(result.result.images) == 4 and result.materials == [cube.active_material]
    nodes = cube.active_material.node_tree.nodes
    for label in ("Albedo", "Normal", "Height", "Roughness", "AO"):
        node = nodes[label]
        user = node.image_user
        assert node.image.source == "SEQUENCE", label
        assert (user.frame_duration, user.frame_start, user.use_cyclic, user.use_auto_refresh) == (4, 10, True, True)
    material = cube.active_material
    shown = [shown_file(material, "Albedo", f) for f in (10, 11, 13)]
    assert shown == ["sdtex_0001.png", "sdtex_0002.png", "sdtex_0004.png"]
    assert shown_file(material, "Albedo", 14) == "sdtex_0001.png"  # cyclic: after the last frame comes frame 0
    assert shown_file(material, "Normal", 12) == "sdtex_0003_normal.png"
    assert all(Path(f).is_file() for f in result.files) and len(result.files) == 4 * 5


def test_open_travel_holds_its_last_frame(scene, tmp_path):
    cube = add_cube()
    api.travel_texture([cube], KEYS, frames=2, output_dir=str(tmp_path), **SMALL)
    node = cube.active_material.node_tree.nodes["Albedo"]
    assert (node.image_user.frame_duration, node.image_user.use_cyclic) == (3, False)
    assert shown_file(cube.active_material, "Albedo", scene.frame_start + 7) == "sdtex_0003.png"


def test_one_keyframe_is_a_clear_error(scene, tmp_path):
    with pytest.raises(api.BackendError, match="keyframes must be a list of at least 2"):
        api.travel_texture([add_cube()], KEYS[:1], output_dir=str(tmp_path), **SMALL)


def test_panel_keyframes_and_travel_operator(scene, tmp_path):
    """Add Keyframe takes the main panel's prompt and seed; Travel runs the job (blocking in background mode)."""
    settings, travel = scene.sdtex, scene.sdtex_travel
    settings.random_seed = False
    for prompt, seed in (("rust", 5), ("chrome", 6)):
        settings.prompt, settings.seed = prompt, seed
        assert bpy.ops.sdtex.travel_add_key() == {"FINISHED"}
    assert [(k.prompt, k.seed) for k in travel.keyframes] == [("rust", 5), ("chrome", 6)]
    travel.frames, travel.loop = 1, True
    settings.steps = 1
    session.preferences().output_folder = str(tmp_path)
    cube = add_cube()
    cube.select_set(True)
    assert bpy.ops.sdtex.travel() == {"FINISHED"}
    node = cube.active_material.node_tree.nodes["Albedo"]
    assert (node.image.source, node.image_user.frame_duration, node.image_user.use_cyclic) == ("SEQUENCE", 2, True)

    assert bpy.ops.sdtex.travel_remove_key() == {"FINISHED"} and len(travel.keyframes) == 1
    with pytest.raises(RuntimeError, match="add at least 2 with the Add Keyframe button"):
        bpy.ops.sdtex.travel()


def test_ui_travel_job_applies_sequences_through_the_job_timer(scene, tmp_path):

    cube = add_cube()
    params = tasks.task_params("travel", {"keyframes": KEYS, "frames": 1} | SMALL, output_dir=str(tmp_path))
    job = ui_jobs.start_ui_job(params, [cube], tasks.apply_options(), apply=True, task="travel")
    while (delay := ui_jobs._tick()) is not None:
        time.sleep(delay)
    ui_jobs.stop_polling()
    assert job.state == jobs.DONE and not ui_state.STATE.is_error, ui_state.STATE.message
    assert [a.kind for a in job.artifacts] == ["frame", "frame"]
    node = cube.active_material.node_tree.nodes["Albedo"]
    assert (node.image.source, node.image_user.frame_duration) == ("SEQUENCE", 2)
