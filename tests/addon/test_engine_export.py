"""Export for game engines without Blender: presets, option checks, texture-set names, sizes and the 16-bit height
PNG (decoded by Pillow, an independent reader)."""

from __future__ import annotations

import io
import os
from array import array

import numpy as np
import pytest
from PIL import Image

from blender_sd_addon import engine_export
from blender_sd_addon.engine_export import ExportResult, TextureSet


def test_presets_have_each_engines_normal_convention():
    conventions = {name: preset.directx_normals for name, preset in engine_export.ENGINES.items()}
    assert conventions == {"gltf": False, "unreal": True, "unity": False, "godot": False}
    assert engine_export.flips_green(source_directx=False, engine="unreal")
    assert engine_export.flips_green(source_directx=True, engine="gltf")
    assert not engine_export.flips_green(source_directx=True, engine="unreal")
    assert not engine_export.flips_green(source_directx=False, engine="godot")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"engine": "cryengine"}, "engine must be one of gltf, unreal, unity, godot; got 'cryengine'"),
        ({"size": 300}, "size must be one of 0, 512, 1024, 2048, 4096"),
        ({"size": True}, "size must be one of"),
        ({"folder": ""}, "folder must be a folder path"),
        ({"name": "../scene"}, "name must be a file name"),
        ({"name": ""}, "name must be a file name"),
    ],
)
def test_bad_options_name_the_parameter(tmp_path, options, message):
    values = {"engine": "gltf", "size": 0, "folder": str(tmp_path), "name": "scene"} | options
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine_export.check_options(**values)


def test_folder_checks(tmp_path):
    engine_export.check_options("unity", 1024, str(tmp_path / "new" / "deeper"))  # made on export: accepted
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(ValueError, match="folder is a file"):
        engine_export.check_options("unity", 1024, str(tmp_path / "file.txt"))
    with pytest.raises(ValueError, match="folder cannot be made: .*file.txt is a file"):
        engine_export.check_options("unity", 1024, str(tmp_path / "file.txt" / "textures"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="folder cannot be written"):
            engine_export.check_options("gltf", 0, str(locked / "out"))
    finally:
        locked.chmod(0o700)


def test_file_names_are_sanitised_and_unique_per_material():
    stems = engine_export.texture_set_stems(["Crate", "Rusty metal/plate", "Wood.001", "Wood 001", "wood_001", "***"])
    assert stems == {
        "Crate": "Crate",
        "Rusty metal/plate": "Rusty_metal_plate",
        "Wood.001": "Wood_001",
        "Wood 001": "Wood_001_2",
        "wood_001": "wood_001_3",  # Windows and macOS fold case: Wood_001 and wood_001 would be one file
        "***": "Material",
    }
    names = [engine_export.file_name("Crate", kind) for kind in ("base_color", "normal", "orm", "height")]
    assert names == ["Crate_BaseColor.png", "Crate_Normal.png", "Crate_ORM.png", "Crate_Height.png"]


@pytest.mark.parametrize(
    ("width", "height", "size", "expected"),
    [(640, 480, 0, (640, 480)), (2048, 2048, 512, (512, 512)), (1000, 500, 1024, (1024, 512)),
     (300, 900, 512, (171, 512)), (64, 64, 4096, (4096, 4096))],
)  # fmt: skip
def test_scaled_size_keeps_the_aspect_ratio(width, height, size, expected):
    assert engine_export.scaled_size(width, height, size) == expected


def test_height_png_is_16_bit_and_keeps_fine_steps():
    width, height = 5, 3
    values = array("f", [(i * 997 % 65536) / 65535 for i in range(width * height)])  # steps far below 1/255
    data = engine_export.encode_gray16(width, height, values)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.size == (width, height) and decoded.mode.startswith("I;16")
    expected = np.array([round(v * 65535) for v in values]).reshape(height, width)
    assert (np.asarray(decoded, dtype=np.int64) == expected).all()
    flipped = Image.open(io.BytesIO(engine_export.encode_gray16(width, height, values, bottom_up=True)))
    assert (np.asarray(flipped, dtype=np.int64) == expected[::-1]).all()
    clipped = Image.open(io.BytesIO(engine_export.encode_gray16(2, 1, array("f", [-0.5, 1.5]))))
    assert np.asarray(clipped, dtype=np.int64).tolist() == [[0, 65535]]
    with pytest.raises(ValueError, match="values must hold width \\* height = 6"):
        engine_export.encode_gray16(3, 2, array("f", [0.0]))


def test_result_message_counts_what_was_written():
    sets = [TextureSet("Crate"), TextureSet("Barrel")]
    result = ExportResult("gltf", "/out", "/out/scene.glb", sets, ["Cube", "Plane", "Barrel"])
    assert result.message() == "Exported 3 objects, 2 texture sets to /out/scene.glb"
    single = ExportResult("unreal", "/out", "", sets[:1], ["Cube"])
    assert single.message() == "Exported 1 object, 1 texture set to /out"
