"""The newcomer's panel in bpy: every setting round-trips through "Use these settings", Apply again reuses its
material, history survives undo, helper images are never unsaved changes, and the setup lines see a missing
backend or model."""

from __future__ import annotations

import os

import pytest

bpy = pytest.importorskip("bpy")

from blender_sd_addon.blender import history_store, status, ui_jobs, ui_state  # noqa: E402
from blender_sd_addon.blender.properties import SCENE_CONTROLS  # noqa: E402
from blender_sd_addon.history import PBR_METHOD_SETTINGS, HistoryRecord  # noqa: E402

# Values that keep the generation small; every other control gets some value other than its default.
FAST = {"width": 64, "height": 72, "steps": 2, "batch_size": 2, "scheduler": "ddim", "seamless": "x"}


def other_value(group, name: str):
    """A value of the property `name` that is not its default (within its limits)."""
    if name in FAST:
        return FAST[name]
    prop = group.bl_rna.properties[name]
    if prop.type == "ENUM":
        return next(item.identifier for item in prop.enum_items if item.identifier != prop.default)
    if prop.type == "BOOLEAN":
        return not prop.default
    if prop.type == "STRING":
        return "roughly hewn granite"
    if prop.type == "INT":
        return min(prop.default + 7, prop.hard_max)
    return round(min(prop.default + 0.25, prop.hard_max) if prop.default < prop.hard_max else prop.default - 0.25, 2)


def test_every_setting_round_trips_through_use_these_settings(scene):
    settings = scene.sdtex
    chosen = {}
    # The maps' Model methods would need estimator weights: test_estimated_maps_bpy round-trips them without a model.
    for name in sorted(SCENE_CONTROLS - {"model", "pbr_seamless", "seed", *PBR_METHOD_SETTINGS}):
        chosen[name] = other_value(settings, name)
        setattr(settings, name, chosen[name])
    settings.random_seed, settings.seed = False, 4321
    assert bpy.ops.sdtex.generate(apply=False) == {"FINISHED"}

    for name in chosen:  # back to the defaults
        settings.property_unset(name)
    settings.random_seed = True
    assert bpy.ops.sdtex.use_history_settings() == {"FINISHED"}

    assert {"prompt", "batch_size", "ao_strength", "normal_format", "pbr"} <= chosen.keys()  # the table's, all
    for name, value in chosen.items():
        assert getattr(settings, name) == pytest.approx(value), name
    assert (settings.random_seed, settings.seed) == (False, 4321)


def test_apply_again_reuses_the_material_it_made(scene):
    assert bpy.ops.sdtex.generate(apply=False) == {"FINISHED"}
    bpy.ops.mesh.primitive_cube_add()
    cube = bpy.context.active_object
    cube.select_set(True)
    before = set(bpy.data.materials)
    assert bpy.ops.sdtex.apply_history() == {"FINISHED"}
    made = set(bpy.data.materials) - before
    assert len(made) == 1
    assert bpy.ops.sdtex.apply_history() == {"FINISHED"}
    assert set(bpy.data.materials) - before == made  # no .001 copy
    assert cube.active_material in made


def test_history_survives_undo(scene):
    assert bpy.ops.sdtex.generate(apply=False) == {"FINISHED"}
    first = HistoryRecord.from_fields(scene.sdtex.history[0])
    assert bpy.ops.sdtex.generate(apply=False) == {"FINISHED"}
    assert len(scene.sdtex.history) == 2
    scene.sdtex.history.remove(0)  # what an undo to before the second generation does to the scene's list
    scene.sdtex.history.remove(0)
    history_store.restore_history()  # the undo_post handler
    titles = [HistoryRecord.from_fields(e).files for e in scene.sdtex.history]
    assert len(titles) == 2 and titles[1] == first.files
    folder = os.path.dirname(first.images()[0].path)
    with open(os.path.join(folder, history_store.HISTORY_FILE), encoding="utf-8") as log:
        assert first.files in [HistoryRecord.from_json(line).files for line in log]


def test_helper_images_are_not_unsaved_changes(scene):
    assert bpy.ops.sdtex.generate(apply=False) == {"FINISHED"}
    assert bpy.ops.sdtex.tile_preview() == {"FINISHED"}
    helpers = [image for image in bpy.data.images if image.name.endswith(" 2x2")]
    assert helpers and not any(image.is_dirty for image in helpers)


