"""Preferences > Install Backend: thin operators over installer.py, and the facts the status lines need.

The installation runs in a thread; a `bpy.app.timers` callback redraws the preferences while it runs.
In background mode (`blender -b`) the operator waits for the end, so a script can install headless.
"""

from __future__ import annotations

import sys
from pathlib import Path

import bpy
from bpy.props import StringProperty

from .. import installer, paths, readiness
from ..client import SDTexError
from . import session, ui_jobs
from .ui_state import STATE, start_backend_async

REDRAW_INTERVAL = 0.5  # seconds


def _redraw_while_running() -> float | None:
    """Redraw the preferences and sidebars while installing; start the new backend once it is in place."""
    ui_jobs.redraw(areas=("PREFERENCES",))
    STATE.readiness = None
    if installer.STATE.running:
        return REDRAW_INTERVAL
    if installer.STATE.succeeded:
        start_backend_async()
    return None


def interpreter_facts(remote: bool) -> dict[str, str]:
    """readiness.Facts' interpreter fields: the backend's Python and where it came from, or why there is none
    (a remote backend needs none here)."""
    if remote:
        return {}
    setting = bpy.path.abspath(session.preferences().backend_python)
    try:
        found = paths.find_backend_python(setting, session.user_data_dir())
    except SDTexError as exc:
        return {"interpreter_error": str(exc)}
    if setting.strip():
        source = readiness.SET
    elif Path(found) == installer.venv_python(session.user_data_dir()):
        source = readiness.INSTALLED
    else:
        source = ""
    return {"interpreter": found, "interpreter_source": source}


def install_facts() -> dict:
    """readiness.Facts' installer fields; a failure comes as its cause and fix in a line or two."""
    state = installer.STATE
    return {
        "installing": state.running,
        "install_progress": state.progress,
        "install_message": state.short_error if state.error else state.message,
        "install_failed": state.error,
        "install_log": str(state.log_path or ""),
    }


class SDTEX_OT_install_backend(bpy.types.Operator):
    """Create a Python environment in the user data folder and install torch, diffusers and the other \
backend packages into it (downloads several GB)"""

    bl_idname = "sdtex.install_backend"
    bl_label = "Install Backend"

    torch_spec: StringProperty(
        name="Torch",
        description=f"pip requirement for torch, e.g. torch==2.5.1. Empty: {installer.DEFAULT_TORCH_SPEC}, the "
        "version the add-on was tested with",
        default="",
    )
    index_url: StringProperty(
        name="Torch Index URL",
        description="pip index to get torch from, e.g. a mirror. Empty: the one picked for this computer (PyTorch's "
        "CUDA index with an NVIDIA GPU, its CPU index without one, PyPI on macOS)",
    )

    @classmethod
    def poll(cls, context) -> bool:
        return not installer.STATE.running

    def choice(self) -> installer.TorchChoice:
        data = session.user_data_dir()
        return installer.plan_install(data, torch_spec=self.torch_spec, index_url=self.index_url or None)

    def invoke(self, context, event):
        return context.window_manager.invoke_props_dialog(self, width=520)

    def draw(self, context):
        layout = self.layout
        layout.label(text=self.choice().summary, icon="INFO")
        layout.prop(self, "torch_spec")
        layout.label(text=f"Empty: {installer.DEFAULT_TORCH_SPEC} (the tested version)", icon="BLANK1")
        layout.prop(self, "index_url")
        layout.label(text="Empty: the index picked for this computer (above)", icon="BLANK1")

    def execute(self, context):
        if sys.platform == "win32":  # the running worker's files are locked: the switch to the new backend fails
            session.shutdown_backend()
        try:
            thread = installer.start_install(
                session.user_data_dir(),
                paths.ADDON_DIR / "worker",
                torch_spec=self.torch_spec,
                index_url=self.index_url or None,
            )
        except installer.InstallError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        if bpy.app.background:  # no event loop to follow a thread: wait
            thread.join()
            state = installer.STATE
            self.report({"ERROR"} if state.error or state.cancelled else {"INFO"}, state.message)
            return {"CANCELLED"} if state.error or state.cancelled else {"FINISHED"}
        # persistent: opening a .blend meanwhile must not stop the redraws (the bar would stay where it was)
        bpy.app.timers.register(_redraw_while_running, first_interval=REDRAW_INTERVAL, persistent=True)
        self.report({"INFO"}, f"Installing the backend; the log is in {installer.STATE.log_path}")
        return {"FINISHED"}


class SDTEX_OT_install_backend_cancel(bpy.types.Operator):
    """Stop the backend installation (the backend in use stays as it was; pip's cache keeps the downloads)"""

    bl_idname = "sdtex.install_backend_cancel"
    bl_label = "Cancel Installation"

    @classmethod
    def poll(cls, context) -> bool:
        return installer.STATE.running

    def execute(self, context):
        installer.cancel_install()
        return {"FINISHED"}


class SDTEX_OT_open_install_log(bpy.types.Operator):
    """Open the backend installation's log (pip's whole output) in the system's text viewer"""

    bl_idname = "sdtex.open_install_log"
    bl_label = "Open Install Log"

    @classmethod
    def poll(cls, context) -> bool:
        log = installer.STATE.log_path
        return bool(log and Path(log).is_file())

    def execute(self, context):
        log = str(installer.STATE.log_path)
        self.report({"INFO"}, f"Install log: {log}")
        if not bpy.app.background:  # no desktop to open it on
            bpy.ops.wm.path_open(filepath=log)
        return {"FINISHED"}


classes = (SDTEX_OT_install_backend, SDTEX_OT_install_backend_cancel, SDTEX_OT_open_install_log)
