"""Materials built from generated maps, checked in real Blender (the bpy module): links, colour spaces,
slots, UVs, and the tiled preview. Images are small PNGs written with Pillow; no backend, no torch."""

import math
import os

import numpy as np
import pytest
from PIL import Image

bpy = pytest.importorskip("bpy")
from blender_sd_addon.blender.materials import ApplyOptions, apply_images, show_tile_preview  # noqa: E402


@pytest.fixture(autouse=True)
def empty_scene():
    bpy.ops.wm.read_factory_settings(use_empty=True)


@pytest.fixture
def maps(tmp_path) -> dict[str, str]:
    """All five maps as PNG files with different sizes, so a wrong image is easy to tell apart."""
    rng = np.random.default_rng(0)
    paths = {}
    for i, (kind, mode) in enumerate(
        [("albedo", "RGB"), ("height", "L"), ("normal", "RGB"), ("roughness", "L"), ("ao", "L")]
    ):
        shape = (6 + i, 8) if mode == "L" else (6 + i, 8, 3)
        path = tmp_path / f"{kind}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        paths[kind] = str(path)
    return paths


def add_cube(name: str = "Cube", location=(0.0, 0.0, 0.0)):
    bpy.ops.mesh.primitive_cube_add(size=2.0, location=location)
    obj = bpy.context.active_object
    obj.name = name
    return obj


def source(socket):
    """The node linked into an input socket (exactly one link)."""
    assert len(socket.links) == 1, f"{socket.node.name}.{socket.name} has {len(socket.links)} links"
    return socket.links[0].from_node


def source_socket(socket):
    assert len(socket.links) == 1
    return socket.links[0].from_socket


def nodes_of(material, bl_idname: str) -> list:
    return [node for node in material.node_tree.nodes if node.bl_idname == bl_idname]


def image_path(node) -> str:
    return os.path.realpath(bpy.path.abspath(node.image.filepath))


def principled(material):
    (bsdf,) = nodes_of(material, "ShaderNodeBsdfPrincipled")
    return bsdf


def output(material):
    (out,) = nodes_of(material, "ShaderNodeOutputMaterial")
    return out


def test_single_object_links_every_map_through_the_right_nodes(maps):
    cube = add_cube()
    (mat,) = apply_images([cube], maps, ApplyOptions(texture_scale=3.0), "Brick")

    assert mat.name == "Brick"
    assert cube.active_material == mat
    bsdf, out = principled(mat), output(mat)
    assert source(out.inputs["Surface"]) == bsdf
    assert not out.inputs["Displacement"].is_linked

    albedo = source(bsdf.inputs["Base Color"])
    assert albedo.bl_idname == "ShaderNodeTexImage" and image_path(albedo) == os.path.realpath(maps["albedo"])
    assert albedo.image.colorspace_settings.name == "sRGB"
    roughness = source(bsdf.inputs["Roughness"])
    assert image_path(roughness) == os.path.realpath(maps["roughness"])

    # Normal: normal map -> Normal Map node -> Bump (as its base normal) -> BSDF; height -> Bump height.
    bump = source(bsdf.inputs["Normal"])
    assert bump.bl_idname == "ShaderNodeBump"
    assert image_path(source(bump.inputs["Height"])) == os.path.realpath(maps["height"])
    normal_map = source(bump.inputs["Normal"])
    assert normal_map.bl_idname == "ShaderNodeNormalMap"
    assert image_path(source(normal_map.inputs["Color"])) == os.path.realpath(maps["normal"])

    textures = nodes_of(mat, "ShaderNodeTexImage")
    assert len(textures) == 5
    for texture in textures:
        expected = "sRGB" if texture == albedo else "Non-Color"
        assert texture.image.colorspace_settings.name == expected, texture.label
        assert texture.projection == "FLAT"
        mapping = source(texture.inputs["Vector"])
        assert mapping.bl_idname == "ShaderNodeMapping"
        assert texture.parent is not None and texture.parent.label == "Textures"
    assert tuple(mapping.inputs["Scale"].default_value) == pytest.approx((3.0, 3.0, 3.0))
    uv = source(mapping.inputs["Vector"])
    assert uv.bl_idname == "ShaderNodeUVMap" and uv.uv_map == cube.data.uv_layers.active.name
    assert bsdf.parent.label == "Surface"
    assert {t.label for t in textures} == {"Albedo", "Height", "Normal", "Roughness", "AO"}
    # AO stays available in the Textures frame but changes nothing unless multiplied in.
    assert not mat.node_tree.nodes["AO"].outputs["Color"].is_linked


