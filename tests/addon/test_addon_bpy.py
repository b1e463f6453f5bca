"""The add-on in real Blender (bpy 5.0 as a module) with the real backend worker and the tiny model.

In background mode `bpy.ops.sdtex.generate()` blocks until the material is applied, and an ERROR report
raises RuntimeError carrying the message. Undo after applying needs a window: the GUI test covers it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

bpy = pytest.importorskip("bpy")
import addon_utils  # noqa: E402

from blender_sd_addon import api, jobs  # noqa: E402
from blender_sd_addon.blender import history_store, session, tasks, ui_jobs, ui_state  # noqa: E402
from blender_sd_addon.contract import protocol  # noqa: E402
from blender_sd_addon.history import HISTORY_LIMIT, HistoryRecord  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ADDON = "blender_sd_addon"


def add_cube(name: str, x: float = 0.0):
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=(x, 0.0, 0.0))
    obj = bpy.context.active_object
    obj.name = name
    return obj


def image_texture_paths(obj) -> list[str]:
    material = obj.active_material
    assert material is not None, f"{obj.name} has no material"
    return [bpy.path.abspath(n.image.filepath) for n in material.node_tree.nodes if n.type == "TEX_IMAGE"]


def test_enable_and_disable_twice_leaves_nothing_behind():
    from blender_sd_addon import blender as addon_blender

    for _ in range(2):
        assert addon_utils.enable(ADDON, default_set=True) is not None
        assert hasattr(bpy.types.Scene, "sdtex")
        assert all(cls.is_registered for cls in addon_blender.classes)
        assert addon_blender._on_load_pre in bpy.app.handlers.load_pre

        addon_utils.disable(ADDON, default_set=True)
        assert not hasattr(bpy.types.Scene, "sdtex")
        assert not any(cls.is_registered for cls in addon_blender.classes)
        assert addon_blender._on_load_pre not in bpy.app.handlers.load_pre
        assert not bpy.app.timers.is_registered(ui_jobs._tick)
        assert not bpy.app.timers.is_registered(addon_blender._start_early)
        assert ADDON not in bpy.context.preferences.addons


def test_generate_operator_puts_materials_on_two_selected_objects(scene, addon, tmp_path):
    first, second = add_cube("First"), add_cube("Second", x=2.0)
    first.select_set(True)
    second.select_set(True)
    scene.sdtex.shared_material = False

    assert bpy.ops.sdtex.generate() == {"FINISHED"}

    for obj in (first, second):
        paths = image_texture_paths(obj)
        assert paths and all(os.path.isfile(p) for p in paths), paths
        assert Path(paths[0]).parent == Path(addon.output_folder)
    assert first.active_material != second.active_material
    entry = HistoryRecord.from_fields(scene.sdtex.history[0])
    assert entry.prompt == "mossy stone wall" and (entry.width, entry.steps) == (64, 2)
    assert entry.images()[0].path == image_texture_paths(first)[0]


def test_no_selection_is_a_clear_report_and_generation_only_still_works(scene):
    add_cube("Unselected").select_set(False)
    with pytest.raises(RuntimeError, match="Select one or more mesh objects"):
        bpy.ops.sdtex.generate()
    assert bpy.ops.sdtex.generate(apply=False) == {"FINISHED"}
    assert len(scene.sdtex.history) == 1
    assert os.path.isfile(HistoryRecord.from_fields(scene.sdtex.history[0]).images()[0].path)


def test_missing_backend_interpreter_is_a_clear_report_then_the_next_call_works(scene, addon, tmp_path):
    cube = add_cube("Cube")
    cube.select_set(True)
    addon.backend_python = str(tmp_path / "no-python-here")
    try:
        with pytest.raises(RuntimeError, match="backend interpreter .* does not exist: .*no-python-here"):
            bpy.ops.sdtex.generate()
    finally:
        addon.backend_python = ""
    assert bpy.ops.sdtex.generate() == {"FINISHED"}
    assert os.path.isfile(image_texture_paths(cube)[0])


def test_worker_killed_mid_job_is_a_clear_report_then_the_next_call_works(scene, monkeypatch):
    cube = add_cube("Cube")
    cube.select_set(True)
    scene.sdtex.steps = 150  # long enough that the kill lands mid-job
    handle = jobs.Job.handle

    def kill_at_first_progress(job, message):
        handle(job, message)
        if message.get("event") == "progress":
            os.kill(session.current_client().pid, signal.SIGKILL)

    monkeypatch.setattr(jobs.Job, "handle", kill_at_first_progress)
    with pytest.raises(RuntimeError, match=r"(?s)backend stopped, killed by SIGKILL.*Full log: "):
        bpy.ops.sdtex.generate()
    assert cube.active_material is None
    monkeypatch.undo()

    scene.sdtex.steps = 2
    assert bpy.ops.sdtex.generate() == {"FINISHED"}
    assert os.path.isfile(image_texture_paths(cube)[0])


def test_history_survives_saving_and_reopening(scene, tmp_path):
    assert bpy.ops.sdtex.generate(apply=False) == {"FINISHED"}
    saved = [HistoryRecord.from_fields(e) for e in scene.sdtex.history]
    assert [r.prompt for r in saved] == ["mossy stone wall"] and os.path.isfile(saved[0].images()[0].path)

    blend = tmp_path / "history.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    bpy.ops.wm.read_homefile(use_empty=True)
    assert len(bpy.context.scene.sdtex.history) == 0
    bpy.ops.wm.open_mainfile(filepath=str(blend))
    assert [HistoryRecord.from_fields(e) for e in bpy.context.scene.sdtex.history] == saved


def test_history_is_newest_first_and_capped(scene):
    def record(n: int) -> HistoryRecord:
        return HistoryRecord(f"prompt {n}", "", n, 2, 7.5, 64, 64, "euler_a", "none", False, "/m", [])

    for n in range(HISTORY_LIMIT + 2):
        history_store.add_history(scene, record(n))
    prompts = [entry.prompt for entry in scene.sdtex.history]
    assert len(prompts) == HISTORY_LIMIT
    assert prompts[0] == f"prompt {HISTORY_LIMIT + 1}" and prompts[-1] == "prompt 2"


def test_history_keeps_a_pbr_entry_without_seed_across_saving_and_reopening(scene, tmp_path):
    maps = {"height": "/out/wall_height.png", "normal": "/out/wall_normal.png"}
    record = HistoryRecord(
        "", "", None, 25, 7.5, 32, 16, "euler_a", "xy", True, "", [{"path": "", "seed": None, "maps": maps}],
        task="pbr", source="Wall Paint", ao_strength=2.0,
    )
    history_store.add_history(scene, record)
    blend = tmp_path / "pbr.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    bpy.ops.wm.open_mainfile(filepath=str(blend))
    (entry,) = bpy.context.scene.sdtex.history
    assert entry.seed == "" and HistoryRecord.from_fields(entry) == record
    assert record.title == "Maps of Wall Paint" and record.images()[0].maps == maps


def test_generating_onto_an_object_in_edit_mode_applies_and_records(scene):
    cube = add_cube("Cube")
    cube.select_set(True)
    bpy.ops.object.mode_set(mode="EDIT")
    assert bpy.ops.sdtex.generate() == {"FINISHED"}
    bpy.ops.object.mode_set(mode="OBJECT")
    (entry,) = scene.sdtex.history
    assert image_texture_paths(cube) == [HistoryRecord.from_fields(entry).images()[0].path]


def test_use_history_settings_and_apply_again(scene):
    scene.sdtex.random_seed = False
    scene.sdtex.seed = 1234
    assert bpy.ops.sdtex.generate(apply=False) == {"FINISHED"}
    scene.sdtex.prompt, scene.sdtex.seed, scene.sdtex.steps = "something else", 1, 3

    assert bpy.ops.sdtex.use_history_settings() == {"FINISHED"}
    assert (scene.sdtex.prompt, scene.sdtex.seed, scene.sdtex.steps) == ("mossy stone wall", 1234, 2)

    cube = add_cube("Cube")
    cube.select_set(True)
    assert bpy.ops.sdtex.apply_history() == {"FINISHED"}
    albedo = HistoryRecord.from_fields(scene.sdtex.history[0]).images()[0].path
    assert image_texture_paths(cube)[0] == albedo
    assert scene.sdtex.model == ""  # the entry used the preferences' model: the panel keeps following them

    assert bpy.ops.sdtex.tile_preview() == {"FINISHED"}
    tiled = bpy.data.images[f"{Path(albedo).stem} 2x2"]
    assert tuple(tiled.size) == (128, 128)


def test_api_generate_texture_returns_images_and_materials_with_files_on_disk(scene, tmp_path):
    cube = add_cube("Cube")
    result = api.generate_texture(
        [cube], "oak planks", seed=42, steps=2, width=64, height=64, seamless="xy", output_dir=str(tmp_path)
    )
    assert result.seed == 42 and result.result.seamless == "xy"
    assert [Path(bpy.path.abspath(i.filepath)) for i in result.images] == [Path(f) for f in result.files]
    assert all(Path(f).is_file() and Path(f).parent == tmp_path for f in result.files)
    assert cube.active_material == result.materials[0]
    assert image_texture_paths(cube) == result.files


def test_api_bad_parameter_names_it_and_its_range(scene):
    with pytest.raises(api.SDTexError, match="steps must be an integer from 1 to 150"):
        api.generate_texture([add_cube("Cube")], "x", steps=0)


def follow_ui_jobs(on_tick=None):
    """Drive the UI timer by hand (timers do not tick in background mode) until it stops."""

    while (delay := ui_jobs._tick()) is not None:
        if on_tick:
            on_tick()
        time.sleep(delay)
    ui_jobs.stop_polling()


def test_ui_job_passes_previews_on_and_applies_the_result(scene, monkeypatch):
    from blender_sd_addon.blender import preview

    shown = []  # tests/addon/test_preview_bpy.py checks what the preview does with them
    show = preview.show_preview
    monkeypatch.setattr(preview, "show_preview", lambda event: shown.append(event) or show(event))
    cube = add_cube("Cube")
    params = tasks.generate_params(scene.sdtex.generate_settings(9) | {"preview_every": 1})
    options = tasks.apply_options(shared_material=True, slot="NEW", projection="UV", texture_scale=1.0)
    job = ui_jobs.start_ui_job(params, [cube], options, apply=True)
    follow_ui_jobs()

    assert job.state == jobs.DONE and not ui_state.STATE.is_error, ui_state.STATE.message
    assert os.path.isfile(image_texture_paths(cube)[0])
    assert "Saved" in ui_state.STATE.message and "seed 9" in ui_state.STATE.message
    assert shown and all(len(base64.b64decode(e.rgb)) == e.width * e.height * 3 for e in shown)
    assert preview.PREVIEW_NAME not in bpy.data.images  # steps never touch an image datablock


def test_ui_cancel_stops_the_job_without_applying(scene):

    cube = add_cube("Cube")
    params = tasks.generate_params(scene.sdtex.generate_settings(3) | {"steps": 150})
    options = tasks.apply_options(shared_material=True, slot="NEW", projection="UV", texture_scale=1.0)
    job = ui_jobs.start_ui_job(params, [cube], options, apply=True)

    def cancel_once_running():
        if job.step >= 1 and bpy.ops.sdtex.cancel.poll():
            assert bpy.ops.sdtex.cancel(request_id=job.request_id) == {"FINISHED"}

    follow_ui_jobs(cancel_once_running)
    assert job.state == jobs.CANCELLED and job.step < 150
    assert ui_state.STATE.message == "Cancelled" and not ui_state.STATE.is_error
    assert cube.active_material is None


def test_two_ui_jobs_back_to_back_each_apply_to_their_own_object(scene):
    """The second generation is queued while the first runs; each result lands on the object it was
    started for, and cancelling a third (queued) one leaves the others alone."""

    left, right, spare = add_cube("Left"), add_cube("Right"), add_cube("Spare")
    options = tasks.apply_options(shared_material=False, slot="NEW", projection="UV", texture_scale=1.0)
    first = ui_jobs.start_ui_job(tasks.generate_params(scene.sdtex.generate_settings(1)), [left], options, True)
    second = ui_jobs.start_ui_job(tasks.generate_params(scene.sdtex.generate_settings(2)), [right], options, True)
    third = ui_jobs.start_ui_job(tasks.generate_params(scene.sdtex.generate_settings(3)), [spare], options, True)
    assert len(ui_state.STATE.board.active) == 3
    assert bpy.ops.sdtex.cancel(request_id=third.request_id) == {"FINISHED"}
    seen_running_together = []
    follow_ui_jobs(lambda: seen_running_together.append(len(ui_state.STATE.board.active)))

    assert (first.state, second.state, third.state) == (jobs.DONE, jobs.DONE, jobs.CANCELLED)
    assert max(seen_running_together) >= 2  # both were listed at once, each with its own progress
    assert image_texture_paths(left) == [first.result.images[0].path]
    assert image_texture_paths(right) == [second.result.images[0].path]
    assert spare.active_material is None
    assert [entry.seed for entry in scene.sdtex.history][:2] == ["2", "1"]


def test_fresh_blender_process_never_imports_torch(tiny_model_dir, tmp_path):
    """Runs examples/headless_api.py in a new process (this one has torch from the backend tests)."""
    scenario = f"""
