"""Drives the real Blender GUI (3.4+, under Xvfb) for tests/gui/test_gui.py; writes report.json and quits.

    blender --factory-startup --enable-event-simulate scene.blend --python gui_driver.py -- '{"zip": ..., ...}'

Arguments (JSON): zip (the built add-on), model (a diffusers folder), python (the backend interpreter),
out (report and screenshots), steps, size, timeout (seconds), preview_box (left, top, right, bottom of the
screenshot region the textured cube fills) and preview_saturation (the mean HSV saturation, 0-255, it must pass).

Nothing waits a fixed time for a condition: each wait polls the condition itself (the tab drawn, the textured
cube on screen once EEVEE has compiled its shaders) until a deadline, so a loaded machine only makes it slower.

It does what a user does: install the zip (legacy add-on path), open the sidebar on the SD Textures tab,
follow the setup lines (no backend: set the interpreter; the default model not on disk: choose the tiny model's
folder), select the cube and press Generate, select the plane and press Generate again while the first runs, watch
both jobs' progress (the live preview in an Image Editor), look at the result in Material Preview, undo both;
then, in a new unsaved file, generate once and save into a new folder: the texture must follow the .blend.
A heartbeat timer measures how long Blender's event loop stalls, first without a job, then during the jobs
(gui_stalls.py). Everything after
Generate runs from `bpy.app.timers` callbacks, so the report also shows that Blender kept running its
event loop while the backend worked. Any exception ends the run with the traceback in the report.
"""

import json
import os
import sys
import time
from types import SimpleNamespace

import addon_utils
import bpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # Blender runs this file as a script
from blender_window import mean_saturation, override, run_scenario, view3d  # noqa: E402
from gui_stalls import START, Stalls  # noqa: E402

ARGS = json.loads(sys.argv[sys.argv.index("--") + 1])
ADDON = "blender_sd_addon"
TAB = "SD Textures"
TICK = 0.1  # seconds between driver steps
TAB_WAIT = 60.0  # seconds the sidebar may take to show the add-on's tab
PREVIEW_WAIT = 150.0  # seconds EEVEE may take to compile its shaders (minutes-long on a loaded llvmpipe)
BASELINE = 5.0  # seconds of heartbeat with the same load and the same redraws, before any job
REPORT = {"errors": [], "ticks_during_job": 0, "progress_seen": [], "screenshots": {}, "timeline": {}}


def mark(event: str) -> None:
    REPORT["timeline"][event] = round(time.monotonic() - START, 2)


STALLS = Stalls()


class TabProbe(bpy.types.Panel):
    """An empty panel in the add-on's sidebar tab: Blender draws it only while that tab is open."""

    bl_idname = "SDTEX_PT_gui_test_probe"
    bl_label = ""
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = TAB
    bl_options = {"HIDE_HEADER"}
    bl_order = 1000
    draws = 0

    def draw(self, context):
        TabProbe.draws += 1


def screenshot(name: str) -> None:
    path = os.path.join(ARGS["out"], name)
    with override(), STALLS.paused():  # the driver's own work, not the add-on's
        bpy.ops.screen.screenshot(filepath=path)
    REPORT["screenshots"][name] = path


def object_state(name: str) -> dict:
    cube = bpy.data.objects[name]
    material = cube.active_material
    images = []
    if material and material.node_tree:
        images = [n.image for n in material.node_tree.nodes if n.type == "TEX_IMAGE" and n.image]
    return {
        "material": material.name if material else None,
        "images": [bpy.path.abspath(image.filepath) for image in images],
        "slots": [slot.material.name if slot.material else None for slot in cube.material_slots],
    }


def select_only(name: str) -> None:
    for obj in bpy.context.view_layer.objects:
        obj.select_set(obj.name == name)
    bpy.context.view_layer.objects.active = bpy.data.objects[name]