def test_directx_normals_get_their_green_flipped_for_blender(maps):
    cube = add_cube()
    (mat,) = apply_images([cube], maps, ApplyOptions(normal_directx=True), "DX")
    normal_map = next(n for n in mat.node_tree.nodes if n.bl_idname == "ShaderNodeNormalMap")
    join = source(normal_map.inputs["Color"])
    assert join.bl_idname == "ShaderNodeCombineColor"
    flip = source(join.inputs["Green"])
    assert flip.bl_idname == "ShaderNodeMath" and flip.operation == "SUBTRACT"
    assert flip.inputs[0].default_value == 1.0
    split = source(flip.inputs[1])
    assert source_socket(flip.inputs[1]).name == "Green"
    assert source(join.inputs["Red"]) == split and source(join.inputs["Blue"]) == split
    assert image_path(source(split.inputs["Color"])) == os.path.realpath(maps["normal"])


def test_albedo_alone_makes_a_plain_material(maps):
    cube = add_cube()
    (mat,) = apply_images([cube], {"albedo": maps["albedo"]}, ApplyOptions(), "Plain")
    bsdf = principled(mat)
    assert image_path(source(bsdf.inputs["Base Color"])) == os.path.realpath(maps["albedo"])
    assert not bsdf.inputs["Normal"].is_linked and not bsdf.inputs["Roughness"].is_linked
    assert len(nodes_of(mat, "ShaderNodeTexImage")) == 1


@pytest.mark.parametrize("shared", [True, False])
def test_two_objects_share_one_material_or_get_one_each(maps, shared):
    a, b = add_cube("A"), add_cube("B", location=(3.0, 0.0, 0.0))
    made = apply_images([a, b], maps, ApplyOptions(shared_material=shared), "Stone")
    if shared:
        assert [m.name for m in made] == ["Stone"]
        assert a.active_material == b.active_material == made[0]
    else:
        assert [m.name for m in made] == ["Stone.A", "Stone.B"]
        assert (a.active_material, b.active_material) == (made[0], made[1])
    # Both use the same image datablocks: loaded once, not duplicated per material.
    albedo_images = {source(principled(m).inputs["Base Color"]).image for m in made}
    assert len(albedo_images) == 1


def test_box_projection_uses_object_coordinates_and_world_units_per_tile(maps):
    cube = add_cube()
    (mat,) = apply_images([cube], maps, ApplyOptions(projection="BOX", texture_scale=2.0), "Box")
    textures = nodes_of(mat, "ShaderNodeTexImage")
    assert len(textures) == 5
    for texture in textures:
        assert texture.projection == "BOX"
        assert 0.1 <= texture.projection_blend <= 0.3
        mapping = source(texture.inputs["Vector"])
    # One tile spans 2 world units: object coordinates are scaled by 1/2.
    assert tuple(mapping.inputs["Scale"].default_value) == pytest.approx((0.5, 0.5, 0.5))
    coords_socket = source_socket(mapping.inputs["Vector"])
    assert coords_socket.node.bl_idname == "ShaderNodeTexCoord" and coords_socket.name == "Object"


def test_true_displacement_feeds_the_material_output(maps):
    cube = add_cube()
    (mat,) = apply_images([cube], maps, ApplyOptions(displacement="DISPLACEMENT"), "Displaced")
    bsdf, out = principled(mat), output(mat)
    displacement = source(out.inputs["Displacement"])
    assert displacement.bl_idname == "ShaderNodeDisplacement"
    assert image_path(source(displacement.inputs["Height"])) == os.path.realpath(maps["height"])
    assert source(bsdf.inputs["Normal"]).bl_idname == "ShaderNodeNormalMap"
    assert not nodes_of(mat, "ShaderNodeBump")
    assert mat.displacement_method == "BOTH"


def test_ao_multiply_darkens_the_base_colour(maps):
    cube = add_cube()
    (mat,) = apply_images([cube], maps, ApplyOptions(ao_multiply=True), "Occluded")
    mix = source(principled(mat).inputs["Base Color"])
    assert mix.bl_idname == "ShaderNodeMix"
    assert (mix.data_type, mix.blend_type) == ("RGBA", "MULTIPLY")
    linked = {s.identifier: image_path(source(s)) for s in mix.inputs if s.is_linked}
    assert linked == {"A_Color": os.path.realpath(maps["albedo"]), "B_Color": os.path.realpath(maps["ao"])}
    factor = next(s for s in mix.inputs if s.identifier == "Factor_Float")
    assert factor.default_value == pytest.approx(1.0)


