"""Drives the Project panel in the real Blender GUI (3.4+, under Xvfb) for tests/gui/test_project_gui.py: a
scene of three objects textured in one pass, synchronized, from views chosen by coverage.

    blender --factory-startup --enable-event-simulate scene.blend --python project_driver.py -- '{"model": ...}'

Arguments (JSON): repo (the checkout: the add-on is enabled from it), model (the tiny diffusers folder),
controlnet (its tiny depth ControlNet), python (the backend interpreter), out (report and screenshots), steps,
size, texture_size, timeout (seconds).

As a user: enable the add-on, point it at the backend and the model, add a sphere and a torus beside the
default cube, select all three, open the sidebar on the SD Textures tab with the Project sub-panel open, choose
Cover Selection and Synchronized, press Project Texture and wait (Blender's timers tick meanwhile), then look
at the three in Material Preview. The Project panel's draw is recorded (which properties it shows, how) through
a stand-in for its layout. Nothing waits a fixed time for a condition: each wait polls it until a deadline.
Any exception ends the run with the traceback in the report.
"""

import json
import os
import sys
import time

import addon_utils
import bpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # Blender runs this file as a script
from blender_window import mean_saturation, override, run_scenario, view3d  # noqa: E402

ARGS = json.loads(sys.argv[sys.argv.index("--") + 1])
ADDON = "blender_sd_addon"
OBJECTS = ("Cube", "Sphere", "Torus")
PREVIEW_WAIT = 150.0  # seconds EEVEE may take to compile its shaders (minutes-long on a loaded llvmpipe)
GREY_TIMES = 3  # the textured view's saturation against the grey Solid view's, once EEVEE shows the textures
REPORT = {"errors": [], "drawn": [], "ticks_during_job": 0, "stages": [], "screenshots": {}}


