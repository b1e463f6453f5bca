"""The status lines in bpy: a failed install in the sidebar is a short error with Open Log, Cancel is there while
it runs, and lines about a setting go when the setting changes (interpreter, Local/Remote)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

bpy = pytest.importorskip("bpy")

from blender_sd_addon import installer, readiness  # noqa: E402
from blender_sd_addon.blender import panels, preferences, remote, status, ui_state  # noqa: E402

RECORDED = Path(__file__).parent / "pip_output"


class Layout:
    """Records the labels and operators a draw function makes; accepts every other layout call."""

    def __init__(self):
        self.labels: list[tuple[str, str]] = []
        self.operators: list[str] = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self

    def label(self, text="", icon="NONE", **kwargs):
        self.labels.append((text, icon))

    def operator(self, idname, **kwargs):
        self.operators.append(idname)
        return self


def draw_sidebar(scene) -> Layout:
    ui_state.STATE.readiness = None
    layout = Layout()
    context = type("Context", (), {"scene": scene, "region": type("Region", (), {"width": 280})()})()
    panels.MainPanel.draw(type("Panel", (), {"layout": layout})(), context)
    return layout


@pytest.fixture
def idle_installer():
    yield installer.STATE
    if installer.STATE.running:
        installer.cancel_install()
        deadline = time.monotonic() + 30
        while installer.STATE.running and time.monotonic() < deadline:
            time.sleep(0.05)
    installer.STATE.error, installer.STATE.message, installer.STATE.log_path = False, "", None


def test_the_sidebar_offers_cancel_while_installing(scene, idle_installer):
    code = "import time; print('slow', 'start', flush=True); time.sleep(60)"
    installer.start_phases([installer.Phase("Installing torch", [sys.executable, "-c", code])])
    deadline = time.monotonic() + 30
    while not any("slow start" in line for line in idle_installer.log_lines):
        assert time.monotonic() < deadline, idle_installer.log_lines
        time.sleep(0.05)
    assert "sdtex.install_backend_cancel" in draw_sidebar(scene).operators
    assert bpy.ops.sdtex.install_backend_cancel() == {"FINISHED"}


def test_a_failed_install_is_a_short_error_with_its_log_in_the_sidebar(scene, addon, tmp_path, idle_installer):
    log = tmp_path / "backend-install.log"
    code = f"import sys; sys.stdout.write(open({str(RECORDED / 'unreachable.txt')!r}).read()); sys.exit(1)"
    installer.start_phases([installer.Phase("Installing torch", [sys.executable, "-c", code])], log).join(60)
    python = addon.backend_python
    addon.backend_python = str(tmp_path / "no-such-python")  # no backend: the install failure is the line
    try:
        layout = draw_sidebar(scene)
    finally:
        addon.backend_python = python
    start = next(i for i, (text, _) in enumerate(layout.labels) if text.startswith("Install failed"))
    shown = [layout.labels[start][0]]
    for text, icon in layout.labels[start + 1 :]:  # its wrapped lines follow with a blank icon
        if icon != "BLANK1":
            break
        shown.append(text)
    assert layout.labels[start][1] == "ERROR" and "package index cannot be reached" in " ".join(shown)
    assert len(shown) <= 4  # was ~40 lines of pip's output
    assert "sdtex.open_install_log" in layout.operators
    assert bpy.ops.sdtex.open_install_log() == {"FINISHED"}  # background: reports the path, opens nothing

    prefs = Layout()  # Preferences: the whole message, naming the log, with an error icon; no pip lines
    preferences.draw_install(prefs, type("Context", (), {"region": type("Region", (), {"width": 900})()})())
    text = " ".join(text for text, _ in prefs.labels)
    assert prefs.labels[0][1] == "ERROR" and str(log) in text.split()
    assert text.startswith("Installing torch failed: the package index cannot be reached. Check the network")
    assert "Retrying" not in text
    assert "sdtex.open_install_log" in prefs.operators


def test_setting_the_interpreter_clears_the_error_about_the_previous_one(scene, addon):
    ui_state.STATE.backend_message = "error: No Python with the backend found. Tried: ..."
    python = addon.backend_python
    try:
        addon.backend_python = sys.executable
        assert ui_state.STATE.backend_message == ""
        line = status.check_readiness(bpy.context).backend
        assert line.text.startswith(f"Backend interpreter set: {sys.executable}") and line.icon == "INFO"
        ui_state.STATE.backend_message = "model loaded"  # not an error: a setting change keeps it
        addon.backend_python = python
        assert ui_state.STATE.backend_message == "model loaded"
    finally:
        addon.backend_python = python
        ui_state.STATE.backend_message = ""


def test_back_to_local_forgets_the_remote_backends_errors(scene, addon):
    addon.remote_address = "127.0.0.1:9"
    addon.backend_mode = "REMOTE"
    try:
        remote.STATE.update(message="Failed: the server refused the token", error=True)
        ui_state.STATE.say("the server refused the token", is_error=True)
        ui_state.STATE.readiness = None
        line = status.check_readiness(bpy.context).backend
        assert "refused the token" in line.text and line.kind == readiness.ERROR  # no check mark above it
        addon.backend_mode = "LOCAL"
        assert remote.last_error() == "" and ui_state.STATE.message == ""
        assert "token" not in status.check_readiness(bpy.context).backend.text
    finally:
        addon.backend_mode, addon.remote_address = "LOCAL", ""
        ui_state.STATE.say("")
