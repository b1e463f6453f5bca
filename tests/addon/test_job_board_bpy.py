"""One job mechanism: every kind of job the panels start (generate, travel, train, project, batch, download) is a
row on the UI's one job board, and Cancel says "Cancelling…" at once, before the worker confirms. Real Blender (bpy
5.0 as a module) and the real worker with the tiny model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

bpy = pytest.importorskip("bpy")
from blender_sd_addon.blender import batch, operator_base, project, train, ui_jobs, ui_state  # noqa: E402
from blender_sd_addon.jobs import CANCELLED  # noqa: E402


def write_photos(folder: Path) -> Path:
    import PIL.Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        PIL.Image.new("RGB", (32, 32), (60 * i, 120, 200)).save(folder / f"photo{i}.png")
    return folder


def add_cube(name: str):
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    obj = bpy.context.active_object
    obj.name = name
    return obj


def start_every_kind(scene, controlnet: str, tmp_path: Path) -> None:
    """Start each kind of job from its operator, as the panels do."""
    settings = scene.sdtex
    settings.steps = 150  # long enough to be running still when cancelled
    cube = add_cube("Crate")
    cube.select_set(True)
    assert bpy.ops.sdtex.generate() == {"FINISHED"}
    for prompt in ("lava", "basalt"):
        settings.prompt = prompt
        assert bpy.ops.sdtex.travel_add_key() == {"FINISHED"}
    assert bpy.ops.sdtex.travel() == {"FINISHED"}
    train_settings = scene.sdtex_train
    train_settings.photos_dir = str(write_photos(tmp_path / "photos"))
    train_settings.steps, train_settings.resolution, train_settings.prior = 3, 32, False
    assert bpy.ops.sdtex.train() == {"FINISHED"}
    scene.sdtex_project.controlnet, scene.sdtex_project.texture_size = controlnet, 64
    assert bpy.ops.sdtex.project() == {"FINISHED"}
    assert bpy.ops.sdtex.batch_texture(template="{name} of bricks") == {"FINISHED"}
    settings.model = "owner/not-downloaded"
    assert bpy.ops.sdtex.download_model() == {"FINISHED"}


def test_every_kind_of_job_is_a_row_on_the_board_and_cancel_says_so_at_once(scene, controlnet, tmp_path, as_ui):
    as_ui(operator_base, train, project, batch)
    start_every_kind(scene, controlnet, tmp_path)

    rows = ui_state.STATE.board.active
    assert [job.task for job in rows] == ["txt2img", "travel", "train_lora", "project", "txt2img", "download_model"]
    assert train.STATE.job is rows[2] and project.project_jobs() == [rows[3]]  # their panels show the same rows
    assert ui_state.STATE.targets[rows[4].request_id].kind == "batch"
    for job in rows:
        assert bpy.ops.sdtex.cancel(request_id=job.request_id) == {"FINISHED"}
        assert job.status_text == "Cancelling…", job.task  # at once: the worker has not answered yet

    deadline = time.monotonic() + 120
    while ui_jobs._tick() is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    ui_jobs.stop_polling()
    assert [job.state for job in rows] == [CANCELLED] * len(rows), [(j.task, j.state, j.error) for j in rows]
    assert train.STATE.message.startswith("Cancelled") and project.Running.message == "Cancelled"
    assert batch.STATE["message"] == "Batch: 0 of 1 applied; Crate: Cancelled"
