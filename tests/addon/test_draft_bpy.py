"""Draft in real Blender (bpy 5.0 as a module) with the real worker and the tiny model: the Draft operator submits
the draft, then, only once it is done, the final with the same seed (picked once here when unset) and the artist's
own steps; the draft is shown (handed to the Image Editors, as a final is) and never applied nor recorded; only the
final goes on the mesh and into the history; Cancel stops both. Background mode and the API run both in turn."""

from __future__ import annotations

import time

import pytest

bpy = pytest.importorskip("bpy")
from blender_sd_addon import api  # noqa: E402
from blender_sd_addon.blender import job_operators, preview, ui_jobs  # noqa: E402
from blender_sd_addon.blender.ui_state import STATE  # noqa: E402
from blender_sd_addon.history import HistoryRecord  # noqa: E402
from blender_sd_addon.jobs import CANCELLED, DONE  # noqa: E402

STEPS = 10  # the artist's; the steps preset's draft takes 8


def texture_files(obj) -> set[str]:
    material = obj.active_material
    if material is None:
        return set()
    return {bpy.path.abspath(n.image.filepath) for n in material.node_tree.nodes if n.type == "TEX_IMAGE" and n.image}


def tick_until(done, on_tick=None, seconds: float = 120.0) -> None:
    """Drive the UI timer by hand (timers do not tick in background mode)."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        ui_jobs._tick()
        if on_tick:
            on_tick()
        time.sleep(0.02)
    assert done(), "timed out"


@pytest.fixture
def cube(scene):
    scene.sdtex.steps, scene.sdtex.random_seed, scene.sdtex.draft_preset = STEPS, True, "steps"
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    obj = bpy.context.active_object
    obj.select_set(True)
    return obj


@pytest.fixture
def shown(monkeypatch) -> list:
    """The images handed to the Image Editors (bpy as a module has no windows to look at)."""
    handed: list = []
    monkeypatch.setattr(preview, "hand_over", handed.append)
    return handed


def test_draft_first_then_the_final_with_the_same_seed_and_only_the_final_applied(scene, cube, shown, as_ui):
    as_ui(job_operators)
    assert bpy.ops.sdtex.draft() == {"FINISHED"}
    (draft,) = STATE.board.active  # the final is not submitted yet
    assert draft.params["steps"] == 8 and isinstance(draft.params["seed"], int)

    tick_until(lambda: draft.then.job is not None and draft.request_id not in STATE.targets)
    final = draft.then.job
    assert draft.state == DONE and STATE.board.active == [final]
    assert final.params["steps"] == STEPS and final.params["seed"] == draft.params["seed"]
    assert {k for k in final.params if final.params[k] != draft.params[k]} == {"steps"}
    draft_file = draft.result.images[0].path
    assert [image.filepath for image in shown] == [draft_file]  # shown while the final runs
    assert texture_files(cube) == set() and len(scene.sdtex.history) == 0  # neither applied nor recorded

    tick_until(lambda: final.finished)
    ui_jobs.stop_polling()
    assert final.state == DONE and not STATE.is_error, STATE.message
    assert texture_files(cube) == {final.result.images[0].path} != {draft_file}
    (entry,) = scene.sdtex.history
    assert (entry.steps, entry.seed) == (STEPS, str(draft.params["seed"]))
    assert shown[-1].filepath == final.result.images[0].path


def test_cancel_during_the_draft_stops_both(scene, cube, shown, as_ui):
    as_ui(job_operators)
    assert bpy.ops.sdtex.draft() == {"FINISHED"}
    (draft,) = STATE.board.active
    assert bpy.ops.sdtex.cancel() == {"FINISHED"}  # every job: the final is not one yet
    tick_until(lambda: not STATE.running)
    ui_jobs.stop_polling()
    assert draft.then.job is None and texture_files(cube) == set() and shown == []
    assert draft.state in (CANCELLED, DONE) and STATE.message == "Cancelled"  # DONE: it ended before the cancel


def test_cancel_during_the_final_applies_nothing(scene, cube, shown, as_ui):
    as_ui(job_operators)
    scene.sdtex.steps = 150
    assert bpy.ops.sdtex.draft() == {"FINISHED"}
    (draft,) = STATE.board.active

    def cancel_the_final() -> None:
        final = draft.then.job
        if final is not None and final.step >= 1 and not final.cancelling:
            assert bpy.ops.sdtex.cancel(request_id=final.request_id) == {"FINISHED"}

    tick_until(lambda: draft.then.job is not None and draft.then.job.finished, cancel_the_final)
    ui_jobs.stop_polling()
    assert draft.then.job.state == CANCELLED and draft.then.job.step < 150
    assert texture_files(cube) == set() and len(scene.sdtex.history) == 0 and len(shown) == 1


def test_background_mode_and_the_api_run_the_draft_then_the_final(scene, cube):
    assert bpy.ops.sdtex.draft() == {"FINISHED"}  # background mode: blocks until the final is applied
    (entry,) = scene.sdtex.history
    assert entry.steps == STEPS and texture_files(cube) == {HistoryRecord.from_fields(entry).images()[0].path}

    draft, final = api.generate_with_draft([cube], "moss", steps=STEPS, width=64, height=64, slot="REPLACE")
    assert draft.seed == final.seed and draft.materials == [] and final.materials
    assert (draft.result.params["steps"], final.result.params["steps"]) == (8, STEPS)
    assert texture_files(cube) == {final.files[0]} and len(scene.sdtex.history) == 2
    assert draft.images[0].filepath == draft.files[0]


def test_a_lora_preset_without_its_lora_names_the_setting(scene, cube, addon):
    scene.sdtex.draft_preset = "lcm"
    addon.lcm_lora = ""
    with pytest.raises(RuntimeError, match="set Preferences > Draft LoRAs > LCM-LoRA"):
        bpy.ops.sdtex.draft()
    with pytest.raises(api.SDTexError, match="draft_lora must be the LCM-LoRA file, folder or hub id"):
        api.generate_with_draft([cube], "moss", draft="lcm")
    with pytest.raises(api.SDTexError, match="draft must be one of steps, lcm, tcd, hyper, turbo"):
        api.generate_with_draft([cube], "moss", draft="fast")
