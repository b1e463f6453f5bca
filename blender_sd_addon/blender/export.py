"""Export for game engines, the Blender side: texture sets (BaseColor, Normal, ORM, Height PNGs) of the generated
materials on some objects, and a GLB of the objects with those maps.

The maps are read from the materials material_nodes.py builds (Image Texture nodes named "Albedo", "Roughness",
"Metallic", "Normal", "Height", "AO"); channels are packed with image pixel arrays (stdlib `array`, no numpy: Debian's
Blender 3.4 has none). The GLB is written by glTF-Blender-IO from TEMPORARY materials wired the way its exporter reads
them (ORM through a Separate Color node, occlusion into a "glTF Material Output" group); the user's materials are put
back in their slots afterwards and every datablock made here is removed again. Blender 3.4 to 5.x.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import bpy

from .. import engine_export
from ..client import SDTexError
from ..engine_export import ExportResult, TextureSet
from .materials import MAP_LABELS, MATERIAL_KEY

GLTF_ADDON = "io_scene_gltf2"
GLTF_GROUP = "glTF Material Output"  # glTF-Blender-IO reads Occlusion from a group whose name starts with this
# glTF's own normal textures are OpenGL (green up), whatever the engine preset says.
GLB_OPTIONS = {
    "export_format": "GLB",
    "use_selection": True,
    "export_tangents": True,  # else the validator warns MESH_PRIMITIVE_GENERATED_TANGENT_SPACE per primitive
    "export_image_format": "AUTO",
    "export_materials": "EXPORT",
    "export_apply": True,  # the modifiers, as rendered (engines get what Blender shows), and _ngons_triangulated's
}


@dataclass
class MaterialMaps:
    """What a generated material's node tree says about its maps."""

    images: dict  # kind ("albedo", "roughness", "metallic", "normal", "height", "ao") -> Image
    roughness: float  # the BSDF's values, for the channels without a map
    metallic: float
    directx_normal: bool  # the normal image is green down (the tree flips it for Blender)
    uv_name: str  # "" = the render-active UV map
    scale: float  # UV repeats (the Mapping node's); box projection exports one tile across the UV map


@dataclass
class _Written:
    """A texture set and the images its GLB material shows (kind -> path; the OpenGL normal may be a scratch file)."""

    texture_set: TextureSet
    maps: MaterialMaps
    glb_files: dict[str, str] = field(default_factory=dict)


def export_for_engines(
    objects, folder: str, *, engine: str = "gltf", size: int = 0, glb: bool = True, name: str = engine_export.GLB_NAME
) -> ExportResult:
    """Write a texture set per generated material on the mesh `objects` into `folder` and (glb=True) `<name>.glb`
    of the objects. Raises SDTexError naming the parameter or the problem before anything is written."""
    # 1. Check inputs
    try:
        engine_export.check_options(engine, size, folder, name)
    except ValueError as exc:
        raise SDTexError(str(exc)) from None
    meshes = [obj for obj in objects if obj.type == "MESH"]
    if not meshes:
        raise SDTexError("Nothing to export: select one or more mesh objects")
    if glb and importlib.util.find_spec("numpy") is None:  # only looked for: glTF-Blender-IO imports it, not us
        raise SDTexError(
            "The GLB needs Blender's glTF exporter, which needs numpy, missing in this Blender (Debian: apt install "
            "python3-numpy); export the texture sets alone (GLB off) meanwhile"
        )
    materials = generated_materials(meshes)
    if not materials:
        raise SDTexError("No generated material on the selected objects: apply a texture first")
    all_maps = {material: material_maps(material) for material in materials}
    folder = os.path.abspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise SDTexError(f"folder cannot be made: {exc}") from None

    # 2. One texture set per material (not per object), then the GLB from the same files
    stems = engine_export.texture_set_stems([material.name for material in materials])
    with tempfile.TemporaryDirectory(prefix="sdtex-export-") as scratch:
        written = {
            material: write_texture_set(all_maps[material], stems[material.name], folder, engine, size, scratch)
            for material in materials
        }
        glb_path = os.path.join(folder, f"{name}.glb") if glb else ""
        if glb:
            export_glb(meshes, written, glb_path)
    sets = [entry.texture_set for entry in written.values()]
    return ExportResult(engine, folder, glb_path, sets, [obj.name for obj in meshes])