def setup() -> None:
    # 1. Install the zip as a legacy add-on (the Blender 3.4-4.1 path) and enable it
    bpy.context.preferences.filepaths.temporary_directory = ARGS["out"]  # quit.blend lands here
    REPORT["install"] = sorted(bpy.ops.preferences.addon_install(filepath=ARGS["zip"]))
    module = addon_utils.enable(ADDON, default_set=True)
    REPORT["addon_file"] = module.__file__ if module else None

    # 2. The prompt a user would type (the model and the sizes come once the setup lines are seen)
    bpy.context.scene.sdtex.prompt = "mossy stone wall"
    plane = bpy.data.objects.new("Plane", bpy.data.meshes.new("Plane"))
    plane.data.from_pydata([(-1, -1, 0), (1, -1, 0), (1, 1, 0), (-1, 1, 0)], [], [(0, 1, 2, 3)])
    plane.location = (3.5, 0, -1)
    bpy.context.scene.collection.objects.link(plane)
    cube = bpy.data.objects["Cube"]
    bpy.context.view_layer.objects.active = cube
    cube.select_set(True)
    REPORT["before"] = object_state("Cube")
    REPORT["plane_before"] = object_state("Plane")

    # 3. Open the sidebar, and an Image Editor (for the live preview) where the Properties editor was
    _, area, _ = view3d()
    area.spaces.active.show_region_ui = True
    bpy.utils.register_class(TabProbe)
    properties = next(a for a in bpy.context.window_manager.windows[0].screen.areas if a.type == "PROPERTIES")
    properties.type = "IMAGE_EDITOR"
    bpy.app.timers.register(STALLS.tick, persistent=True)
    STALLS.watch_viewport()
    mark("setup")


def scenario():
    """The steps after start-up; each `yield` gives Blender back its event loop for that many seconds."""
    ui = addon_ui()
    yield 0.1
    with override():  # what the user did so far is one undo step, as their clicks would have made it
        bpy.ops.ed.undo_push(message="Scene set up")
    yield from open_tab()
    yield from guided_setup(ui)
    yield from idle_baseline(ui)
    first_job = yield from generate_on_both(ui)
    yield from follow_jobs(ui, first_job)
    yield from material_preview()
    yield from undo_and_redo()
    yield from first_save(ui)
    mark("end")


def addon_ui() -> SimpleNamespace:
    """The add-on's UI parts the driver looks into, by their names in the installed package."""
    blender = sys.modules[ADDON + ".blender"]
    parts = {name: sys.modules[f"{ADDON}.blender.{name}"] for name in ("ui_jobs", "ui_state", "status", "preview")}
    return SimpleNamespace(
        jobs=parts["ui_jobs"],
        STATE=parts["ui_state"].STATE,
        backend_status=parts["ui_state"].backend_status,
        check_readiness=parts["status"].check_readiness,
        preview=parts["preview"],
        panels=[cls for cls in blender.classes if issubclass(cls, bpy.types.Panel)],
    )


def open_tab():
    """Switch the sidebar to the add-on's tab (Ctrl+Wheel over the sidebar cycles tabs; 3.4 has no API)."""
    window, _, region = view3d()
    deadline = time.monotonic() + TAB_WAIT
    while time.monotonic() < deadline:
        yield 0.3
        if TabProbe.draws:
            break
        x, y = region.x + region.width // 2, region.y + region.height // 2
        window.event_simulate(type="MOUSEMOVE", value="NOTHING", x=x, y=y)
        window.event_simulate(type="WHEELDOWNMOUSE", value="PRESS", x=x, y=y, ctrl=True)
    REPORT["tab_open"] = TabProbe.draws > 0
    mark("tab_open")


def guided_setup(ui):
    """A newcomer's setup, as the panel's lines guide it: no backend, then no model, then ready."""
    prefs = bpy.context.preferences.addons[ADDON].preferences
    for step in ("backend_missing", "model_missing", "ready"):
        if step == "model_missing":  # Preferences > Backend Interpreter (or Install Backend)
            prefs.backend_python = ARGS["python"]
        if step == "ready":  # the panel's Choose Model, on the tiny model's folder
            with override():
                bpy.ops.sdtex.browse_model(target="PREFERENCES", filepath="", directory=ARGS["model"])
        ui.STATE.readiness = None
        yield 0.5
        with override():
            bpy.ops.wm.redraw_timer(type="DRAW_WIN_SWAP", iterations=1)
            can_generate = bpy.ops.sdtex.generate.poll()
        ready = ui.check_readiness(bpy.context)
        REPORT[f"setup_{step}"] = {"blocker": ready.blocker, "generate_enabled": can_generate}
        screenshot(f"setup_{step}.png")
    mark("setup_done")
    small_settings(bpy.context.scene.sdtex)  # picking the model filled in its size and steps
    with override():
        bpy.ops.ed.undo_push(message="Settings")


