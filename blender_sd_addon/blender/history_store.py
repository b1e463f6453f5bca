"""The history in Blender: records in the scene's list, kept outside undo too, and appended to a file.

Every record is kept here as well (scene name -> records, oldest first); after an undo or redo the scene's list
is rebuilt from it, so Ctrl+Z removes a material but never its history entry.
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
