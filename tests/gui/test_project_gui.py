"""The Project panel in the real Blender GUI (Debian's Blender 3.4 under Xvfb), driven by project_driver.py: a
cube, a sphere and a torus textured in one synchronized pass from views chosen by coverage, with the tiny model
and its tiny depth ControlNet.

Skips when `blender` or `xvfb-run` is missing, except under CI=true, where that is a failure.
Screenshots go to artifacts/gui/project/; with SDTEX_UPDATE_README_IMAGE=1 the textured scene also goes, at 3/4
size, to docs/images/ for the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gui_report import read_report
from PIL import Image

pytestmark = pytest.mark.gui

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("project_driver.py")
ARTIFACTS = REPO / "artifacts" / "gui" / "project"
README_IMAGE = REPO / "docs" / "images" / "gui_project_scene.png"
STEPS, SIZE, TEXTURE = 6, 64, 128  # the tiny model: a job of some seconds on a shared CPU
BLENDER_TIMEOUT = 420  # seconds for the whole Blender run; the driver gives up earlier and reports
OBJECTS = ("Cube", "Sphere", "Torus")


@pytest.fixture(scope="module")
def project_run(require, tiny_model_dir, tmp_path_factory) -> dict:
    from backend.tiny_model import make_test_controlnet

    blender, xvfb_run = require("blender"), require("xvfb-run")
    work = tmp_path_factory.mktemp("project_gui")
    out, home = work / "out", work / "home"
    out.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1")  # Blender's user config stays in the temp folder
    scene = work / "scene.blend"  # a saved file: no splash screen, and "//textures/" resolves beside it
    save = f"import bpy; bpy.ops.wm.save_as_mainfile(filepath={str(scene)!r})"
    subprocess.run([blender, "-b", "--factory-startup", "--python-expr", save], env=env, check=True)
    args = {
        "repo": str(REPO), "model": str(tiny_model_dir), "python": sys.executable, "out": str(out),
        "controlnet": str(make_test_controlnet(work / "controlnet", tiny_model_dir)),
        "steps": STEPS, "size": SIZE, "texture_size": TEXTURE, "timeout": BLENDER_TIMEOUT - 30,
    }  # fmt: skip
    command = [
        xvfb_run,
        "-a",
        "-s",
        "-screen 0 1600x1000x24",
        blender,
        "--factory-startup",
        "--enable-event-simulate",
        str(scene),
    ]
    done = subprocess.run(
        [*command, "--python", str(DRIVER), "--", json.dumps(args)],
        env=env, capture_output=True, text=True, timeout=BLENDER_TIMEOUT,
    )  # fmt: skip
    report = read_report(done, out, ARTIFACTS)
    report["work"] = str(work)
    return report


def drawn(panel: list[dict]) -> dict[str, dict]:
    return {entry["prop"]: entry for entry in panel if "prop" in entry}


def test_the_project_panel_offers_the_mode_and_the_coverage_views(project_run):
    before = drawn(project_run["panel_before"])
    assert before["mode"].get("expand") is True  # Synchronized / Sequential side by side
    assert "sync_until" in before and "refine_below" not in before  # synchronized mode's own setting
    assert "match_colors" not in before  # sequential mode's: synchronized views agree already
    assert "views" in before and "views_per_ring" not in before  # Cover Selection has no rings
    assert {"operator": "sdtex.project"} in project_run["panel_before"]


def test_three_objects_are_textured_in_one_synchronized_pass(project_run):
    assert project_run["project"] == ["FINISHED"] and project_run["returned_while_running"]
    assert project_run["ticks_during_job"] > 10  # Blender ran its timers while the worker painted
    stages = project_run["stages"]
    assert any(stage.startswith("Views 1-") and " together · step " in stage for stage in stages), stages
    message = project_run["message"]
    assert message.startswith("Baked 3 textures; views saw Cube "), message
    assert "Sphere" in message and "Torus" in message
    textures = set()
    for name in OBJECTS:
        before, after = project_run["before"][name], project_run["after"][name]
        assert after["material"] and after["material"] != before["material"]
        (image,) = after["images"]  # each object its own texture, none painted onto another's
        assert Image.open(image).size == (TEXTURE, TEXTURE)
        textures.add(image)
    assert len(textures) == 3


def test_the_scene_shows_its_textures_in_material_preview(project_run):
    grey, textured = project_run["grey_saturation"], project_run["preview_saturation"]
    assert grey < 5 and textured > 3 * grey, (grey, textured)  # colour where the Solid view was grey
    if os.environ.get("SDTEX_UPDATE_README_IMAGE") == "1":  # tests leave tracked files alone unless asked
        shot = Image.open(project_run["screenshots"]["material_preview.png"]).convert("RGB")
        shot.resize((1200, 750), Image.LANCZOS).save(README_IMAGE, optimize=True)