def test_setup_lines_see_a_missing_model_and_a_missing_interpreter(scene, addon, tmp_path):
    context = bpy.context
    ui_state.STATE.readiness = None
    assert status.check_readiness(context).blocker == ""
    scene.sdtex.model = "nobody/not-downloaded"
    ui_state.STATE.readiness = None
    ready = status.check_readiness(context)
    assert ready.blocker == "Model not on disk: nobody/not-downloaded"
    assert ("sdtex.download_model", "Download Model") in ready.model.fixes
    scene.sdtex.model = ""
    python = addon.backend_python
    addon.backend_python = str(tmp_path / "no-such-python")
    try:
        ui_state.STATE.readiness = None
        ready = status.check_readiness(context)
        assert not ready.backend.ready and ("sdtex.install_backend", "Install Backend") in ready.backend.fixes
    finally:
        addon.backend_python = python
        ui_state.STATE.readiness = None


def test_images_made_before_the_first_save_follow_the_blend(scene, addon, tmp_path):
    folder = addon.output_folder
    addon.output_folder = "//textures/"
    try:
        assert not bpy.data.filepath
        bpy.ops.mesh.primitive_cube_add()
        bpy.context.active_object.select_set(True)
        assert bpy.ops.sdtex.generate() == {"FINISHED"}
        before = HistoryRecord.from_fields(scene.sdtex.history[0]).images()[0].path
        assert os.path.isfile(before) and not before.startswith(str(tmp_path))

        bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "scene.blend"))

        after = HistoryRecord.from_fields(bpy.context.scene.sdtex.history[0]).images()[0].path
        assert after == str(tmp_path / "textures" / os.path.basename(before))
        assert os.path.isfile(after) and not os.path.exists(before)
        node_paths = [
            bpy.path.abspath(n.image.filepath)
            for n in bpy.context.active_object.active_material.node_tree.nodes
            if n.type == "TEX_IMAGE"
        ]
        assert os.path.normpath(node_paths[0]) == after
    finally:
        addon.output_folder = folder


class StubClient:
    """Stands in for the worker's client: hands the board the messages a download job sends."""

    starting = False

    def __init__(self):
        self.inbox: list[dict] = []

    def submit(self, method: str, params: dict) -> str:
        return "download-1"

    def messages(self, request_id: str) -> list[dict]:
        messages, self.inbox = self.inbox, []
        return messages


def test_download_progress_reaches_the_model_line_and_the_end_says_so(scene):
    scene.sdtex.model = "owner/not-downloaded"
    client = StubClient()
    ui_state.STATE.board.submit(client, "download_model", {"model": "owner/not-downloaded"})
    try:
        data = {"bytes_done": 500_000_000, "bytes_total": 2_000_000_000, "files_done": 1, "files_total": 4}
        client.inbox = [{"id": "download-1", "event": "download", "data": {**data, "speed": 2e7, "elapsed": 25.0}}]
        progress = {"step": 500_000_000, "total": 2_000_000_000, "elapsed": 25.0}
        client.inbox.append({"id": "download-1", "event": "progress", "data": progress})
        ui_jobs._follow_jobs()
        ui_state.STATE.readiness = None
        line = status.check_readiness(bpy.context).model
        assert line.progress == pytest.approx(0.25) and not line.ready
        assert line.text == "owner/not-downloaded: Downloading 500 MB of 2.0 GB · 20 MB/s"

        client.inbox = [{"id": "download-1", "result": {"model": "owner/not-downloaded", "path": "/cache/x"}}]
        ui_jobs._follow_jobs()
        assert ui_state.STATE.message == "Downloaded owner/not-downloaded: ready to generate"
        assert ui_state.STATE.download_job() is None
    finally:
        ui_jobs.stop_polling()
        ui_state.STATE.say("")
        scene.sdtex.model = ""


def test_a_field_error_clears_once_the_field_is_fixed(scene):
    scene.sdtex.prompt = ""
    with pytest.raises(RuntimeError, match="Prompt is empty"):
        bpy.ops.sdtex.generate(apply=False)
    assert ui_state.STATE.is_error and ui_state.STATE.message.startswith("Prompt is empty")
    ui_state.STATE.clear_fixed_error(scene.sdtex)  # what each panel redraw does
    assert ui_state.STATE.is_error  # still empty: the error stays
    scene.sdtex.prompt = "brick"
    ui_state.STATE.clear_fixed_error(scene.sdtex)
    assert not ui_state.STATE.is_error and ui_state.STATE.message == ""
