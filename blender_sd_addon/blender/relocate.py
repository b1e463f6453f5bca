"""Images made while the .blend was unsaved follow it on its first save.

Unsaved, the output folder "//textures/" has no .blend to be beside, so files go to the add-on's user folder
(the panel says so, with an Open Folder button). When the file is first saved, a save_pre handler moves them
into the folder the setting now means and points the images and the history at the new paths, before Blender
writes the .blend (which then stores them relative to it).
"""

from __future__ import annotations

import json
import os
import shutil

import bpy

from .. import api, paths

_pending: list[str] = []  # absolute paths written while the file had no path, in order


def remember(files: list[str]) -> None:
    """Called after a job's files are on disk: keep those that would be lost to an unsaved file's folder."""
    if not bpy.data.filepath:
        _pending.extend(files)


def forget() -> None:
    _pending.clear()


@bpy.app.handlers.persistent
def on_save_pre(*args) -> None:
    blend = args[0] if args and isinstance(args[0], str) else ""  # Blender passes the path being saved to
    if not _pending or not blend or bpy.data.filepath:  # only on the first save, and only ours
        return
    target = paths.resolve_output_dir(api.preferences().output_folder, blend, api.user_data_dir())
    try:
        moved = move_files(list(_pending), target)
    except OSError as exc:  # the images stay where they are, and still load: nothing is lost
        print(f"SD Textures: could not move the images beside {blend}: {exc}")
        return
    finally:
        _pending.clear()
    remap(moved)


def move_files(files: list[str], folder) -> dict[str, str]:
    """Move files (those still there) into `folder`, never over an existing file; old path -> new path."""
    os.makedirs(folder, exist_ok=True)
    moved = {}
    for path in files:
        if not os.path.isfile(path) or os.path.dirname(path) == str(folder):
            continue
        new = os.path.join(folder, os.path.basename(path))
        stem, suffix = os.path.splitext(new)
        n = 1
        while os.path.exists(new):
            new, n = f"{stem}-{n}{suffix}", n + 1
        shutil.move(path, new)
        moved[path] = new
    return moved


def remap(moved: dict[str, str]) -> None:
    """Point images and history records at the files' new paths."""
    for image in bpy.data.images:
        new = moved.get(os.path.abspath(bpy.path.abspath(image.filepath))) if image.filepath else None
        if new:
            image.filepath = new
    for scene in bpy.data.scenes:
        for entry in scene.sdtex.history:
            files = json.loads(entry.files or "[]")
            for image in files:
                image["path"] = moved.get(image.get("path", ""), image.get("path", ""))
                image["maps"] = {kind: moved.get(p, p) for kind, p in image.get("maps", {}).items()}
            entry.files = json.dumps(files)
    api.forget_history()  # rebuilt from the scenes, with the new paths, at the next record
