"""Export for game engines in Blender (bpy 5.0 as a module): a cube and a plane with one material made by
materials.apply_images from known 32x32 maps are exported; the GLB passes the Khronos glTF validator with no error and
no warning, its ORM texture holds AO, roughness and metallic, the texture-set files have the documented names and
conventions, and the scene afterwards is as it was. The GLB is read back with an independent reader (json + Pillow)."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

bpy = pytest.importorskip("bpy")

from blender_sd_addon.blender import export, materials  # noqa: E402
from blender_sd_addon.blender.materials import ApplyOptions  # noqa: E402
from blender_sd_addon.client import SDTexError  # noqa: E402

ADDON = "blender_sd_addon"
ROOT = Path(__file__).resolve().parents[2]
VALIDATOR = ROOT / "tools" / "gltf" / "validate.mjs"
VALIDATOR_PACKAGE = ROOT / "tools" / "gltf" / "node_modules" / "gltf-validator"
SIZE = 32
TOLERANCE = 1  # of 255


@pytest.fixture(scope="module")
def enabled():
    import addon_utils

    assert addon_utils.enable(ADDON, default_set=True) is not None
    yield
    addon_utils.disable(ADDON, default_set=True)


def patterns() -> dict[str, np.ndarray]:
    """A distinct known pattern per map (rows top to bottom, as PNG files store them)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    albedo = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1)
    normal = np.stack([128 + x * 2, 40 + y * 5, np.full_like(x, 230)], axis=-1)
    return {
        "albedo": albedo.astype(np.uint8),
        "normal": normal.astype(np.uint8),
        "roughness": (x * 8 + 3).astype(np.uint8),
        "metallic": (y * 7 + 10).astype(np.uint8),
        "ao": (255 - (x + y) * 3).astype(np.uint8),
        "height": ((x * y) % 256).astype(np.uint8),
    }


@pytest.fixture
def crate(enabled, tmp_path) -> dict:
    """A cube and a plane (UVs from the primitives) sharing one generated material with every map."""
    bpy.ops.wm.read_homefile(use_empty=True)
    files = {}
    for kind, pixels in patterns().items():
        files[kind] = str(tmp_path / f"crate_{kind}.png")
        Image.fromarray(pixels).save(files[kind])
    bpy.ops.mesh.primitive_cube_add()
    cube = bpy.context.active_object
    bpy.ops.mesh.primitive_plane_add(location=(3, 0, 0))
    plane = bpy.context.active_object
    (material,) = materials.apply_images([cube, plane], files, ApplyOptions(), "Crate")
    return {"objects": [cube, plane], "material": material, "files": files, "out": tmp_path / "export"}


def read_glb(path) -> tuple[dict, bytes]:
    """The JSON and BIN chunks of a GLB (glTF 2.0 spec, "Binary glTF Layout")."""
    data = Path(path).read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data)
    assert (magic, version, length) == (b"glTF", 2, len(data))
    offset, chunks = 12, {}
    while offset < len(data):
        size, kind = struct.unpack_from("<I4s", data, offset)
        chunks[kind] = data[offset + 8 : offset + 8 + size]
        offset += 8 + size
    return json.loads(chunks[b"JSON"]), chunks.get(b"BIN\x00", b"")


def glb_image(gltf: dict, binary: bytes, texture_index: int) -> np.ndarray:
    image = gltf["images"][gltf["textures"][texture_index]["source"]]
    view = gltf["bufferViews"][image["bufferView"]]
    start = view.get("byteOffset", 0)
    return np.asarray(Image.open(io.BytesIO(binary[start : start + view["byteLength"]])).convert("RGBA"))


