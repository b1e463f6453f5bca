"""The history in Blender: records in the scene's list, kept outside undo too, and appended to a file.

Every record is kept here as well (scene name -> records, oldest first); after an undo or redo the scene's list
is rebuilt from it, so Ctrl+Z removes a material but never its history entry. One file per .blend: records of
an unsaved file's jobs follow its images beside the .blend on the first save (move_history_lines).
"""

from __future__ import annotations

import os

import bpy

from ..history import HISTORY_LIMIT, HistoryRecord

_history: dict[str, list[HistoryRecord]] = {}
HISTORY_FILE = "sdtex-history.jsonl"  # beside the images: one JSON record per line, even if Blender crashes


def add_history(scene, record: HistoryRecord) -> None:
    """Newest first; the oldest entries beyond HISTORY_LIMIT are dropped (their files stay on disk)."""
    if scene.name not in _history:  # first record since the file was loaded: the scene's list is the truth
        _history[scene.name] = [HistoryRecord.from_fields(e) for e in reversed(scene.sdtex.history)]
    kept = _history[scene.name]
    kept.append(record)
    del kept[:-HISTORY_LIMIT]
    _append_history_file(record)
    _mirror_history(scene, kept)
    scene.sdtex.history_index = 0


def restore_history() -> None:
    """Put back the records an undo took out of the scenes' lists (undo_post/redo_post handler)."""
    for scene in bpy.data.scenes:
        kept = _history.get(scene.name)
        if kept is not None and [e.created + e.files for e in scene.sdtex.history] != [
            r.created + r.to_fields()["files"] for r in reversed(kept)
        ]:
            _mirror_history(scene, kept)


def forget_history() -> None:
    """A file was loaded: its scenes' lists are the truth again (load_post handler)."""
    _history.clear()


def _mirror_history(scene, records: list[HistoryRecord]) -> None:
    entries = scene.sdtex.history
    entries.clear()
    for record in reversed(records):
        item = entries.add()
        for name, value in record.to_fields().items():
            setattr(item, name, value)


def _append_history_file(record: HistoryRecord) -> None:
    paths_ = [i.path or next(iter(i.maps.values()), "") for i in record.images()]
    folder = os.path.dirname(paths_[0]) if paths_ and paths_[0] else ""
    if not folder:
        return
    try:
        with open(os.path.join(folder, HISTORY_FILE), "a", encoding="utf-8") as log:
            log.write(record.to_json() + "\n")
    except OSError as exc:  # the images are written and recorded in the scene: a missing log loses nothing
        print(f"SD Textures: could not append to {HISTORY_FILE} in {folder}: {exc}")


def move_history_lines(moved: dict[str, str]) -> None:
    """Files moved (old path -> new path: relocate, on an unsaved file's first save): the records naming them
    leave the old folder's history file for the one beside their files now, with the new paths. Records of
    other files stay where they are."""
    for folder in sorted({os.path.dirname(path) for path in moved}):
        log = os.path.join(folder, HISTORY_FILE)
        try:
            with open(log, encoding="utf-8") as file:
                lines = file.read().splitlines()
        except OSError:  # no history there (or unreadable): nothing to move
            continue
        kept, moving = [], []
        for line in lines:
            record = _read_line(line)
            if record is not None and any(path in moved for path in _paths(record)):
                moving.append(_remapped(record, moved))
            else:
                kept.append(line)
        if not moving:
            continue
        for record in moving:
            _append_history_file(record)
        try:
            with open(log, "w", encoding="utf-8") as file:
                file.write("".join(line + "\n" for line in kept))
        except OSError as exc:  # the records are in both files: a duplicate loses nothing
            print(f"SD Textures: could not rewrite {log}: {exc}")


def _read_line(line: str) -> HistoryRecord | None:
    try:
        return HistoryRecord.from_json(line)
    except (ValueError, TypeError, AttributeError):  # a line of another version, or cut short by a crash
        return None


def _paths(record: HistoryRecord) -> list[str]:
    return [path for image in record.files for path in (image.get("path", ""), *image.get("maps", {}).values())]


def _remapped(record: HistoryRecord, moved: dict[str, str]) -> HistoryRecord:
    for image in record.files:
        image["path"] = moved.get(image.get("path", ""), image.get("path", ""))
        image["maps"] = {kind: moved.get(path, path) for kind, path in image.get("maps", {}).items()}
    return record
