"""Images made in an unsaved file follow the .blend on its first save (blender/relocate.py), in bpy 5.0.

The move runs in save_post, the one place where every Blender version (3.4 passes save_pre (None, None))
knows the new path, and then saves again: the file on disk must reference the moved files when reopened.
The images here are written by Blender itself into the add-on's user folder, as a job's files would be.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

bpy = pytest.importorskip("bpy")

from blender_sd_addon.blender import history_store, relocate, session  # noqa: E402
from blender_sd_addon.history import HistoryRecord  # noqa: E402


@pytest.fixture
def unsaved(scene, addon):
    """An unsaved file whose output folder is the default "//textures/" (the user folder until saved)."""
    folder = addon.output_folder
    addon.output_folder = "//textures/"
    relocate.forget()
    assert not bpy.data.filepath
    yield scene
    addon.output_folder = folder
    relocate.forget()
    for left in (session.user_data_dir() / "textures").glob("relocate_*.png"):  # the user's real folder
        left.unlink()


def made_in_user_folder(scene, name: str) -> tuple[bpy.types.Image, str]:
    """A PNG in the user folder, loaded and recorded in the history the way a finished job does it."""
    path = str(session.user_data_dir() / "textures" / f"{name}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = bpy.data.images.new(name, 4, 4)
    pixels.filepath_raw, pixels.file_format = path, "PNG"
    pixels.save()
    bpy.data.images.remove(pixels)
    image = bpy.data.images.load(path)
    image.use_fake_user = True  # kept in the .blend although no material uses it
    record = HistoryRecord("p", "", 1, 2, 7.5, 4, 4, "euler_a", "none", False, "/m", [{"path": path, "seed": 1}])
    history_store.add_history(scene, record)
    relocate.remember([path])
    return image, path


def history_paths() -> list[str]:
    return [HistoryRecord.from_fields(e).images()[0].path for e in bpy.context.scene.sdtex.history]


def test_first_save_into_a_new_folder_moves_the_images_and_the_saved_file_references_them(unsaved, tmp_path):
    first, first_old = made_in_user_folder(unsaved, "relocate_first")
    _, second_old = made_in_user_folder(unsaved, "relocate_second")
    blend = tmp_path / "new project" / "scene.blend"  # Save As into a folder that had no textures/ yet
    blend.parent.mkdir()

    assert bpy.ops.wm.save_as_mainfile(filepath=str(blend)) == {"FINISHED"}

    moved = [str(blend.parent / "textures" / os.path.basename(p)) for p in (first_old, second_old)]
    assert first.filepath == "//textures/relocate_first.png"
    assert all(os.path.isfile(p) for p in moved) and not any(os.path.exists(p) for p in (first_old, second_old))
    assert sorted(history_paths()) == sorted(moved) and relocate.pending() == []
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.wm.open_mainfile(filepath=str(blend))  # what the first save left on disk
    reopened = bpy.data.images["relocate_first.png"]
    assert reopened.filepath == "//textures/relocate_first.png"
    assert tuple(reopened.size) == (4, 4)  # (0, 0) when the file is not found
    assert sorted(history_paths()) == sorted(moved)


def test_an_image_that_cannot_move_stays_pending_and_the_next_save_moves_it(unsaved, tmp_path):
    image, old = made_in_user_folder(unsaved, "relocate_blocked")
    (tmp_path / "textures").write_text("a file where the folder should be")

    assert bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "scene.blend")) == {"FINISHED"}
    assert os.path.isfile(old) and os.path.normpath(bpy.path.abspath(image.filepath)) == old
    assert relocate.pending() == [old]

    (tmp_path / "textures").unlink()
    assert bpy.ops.wm.save_mainfile() == {"FINISHED"}
    assert image.filepath == "//textures/relocate_blocked.png" and (tmp_path / "textures" / Path(old).name).is_file()
    assert relocate.pending() == [] and not os.path.exists(old)


def test_when_the_second_save_fails_the_images_go_back_and_stay_pending(unsaved, tmp_path, monkeypatch):
    image, old = made_in_user_folder(unsaved, "relocate_unsaved")
    monkeypatch.setattr(relocate, "_resave", lambda: False)

    assert bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "scene.blend")) == {"FINISHED"}
    # the .blend on disk names the old path, so the file must still be there
    assert os.path.isfile(old) and not (tmp_path / "textures" / Path(old).name).exists()
    assert os.path.normpath(bpy.path.abspath(image.filepath)) == old and history_paths() == [old]
    assert relocate.pending() == [old]


def test_save_copy_of_an_unsaved_file_leaves_the_images_pending(unsaved, tmp_path):
    _, old = made_in_user_folder(unsaved, "relocate_copy")
    assert bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "copy.blend"), copy=True) == {"FINISHED"}
    assert not bpy.data.filepath and os.path.isfile(old) and relocate.pending() == [old]