class RecordingLayout:
    """Stands in for a UILayout: forwards every call and records the properties drawn, with their options."""

    def __init__(self, layout):
        self._layout = layout

    def __getattr__(self, name):
        method = getattr(self._layout, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            if name == "prop":
                REPORT["drawn"].append({"prop": args[1], **{k: v for k, v in kwargs.items() if k != "text"}})
            elif name == "operator":
                REPORT["drawn"].append({"operator": args[0]})
            made = method(*args, **kwargs)
            return RecordingLayout(made) if isinstance(made, bpy.types.UILayout) else made

        return call


def record_project_panel(panel_class) -> None:
    """Open the Project sub-panel (closed by default: as a click on its header would) and record its draws."""
    draw = panel_class.draw
    bpy.utils.unregister_class(panel_class)
    panel_class.bl_options = set()

    def recorded(panel, context):
        REPORT["drawn"].clear()  # the latest draw only
        draw(type("Panel", (), {"layout": RecordingLayout(panel.layout)})(), context)

    panel_class.draw = recorded
    bpy.utils.register_class(panel_class)


def screenshot(name: str) -> None:
    path = os.path.join(ARGS["out"], name)
    with override():
        bpy.ops.wm.redraw_timer(type="DRAW_WIN_SWAP", iterations=1)
        bpy.ops.screen.screenshot(filepath=path)
    REPORT["screenshots"][name] = path


def viewport_box() -> list[int]:
    """The middle of the 3D view's drawing region, as (left, top, right, bottom) in screenshot pixels."""
    window, area, _ = view3d()
    region = next(r for r in area.regions if r.type == "WINDOW")
    left, bottom = region.x + region.width // 5, region.y + region.height // 5
    right, top = region.x + 4 * region.width // 5, region.y + 4 * region.height // 5
    return [left, window.height - top, right, window.height - bottom]


def setup() -> None:
    # 1. The add-on from the checkout, the backend and the model (as Preferences would have them)
    bpy.context.preferences.filepaths.temporary_directory = ARGS["out"]
    sys.path.insert(0, ARGS["repo"])
    addon_utils.enable(ADDON, default_set=True)
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.backend_python, prefs.model = ARGS["python"], ARGS["model"]
    record_project_panel(sys.modules[ADDON + ".blender.project"].SDTEX_PT_project)

    # 2. Three objects beside each other, all selected
    bpy.ops.mesh.primitive_uv_sphere_add(radius=1.0, location=(2.6, 0, 0))
    bpy.context.object.name = "Sphere"
    bpy.ops.mesh.primitive_torus_add(major_radius=0.9, minor_radius=0.35, location=(-2.6, 0, 0))
    bpy.context.object.name = "Torus"
    for obj in bpy.context.view_layer.objects:
        obj.select_set(obj.name in OBJECTS)
    REPORT["before"] = {name: materials(name) for name in OBJECTS}

    # 3. The settings a user picks: small sizes for a tiny model on a shared CPU
    settings, project = bpy.context.scene.sdtex, bpy.context.scene.sdtex_project
    settings.prompt, settings.seed, settings.random_seed = "weathered bronze", 5, False
    settings.steps, settings.width, settings.height = ARGS["steps"], ARGS["size"], ARGS["size"]
    project.controlnet, project.texture_size = ARGS["controlnet"], ARGS["texture_size"]
    project.views, project.mode = "COVERAGE", "synchronized"

    # 4. The sidebar on the add-on's tab (the tab a panel draws in comes first when it is the only one open)
    _, area, _ = view3d()
    area.spaces.active.show_region_ui = True


def materials(name: str) -> dict:
    obj = bpy.data.objects[name]
    material = obj.active_material
    nodes = material.node_tree.nodes if material and material.node_tree else []
    images = [bpy.path.abspath(n.image.filepath) for n in nodes if n.type == "TEX_IMAGE" and n.image]
    return {"material": material.name if material else None, "images": images}


def open_tab():
    """Click down the sidebar's tab strip (3.4 has no API for the tab) until the Project panel draws."""
    window, _, region = view3d()
    x, top = region.x + region.width - 10, region.y + region.height
    for y in range(top - 20, region.y, -20):
        window.event_simulate(type="MOUSEMOVE", value="NOTHING", x=x, y=y)
        window.event_simulate(type="LEFTMOUSE", value="PRESS", x=x, y=y)
        window.event_simulate(type="LEFTMOUSE", value="RELEASE", x=x, y=y)
        yield 0.5
        if REPORT["drawn"]:
            break
    REPORT["panel_before"] = list(REPORT["drawn"])
    x, y = region.x + region.width // 2, region.y + region.height // 2
    for _ in range(15):  # scroll the sidebar down to the Project panel (the Generate panel is above it)
        window.event_simulate(type="MOUSEMOVE", value="NOTHING", x=x, y=y)
        window.event_simulate(type="WHEELDOWNMOUSE", value="PRESS", x=x, y=y)
        yield 0.1


def project_and_follow():
    """Press Project Texture (an invoke, as the button does); it returns at once and the job runs while
    Blender's timers tick; the panel's progress line is looked at on the way."""
    project = sys.modules[ADDON + ".blender.project"]
    with override():
        REPORT["project"] = sorted(bpy.ops.sdtex.project("INVOKE_DEFAULT", True))
    REPORT["returned_while_running"] = bool(project.project_jobs())
    screenshot("project_running.png")
    while project.project_jobs():
        REPORT["ticks_during_job"] += 1
        stage = project.progress(project.project_jobs()[0])[1]
        if not REPORT["stages"] or REPORT["stages"][-1] != stage:
            REPORT["stages"].append(stage)
        yield 0.1
    REPORT["message"] = project.Running.message
    REPORT["after"] = {name: materials(name) for name in OBJECTS}
    REPORT["panel_after"] = list(REPORT["drawn"])


def material_preview():
    """The three in Material Preview, framed (EEVEE compiles its shaders first: grey until then)."""
    window, area, _ = view3d()
    REPORT["grey_saturation"] = round(mean_saturation(screenshot_path("solid.png"), viewport_box()), 1)
    area.spaces.active.shading.type = "MATERIAL"
    region = next(r for r in area.regions if r.type == "WINDOW")
    with bpy.context.temp_override(window=window, area=area, region=region):
        bpy.ops.view3d.view_selected()
    deadline = time.monotonic() + PREVIEW_WAIT
    while True:
        yield 0.5
        saturation = mean_saturation(screenshot_path("material_preview.png"), viewport_box())
        REPORT["preview_saturation"] = round(saturation, 1)
        if saturation > GREY_TIMES * REPORT["grey_saturation"] or time.monotonic() > deadline:
            break


def screenshot_path(name: str) -> str:
    screenshot(name)
    return REPORT["screenshots"][name]


def scenario():
    yield from open_tab()
    screenshot("project_panel.png")
    yield from project_and_follow()
    yield from material_preview()


run_scenario(setup, scenario, REPORT, ARGS["out"], ARGS["timeout"])