def generated_materials(objects) -> list:
    """The distinct materials the add-on made on the objects' slots, in slot order."""
    found = []
    for obj in objects:
        for slot in obj.material_slots:
            material = slot.material
            if material is not None and MATERIAL_KEY in material and material not in found:
                found.append(material)
    return found


def material_maps(material) -> MaterialMaps:
    """Read a generated material's maps and values (SDTexError when its albedo is gone)."""
    nodes = material.node_tree.nodes
    images = {}
    for kind, label in MAP_LABELS.items():
        texture = nodes.get(label)
        if texture is not None and texture.type == "TEX_IMAGE" and texture.image is not None:
            if tuple(texture.image.size) == (0, 0):  # reading the size loads a file image
                raise SDTexError(f"The {kind} image of material {material.name!r} has no pixels (file missing?)")
            images[kind] = texture.image
    if "albedo" not in images:
        raise SDTexError(f"Material {material.name!r} has no Albedo image texture to export")
    bsdf = next((node for node in nodes if node.type == "BSDF_PRINCIPLED"), None)
    values = [bsdf.inputs[socket].default_value if bsdf else default for socket, default in
              (("Roughness", 0.5), ("Metallic", 0.0))]  # fmt: skip
    mapping = nodes.get("Mapping")
    uv_node = nodes.get("UV Map")
    return MaterialMaps(
        images,
        roughness=float(values[0]),
        metallic=float(values[1]),
        directx_normal=_flips_green(nodes.get("Normal")),
        uv_name=uv_node.uv_map if uv_node is not None and uv_node.type == "UVMAP" else "",
        scale=float(mapping.inputs["Scale"].default_value[0]) if uv_node is not None and mapping is not None else 1.0,
    )


def _flips_green(texture) -> bool:
    """A DirectX normal image: material_nodes flips its green with a Separate Color right after the texture."""
    if texture is None:
        return False
    return any(link.to_node.type in ("SEPARATE_COLOR", "SEPRGB") for link in texture.outputs["Color"].links)


# --- Texture sets ---------------------------------------------------------------------------------------------------


def write_texture_set(maps: MaterialMaps, stem: str, folder: str, engine: str, size: int, scratch: str) -> _Written:
    """The PNGs of one material: BaseColor (sRGB), Normal (the engine's convention), ORM, Height (16-bit)."""
    images = maps.images
    entry = _Written(TextureSet(stem), maps)
    files = entry.texture_set.files

    def path(kind: str) -> str:
        return os.path.join(folder, engine_export.file_name(stem, kind))

    albedo = images["albedo"]
    width, height = engine_export.scaled_size(*albedo.size, size)
    files["base_color"] = _save_png(_rgba(albedo, width, height), width, height, path("base_color"), albedo.is_float)
    entry.glb_files["base_color"] = files["base_color"]

    if "normal" in images:
        entry.glb_files["normal"] = files["normal"] = _write_normal(maps, engine, size, path("normal"))
        if engine_export.ENGINES[engine].directx_normals:  # the GLB still needs the OpenGL one
            gl_path = os.path.join(scratch, engine_export.file_name(stem, "normal"))
            entry.glb_files["normal"] = _write_normal(maps, "gltf", size, gl_path)

    data_maps = [images[kind] for kind in ("ao", "roughness", "metallic") if kind in images]
    orm_source = data_maps[0] if data_maps else albedo
    width, height = engine_export.scaled_size(*orm_source.size, size)
    entry.glb_files["orm"] = files["orm"] = _save_png(_orm(maps, width, height), width, height, path("orm"))

    if "height" in images:
        source = images["height"]
        width, height = engine_export.scaled_size(*source.size, size)
        grey = _channel(source, width, height, 0)
        with open(path("height"), "wb") as out:
            out.write(engine_export.encode_gray16(width, height, grey, bottom_up=True))
        files["height"] = path("height")
    return entry


def _write_normal(maps: MaterialMaps, engine: str, size: int, path: str) -> str:
    source = maps.images["normal"]
    width, height = engine_export.scaled_size(*source.size, size)
    pixels = _rgba(source, width, height)
    if engine_export.flips_green(maps.directx_normal, engine):
        pixels[1::4] = array("f", [1.0 - green for green in pixels[1::4]])
    return _save_png(pixels, width, height, path)


def _orm(maps: MaterialMaps, width: int, height: int) -> array:
    """R = AO (1 without a map), G = roughness, B = metallic (the BSDF's values without maps), A = 1."""
    count = width * height
    packed = array("f", [1.0]) * (count * 4)
    for channel, kind, constant in ((0, "ao", 1.0), (1, "roughness", maps.roughness), (2, "metallic", maps.metallic)):
        image = maps.images.get(kind)
        packed[channel::4] = _channel(image, width, height, 0) if image else array("f", [constant]) * count
    return packed


