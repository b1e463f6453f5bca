"""Generated images -> Blender materials: node trees, material slots, UVs, a tiled preview.

Blender's own API only (no operators), so it runs the same in the UI and in `blender -b` scripts.
Works on Blender 3.4 to 5.x: only sockets that exist on every version are used (Base Color, Roughness,
Normal), and version differences are guarded where they are met.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import bmesh
import bpy

MAP_LABELS = {"albedo": "Albedo", "roughness": "Roughness", "normal": "Normal", "height": "Height", "ao": "AO"}
MAP_KINDS = tuple(MAP_LABELS)
SLOT_MODES = ("REUSE", "NEW", "REPLACE")
PROJECTIONS = ("UV", "BOX")
DISPLACEMENTS = ("BUMP", "DISPLACEMENT")
TEXTURE_SCALE_MIN, TEXTURE_SCALE_MAX = 0.001, 1000.0

HEIGHT_SCALE = 0.1  # world units between black and white in the height map (bump distance, displacement scale)
BOX_BLEND = 0.2  # softens the seams where box projection switches between faces

# Node columns, left to right (x), and the vertical spacing of the image textures.
X_COORDS, X_MAPPING, X_TEXTURES, X_HELPERS, X_BSDF, X_OUTPUT = -1300, -1100, -800, -450, -150, 250
ROW = -300


MATERIAL_KEY = "sdtex_made_from"  # custom property: the images and options a material was built from


@dataclass
class ApplyOptions:
    """How `apply_images` builds and assigns materials."""

    shared_material: bool = True  # one material for all objects, else one per object
    slot: str = "NEW"  # "REUSE" (the slot made before) | "NEW" (append a slot) | "REPLACE" (the active slot)
    projection: str = "UV"  # "UV" (object UVs; made when missing) | "BOX" (triplanar)
    texture_scale: float = 1.0  # UV repeats, or world units per tile with BOX
    displacement: str = "BUMP"  # "BUMP" | "DISPLACEMENT"
    ao_multiply: bool = False
    pack: bool = False  # pack images into the .blend
    normal_directx: bool = False  # the normal map points green down (DirectX): flip it for Blender

    def __post_init__(self) -> None:
        for option, value, accepted in (
            ("slot", self.slot, SLOT_MODES),
            ("projection", self.projection, PROJECTIONS),
            ("displacement", self.displacement, DISPLACEMENTS),
        ):
            if value not in accepted:
                raise ValueError(f"{option} must be one of {', '.join(accepted)}; got {value!r}")
        scale = self.texture_scale
        is_number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
        if not (is_number and TEXTURE_SCALE_MIN <= scale <= TEXTURE_SCALE_MAX):  # also turns away NaN
            raise ValueError(f"texture_scale must be in [{TEXTURE_SCALE_MIN}, {TEXTURE_SCALE_MAX}]; got {scale!r}")


def apply_images(
    objects, maps: dict[str, str | bpy.types.Image], options: ApplyOptions, name: str
) -> list[bpy.types.Material]:
    """Build materials from images and assign them to the mesh objects among `objects`.

    `maps` holds "albedo" (required) and optionally "height", "normal", "roughness", "ao" -> a file path
    (loaded with the colour space its kind needs, packed when options.pack is set) or an Image datablock
    (an artist's image, used as it is: never recoloured or packed). Normal maps are expected in OpenGL
    convention (green up), as Blender reads them. Objects that are not meshes are skipped (callers report
    them); a ValueError is raised when none is a mesh. Objects in Edit Mode get their UVs and face
    assignments in the edit mesh, so leaving Edit Mode keeps them.
    Returns the materials made: one named `name`, or one per object named `name.ObjectName`.
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
        material = _material(name, images, options, _common_uv_name(meshes))
        for obj in meshes:
            _assign(obj, material, options.slot)
        return [material]
    materials = []
    for obj in meshes:
        material = _material(f"{name}.{obj.name}", images, options, _common_uv_name([obj]))
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


def _material(name: str, images: dict, options: ApplyOptions, uv_name: str) -> bpy.types.Material:
    """The material these images and options make: the one made before when it is still there unchanged in
    what matters (Apply again reuses it instead of piling up .001, .002 copies), else a new one."""
    key = repr((name, sorted((kind, image.name) for kind, image in images.items()), options, uv_name))
    for material in bpy.data.materials:
        if material.get(MATERIAL_KEY) == key and not material.library:
            return material
    material = _build_material(name, images, options, uv_name)
    material[MATERIAL_KEY] = key
    return material


@dataclass
class _Builder:
    """What the per-socket functions share (after glTF-Blender-IO's MaterialHelper): the node tree, the
    options, the frames and the Image Texture of each map."""

    material: bpy.types.Material
    options: ApplyOptions
    uv_name: str
    textures_frame: bpy.types.Node
    surface_frame: bpy.types.Node
    textures: dict = field(default_factory=dict)  # kind -> ShaderNodeTexImage

    @property
    def nodes(self):
        return self.material.node_tree.nodes

    @property
    def links(self):
        return self.material.node_tree.links

    def helper(self, node_type: str, label: str, location: tuple[float, float]):
        return _node(self.nodes, node_type, label, location, self.surface_frame)


def _build_material(name: str, images: dict, options: ApplyOptions, uv_name: str) -> bpy.types.Material:
    material = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):
        material.use_nodes = True  # always on (and deprecated) from 5.0
    nodes = material.node_tree.nodes
    nodes.clear()
    frames = (
        _node(nodes, "NodeFrame", "Textures", (X_COORDS, 0)),
        _node(nodes, "NodeFrame", "Surface", (X_HELPERS, 0)),
    )
    builder = _Builder(material, options, uv_name, *frames)
    _image_textures(builder, images, _coordinates(builder))

    # Surface: Principled BSDF fed by the maps, one function per socket, through the helper nodes a map needs
    bsdf = builder.helper("ShaderNodeBsdfPrincipled", "Principled BSDF", (X_BSDF, 0))
    output = builder.helper("ShaderNodeOutputMaterial", "Material Output", (X_OUTPUT, 0))
    builder.links.new(bsdf.outputs["BSDF"], output.inputs["Surface"])
    _base_color(builder, bsdf.inputs["Base Color"])
    _roughness(builder, bsdf.inputs["Roughness"])
    normal = _height(builder, _normal(builder), output.inputs["Displacement"])
    if normal is not None:
        builder.links.new(normal, bsdf.inputs["Normal"])
    return material