import json, runpy, sys
sys.argv = ["headless_api.py", "--prompt", "cracked clay", "--model", {str(tiny_model_dir)!r},
            "--output", {str(tmp_path)!r}, "--steps", "2", "--size", "64", "--seed", "5"]
try:
    runpy.run_path({str(REPO / "examples" / "headless_api.py")!r}, run_name="__main__")
except SystemExit as exc:
    sys.exit(exc.code)
import bpy
material = bpy.data.objects["Cube"].active_material
images = [bpy.path.abspath(n.image.filepath) for n in material.node_tree.nodes if n.type == "TEX_IMAGE"]
print("RESULT " + json.dumps({{"torch": "torch" in sys.modules, "material": material.name, "images": images}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", scenario], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    facts = json.loads(line[len("RESULT ") :])
    assert facts["torch"] is False
    assert facts["material"] == "SD cracked clay"
    assert facts["images"] and all(Path(p).is_file() and Path(p).parent == tmp_path for p in facts["images"])


def test_early_start_warms_only_a_model_that_is_on_disk(addon, monkeypatch):
    """A hub id that is not downloaded is not loaded at start (the first Generate used to wait ~20 s
    behind failed hub look-ups); a model folder on disk is loaded and warmed."""

    requests = []
    client = session.get_client()
    submit = client.submit
    monkeypatch.setattr(client, "submit", lambda method, params=None: requests.append(method) or submit(method, params))
    model = addon.model
    try:
        addon.model = "nobody/not-downloaded"
        ui_state.start_backend_async().join(120)
        assert "not on disk: nobody/not-downloaded" in ui_state.STATE.backend_message
        assert protocol.LOAD_MODEL not in requests and client.alive
    finally:
        addon.model = model
    ui_state.start_backend_async().join(120)
    assert ui_state.STATE.backend_message == "model loaded" and protocol.LOAD_MODEL in requests


def test_a_long_error_is_drawn_whole_over_several_lines(scene):
    """At the default sidebar width a label cuts text off; the panel's message wraps instead."""
    from blender_sd_addon.blender import panels

    message = (
        "The backend interpreter set in Preferences > Backend interpreter does not exist: "
        "/home/artist/venvs/sd/bin/python. Press Install backend, or choose another interpreter."
    )
    ui_state.STATE.say(message, is_error=True)
    labels: list = []

    class Layout:
        def __getattr__(self, name):  # rows, columns, props and operators: accept and ignore
            return lambda *args, **kwargs: self

        def label(self, text="", icon="NONE", **kwargs):
            labels.append((text, icon))

    context = type("Context", (), {"scene": scene, "region": type("Region", (), {"width": 280})()})()
    try:
        panels.MainPanel.draw(type("Panel", (), {"layout": Layout()})(), context)
    finally:
        ui_state.STATE.say("")
    # The message's labels: from the one with the error icon on (the setup lines and field labels come before).
    start = next(i for i, (text, icon) in enumerate(labels) if icon == "ERROR" and message.startswith(text))
    lines, shown = [], ""
    for text, _ in labels[start:]:
        if len(shown) >= len(message):
            break
        shown += text if shown.endswith("/") or not shown else " " + text  # a path breaks after its "/"
        lines.append(text)
    assert len(lines) > 2 and all(len(line) <= 280 / 7 for line in lines)
    assert shown == message  # nothing cut off
    assert all(icon == "BLANK1" for _, icon in labels[start + 1 : start + len(lines)])