def small_settings(settings) -> None:
    settings.steps, settings.width, settings.height = ARGS["steps"], ARGS["size"], ARGS["size"]
    settings.random_seed = False


def idle_baseline(ui):
    """The same load and the same redraws as during a job, without one (see Stalls)."""
    STALLS.watch_addon(ui)
    STALLS.start("idle")
    deadline = time.monotonic() + BASELINE
    while time.monotonic() < deadline:
        ui.jobs.redraw()  # what the add-on's timer does on each step's news
        yield 0.05
    STALLS.start(None)


def generate_on_both(ui):
    """Press Generate on the cube, then on the plane while the first job runs (as a button press does:
    invoke, with an undo step); each must return at once. Returns the first job. The cube is already selected
    (since the setup)."""
    mark("generate_pressed")
    REPORT["generate"] = []
    for name, seed in (("Cube", 7), ("Plane", 8)):
        if name == "Plane":  # the user's click redraws the viewport: their stall, recorded on its own
            yield 2.0  # first, whether pressing Generate redrew the viewport (in "steps")
            STALLS.start("user_selects")
            select_only(name)
            yield from viewport_settles()
        bpy.context.scene.sdtex.seed = seed
        with override():
            REPORT["generate"].append(sorted(bpy.ops.sdtex.generate("INVOKE_DEFAULT", True)))
        STALLS.start("after_first_result" if STALLS.result_applied else "steps")
    # The redo panel shows the last registered operator: Generate must not be one (it would re-run a job)
    registered = bpy.context.window_manager.operators
    REPORT["last_registered_operator"] = registered[-1].bl_idname if len(registered) else None
    REPORT["returned_while_running"] = ui.STATE.running
    REPORT["jobs_listed"] = len(ui.STATE.board.active)
    mark("generate_returned")
    return ui.STATE.board.active[0]


def viewport_settles(quiet: float = 1.0, longest: float = 30.0):
    """Wait until the 3D viewport has not redrawn for `quiet` seconds (a redraw starts up to 8 more: the
    Solid mode's anti-aliasing samples), at most `longest` seconds."""
    started = time.monotonic()
    deadline = started + longest
    while time.monotonic() < started + 3.0 and STALLS.last_viewport_draw < started:  # the redraw it caused
        yield 0.1
    while time.monotonic() < deadline and time.monotonic() - STALLS.last_viewport_draw < quiet:
        yield 0.1


def follow_jobs(ui, first_job):
    """Follow the jobs from timer ticks (the first job's progress); screenshot the panel once it shows some."""
    while ui.STATE.running:
        REPORT["ticks_during_job"] += 1
        fraction = first_job.fraction
        if fraction and (not REPORT["progress_seen"] or REPORT["progress_seen"][-1] != fraction):
            REPORT["progress_seen"].append(fraction)
        if 0 < fraction < 1 and "progress.png" not in REPORT["screenshots"]:
            with override(), STALLS.paused():
                bpy.ops.wm.redraw_timer(type="DRAW_WIN_SWAP", iterations=1)  # draw the progress now
            screenshot("progress.png")
            REPORT["progress_screenshot_at"] = fraction
        drawn = STALLS.callbacks.get("gpu draw_texture_2d", [0])[0]
        if drawn and "live_preview.png" not in REPORT["screenshots"]:  # the Image Editor showed a step
            screenshot("live_preview.png")
        yield TICK
    STALLS.start(None)
    mark("job_finished")
    REPORT["stalls"] = STALLS.summary()
    window = bpy.context.window_manager.windows[0]
    image_editor = next(a for a in window.screen.areas if a.type == "IMAGE_EDITOR").spaces.active
    REPORT["image_editor_shows"] = image_editor.image.name if image_editor.image else None
    REPORT["message"] = ui.STATE.message
    REPORT["is_error"] = ui.STATE.is_error
    REPORT["backend_status"] = ui.backend_status()
    REPORT["after"] = object_state("Cube")
    REPORT["plane_after"] = object_state("Plane")