def _pixels(image, width: int, height: int) -> tuple[array, int]:
    """The image's pixels at width x height (a scaled copy when the size differs; the image itself is untouched)
    and its channel count. Rows bottom to top, as Blender stores them."""
    source = image
    if tuple(image.size) != (width, height):
        source = image.copy()
        source.scale(width, height)
    try:
        channels = source.channels
        pixels = array("f", [0.0]) * (width * height * channels)
        source.pixels.foreach_get(pixels)
    finally:
        if source is not image:
            bpy.data.images.remove(source)
    return pixels, channels


def _channel(image, width: int, height: int, channel: int) -> array:
    pixels, channels = _pixels(image, width, height)
    return pixels[min(channel, channels - 1) :: channels]


def _rgba(image, width: int, height: int) -> array:
    """The image's pixels as RGBA (grey and RGB images widened; alpha 1 where there is none)."""
    pixels, channels = _pixels(image, width, height)
    if channels == 4:
        return pixels
    rgba = array("f", [1.0]) * (width * height * 4)
    for channel in range(3):
        rgba[channel::4] = pixels[min(channel, channels - 1) :: channels]
    return rgba


def _save_png(pixels: array, width: int, height: int, path: str, is_float: bool = False) -> str:
    """Write RGBA floats as an 8-bit PNG through a scratch image (Blender rounds to bytes: k/255 comes back as k).
    A float source (linear colour) keeps a float scratch image, so saving encodes it to sRGB."""
    image = bpy.data.images.new(f"sdtex-export-{os.path.basename(path)}", width, height, alpha=True,
                                float_buffer=is_float)  # fmt: skip
    try:
        image.pixels.foreach_set(pixels)
        image.filepath_raw = path
        image.file_format = "PNG"
        image.save()
    finally:
        bpy.data.images.remove(image)
    return path


# --- GLB --------------------------------------------------------------------------------------------------------------


def export_glb(meshes, written: dict, path: str) -> None:
    """Export the meshes as a GLB with each generated material replaced by its texture set's export material."""
    if GLTF_ADDON not in bpy.context.preferences.addons:  # shipped with Blender, on by default; a user may turn it off
        bpy.ops.preferences.addon_enable(module=GLTF_ADDON)
    with _only_selected(meshes), export_materials(meshes, written), _ngons_triangulated(meshes):
        bpy.ops.export_scene.gltf(filepath=path, **GLB_OPTIONS)


@contextmanager
def _ngons_triangulated(meshes) -> Iterator[None]:
    """A Triangulate modifier, last in the stack, on the meshes with faces of 5+ corners while exporting: Blender
    computes tangents for triangles and quads only, and without tangents the validator warns
    MESH_PRIMITIVE_GENERATED_TANGENT_SPACE (seen on a cylinder's caps). Removed again afterwards."""
    added = []
    try:
        for obj in meshes:
            if any(polygon.loop_total > 4 for polygon in obj.data.polygons):
                modifier = obj.modifiers.new("sdtex-export-triangulate", "TRIANGULATE")
                modifier.min_vertices = 5  # triangles and quads stay as they are
                added.append((obj, modifier))
        yield
    finally:
        for obj, modifier in added:
            obj.modifiers.remove(modifier)


@contextmanager
def _only_selected(objects) -> Iterator[None]:
    """Select exactly `objects` (the exporter's use_selection) and give the selection and the active object back."""
    view_layer = bpy.context.view_layer
    before = [obj for obj in view_layer.objects if obj.select_get()]
    active = view_layer.objects.active
    missing = [obj.name for obj in objects if obj.name not in view_layer.objects]
    if missing:
        raise SDTexError(f"Objects not in the view layer cannot be exported: {', '.join(missing)}")
    try:
        for obj in before:
            obj.select_set(False)
        for obj in objects:
            obj.select_set(True)
        yield
    finally:
        for obj in view_layer.objects:
            obj.select_set(obj in before)
        view_layer.objects.active = active