def test_slot_new_keeps_the_old_material_in_its_slot(maps):
    cube = add_cube()
    old = bpy.data.materials.new("Old")
    cube.data.materials.append(old)
    (mat,) = apply_images([cube], maps, ApplyOptions(slot="NEW"), "Fresh")
    assert [slot.material for slot in cube.material_slots] == [old, mat]
    assert cube.active_material_index == 1
    assert {p.material_index for p in cube.data.polygons} == {1}


def test_slot_replace_keeps_the_old_material_alive_after_save_and_reload(maps, tmp_path):
    cube = add_cube()
    old = bpy.data.materials.new("Old")
    cube.data.materials.append(old)
    apply_images([cube], maps, ApplyOptions(slot="REPLACE"), "Fresh")
    assert [slot.material.name for slot in cube.material_slots] == ["Fresh"]

    path = str(tmp_path / "scene.blend")
    bpy.ops.wm.save_as_mainfile(filepath=path)
    bpy.ops.wm.open_mainfile(filepath=path)
    assert "Old" in bpy.data.materials  # nothing uses it, yet it survived the save
    assert [slot.material.name for slot in bpy.data.objects["Cube"].material_slots] == ["Fresh"]


def test_slot_reuse_fills_the_slot_it_made_before_and_leaves_the_artists_alone(maps):
    cube = add_cube()
    old = bpy.data.materials.new("Old")
    cube.data.materials.append(old)
    (first,) = apply_images([cube], maps, ApplyOptions(slot="REUSE"), "Try 1")
    assert [slot.material for slot in cube.material_slots] == [old, first]  # the first time: a new slot
    cube.active_material_index = 0  # the artist looks at their own slot meanwhile
    for attempt in range(2, 7):  # six tries in all
        (made,) = apply_images([cube], maps, ApplyOptions(slot="REUSE"), f"Try {attempt}")
    assert [slot.material for slot in cube.material_slots] == [old, made]  # still two slots
    assert made.name == "Try 6" and cube.active_material_index == 1
    assert {p.material_index for p in cube.data.polygons} == {1}


def test_slot_replace_on_an_object_without_slots_adds_one(maps):
    cube = add_cube()
    (mat,) = apply_images([cube], maps, ApplyOptions(slot="REPLACE"), "Fresh")
    assert [slot.material for slot in cube.material_slots] == [mat]


def test_pack_stores_the_images_in_the_blend(maps):
    cube = add_cube()
    (mat,) = apply_images([cube], maps, ApplyOptions(pack=True), "Packed")
    assert all(t.image.packed_file is not None for t in nodes_of(mat, "ShaderNodeTexImage"))


def test_non_meshes_are_skipped_and_no_mesh_is_an_error(maps):
    cube = add_cube()
    empty = bpy.data.objects.new("Empty", None)
    bpy.context.scene.collection.objects.link(empty)
    (mat,) = apply_images([empty, cube], maps, ApplyOptions(), "OnlyMeshes")
    assert cube.active_material == mat
    with pytest.raises(ValueError, match="mesh"):
        apply_images([empty], maps, ApplyOptions(), "Nothing")


def test_mesh_without_uvs_gets_a_box_projected_uv_map(maps):
    # A 2 x 2 x 2 cube built from data has no UV map.
    verts = [(x, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    mesh = bpy.data.meshes.new("Bare")
    mesh.from_pydata(verts, [], faces)
    obj = bpy.data.objects.new("Bare", mesh)
    bpy.context.scene.collection.objects.link(obj)
    assert len(mesh.uv_layers) == 0

    apply_images([obj], maps, ApplyOptions(), "Unwrapped")
    assert len(mesh.uv_layers) == 1
    uvs = mesh.uv_layers.active.data
    for polygon in mesh.polygons:
        corners = [tuple(uvs[i].uv) for i in polygon.loop_indices]
        edges = zip(corners, corners[1:] + corners[:1], strict=True)
        area = 0.5 * abs(sum(u0 * v1 - u1 * v0 for (u0, v0), (u1, v1) in edges))  # shoelace formula
        # Each 2 x 2 face, scaled so the cube's 2-unit side spans one UV unit, covers exactly 1.
        assert area == pytest.approx(1.0, abs=1e-5), polygon.index
        assert all(math.isfinite(c) for corner in corners for c in corner)


def test_existing_uvs_are_left_untouched(maps):
    cube = add_cube()
    before = [tuple(d.uv) for d in cube.data.uv_layers.active.data]
    apply_images([cube], maps, ApplyOptions(), "Kept")
    assert len(cube.data.uv_layers) == 1
    assert [tuple(d.uv) for d in cube.data.uv_layers.active.data] == before


def test_tile_preview_repeats_the_tile_and_shows_it(tmp_path):
    rng = np.random.default_rng(1)
    tile = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "tile.png"
    Image.fromarray(tile, "RGB").save(path)
    area = bpy.context.window_manager.windows[0].screen.areas[0]
    area.type = "IMAGE_EDITOR"

    preview = show_tile_preview(str(path), repeat=2)
    assert preview.name == "tile 2x2"
    assert tuple(preview.size) == (14, 10)
    pixels = np.empty(14 * 10 * 4, dtype=np.float32)
    preview.pixels.foreach_get(pixels)
    # Blender stores rows bottom to top; the expected image is Pillow's tile repeated 2 x 2, flipped.
    expected = np.flipud(np.tile(tile, (2, 2, 1))).astype(np.float32) / 255.0
    np.testing.assert_allclose(pixels.reshape(10, 14, 4)[..., :3], expected, atol=1.5 / 255)
    assert area.spaces.active.image == preview

    # Calling again with another repeat makes a matching image; the same repeat reuses its preview.
    assert tuple(show_tile_preview(str(path), repeat=3).size) == (21, 15)
    assert show_tile_preview(str(path), repeat=2) == preview


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("slot", "APPEND"),
        ("projection", "SPHERE"),
        ("displacement", "PARALLAX"),
        ("texture_scale", 0.0),
        ("texture_scale", float("nan")),
        ("texture_scale", "2"),
    ],
)
def test_bad_option_names_itself(option, value):
    with pytest.raises(ValueError, match=option):
        ApplyOptions(**{option: value})