def material_preview():
    """Look at the result in Material Preview, the cube filling the view (EEVEE compiles its shaders first)."""
    window, area, _ = view3d()
    select_only("Cube")
    area.spaces.active.shading.type = "MATERIAL"
    with bpy.context.temp_override(
        window=window, area=area, region=next(r for r in area.regions if r.type == "WINDOW")
    ):
        bpy.ops.view3d.view_selected()
    area.spaces.active.region_3d.view_distance *= 2.2  # view_selected fills the view edge to edge
    # Until the texture shows: while EEVEE compiles its shaders the cube is grey ("Compiling Shaders")
    deadline, REPORT["preview_tries"] = time.monotonic() + PREVIEW_WAIT, 0
    while True:
        yield 0.5
        screenshot("material_preview.png")
        REPORT["preview_tries"] += 1
        saturation = mean_saturation(REPORT["screenshots"]["material_preview.png"], ARGS["preview_box"])
        REPORT["preview_saturation"] = round(saturation, 1)
        if saturation > ARGS["preview_saturation"] or time.monotonic() > deadline:
            break
    mark("preview_shown")


def undo_and_redo():
    """Undo, once per applied job (and nothing else), puts the old materials back but keeps the history;
    redo brings the materials again."""
    REPORT["history_before_undo"] = len(bpy.context.scene.sdtex.history)
    for step in ("undo", "redo"):
        for _ in range(2):
            with override():
                REPORT.setdefault(step, []).append(sorted(getattr(bpy.ops.ed, step)()))
            yield 1.0
        REPORT[f"after_{step}"] = object_state("Cube")
        REPORT[f"plane_after_{step}"] = object_state("Plane")
        REPORT[f"history_after_{step}"] = len(bpy.context.scene.sdtex.history)


def texture_files(name: str) -> list[str]:
    """The image paths as the object's material stores them (relative ones start with //)."""
    material = bpy.data.objects[name].active_material
    return [n.image.filepath for n in material.node_tree.nodes if n.type == "TEX_IMAGE" and n.image]


def first_save(ui):
    """File > New, Generate on the cube, File > Save As into a new folder, then reopen what was saved."""
    with override():
        bpy.ops.wm.read_homefile(app_template="")
    yield 1.0
    REPORT["new_file"] = {"filepath": bpy.data.filepath, "addon_enabled": ADDON in bpy.context.preferences.addons}
    settings = bpy.context.scene.sdtex
    small_settings(settings)
    settings.prompt, settings.seed = "mossy stone wall", 9
    select_only("Cube")
    with override():
        REPORT["new_file"]["generate"] = sorted(bpy.ops.sdtex.generate("INVOKE_DEFAULT", True))
    while ui.STATE.running:
        yield TICK
    REPORT["new_file"]["message"] = ui.STATE.message
    unsaved = [bpy.path.abspath(path) for path in texture_files("Cube")]
    blend = os.path.join(ARGS["out"], "new folder", "first.blend")
    os.makedirs(os.path.dirname(blend))  # as the file browser's New Folder does
    with override():
        REPORT["new_file"]["save"] = sorted(bpy.ops.wm.save_as_mainfile(filepath=blend))
    yield 0.5
    saved = texture_files("Cube")
    with override():
        bpy.ops.wm.open_mainfile(filepath=blend)
    yield 1.0
    reopened = texture_files("Cube")
    REPORT["first_save"] = {
        "blend": blend,
        "unsaved": unsaved,
        "unsaved_still_there": [os.path.exists(path) for path in unsaved],
        "after_save": saved,
        "reopened": reopened,
        "reopened_exist": [os.path.isfile(bpy.path.abspath(path)) for path in reopened],
    }


run_scenario(setup, scenario, REPORT, ARGS["out"], ARGS["timeout"])
