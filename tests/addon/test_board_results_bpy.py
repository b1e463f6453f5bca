"""The job board's ends in real Blender (bpy 5.0 as a module) with the real worker, the tiny model and a tiny
ControlNet: a cancelled project applies the views it baked, project and training jobs leave history entries
(Apply Again re-applies them), opening a file abandons running jobs cleanly, unsaved-file history follows the
images on the first save, and sidebar redraws are limited to the sidebars, at most ~4 a second for progress."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

bpy = pytest.importorskip("bpy")
from blender_sd_addon.blender import history_store, operator_base, project, projecting, ui_jobs  # noqa: E402
from blender_sd_addon.blender.ui_state import STATE  # noqa: E402
from blender_sd_addon.jobs import CANCELLED, Job  # noqa: E402


def tick_until(done, seconds: float = 180.0) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        ui_jobs._tick()
        time.sleep(0.02)
    assert done(), "timed out"


def start_project(scene, controlnet: str, as_ui) -> Job:
    as_ui(operator_base, project)
    scene.sdtex.steps = 6
    settings = scene.sdtex_project
    settings.controlnet, settings.texture_size = controlnet, 64
    settings.views_per_ring, settings.both_sides = 4, False
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    cube = bpy.context.active_object
    cube.name = "Crate"
    cube.select_set(True)
    assert bpy.ops.sdtex.project() == {"FINISHED"}
    (job,) = project.project_jobs()
    return job


def material_images(obj) -> set[str]:
    return {
        os.path.abspath(bpy.path.abspath(node.image.filepath))
        for slot in obj.material_slots
        for node in slot.material.node_tree.nodes
        if node.type == "TEX_IMAGE" and node.image
    }


def test_a_cancelled_project_applies_the_views_baked_and_is_in_the_history(scene, controlnet, as_ui):
    job = start_project(scene, controlnet, as_ui)
    tick_until(lambda: projecting.views_done(job) >= 1)
    job.cancel()
    tick_until(lambda: job.finished)
    ui_jobs.stop_polling()

    assert job.state == CANCELLED
    done = re.fullmatch(r"Cancelled after (\d) of 4 views: applied what was baked", project.Running.message)
    assert done and 1 <= int(done[1]) < 4, project.Running.message
    textures = {a.path for a in job.artifacts if a.kind == "image"}
    cube = bpy.data.objects["Crate"]
    assert len(textures) == 1 and material_images(cube) == textures  # the texture baked from the finished views

    entry = scene.sdtex.history[0]
    assert entry.task == "project" and [f["path"] for f in json.loads(entry.files)] == list(textures)
    assert json.loads(entry.params)["objects"] == ["Crate"] and "cameras" not in json.loads(entry.params)
    cube.data.materials.clear()
    bpy.ops.object.select_all(action="DESELECT")  # Apply Again goes to the objects it was baked for
    assert bpy.ops.sdtex.apply_history() == {"FINISHED"}
    assert material_images(cube) == textures


def test_opening_a_file_abandons_running_jobs_and_the_panel_warns_before(scene, controlnet, as_ui):
    scene.sdtex.steps = 200
    job = start_project(scene, controlnet, as_ui)
    assert STATE.closing_warning() == "1 job running: closing Blender or opening a file cancels them"
    bpy.ops.wm.read_homefile(use_empty=True)  # load_pre
    assert job.state == CANCELLED and job.cancelling and STATE.board.active == [] and STATE.targets == {}
    assert STATE.closing_warning() == "" and not bpy.app.timers.is_registered(ui_jobs._tick)
    assert project.project_jobs() == [] and not bpy.data.objects  # nothing of it reaches the new file


def test_a_training_leaves_a_history_entry_that_enables_its_lora_again(scene, tmp_path):
    import PIL.Image

    (tmp_path / "photos").mkdir()
    for i in range(3):
        PIL.Image.new("RGB", (32, 32), (60 * i, 120, 200)).save(tmp_path / "photos" / f"photo{i}.png")
    settings = scene.sdtex_train
    settings.photos_dir = str(tmp_path / "photos")
    settings.token, settings.subject, settings.prior = "sks", "tiles", False
    settings.steps, settings.resolution, settings.sample_every = 2, 32, 0
    assert bpy.ops.sdtex.train() == {"FINISHED"}  # background mode: blocks until trained

    lora = bpy.path.abspath(settings.loras[0].filepath)
    entry = scene.sdtex.history[0]
    assert entry.task == "train_lora" and json.loads(entry.files)[0]["path"] == lora and os.path.isfile(lora)
    assert entry.prompt == "a photo of sks tiles" and json.loads(entry.params)["rank"] == settings.rank
    settings.loras.remove(0)
    assert bpy.ops.sdtex.apply_history() == {"FINISHED"}
    assert [(bpy.path.abspath(e.filepath), e.enabled) for e in settings.loras] == [(lora, True)]
    settings.steps, scene.sdtex.steps = 7, 5
    assert bpy.ops.sdtex.use_history_settings() == {"FINISHED"}
    assert (settings.steps, scene.sdtex.steps) == (2, 5)  # the Train panel's settings, not the main panel's
    with pytest.raises(RuntimeError, match="is a LoRA, not an image"):
        bpy.ops.sdtex.tile_preview()


def test_an_unsaved_files_history_lines_follow_its_images_beside_the_blend(scene, addon, tmp_path):
    from blender_sd_addon.blender import relocate, session
    from blender_sd_addon.history import HistoryRecord

    folder, addon.output_folder = addon.output_folder, "//textures/"  # the user folder until saved
    relocate.forget()
    assert not bpy.data.filepath
    path = str(session.user_data_dir() / "textures" / "history_move.png")  # as a finished job writes it
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = bpy.data.images.new("history_move", 4, 4)
    pixels.filepath_raw, pixels.file_format = path, "PNG"
    pixels.save()
    record = HistoryRecord("moss", "", 1, 2, 7.5, 4, 4, "euler_a", "none", False, "/m", [{"path": path, "seed": 1}])
    history_store.add_history(scene, record)
    relocate.remember([path])
    unsaved_log = Path(path).parent / history_store.HISTORY_FILE
    other = HistoryRecord.from_dict(record.to_dict() | {"prompt": "another file's", "files": [{"path": "/x.png"}]})
    with open(unsaved_log, "a") as log:
        log.write(other.to_json() + "\n")
    try:
        bpy.ops.wm.save_mainfile(filepath=str(tmp_path / "scene.blend"))

        (line,) = (tmp_path / "textures" / history_store.HISTORY_FILE).read_text().splitlines()
        assert HistoryRecord.from_json(line).images()[0].path == str(tmp_path / "textures" / "history_move.png")
        left = unsaved_log.read_text().splitlines()
        assert other.to_json() in left and path not in unsaved_log.read_text()  # another file's record stays
    finally:
        kept = [line for line in unsaved_log.read_text().splitlines() if line != other.to_json()]
        unsaved_log.write_text("".join(line + "\n" for line in kept))
        relocate.forget()
        addon.output_folder = folder


class _Region:
    def __init__(self, kind: str, tagged: list):
        self.type, self._tagged = kind, tagged

    def tag_redraw(self):
        self._tagged.append(self)


def test_redraw_tags_only_the_sidebars_and_progress_at_most_4_times_a_second(monkeypatch):
    tagged: list = []
    areas = [
        SimpleNamespace(type=kind, regions=[_Region(r, tagged) for r in ("HEADER", "WINDOW", "UI")])
        for kind in ("VIEW_3D", "IMAGE_EDITOR", "NODE_EDITOR", "OUTLINER", "PROPERTIES")
    ]
    windows = [SimpleNamespace(screen=SimpleNamespace(areas=areas))]
    monkeypatch.setattr(ui_jobs, "bpy", SimpleNamespace(context=SimpleNamespace(window_manager=SimpleNamespace(
        windows=windows))))  # fmt: skip
    ui_jobs.redraw()
    assert [(r.type, a.type) for a in areas for r in a.regions if r in tagged] == [
        ("UI", "VIEW_3D"), ("UI", "IMAGE_EDITOR"), ("UI", "NODE_EDITOR")
    ]  # fmt: skip

    now = [100.0]
    redraws = ui_jobs.Redraws(clock=lambda: now[0])
    calls: list[float] = []
    monkeypatch.setattr(ui_jobs, "redraw", lambda: calls.append(now[0]))
    board = [("r1", "running", "denoising", False, False)]  # what _board_signature gives: one row, running

    def tick(at: float, progress: bool) -> bool:
        now[0] = 100.0 + at
        return redraws.news(progress, tuple(board))

    assert tick(0.0, True)  # a new row: at once
    assert [tick(t, True) for t in (0.01, 0.1, 0.2, 0.24)] == [False] * 4  # progress only: held back
    assert tick(0.25, True)  # a quarter second later
    board[0] = ("r1", "running", "denoising", True, False)
    assert tick(0.26, False)  # Cancel: at once
    assert not tick(0.3, True)
    assert not tick(0.4, False) and tick(0.51, False)  # the held-back progress is drawn when its time comes
    assert not tick(5.0, False)  # nothing new: no redraw
    progress_only = [t for t in range(400) if tick(10 + t / 100, True)]
    assert len(progress_only) == 16  # 4 seconds of a tick every 10 ms with news: 4 a second
    assert calls == [100.0 + t for t in (0.0, 0.25, 0.26, 0.51)] + [110.0 + t / 100 for t in progress_only]


def test_a_cancelled_travel_says_where_its_finished_frames_are(addon):
    from blender_sd_addon.contract import protocol

    job = Job(None, "r9", "travel", state=CANCELLED)
    ui_jobs.finish_texture_job(job, ui_jobs.Target((), None, False))
    assert STATE.message == "Cancelled"  # nothing made yet
    job.artifacts = [protocol.Artifact(f"/out/lava_1a2b/lava_{n:04d}.png", "frame", 9, "0" * 64) for n in (1, 2)]
    ui_jobs.finish_texture_job(job, ui_jobs.Target((), None, False))
    assert STATE.message == (
        "Cancelled after 2 frames: they stay in /out/lava_1a2b, and running the same travel again continues "
        "from there"
    )


def test_a_ray_batch_is_one_row_on_the_board_and_applies_what_it_made(scene, as_ui):
    from blender_sd_addon.blender import batch
    from blender_sd_addon.jobs import DONE

    as_ui(operator_base, batch)
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    cube = bpy.context.active_object
    cube.name = "Crate"
    cube.select_set(True)
    assert bpy.ops.sdtex.batch_texture(template="{name} of bricks", use_ray=True, ray_address="local") == {"FINISHED"}

    (row,) = STATE.board.active
    assert row.task == "batch" and row.status_text == "0 of 1 done"
    assert STATE.targets[row.request_id].kind == batch.RAY and batch.STATE["job"] is row
    tick_until(lambda: row.finished, 400)
    ui_jobs.stop_polling()
    assert row.state == DONE and row.step == 1, Path(row.log).read_text()[-3000:]
    assert batch.STATE["message"] == "Batch: 1 of 1 applied"
    (image,) = material_images(cube)
    assert Path(image).parent.name == "Crate" and Path(image).parent.parent == Path(row.log).parent
