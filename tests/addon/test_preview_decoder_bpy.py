"""The Preview Decoder preference in Blender (bpy 5.0 as a module): sent with the tasks that send previews (a hub id
as it is, a folder made absolute), and a setup line while it is not on disk that leaves Generate on."""

from __future__ import annotations

import pytest

bpy = pytest.importorskip("bpy")

from blender_sd_addon.blender import status, tasks, ui_state  # noqa: E402

TAESD = "nobody/taesd-not-downloaded"


@pytest.fixture
def decoder(addon):
    def set_to(value: str) -> None:
        addon.preview_decoder = value
        ui_state.STATE.readiness = None

    yield set_to
    addon.property_unset("preview_decoder")
    ui_state.STATE.readiness = None


def test_the_preview_decoder_reaches_the_tasks_that_send_previews(scene, decoder, tmp_path):
    settings = scene.sdtex
    decoder(TAESD)
    assert tasks.task_params("txt2img", settings.generate_settings(5))["preview_decoder"] == TAESD
    task, values, _ = settings.image_task_settings(5)
    assert tasks.task_params(task, values)["preview_decoder"] == TAESD
    assert "preview_decoder" not in tasks.pbr_params(settings.pbr_settings())  # the pbr task sends no previews
    decoder(str(tmp_path / "taesd"))
    assert tasks.task_params("txt2img", settings.generate_settings(5))["preview_decoder"] == str(tmp_path / "taesd")


def test_a_preview_decoder_not_on_disk_is_said_and_generate_stays_on(scene, decoder):
    decoder("")
    before = status.check_readiness(bpy.context)
    assert before.preview is None
    decoder(TAESD)
    ready = status.check_readiness(bpy.context)
    assert ready.preview.text == f"Previews will be approximate: preview decoder {TAESD} not on disk"
    assert ready.preview.ready and ready.blocker == before.blocker  # whatever held Generate back before, no more
