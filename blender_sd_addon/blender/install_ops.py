"""Preferences > Install Backend: thin operators over installer.py.

The installation runs in a thread; a `bpy.app.timers` callback redraws the preferences while it runs.
In background mode (`blender -b`) the operator waits for the end, so a script can install headless.
"""

from __future__ import annotations

import sys

import bpy
from bpy.props import StringProperty

from .. import api, installer, paths

REDRAW_INTERVAL = 0.5  # seconds


def _redraw_while_running() -> float | None:
    """Redraw the preferences and sidebars while installing; start the new backend once it is in place."""
    from .operators import STATE, start_backend_async

    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in ("PREFERENCES", "VIEW_3D", "IMAGE_EDITOR", "NODE_EDITOR"):
                area.tag_redraw()
    STATE.readiness = None
    if installer.STATE.running:
        return REDRAW_INTERVAL
    if installer.STATE.succeeded:
        start_backend_async()
    return None


class SDTEX_OT_install_backend(bpy.types.Operator):
    """Create a Python environment in the user data folder and install torch, diffusers and the other \
backend packages into it (downloads several GB)"""

    bl_idname = "sdtex.install_backend"
    bl_label = "Install Backend"

    torch_spec: StringProperty(
        name="Torch",
        description="pip requirement for torch, e.g. torch==2.5.1; empty installs the latest torch",
        default="",
    )
    index_url: StringProperty(
        name="Torch Index URL",
        description="pip index to get torch from; empty picks one for this computer "
        "(CUDA with an NVIDIA GPU, the CPU build without one, PyPI on macOS)",
    )

    @classmethod
    def poll(cls, context) -> bool:
        return not installer.STATE.running

    def choice(self) -> installer.TorchChoice:
        return installer.plan_install(api.user_data_dir(), torch_spec=self.torch_spec, index_url=self.index_url or None)

    def invoke(self, context, event):
        return context.window_manager.invoke_props_dialog(self, width=520)

    def draw(self, context):
        layout = self.layout
        layout.label(text=self.choice().summary, icon="INFO")
        layout.prop(self, "torch_spec")
        layout.prop(self, "index_url")

    def execute(self, context):
        if sys.platform == "win32":  # the running worker's files are locked: the switch to the new backend fails
            api.shutdown_backend()
        try:
            thread = installer.start_install(
                api.user_data_dir(),
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
        bpy.app.timers.register(_redraw_while_running, first_interval=REDRAW_INTERVAL)
        self.report({"INFO"}, f"Installing the backend; the log is in {installer.STATE.log_path}")
        return {"FINISHED"}


class SDTEX_OT_install_backend_cancel(bpy.types.Operator):
    """Stop the backend installation (what is already installed stays; installing again resumes)"""

    bl_idname = "sdtex.install_backend_cancel"
    bl_label = "Cancel Installation"

    @classmethod
    def poll(cls, context) -> bool:
        return installer.STATE.running

    def execute(self, context):
        installer.cancel_install()
        return {"FINISHED"}


classes = (SDTEX_OT_install_backend, SDTEX_OT_install_backend_cancel)