@contextmanager
def export_materials(meshes, written: dict) -> Iterator[dict]:
    """The generated materials' slots on `meshes` show export materials (material -> its export material, yielded)
    while the block runs; afterwards the slots hold the user's materials again and the export materials, their
    images and the glTF group are removed."""
    made: list = []  # (bpy.data collection, datablock) to remove
    renamed: list[tuple] = []  # (material, its name)
    swapped: list[tuple] = []  # (slot, the material it held)
    try:
        group = _gltf_group(made)
        temps = {
            material: _export_material(material, entry, group, made, renamed) for material, entry in written.items()
        }
        for obj in meshes:
            for slot in obj.material_slots:
                if slot.material in temps:
                    swapped.append((slot, slot.material))
                    slot.material = temps[slot.material]
        yield temps
    finally:
        for slot, material in reversed(swapped):
            slot.material = material
        for collection, datablock in reversed(made):
            collection.remove(datablock)
        for material, name in renamed:
            material.name = name


def _gltf_group(made: list):
    """The node group whose Occlusion input glTF-Blender-IO exports (a new one, removed afterwards)."""
    group = bpy.data.node_groups.new(GLTF_GROUP, "ShaderNodeTree")
    made.append((bpy.data.node_groups, group))
    if hasattr(group, "interface"):  # Blender 4.0+
        group.interface.new_socket("Occlusion", in_out="INPUT", socket_type="NodeSocketFloat")
    else:
        group.inputs.new("NodeSocketFloat", "Occlusion")
    group.nodes.new("NodeGroupInput")
    group.nodes.new("NodeGroupOutput")
    return group


def _export_material(material, entry: _Written, group, made: list, renamed: list):
    """A material glTF-Blender-IO exports as the texture set: base colour, ORM (occlusion, roughness, metallic from
    one image) and the OpenGL normal, under the user's material's name."""
    export = bpy.data.materials.new(f"sdtex-export-{material.name}")
    made.append((bpy.data.materials, export))
    if not material.library:  # the GLB names the material as the user does: lend the name while exporting
        renamed.append((material, material.name))
        name, material.name = material.name, f"sdtex-export-original-{material.name}"
        export.name = name
    if bpy.app.version < (5, 0, 0):
        export.use_nodes = True
    nodes, links = export.node_tree.nodes, export.node_tree.links
    nodes.clear()
    bsdf = nodes.new("ShaderNodeBsdfPrincipled")
    links.new(bsdf.outputs["BSDF"], nodes.new("ShaderNodeOutputMaterial").inputs["Surface"])
    vector = _coordinates(nodes, links, entry.maps)

    def texture(kind: str, colorspace: str):
        image = bpy.data.images.load(entry.glb_files[kind], check_existing=False)
        made.append((bpy.data.images, image))
        image.colorspace_settings.name = colorspace
        node = nodes.new("ShaderNodeTexImage")
        node.name = node.label = kind
        node.image = image
        if vector is not None:
            links.new(vector, node.inputs["Vector"])
        return node.outputs["Color"]

    links.new(texture("base_color", "sRGB"), bsdf.inputs["Base Color"])
    split = nodes.new("ShaderNodeSeparateColor")  # glTF-Blender-IO 3.4+ reads channels through it
    links.new(texture("orm", "Non-Color"), split.inputs["Color"])
    occlusion = nodes.new("ShaderNodeGroup")
    occlusion.node_tree = group
    links.new(split.outputs["Red"], occlusion.inputs["Occlusion"])
    links.new(split.outputs["Green"], bsdf.inputs["Roughness"])
    links.new(split.outputs["Blue"], bsdf.inputs["Metallic"])
    if "normal" in entry.glb_files:
        normal_map = nodes.new("ShaderNodeNormalMap")
        normal_map.uv_map = entry.maps.uv_name
        links.new(texture("normal", "Non-Color"), normal_map.inputs["Color"])
        links.new(normal_map.outputs["Normal"], bsdf.inputs["Normal"])
    return export


def _coordinates(nodes, links, maps: MaterialMaps):
    """The UV map and repeats of the user's material (glTF: the texcoord and KHR_texture_transform), or None for
    the render-active map as it is."""
    if not maps.uv_name and maps.scale == 1.0:
        return None
    uv = nodes.new("ShaderNodeUVMap")
    uv.uv_map = maps.uv_name
    if maps.scale == 1.0:
        return uv.outputs["UV"]
    mapping = nodes.new("ShaderNodeMapping")
    mapping.inputs["Scale"].default_value = (maps.scale, maps.scale, 1.0)
    links.new(uv.outputs["UV"], mapping.inputs["Vector"])
    return mapping.outputs["Vector"]