def _coordinates(builder: _Builder):
    """The Mapping node's output: the UV map repeated texture_scale times, or object space with one tile per
    texture_scale world units for box projection."""
    options, nodes, frame = builder.options, builder.nodes, builder.textures_frame
    if options.projection == "UV":
        coords = _node(nodes, "ShaderNodeUVMap", "UV Map", (X_COORDS, 0), frame)
        coords.uv_map = builder.uv_name
        coords_out, scale = coords.outputs["UV"], options.texture_scale
    else:
        coords = _node(nodes, "ShaderNodeTexCoord", "Texture Coordinate", (X_COORDS, 0), frame)
        coords_out, scale = coords.outputs["Object"], 1.0 / options.texture_scale
    mapping = _node(nodes, "ShaderNodeMapping", "Mapping", (X_MAPPING, 0), frame)
    mapping.inputs["Scale"].default_value = (scale, scale, scale)
    builder.links.new(coords_out, mapping.inputs["Vector"])
    return mapping.outputs["Vector"]


def _image_textures(builder: _Builder, images: dict, vector) -> None:
    """One Image Texture per map, stacked in the Textures frame."""
    present = [kind for kind in MAP_KINDS if kind in images]
    for row, kind in enumerate(present):
        location = (X_TEXTURES, row * ROW)
        texture = _node(builder.nodes, "ShaderNodeTexImage", MAP_LABELS[kind], location, builder.textures_frame)
        texture.image = images[kind]
        if builder.options.projection == "BOX":
            texture.projection = "BOX"
            texture.projection_blend = BOX_BLEND
        builder.links.new(vector, texture.inputs["Vector"])
        builder.textures[kind] = texture


