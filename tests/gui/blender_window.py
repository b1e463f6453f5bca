"""What the GUI drivers share inside Blender (3.4+, with a window): the 3D view, a context override for
operators, the mean saturation of part of a screenshot, and the timer that runs a scenario. Runs in Blender's
Python: bpy, no PIL."""

from __future__ import annotations

import array
import json
import os
import time
import traceback

import bpy


def view3d():
    """(the window, its 3D View area, that area's sidebar region)."""
    window = bpy.context.window_manager.windows[0]
    area = next(a for a in window.screen.areas if a.type == "VIEW_3D")
    region = next(r for r in area.regions if r.type == "UI")
    return window, area, region


def override():
    """The context a click in the 3D view gives an operator."""
    window, area, _ = view3d()
    return bpy.context.temp_override(window=window, area=area, screen=window.screen)


def mean_saturation(path: str, box: list[int]) -> float:
    """The mean HSV saturation (0-255, as PIL's HSV has it) of `box` (left, top, right, bottom; rows from the top)
    in a screenshot. Blender's Python has no PIL: the pixels come through bpy (rows from the bottom)."""
    image = bpy.data.images.load(path, check_existing=False)
    try:
        width, height = image.size
        pixels = array.array("f", bytes(16 * width * height))
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    left, top, right, bottom = box
    total = 0.0
    for y in range(height - bottom, height - top):
        for i in range(4 * (y * width + left), 4 * (y * width + right), 4):
            high = max(pixels[i : i + 3])
            total += (high - min(pixels[i : i + 3])) / high if high else 0.0
    return 255 * total / ((right - left) * (bottom - top))


def run_scenario(setup, scenario, report: dict, out: str, timeout: float) -> None:
    """Run setup() now and the scenario generator from a timer (each `yield` gives Blender back its event loop
    for that many seconds), then write `report` to out/report.json and quit; any exception (or running past
    `timeout` seconds) ends the run with the traceback in report["errors"]."""
    deadline = time.monotonic() + timeout
    steps = None

    def finish() -> None:
        with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)
        bpy.ops.wm.quit_blender()

    def drive():
        try:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the GUI scenario took more than {timeout} s")
            return next(steps)
        except StopIteration:
            pass
        except Exception:
            report["errors"].append(traceback.format_exc())
        finish()
        return None

    try:
        setup()
        steps = scenario()
        bpy.app.timers.register(drive, first_interval=1.0, persistent=True)  # persistent: scenarios open files
    except Exception:
        report["errors"].append(traceback.format_exc())
        finish()
