"""Images made while the .blend was unsaved follow it on its first save.

Unsaved, the output folder "//textures/" has no .blend to be beside, so files go to the add-on's user folder
(the panel says so, with an Open Folder button). When the file is first saved (Save or Save As, into any
folder), a save_post handler moves them into the folder the setting now means, points the images and the
history at the new paths and saves the .blend once more, so the file on disk references the moved files.

Why save_post and a second write: Blender 3.4 calls save_pre with (None, None) and bpy.data.filepath is still
empty there, so the target is unknown before the write; in save_post bpy.data.filepath is set in every version.
Files that cannot be moved stay pending (and still load from where they are): the next save tries again.
"""

from __future__ import annotations

import json
import os
import shutil

import bpy

from .. import paths
from . import session
from .history_store import forget_history, move_history_lines

_pending: list[str] = []  # absolute paths written while the file had no path, in order
_resaving = False  # our own second save is running (its handlers must not start another)


def remember(files: list[str]) -> None:
    """Called after a job's files are on disk: keep those that would be lost to an unsaved file's folder."""
    if not bpy.data.filepath:
        _pending.extend(files)


def forget() -> None:
    _pending.clear()


def pending() -> list[str]:
    return list(_pending)


@bpy.app.handlers.persistent
def on_save_post(*_args) -> None:
    blend = bpy.data.filepath  # empty after "Save Copy" of an unsaved file: the files stay pending
    if not _pending or not blend or _resaving:
        return
    target = paths.resolve_output_dir(session.preferences().output_folder, blend, session.user_data_dir())
    moved, failed = move_files(list(_pending), target)
    _pending[:] = failed
    if not moved:
        return
    remap(moved)
    if not _resave():  # the .blend on disk names the old paths: put the files back there
        remap(move_back(moved))
        _pending[:0] = list(moved)


def _resave() -> bool:
    global _resaving
    _resaving = True
    try:
        return "FINISHED" in bpy.ops.wm.save_mainfile(check_existing=False)
    except RuntimeError as exc:
        print(f"SD Textures: could not save {bpy.data.filepath} again after moving its images: {exc}")
        return False
    finally:
        _resaving = False


def move_files(files: list[str], folder) -> tuple[dict[str, str], list[str]]:
    """Move files (those still there) into `folder`, never over an existing file.
    Returns old path -> new path, and the files that could not be moved (each error is printed)."""
    moved, failed = {}, []
    for path in files:
        if not os.path.isfile(path) or os.path.dirname(path) == str(folder):
            continue
        new = os.path.join(folder, os.path.basename(path))
        stem, suffix = os.path.splitext(new)
        n = 1
        while os.path.exists(new):
            new, n = f"{stem}-{n}{suffix}", n + 1
        try:
            os.makedirs(folder, exist_ok=True)
            shutil.move(path, new)
        except OSError as exc:  # this image stays where it is, and still loads: nothing is lost
            print(f"SD Textures: could not move {path} into {folder}: {exc}")
            failed.append(path)
            continue
        moved[path] = new
    return moved, failed


def move_back(moved: dict[str, str]) -> dict[str, str]:
    """Undo move_files; returns new path -> old path for the files put back."""
    back = {}
    for old, new in moved.items():
        try:
            shutil.move(new, old)
            back[new] = old
        except OSError as exc:
            print(f"SD Textures: could not put {new} back to {old}: {exc}")
    return back


def remap(moved: dict[str, str]) -> None:
    """Point images and history records at the files' new paths (relative to the .blend when the preferences
    ask for relative paths, as Blender's own file browser does)."""
    relative = bpy.context.preferences.filepaths.use_relative_paths and bool(bpy.data.filepath)
    for image in bpy.data.images:
        new = moved.get(os.path.abspath(bpy.path.abspath(image.filepath))) if image.filepath else None
        if new:
            image.filepath = _blend_relative(new) if relative else new
    for scene in bpy.data.scenes:
        for entry in scene.sdtex.history:
            files = json.loads(entry.files or "[]")
            for image in files:
                image["path"] = moved.get(image.get("path", ""), image.get("path", ""))
                image["maps"] = {kind: moved.get(p, p) for kind, p in image.get("maps", {}).items()}
            entry.files = json.dumps(files)
    forget_history()  # rebuilt from the scenes, with the new paths, at the next record
    move_history_lines(moved)  # the records follow their files: one history file beside the .blend


def _blend_relative(path: str) -> str:
    try:
        return bpy.path.relpath(path)
    except ValueError:  # another drive than the .blend's (Windows): only an absolute path reaches it
        return path