def _base_color(builder: _Builder, socket) -> None:
    """The albedo, darkened by the AO map when ao_multiply is on."""
    color = builder.textures["albedo"].outputs["Color"]
    if builder.options.ao_multiply and "ao" in builder.textures:
        multiply = builder.helper("ShaderNodeMix", "AO Multiply", (X_HELPERS, 0))
        multiply.data_type = "RGBA"
        multiply.blend_type = "MULTIPLY"
        _socket(multiply.inputs, "Factor_Float").default_value = 1.0
        builder.links.new(color, _socket(multiply.inputs, "A_Color"))
        builder.links.new(builder.textures["ao"].outputs["Color"], _socket(multiply.inputs, "B_Color"))
        color = _socket(multiply.outputs, "Result_Color")
    builder.links.new(color, socket)


def _roughness(builder: _Builder, socket) -> None:
    if "roughness" in builder.textures:
        builder.links.new(builder.textures["roughness"].outputs["Color"], socket)


def _normal(builder: _Builder):
    """The Normal Map node's output (None without a normal map)."""
    if "normal" not in builder.textures:
        return None
    normal_map = builder.helper("ShaderNodeNormalMap", "Normal Map", (X_HELPERS, 2 * ROW))
    normal_map.uv_map = builder.uv_name
    color = builder.textures["normal"].outputs["Color"]
    if builder.options.normal_directx:
        color = _flip_green(builder, color)
    builder.links.new(color, normal_map.inputs["Color"])
    return normal_map.outputs["Normal"]


def _flip_green(builder: _Builder, color):
    """A DirectX normal map made OpenGL (Blender reads OpenGL normals): green = 1 - green."""
    split = builder.helper("ShaderNodeSeparateColor", "DirectX Green", (X_HELPERS, 4 * ROW))
    flip = builder.helper("ShaderNodeMath", "Flip Green", (X_HELPERS, 4.5 * ROW))
    join = builder.helper("ShaderNodeCombineColor", "OpenGL Normal", (X_HELPERS, 5 * ROW))
    flip.operation = "SUBTRACT"
    flip.inputs[0].default_value = 1.0
    links = builder.links
    links.new(color, split.inputs["Color"])
    links.new(split.outputs["Green"], flip.inputs[1])
    for channel, source in (("Red", split.outputs["Red"]), ("Green", flip.outputs["Value"])):
        links.new(source, join.inputs[channel])
    links.new(split.outputs["Blue"], join.inputs["Blue"])
    return join.outputs["Color"]


def _height(builder: _Builder, normal, displacement_socket):
    """The height map as bump (on top of `normal`; returns the normal to use) or as true displacement into
    the output's Displacement socket (returns `normal` unchanged)."""
    if "height" not in builder.textures:
        return normal
    height = builder.textures["height"].outputs["Color"]
    if builder.options.displacement == "BUMP":
        # Bump takes the normal map's output as its base normal, so both details add up.
        bump = builder.helper("ShaderNodeBump", "Bump", (X_HELPERS, 3 * ROW))
        bump.inputs["Distance"].default_value = HEIGHT_SCALE
        builder.links.new(height, bump.inputs["Height"])
        if normal is not None:
            builder.links.new(normal, bump.inputs["Normal"])
        return bump.outputs["Normal"]
    displace = builder.helper("ShaderNodeDisplacement", "Displacement", (X_BSDF, 3 * ROW))
    displace.inputs["Midlevel"].default_value = 0.5
    displace.inputs["Scale"].default_value = HEIGHT_SCALE
    builder.links.new(height, displace.inputs["Height"])
    builder.links.new(displace.outputs["Displacement"], displacement_socket)
    _use_true_displacement(builder.material)
    return normal


def _use_true_displacement(material: bpy.types.Material) -> None:
    """Displace the geometry and keep bump for the detail finer than the mesh (Cycles)."""
    if hasattr(material, "displacement_method"):  # Blender 4.1+
        material.displacement_method = "BOTH"
    elif hasattr(material, "cycles") and hasattr(material.cycles, "displacement_method"):
        material.cycles.displacement_method = "BOTH"


def _node(nodes, node_type: str, label: str, location: tuple[float, float], parent=None):
    node = nodes.new(node_type)
    node.name = node.label = label  # the name lets scripts write nodes["Albedo"]
    node.location = location
    if parent is not None:
        node.parent = parent  # keeps the absolute location given above on every version
    return node


def _socket(sockets, identifier: str):
    """A socket by identifier: the Mix node has several sockets named "A", one per data type."""
    return next(socket for socket in sockets if socket.identifier == identifier)
