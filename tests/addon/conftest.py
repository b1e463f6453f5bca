"""Add-on fixtures: the add-on enabled in bpy (Blender as a Python module), pointed at the tiny model.

bpy is one Blender per process: tests share it, so each test starts from an empty file
(`read_homefile(use_empty=True)` keeps the add-on enabled, unlike `read_factory_settings`).

The add-on sees the contract as `blender_sd_addon.contract` (vendored; a link in a checkout), a different module
object from the worker's `sdtex_contract`: tests of add-on code import it the add-on's way, so that classes such as
Artifact and ProtocolError are the ones the add-on uses.
"""

from __future__ import annotations

import time

import pytest

from blender_sd_addon import installer

ADDON = "blender_sd_addon"


@pytest.fixture(scope="module")
def addon(tiny_model_dir, tmp_path_factory, monkeypatch_module):
    """The enabled add-on's preferences: tiny model, 64 px, output in a temporary folder. The backend
    worker started by the first generation lives until the module's tests are done."""
    bpy = pytest.importorskip("bpy")
    import addon_utils

    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    module = addon_utils.enable(ADDON, default_set=True)
    assert module is not None, "the add-on failed to register (see the traceback above)"
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.model = str(tiny_model_dir)
    prefs.output_folder = str(tmp_path_factory.mktemp("textures"))
    yield prefs
    addon_utils.disable(ADDON, default_set=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture
def scene(addon):
    """An empty scene with small, fast generation settings."""
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)
    settings = bpy.context.scene.sdtex
    settings.prompt = "mossy stone wall"
    settings.width = settings.height = 64
    settings.steps = 2
    return bpy.context.scene


@pytest.fixture
def idle_installer():
    """Waits, after the test, until an install the test left running has stopped (Cancel first)."""
    yield
    if installer.STATE.running:
        installer.cancel_install()
        deadline = time.monotonic() + 30
        while installer.STATE.running and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture(scope="module")
def controlnet(tiny_model_dir, tmp_path_factory) -> str:
    """A tiny depth ControlNet for the tiny model (the project task needs one)."""
    from backend.tiny_model import make_test_controlnet

    return str(make_test_controlnet(tmp_path_factory.mktemp("controlnet") / "cn", tiny_model_dir))


@pytest.fixture
def as_ui(monkeypatch):
    """as_ui(*modules): those modules see bpy.app.background False, as in the GUI, so their operators queue
    jobs on the board instead of blocking (bpy as a module is always in background mode)."""
    import bpy

    class App:
        background = False

        def __getattr__(self, name):
            return getattr(bpy.app, name)

    class UiBpy:
        app = App()

        def __getattr__(self, name):
            return getattr(bpy, name)

    def patch(*modules) -> None:
        for module in modules:
            monkeypatch.setattr(module, "bpy", UiBpy())

    return patch
