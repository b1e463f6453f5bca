"""The Blender side: classes, registration, early backend start, shutdown on quit.

The package keeps a `blender_sd_addon` import name while enabled, also when Blender 4.2+ loads it as
the extension `bl_ext.<repository>.blender_sd_addon`: scripts can always write
`from blender_sd_addon.api import generate_texture`.
"""

from __future__ import annotations

import atexit
import sys

import bpy

from . import (
    backend_ops,
    batch,
    delight_ops,
    export_panel,
    history_ops,
    history_store,
    install_ops,
    job_operators,
    panels,
    preferences,
    preview,
    project,
    properties,
    relocate,
    remote,
    session,
    train,
    travel,
    ui_jobs,
    ui_state,
)

PUBLIC_NAME = "blender_sd_addon"
EARLY_START_DELAY = 1.0  # seconds after registration: Blender finishes starting first

classes = (
    *properties.classes,
    *preferences.classes,
    *job_operators.classes,
    *history_ops.classes,
    *delight_ops.classes,
    *backend_ops.classes,
    *install_ops.classes,
    *panels.classes,
    *travel.classes,
    *train.classes,
    *remote.classes,
    *batch.classes,
    *project.classes,
    *export_panel.classes,
)


def _aliases(api) -> dict:
    """sys.modules names that let scripts import the extension by its public name (api: the add-on's api module,
    handed in by the add-on's register(), since nothing here imports it)."""
    root = session.ADDON_ID
    if root == PUBLIC_NAME or api is None:
        return {}
    return {PUBLIC_NAME: sys.modules[root], f"{PUBLIC_NAME}.api": api}


def _start_early() -> None:
    try:
        ui_state.start_backend_async()
    except Exception as exc:  # a failed warm-up must not break Blender's start; the panel shows it
        ui_state.STATE.backend_message = f"error: {exc}"
    return None


@bpy.app.handlers.persistent
def _on_load_pre(*_args) -> None:
    ui_jobs.stop_polling()  # the job's objects belong to the file being closed
    history_store.forget_history()
    relocate.forget()


@bpy.app.handlers.persistent
def _on_undo_redo(*_args) -> None:
    history_store.restore_history()  # undo takes out materials, never history entries


HANDLERS = (
    ("load_pre", _on_load_pre),
    ("undo_post", _on_undo_redo),
    ("redo_post", _on_undo_redo),
    ("save_post", relocate.on_save_post),
)


def register(api=None) -> None:
    for cls in classes:
        bpy.utils.register_class(cls)
    properties.register()
    travel.register()
    train.register()
    project.register()
    for kind, handler in HANDLERS:
        getattr(bpy.app.handlers, kind).append(handler)
    atexit.register(session.shutdown_backend)
    for name, module in _aliases(api).items():
        sys.modules.setdefault(name, module)
    addon = bpy.context.preferences.addons.get(session.ADDON_ID)  # None when register() is called by hand
    if addon and addon.preferences.start_early and not bpy.app.background:
        bpy.app.timers.register(_start_early, first_interval=EARLY_START_DELAY)


def unregister(api=None) -> None:
    if bpy.app.timers.is_registered(_start_early):
        bpy.app.timers.unregister(_start_early)
    for name, module in _aliases(api).items():
        if sys.modules.get(name) is module:
            del sys.modules[name]
    atexit.unregister(session.shutdown_backend)
    ui_jobs.stop_polling()
    session.shutdown_backend()
    for kind, handler in HANDLERS:
        getattr(bpy.app.handlers, kind).remove(handler)
    preview.unregister()
    batch.unregister()
    project.unregister()
    train.unregister()
    travel.unregister()
    properties.unregister()
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
