"""A job's result marks the .blend unsaved, so Blender asks to save it on quit. Checked in the real Blender GUI
(Debian's Blender 3.4 under Xvfb): bpy as a module reports every file unsaved (`is_dirty` is always True
there), so only a Blender with a window can show the difference.

Skips when `blender` or `xvfb-run` is missing, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.gui

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os, sys, traceback
sys.path.insert(0, {repo!r})
import bpy

def run():
    report = {{}}
    try:
        import blender_sd_addon
        blender_sd_addon.register()
        from blender_sd_addon.blender import ui_jobs
        from blender_sd_addon.blender.ui_state import Target
        from blender_sd_addon.contract import protocol
        from blender_sd_addon.jobs import DONE, Job

        folder = {folder!r}
        bpy.ops.wm.save_mainfile(filepath=os.path.join(folder, "scene.blend"))
        png = os.path.join(folder, "result.png")
        image = bpy.data.images.new("written", 8, 8)
        image.filepath_raw, image.file_format = png, "PNG"
        image.save()
        bpy.data.images.remove(image)
        bpy.ops.wm.save_mainfile()
        loaded = bpy.data.images.load(png)  # loading an image alone leaves the file saved
        report["after_load"] = bpy.data.is_dirty
        bpy.data.images.remove(loaded)
        result = protocol.GenerateResult(
            images=[protocol.ImageRecord(path=png, seed=1)], seed=1, width=8, height=8, model="tiny",
            seamless="none", timings={{}}, params={{"prompt": "moss"}}, task="img2img",
        )
        job = Job(None, "r1", "img2img", state=DONE, result=result, data={{}})
        ui_jobs._finish(job, Target((), None, False))  # recorded, not applied: still a change to save
        report["history"] = len(bpy.context.scene.sdtex.history)
        report["after_result"] = bpy.data.is_dirty
    except Exception:
        report["error"] = traceback.format_exc()
    with open(os.path.join({folder!r}, "report.json"), "w") as file:
        json.dump(report, file)
    os._exit(0)

bpy.app.timers.register(run, first_interval=0.5)
"""


def test_a_result_marks_the_file_unsaved(require, tmp_path):
    blender, xvfb_run = require("blender"), require("xvfb-run")
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(repo=str(REPO), folder=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run = subprocess.run(
        [xvfb_run, "-a", blender, "--factory-startup", "--python", str(script)],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    report_file = tmp_path / "report.json"
    assert report_file.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert "error" not in report, report["error"]
    assert report == {"after_load": False, "history": 1, "after_result": True}
