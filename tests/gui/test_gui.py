"""The add-on in the real Blender GUI (Debian's Blender 3.4 under Xvfb), driven by gui_driver.py.

Skips when `blender` or `Xvfb` is missing, except under CI=true, where that is a failure.
Screenshots go to artifacts/gui/ (CI keeps them); with SDTEX_UPDATE_README_IMAGE=1 the textured one also
goes, at 3/4 size, to docs/images/ for the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gui_report import read_report
from PIL import Image, ImageStat

pytestmark = pytest.mark.gui

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("gui_driver.py")
ARTIFACTS = REPO / "artifacts" / "gui"
README_IMAGE = REPO / "docs" / "images" / "gui_material_preview.png"
STEPS, SIZE = 12, 64  # a tiny model on a shared CPU (Blender draws with llvmpipe): a job of several seconds
BLENDER_TIMEOUT = 600  # seconds for the whole Blender run; the driver gives up earlier and reports
# Where the textured cube fills the Material Preview screenshot, and the mean HSV saturation (0-255) it shows
# there once EEVEE has compiled its shaders (Blender's grey UI and the untextured cube are near 0).
PREVIEW_BOX, PREVIEW_SATURATION = (450, 350, 650, 550), 40
STALL_LIMIT = 0.1  # seconds: the longest any add-on callback may keep Blender from reacting
FREEZE = 1.0  # seconds: less than one 3D viewport redraw with llvmpipe here (1.2-2.8 s measured)


@pytest.fixture(scope="module")
def display(require):
    """A fresh Xvfb server on a free display number (Xvfb picks it and tells us through -displayfd)."""
    xvfb = require("Xvfb")
    read, write = os.pipe()
    server = subprocess.Popen(
        [xvfb, "-displayfd", str(write), "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as answer:
        number = answer.readline().strip()
    assert number, "Xvfb did not start"
    yield f":{number}"
    server.terminate()
    server.wait(timeout=10)


def build_zip(out: Path) -> Path:
    done = subprocess.run(
        [sys.executable, str(REPO / "build_addon.py"), "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def is_blank(path: Path) -> bool:
    return max(ImageStat.Stat(Image.open(path).convert("RGB")).stddev) < 5


@pytest.fixture(scope="module")
def gui_run(require, display, tiny_model_dir, tmp_path_factory) -> dict:
    blender = require("blender")
    work = tmp_path_factory.mktemp("gui")
    out, home = work / "out", work / "home"
    out.mkdir()
    home.mkdir()
    env = {
        **os.environ,
        "DISPLAY": display,
        "HOME": str(home),  # Blender's user config (where the add-on installs) stays in the temp folder
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("SDTEX_BACKEND_PYTHON", None)  # a newcomer's machine: the panel must say the backend is missing
    # A saved file: Blender skips the splash screen when it opens one, and "//textures/" resolves beside it.
    scene = work / "scene.blend"
    save = f"import bpy; bpy.ops.wm.save_as_mainfile(filepath={str(scene)!r})"
    subprocess.run(
        [blender, "-b", "--factory-startup", "--python-expr", save], env=env, capture_output=True, check=True
    )

    args = {
        "zip": str(build_zip(work)),
        "model": str(tiny_model_dir),
        "python": sys.executable,
        "out": str(out),
        "steps": STEPS,
        "size": SIZE,
        "timeout": BLENDER_TIMEOUT - 30,
        "preview_box": PREVIEW_BOX,
        "preview_saturation": PREVIEW_SATURATION,
    }
    command = [blender, "--factory-startup", "--enable-event-simulate", str(scene), "--python", str(DRIVER)]
    # A busy machine: one core spins beside Blender all along (the stall measurements must hold under load)
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        done = subprocess.run(
            [*command, "--", json.dumps(args)], env=env, capture_output=True, text=True, timeout=BLENDER_TIMEOUT
        )
    finally:
        load.kill()
        load.wait()
    report = read_report(done, out, ARTIFACTS)
    report["work"] = str(work)
    return report


def test_addon_installs_from_the_zip(gui_run):
    assert gui_run["install"] == ["FINISHED"]
    installed = Path(gui_run["addon_file"])  # <HOME>/.config/blender/<version>/scripts/addons/blender_sd_addon
    assert installed.is_relative_to(Path(gui_run["work"]) / "home/.config/blender")
    assert installed.parts[-4:] == ("scripts", "addons", "blender_sd_addon", "__init__.py")
    assert (installed.parent / "worker/backend/__main__.py").is_file()


def test_generate_runs_without_blocking_blender(gui_run):
    assert gui_run["tab_open"], "the sidebar never showed the SD Textures tab"
    assert gui_run["generate"] == [["FINISHED"], ["FINISHED"]] and gui_run["returned_while_running"]
    assert gui_run["jobs_listed"] == 2  # the second click queued a job instead of being refused
    assert gui_run["last_registered_operator"] != "SDTEX_OT_generate"  # no redo panel that re-runs a job
    assert gui_run["ticks_during_job"] > 10  # Blender ran its timers all along (a blocked UI ticks once)
    progress = gui_run["progress_seen"]  # how many steps one tick sees depends on the machine's load
    assert progress == sorted(progress) and any(0 < f < 1 for f in progress), progress
    assert 0 < gui_run["progress_screenshot_at"] < 1
    assert not gui_run["is_error"], gui_run["message"]


def test_each_result_is_on_its_own_object_and_undo_restores_the_old_materials(gui_run):
    before, after = gui_run["before"], gui_run["after"]
    plane_before, plane_after = gui_run["plane_before"], gui_run["plane_after"]
    assert before["material"] == "Material" and not before["images"]
    assert plane_before["material"] is None
    assert after["material"] != before["material"] and plane_after["material"]
    assert len(after["images"]) == 1 and len(plane_after["images"]) == 1
    cube_image, plane_image = Path(after["images"][0]), Path(plane_after["images"][0])
    for image, seed in ((cube_image, 7), (plane_image, 8)):  # seeds tell which job made which file
        assert image.is_file() and image.parent == Path(gui_run["work"]) / "textures"
        assert image.stem.endswith(f"_{seed}") and Image.open(image).size == (SIZE, SIZE)

    assert gui_run["undo"] == [["FINISHED"], ["FINISHED"]]
    assert gui_run["after_undo"] == before and gui_run["plane_after_undo"] == plane_before
    assert gui_run["redo"] == [["FINISHED"], ["FINISHED"]]
    assert gui_run["after_redo"] == after and gui_run["plane_after_redo"] == plane_after


def test_a_newcomer_is_guided_from_no_backend_to_a_model_to_generate(gui_run):
    missing_backend, missing_model = gui_run["setup_backend_missing"], gui_run["setup_model_missing"]
    assert missing_backend == {"blocker": "Backend not installed", "generate_enabled": False}
    assert missing_model["blocker"].startswith("Model not on disk: stable-diffusion-v1-5/")
    assert not missing_model["generate_enabled"]
    assert gui_run["setup_ready"] == {"blocker": "", "generate_enabled": True}


def test_undo_keeps_the_history(gui_run):
    assert gui_run["history_before_undo"] == 2
    assert gui_run["history_after_undo"] == gui_run["history_after_redo"] == 2


def test_screenshots_show_the_window(gui_run):
    shots = {name: Path(path) for name, path in gui_run["screenshots"].items()}
    setup = {f"setup_{step}.png" for step in ("backend_missing", "model_missing", "ready")}
    assert set(shots) == {"progress.png", "live_preview.png", "material_preview.png", *setup}
    for path in shots.values():
        assert Image.open(path).size == (1600, 1000) and not is_blank(path)
    # The textured cube fills the middle of the view: colourful, unlike Blender's grey UI.
    middle = Image.open(shots["material_preview.png"]).convert("HSV").crop(PREVIEW_BOX)
    saturation = ImageStat.Stat(middle).mean[1]
    tries, seen = gui_run["preview_tries"], gui_run["preview_saturation"]
    assert saturation > PREVIEW_SATURATION, f"no saturated texture in the viewport after {tries} screenshots ({seen})"
    if os.environ.get("SDTEX_UPDATE_README_IMAGE") == "1":  # tests leave tracked files alone unless asked
        readme_copy = Image.open(shots["material_preview.png"]).convert("RGB").resize((1200, 750), Image.LANCZOS)
        readme_copy.save(README_IMAGE, optimize=True)  # 3/4 size keeps the committed file near 0.5 MB
        for name in sorted(setup):  # the sidebar only: what the README's Getting started shows
            sidebar = Image.open(shots[name]).convert("RGB").crop((1095, 80, 1310, 500))
            sidebar.save(README_IMAGE.with_name(f"gui_{name}"), optimize=True)


def test_blender_never_stalls_on_the_addon_while_jobs_step(gui_run):
    """Stalls (gui_stalls.py): a heartbeat's gaps while two jobs step, the add-on's own callbacks timed one by
    one, 3D viewport redraws counted and timed.

    What is asserted, and why: everything the add-on runs (its timer, panel draws, preview drawing, applying a
    result) must each stay under STALL_LIMIT, and no step may redraw a 3D viewport (per-step image datablock
    updates did: 1.2-2.8 s each with llvmpipe, 8 times over with the Solid mode's anti-aliasing samples). The
    heartbeat's gaps cannot all stay under STALL_LIMIT on this machine whatever the add-on does: one redraw of
    the sidebar's progress costs Blender a whole-window redraw in software, 0.15-0.2 s in the idle phase (same
    load, same redraws, no job), more while the backend computes on the same 2 cores. So the gaps are bounded
    by what the fixed freeze cost instead: a gap as long as a viewport redraw means one came back."""
    stalls = gui_run["stalls"]
    idle, steps = stalls["phases"]["idle"], stalls["phases"]["steps"]
    assert idle["ticks"] > 20 and steps["ticks"] > 200, (idle["ticks"], steps["ticks"])  # enough beats to see
    assert steps["viewport_redraws"] == [], steps["viewport_redraws"]
    callbacks = stalls["callbacks"]
    assert callbacks["preview_draw"]["calls"] > 0 and callbacks["timer"]["calls"] > 200
    addon_code = ("timer", "preview_draw", "apply_result", "redraw_request")
    slow = {name: c["max"] for name, c in callbacks.items() if name in addon_code or name.startswith("draw ")}
    worst = max(slow, key=slow.get)
    inside = {name: (c["max"], c["max_at"]) for name, c in callbacks.items() if name.startswith(("gpu ", "blf "))}
    assert slow[worst] < STALL_LIMIT, f"{worst}: {slow[worst]} s at {callbacks[worst]['max_at']} s; {slow}; {inside}"
    assert steps["max_gap"] < FREEZE, (steps["worst"], idle["worst"])


def test_the_live_preview_hands_over_to_the_result_in_the_image_editor(gui_run):
    results = {Path(path).name for path in gui_run["after"]["images"] + gui_run["plane_after"]["images"]}
    assert gui_run["image_editor_shows"] in results


def test_a_new_files_texture_follows_it_on_the_first_save(gui_run):
    new_file, saved = gui_run["new_file"], gui_run["first_save"]
    assert new_file["addon_enabled"] and not new_file["filepath"]
    assert new_file["generate"] == ["FINISHED"] and new_file["save"] == ["FINISHED"], new_file["message"]
    (unsaved,) = saved["unsaved"]  # made in the user folder: an unsaved file has no folder of its own
    assert Path(unsaved).is_relative_to(Path(gui_run["work"]) / "home/.config/blender")
    beside = f"//textures/{Path(unsaved).name}"
    assert saved["after_save"] == [beside] and saved["reopened"] == [beside]  # the .blend on disk names it
    assert saved["reopened_exist"] == [True] and saved["unsaved_still_there"] == [False]
    assert (Path(saved["blend"]).parent / "textures" / Path(unsaved).name).is_file()