def validate(path) -> dict:
    if shutil.which("node") is None or not VALIDATOR_PACKAGE.is_dir():
        missing = "node or tools/gltf/node_modules missing (npm ci --prefix tools/gltf; make test installs it)"
        pytest.fail(missing) if os.environ.get("CI") else pytest.skip(missing)  # CI must run the validator
    done = subprocess.run(["node", str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def close(actual: np.ndarray, expected: np.ndarray) -> bool:
    return actual.shape == expected.shape and int(np.abs(actual.astype(int) - expected.astype(int)).max()) <= TOLERANCE


def test_glb_passes_the_gltf_validator_without_errors_or_warnings(crate):
    result = export.export_for_engines(crate["objects"], str(crate["out"]))
    report = validate(result.glb)
    issues = report["issues"]
    found = [(m["code"], m["pointer"]) for m in issues["messages"] if m["severity"] <= 1]
    assert (issues["numErrors"], issues["numWarnings"]) == (0, 0), found
    assert result.message() == f"Exported 2 objects, 1 texture set to {result.glb}"


def test_ngons_get_tangents_too(crate, tmp_path):
    bpy.ops.mesh.primitive_cylinder_add(vertices=12, location=(0, 3, 0))  # 12-corner caps
    cylinder = bpy.context.active_object
    materials.apply_images([cylinder], crate["files"], ApplyOptions(), "Crate")
    result = export.export_for_engines([cylinder], str(tmp_path / "cylinder"))
    issues = validate(result.glb)["issues"]
    assert (issues["numErrors"], issues["numWarnings"]) == (0, 0), issues["messages"]
    gltf, _ = read_glb(result.glb)
    assert "TANGENT" in gltf["meshes"][0]["primitives"][0]["attributes"]
    assert len(cylinder.modifiers) == 0 and max(p.loop_total for p in cylinder.data.polygons) == 12


def test_texture_repeats_become_a_texture_transform(crate, tmp_path):
    cube, _ = crate["objects"]
    materials.apply_images([cube], crate["files"], ApplyOptions(texture_scale=3.0, slot="REPLACE"), "Tiles")
    result = export.export_for_engines([cube], str(tmp_path / "tiles"))
    assert validate(result.glb)["issues"]["numWarnings"] == 0
    gltf, _ = read_glb(result.glb)
    base = gltf["materials"][0]["pbrMetallicRoughness"]["baseColorTexture"]
    assert base["extensions"]["KHR_texture_transform"]["scale"] == [3.0, 3.0]


def test_glb_orm_texture_carries_ao_roughness_and_metallic(crate):
    result = export.export_for_engines(crate["objects"], str(crate["out"]))
    gltf, binary = read_glb(result.glb)
    (material,) = gltf["materials"]
    assert material["name"] == "Crate"
    pbr = material["pbrMetallicRoughness"]
    orm_index = pbr["metallicRoughnessTexture"]["index"]
    occlusion_index = material["occlusionTexture"]["index"]
    same_image = gltf["textures"][orm_index]["source"] == gltf["textures"][occlusion_index]["source"]
    assert same_image, "occlusion and metallic-roughness must share the ORM image"
    assert "normalTexture" in material and "baseColorTexture" in pbr
    orm = glb_image(gltf, binary, orm_index)
    maps = patterns()
    for channel, kind in enumerate(("ao", "roughness", "metallic")):
        assert close(orm[..., channel], maps[kind]), kind
    assert close(glb_image(gltf, binary, pbr["baseColorTexture"]["index"])[..., :3], maps["albedo"])
    assert close(glb_image(gltf, binary, material["normalTexture"]["index"])[..., :3], maps["normal"])
    assert {mesh["primitives"][0]["material"] for mesh in gltf["meshes"]} == {0}


def test_texture_set_files_names_and_normal_conventions(crate):
    gl = export.export_for_engines(crate["objects"], str(crate["out"] / "godot"), engine="godot", glb=False)
    dx = export.export_for_engines(crate["objects"], str(crate["out"] / "unreal"), engine="unreal", glb=False)
    (texture_set,) = gl.texture_sets
    names = {kind: os.path.basename(path) for kind, path in texture_set.files.items()}
    assert names == {"base_color": "Crate_BaseColor.png", "normal": "Crate_Normal.png", "orm": "Crate_ORM.png",
                     "height": "Crate_Height.png"}  # fmt: skip
    assert gl.glb == "" and sorted(os.listdir(crate["out"] / "godot")) == sorted(names.values())
    maps = patterns()
    normal_gl = np.asarray(Image.open(texture_set.files["normal"]).convert("RGB"))
    normal_dx = np.asarray(Image.open(dx.texture_sets[0].files["normal"]).convert("RGB"))
    assert close(normal_gl, maps["normal"])
    assert close(normal_dx[..., 1], 255 - maps["normal"][..., 1]) and close(normal_dx[..., 0], maps["normal"][..., 0])
    height = Image.open(texture_set.files["height"])
    assert height.mode.startswith("I;16") or height.mode == "I", height.mode  # 16-bit grey
    assert close(np.asarray(height, dtype=np.int64) // 257, maps["height"])
    base = np.asarray(Image.open(texture_set.files["base_color"]).convert("RGB"))
    assert close(base, maps["albedo"])


def test_directx_source_normal_is_flipped_for_the_glb_and_kept_for_unreal(crate, tmp_path):
    (cube, plane) = crate["objects"]
    options = ApplyOptions(normal_directx=True, slot="REPLACE")
    materials.apply_images([cube, plane], crate["files"], options, "CrateDX")
    result = export.export_for_engines([cube], str(tmp_path / "dx"), engine="unreal")
    normal = patterns()["normal"]
    kept = np.asarray(Image.open(result.texture_sets[0].files["normal"]).convert("RGB"))
    assert close(kept, normal), "a DirectX map exported for Unreal stays as drawn"
    gltf, binary = read_glb(result.glb)
    in_glb = glb_image(gltf, binary, gltf["materials"][0]["normalTexture"]["index"])
    assert close(in_glb[..., 1], 255 - normal[..., 1]), "glTF normals are OpenGL"


def test_export_materials_use_srgb_colour_and_linear_data(crate):
    entry = export.write_texture_set(export.material_maps(crate["material"]), "Crate", str(crate["out"]), "gltf", 0,
                                     str(crate["out"]))  # fmt: skip
    with export.export_materials(crate["objects"], {crate["material"]: entry}) as temps:
        nodes = temps[crate["material"]].node_tree.nodes
        spaces = {node.name: node.image.colorspace_settings.name for node in nodes if node.type == "TEX_IMAGE"}
        assert crate["objects"][0].active_material == temps[crate["material"]]
    assert spaces == {"base_color": "sRGB", "orm": "Non-Color", "normal": "Non-Color"}


def snapshot() -> dict:
    slots = {obj.name: [(s.link, s.material.name if s.material else None) for s in obj.material_slots]
             for obj in bpy.data.objects}  # fmt: skip
    datablocks = {kind: sorted(item.name for item in getattr(bpy.data, kind))
                  for kind in ("materials", "images", "node_groups", "meshes", "textures")}  # fmt: skip
    selected = sorted(obj.name for obj in bpy.context.selected_objects)
    datablocks["modifiers"] = sorted(
        f"{obj.name}/{modifier.name}" for obj in bpy.data.objects for modifier in obj.modifiers
    )
    active = bpy.context.view_layer.objects.active
    return {"slots": slots, "data": datablocks, "selected": selected, "active": active.name if active else None}


def test_scene_is_unchanged_afterwards(crate):
    cube, plane = crate["objects"]
    plane.select_set(False)
    bpy.context.view_layer.objects.active = cube
    bpy.ops.mesh.primitive_uv_sphere_add(location=(0, 4, 0))  # a bystander that stays unselected and unexported
    cube.select_set(True)
    before, inputs = snapshot(), {path: Path(path).read_bytes() for path in crate["files"].values()}
    result = export.export_for_engines([cube, plane], str(crate["out"]), size=512)
    assert snapshot() == before
    assert {path: Path(path).read_bytes() for path in crate["files"].values()} == inputs
    assert not any(image.is_dirty for image in bpy.data.images)
    gltf, _ = read_glb(result.glb)
    assert sorted(node["name"] for node in gltf["nodes"]) == ["Cube", "Plane"]
    assert Image.open(result.texture_sets[0].files["orm"]).size == (512, 512)


def test_errors_name_the_problem(crate, tmp_path):
    with pytest.raises(SDTexError, match="engine must be one of gltf, unreal"):
        export.export_for_engines(crate["objects"], str(tmp_path), engine="cryengine")
    with pytest.raises(SDTexError, match="size must be one of"):
        export.export_for_engines(crate["objects"], str(tmp_path), size=300)
    (tmp_path / "file").write_text("")
    with pytest.raises(SDTexError, match="folder is a file"):
        export.export_for_engines(crate["objects"], str(tmp_path / "file"))
    bpy.ops.mesh.primitive_cube_add(location=(0, 0, 5))
    with pytest.raises(SDTexError, match="No generated material"):
        export.export_for_engines([bpy.context.active_object], str(tmp_path))
    with pytest.raises(SDTexError, match="select one or more mesh"):
        export.export_for_engines([], str(tmp_path))
    roughness = crate["material"].node_tree.nodes["Roughness"].image
    os.remove(crate["files"]["roughness"])
    roughness.reload()
    with pytest.raises(SDTexError, match="The roughness image of material 'Crate' has no pixels"):
        export.export_for_engines(crate["objects"], str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()  # checked before anything is written


def test_operator_reports_what_it_wrote_and_errors(crate, tmp_path):
    cube, plane = crate["objects"]
    for obj in (cube, plane):
        obj.select_set(True)
    folder = tmp_path / "op"
    assert bpy.ops.sdtex.export_for_engines(folder=str(folder), engine="unity", size="512") == {"FINISHED"}
    assert sorted(os.listdir(folder)) == ["Crate_BaseColor.png", "Crate_Height.png", "Crate_Normal.png",
                                          "Crate_ORM.png", "scene.glb"]  # fmt: skip
    assert Image.open(folder / "Crate_ORM.png").size == (512, 512)
    (tmp_path / "taken").write_text("")
    with pytest.raises(RuntimeError, match="folder cannot be made: .*taken is a file"):
        bpy.ops.sdtex.export_for_engines(folder=str(tmp_path / "taken" / "sub"))
    bpy.ops.object.select_all(action="DESELECT")
    assert not bpy.ops.sdtex.export_for_engines.poll()
    bpy.ops.mesh.primitive_cube_add(location=(0, 0, 5))  # selected, with no material
    with pytest.raises(RuntimeError, match="No generated material on the selected objects"):
        bpy.ops.sdtex.export_for_engines(folder=str(folder))


def test_orm_without_maps_takes_the_bsdf_values(crate, tmp_path):
    cube, _ = crate["objects"]
    files = {"albedo": crate["files"]["albedo"]}
    (material,) = materials.apply_images([cube], files, ApplyOptions(slot="REPLACE"), "Plain")
    bsdf = next(node for node in material.node_tree.nodes if node.type == "BSDF_PRINCIPLED")
    bsdf.inputs["Roughness"].default_value, bsdf.inputs["Metallic"].default_value = 0.25, 0.6
    result = export.export_for_engines([cube], str(tmp_path / "plain"))
    (texture_set,) = result.texture_sets
    assert sorted(texture_set.files) == ["base_color", "orm"]
    orm = np.asarray(Image.open(texture_set.files["orm"]).convert("RGB"))
    assert orm.shape == (SIZE, SIZE, 3)  # the albedo's size
    assert {tuple(pixel) for pixel in orm.reshape(-1, 3)} == {(255, 64, 153)}  # AO 1, 0.25 * 255, 0.6 * 255
    assert validate(result.glb)["issues"]["numWarnings"] == 0