def test_bad_maps_are_refused_by_name(maps):
    cube = add_cube()
    with pytest.raises(ValueError, match="albedo"):
        apply_images([cube], {"height": maps["height"]}, ApplyOptions(), "NoAlbedo")
    with pytest.raises(ValueError, match="specular"):
        apply_images([cube], {**maps, "specular": maps["height"]}, ApplyOptions(), "Unknown")
    with pytest.raises(ValueError, match="roughness map not found"):
        apply_images([cube], {**maps, "roughness": maps["height"] + ".missing"}, ApplyOptions(), "Missing")
    with pytest.raises(ValueError, match="repeat"):
        show_tile_preview(maps["albedo"], repeat=0)
    assert not cube.material_slots  # refused before anything was made


def test_linked_duplicates_get_one_new_slot_not_two(maps):
    a = add_cube("A")
    b = bpy.data.objects.new("B", a.data)  # shares A's mesh, as Alt+D makes it
    bpy.context.scene.collection.objects.link(b)
    (mat,) = apply_images([a, b], maps, ApplyOptions(slot="NEW"), "Linked")
    assert [slot.material for slot in a.material_slots] == [mat]
    assert b.active_material == mat


def uvs_of(mesh) -> list[tuple[float, float]]:
    return [tuple(round(c, 5) for c in d.uv) for d in mesh.uv_layers.active.data]


def test_objects_in_edit_mode_keep_their_material_uvs_and_faces_after_leaving_it(maps):
    """Edit Mode holds its own copy of the mesh and overwrites the mesh on leaving: the UV map and the face
    assignments go into that copy, and come out the same as in Object Mode."""
    reference = add_cube("Reference")
    reference.data.uv_layers.remove(reference.data.uv_layers[0])
    apply_images([reference], maps, ApplyOptions(), "InObjectMode")
    cube = add_cube("Editing")
    cube.data.uv_layers.remove(cube.data.uv_layers[0])
    cube.data.materials.append(bpy.data.materials.new("Old"))
    bpy.ops.object.mode_set(mode="EDIT")

    (mat,) = apply_images([cube], maps, ApplyOptions(), "InEditMode")
    bpy.ops.object.mode_set(mode="OBJECT")

    assert [slot.material for slot in cube.material_slots] == [bpy.data.materials["Old"], mat]
    assert {p.material_index for p in cube.data.polygons} == {1}
    assert uvs_of(cube.data) == uvs_of(reference.data)


def test_an_image_datablock_is_used_as_it_is(maps):
    artist = bpy.data.images.load(maps["albedo"])
    artist.colorspace_settings.name = "Linear Rec.709"
    cube = add_cube()
    (mat,) = apply_images([cube], {"albedo": artist, "height": maps["height"]}, ApplyOptions(pack=True), "Mine")
    assert source(principled(mat).inputs["Base Color"]).image == artist
    assert artist.colorspace_settings.name == "Linear Rec.709" and artist.packed_file is None
    assert mat.node_tree.nodes["Height"].image.packed_file is not None  # files this add-on wrote are packed
