"""Generated images -> Blender materials: material slots, UVs, reuse of the material made before, a tiled preview.

The node tree itself is built in material_nodes.py. Blender's own API only (no operators), so it runs the same in
the UI and in `blender -b` scripts; Blender 3.4 to 5.x.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Sequence

import bmesh
import bpy

from .material_nodes import (  # noqa: F401  (re-exported: callers import them from here)
    DISPLACEMENTS,
    MAP_KINDS,
    MAP_LABELS,
    PROJECTIONS,
    SLOT_MODES,
    TEXTURE_SCALE_MAX,
    TEXTURE_SCALE_MIN,
    ApplyOptions,
    build_material,
)

MATERIAL_KEY = "sdtex_made_from"  # custom property: the images and options a material was built from


def apply_images(
    objects, maps: dict[str, str | bpy.types.Image], options: ApplyOptions, name: str,
    sources: dict[str, str] | None = None,
) -> list[bpy.types.Material]:  # fmt: skip
    """Build materials from images and assign them to the mesh objects among `objects`.

    `maps` holds "albedo" (required) and optionally "height", "normal", "roughness", "metallic", "ao" -> a file path
    (loaded with the colour space its kind needs, packed when options.pack is set) or an Image datablock
    (an artist's image, used as it is: never recoloured or packed). Normal maps are expected in OpenGL
    convention (green up), as Blender reads them. Objects that are not meshes are skipped (callers report
    them); a ValueError is raised when none is a mesh. Objects in Edit Mode get their UVs and face
    assignments in the edit mesh, so leaving Edit Mode keeps them.
    `sources` (kind -> "classical" | "model:<model id>", a record's map_sources) label the textures with where
    each map came from. Returns the materials made: one named `name`, or one per object named `name.ObjectName`.
    """
    # 1. Check inputs
    meshes = [obj for obj in objects if obj.type == "MESH"]
    if not meshes:
        raise ValueError("no mesh among the objects: select at least one mesh object")
    unknown = sorted(set(maps) - set(MAP_KINDS))
    if unknown:
        raise ValueError(f"unknown map kind(s) {', '.join(unknown)}; accepted: {', '.join(MAP_KINDS)}")
    if not maps.get("albedo"):
        raise ValueError("maps must contain an 'albedo' image (a file path or an Image)")
    for kind, source in maps.items():
        if isinstance(source, str) and not os.path.isfile(source):
            raise ValueError(f"{kind} map not found: {source}")

    # 2. Load files as their own datablocks: a user's images are reused or left alone, never overwritten
    images = {
        kind: load_image(source, kind, options.pack) if isinstance(source, str) else source
        for kind, source in maps.items()
    }

    # 3. Every mesh gets a UV map when it has none: UV projection reads it, and the Normal Map node's
    #    tangent space needs one even with box projection.
    for obj in meshes:
        ensure_uv_map(obj.data)

    # 4. Build the materials and put them in the objects' slots
    if options.shared_material:
        material = _material(name, images, options, _common_uv_name(meshes), sources or {})
        for obj in meshes:
            _assign(obj, material, options.slot)
        return [material]
    materials = []
    for obj in meshes:
        material = _material(f"{name}.{obj.name}", images, options, _common_uv_name([obj]), sources or {})
        _assign(obj, material, options.slot)
        materials.append(material)
    return materials


def show_tile_preview(image_path: str, repeat: int = 2) -> bpy.types.Image:
    """Make (or refresh) an image "<stem> NxN" repeating the tile, and show it in every Image Editor."""
    if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= 8:
        raise ValueError(f"repeat must be an integer in [1, 8]; got {repeat!r}")
    if not os.path.isfile(image_path):
        raise ValueError(f"image not found: {image_path}")

    # 1. Read the tile's pixels (RGBA floats, rows bottom to top as Blender stores them)
    tile = bpy.data.images.load(image_path, check_existing=True)
    width, height = tile.size
    pixels = _floats(width * height * 4)
    tile.pixels.foreach_get(pixels)

    # 2. Repeat each row across, then the whole block up, into the preview (reused when it exists)
    row = width * 4
    block = array("f")
    for y in range(height):
        block.extend(pixels[y * row : (y + 1) * row] * repeat)
    preview_name = f"{os.path.splitext(os.path.basename(image_path))[0]} {repeat}x{repeat}"
    preview = bpy.data.images.get(preview_name)
    if preview is None:
        preview = bpy.data.images.new(preview_name, width * repeat, height * repeat, alpha=True)
    elif tuple(preview.size) != (width * repeat, height * repeat):
        preview.scale(width * repeat, height * repeat)
    preview.colorspace_settings.name = tile.colorspace_settings.name
    preview.pixels.foreach_set(block * repeat)
    preview.update()
    preview.pack()  # held in the .blend, not "modified": quitting never asks to save a helper image

    # 3. Show it wherever an Image Editor is open
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type == "IMAGE_EDITOR":
                area.spaces.active.image = preview
    return preview


def ensure_uv_map(mesh: bpy.types.Mesh) -> bpy.types.MeshUVLoopLayer:
    """Return the mesh's active UV map, making a box-projected one first when it has none.

    Each face is projected along the axis its normal is closest to (the layout Blender's box
    projection uses too), scaled so the largest side of the mesh spans one UV unit; the texture
    scale then counts repeats across the object. Pure data access, no operators; in Edit Mode the
    map is written into the edit mesh, which Blender copies back to the mesh on leaving.
    """
    if mesh.uv_layers:
        return mesh.uv_layers.active or mesh.uv_layers[0]
    uv_layer = mesh.uv_layers.new(name="UVMap")  # in Edit Mode Blender adds it to the edit mesh
    if mesh.is_editmode:
        edit = bmesh.from_edit_mesh(mesh)
        layer = edit.loops.layers.uv[uv_layer.name]
        co = array("f", [c for vert in edit.verts for c in vert.co])
        uvs = _box_uvs(co, ((face.normal, [loop.vert.co for loop in face.loops]) for face in edit.faces))
        for i, loop in enumerate(loop for face in edit.faces for loop in face.loops):
            loop[layer].uv = uvs[2 * i : 2 * i + 2]
        bmesh.update_edit_mesh(mesh)
        return uv_layer

    co = _floats(len(mesh.vertices) * 3)
    mesh.vertices.foreach_get("co", co)
    normals = _floats(len(mesh.polygons) * 3)
    mesh.polygons.foreach_get("normal", normals)
    loop_starts = array("i", [0]) * len(mesh.polygons)
    mesh.polygons.foreach_get("loop_start", loop_starts)
    loop_totals = array("i", [0]) * len(mesh.polygons)
    mesh.polygons.foreach_get("loop_total", loop_totals)
    loop_verts = array("i", [0]) * len(mesh.loops)
    mesh.loops.foreach_get("vertex_index", loop_verts)
    faces = (
        (normals[3 * face : 3 * face + 3], [co[3 * v : 3 * v + 3] for v in loop_verts[start : start + total]])
        for face, (start, total) in enumerate(zip(loop_starts, loop_totals, strict=True))
    )
    uv_layer.data.foreach_set("uv", _box_uvs(co, faces))
    return uv_layer


def _box_uvs(co: array, faces: Iterable[tuple[Sequence[float], list[Sequence[float]]]]) -> array:
    """Box-projected UVs, two floats per loop in face order: `co` holds every vertex (x, y, z, ...) for the
    bounds, `faces` each face's normal and corner positions."""
    if not co:  # an empty mesh
        return array("f")
    low = [min(co[axis::3]) for axis in range(3)]
    extent = max(max(co[axis::3]) - low[axis] for axis in range(3)) or 1.0
    uvs = array("f")
    for normal, corners in faces:
        axis = max(range(3), key=lambda i: abs(normal[i]))
        sign = 1.0 if normal[axis] >= 0.0 else -1.0
        for corner in corners:
            x, y, z = ((corner[i] - low[i]) / extent for i in range(3))
            # u is flipped on faces looking down an axis, so the image is never mirrored.
            if axis == 0:
                uvs.extend((sign * y, z))
            elif axis == 1:
                uvs.extend((-sign * x, z))
            else:
                uvs.extend((x, sign * y))
    return uvs


def _floats(count: int) -> array:
    """A float32 buffer for foreach_get/foreach_set (stdlib: Debian's Blender has no numpy)."""
    return array("f", [0.0]) * count


def load_image(path: str, kind: str, pack: bool = False) -> bpy.types.Image:
    """The image of a map file (the datablock already showing it, when there is one)."""
    image = bpy.data.images.load(path, check_existing=True)
    # Only colour is sRGB; the other maps are data and must reach the shader unchanged.
    image.colorspace_settings.name = "sRGB" if kind == "albedo" else "Non-Color"
    if pack and not image.packed_file:
        image.pack()
    return image


def _common_uv_name(meshes) -> str:
    """The active UV map's name when all meshes agree on it, else "" (Blender's render-active map)."""
    names = {obj.data.uv_layers.active.name for obj in meshes if obj.data.uv_layers.active}
    return names.pop() if len(names) == 1 else ""


def _assign(obj, material: bpy.types.Material, slot: str) -> None:
    """Put `material` on `obj` without losing the artist's materials.

    NEW appends a slot, makes it active and assigns every face to it: the old materials stay in
    their slots, one click away from being reassigned. REPLACE swaps the material of the active
    slot (a slot is added when there is none); the material taken out gets a fake user so it
    survives saving even when nothing else uses it. REUSE swaps the material of the slot the add-on
    filled before (the active one when it is the add-on's), and is NEW the first time: trying again
    does not pile up slots, and the artist's own materials are never touched.
    """
    mesh = obj.data
    if slot == "REUSE":
        own = _own_slot(obj)
        if own is not None:
            obj.active_material_index = own
            obj.material_slots[own].material = material  # the one taken out is in the history: no fake user
            return
        slot = "NEW"
    if slot == "NEW" and material.name in mesh.materials:  # a linked duplicate sharing this mesh took it
        obj.active_material_index = mesh.materials.find(material.name)
        return
    if slot == "NEW" or not obj.material_slots:
        mesh.materials.append(material)
        obj.active_material_index = len(obj.material_slots) - 1
        if slot == "NEW":
            _assign_faces(mesh, obj.active_material_index)
        return
    active = obj.material_slots[obj.active_material_index]
    old = active.material
    if old is not None and old != material:
        old.use_fake_user = True
    active.material = material


def _own_slot(obj) -> int | None:
    """The slot holding a material the add-on made: the active one when it is, else the last such slot."""
    made = [i for i, s in enumerate(obj.material_slots) if s.material is not None and MATERIAL_KEY in s.material]
    if not made:
        return None
    return obj.active_material_index if obj.active_material_index in made else made[-1]


def _assign_faces(mesh: bpy.types.Mesh, index: int) -> None:
    """Give every face the material slot `index` (in the edit mesh while in Edit Mode)."""
    if mesh.is_editmode:
        edit = bmesh.from_edit_mesh(mesh)
        for face in edit.faces:
            face.material_index = index
        bmesh.update_edit_mesh(mesh)
        return
    mesh.polygons.foreach_set("material_index", array("i", [index]) * len(mesh.polygons))
    mesh.update()


def _material(name: str, images: dict, options: ApplyOptions, uv_name: str, sources: dict) -> bpy.types.Material:
    """The material these images and options make: the one made before when it is still there unchanged in
    what matters (Apply again reuses it instead of piling up .001, .002 copies), else a new one."""
    made_from = sorted((kind, image.name) for kind, image in images.items())
    key = repr((name, made_from, options, uv_name) + ((sorted(sources.items()),) if sources else ()))
    for material in bpy.data.materials:
        if material.get(MATERIAL_KEY) == key and not material.library:
            return material
    material = build_material(name, images, options, uv_name, sources)
    material[MATERIAL_KEY] = key
    return material
