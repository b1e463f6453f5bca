"""The node tree of a generated material: Image Texture nodes per map feeding a Principled BSDF.

After glTF-Blender-IO's pbrMetallicRoughness importer: one helper object carries the tree, one small function per
socket (base colour, roughness, metallic, normal, height). Image Texture nodes are named after their map kind
(MAP_LABELS: "Albedo", "Normal", ... the glTF exporter finds them by name); their labels also say where the map
came from ("Normal (Marigold)", "Roughness (derived)"). Blender's own API only; Blender 3.4 to 5.x.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import bpy

from ..messages import source_label

# Row order of the Image Texture nodes; the names scripts and the exporter look them up by.
MAP_LABELS = {
    "albedo": "Albedo",
    "roughness": "Roughness",
    "metallic": "Metallic",
    "normal": "Normal",
    "height": "Height",
    "ao": "AO",
}
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


@dataclass
class ApplyOptions:
    """How `materials.apply_images` builds and assigns materials."""

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


def texture_label(kind: str, source: str = "") -> str:
    """An Image Texture node's label: its map and, when known, where it came from. A model's albedo is the delit
    one ("Albedo (delit, Marigold)")."""
    if not source:
        return MAP_LABELS[kind]
    origin = source_label(source)
    if kind == "albedo" and source.startswith("model:"):
        origin = f"delit, {origin}"
    return f"{MAP_LABELS[kind]} ({origin})"


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
        return node(self.nodes, node_type, label, location, self.surface_frame)


def build_material(
    name: str, images: dict, options: ApplyOptions, uv_name: str, sources: dict[str, str] | None = None
) -> bpy.types.Material:
    """A new material `name` from `images` (kind -> Image); `sources` (kind -> "classical" | "model:<id>") only
    label the textures."""
    material = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):
        material.use_nodes = True  # always on (and deprecated) from 5.0
    nodes = material.node_tree.nodes
    nodes.clear()
    frames = (
        node(nodes, "NodeFrame", "Textures", (X_COORDS, 0)),
        node(nodes, "NodeFrame", "Surface", (X_HELPERS, 0)),
    )
    builder = _Builder(material, options, uv_name, *frames)
    _image_textures(builder, images, _coordinates(builder), sources or {})

    # Surface: Principled BSDF fed by the maps, one function per socket, through the helper nodes a map needs
    bsdf = builder.helper("ShaderNodeBsdfPrincipled", "Principled BSDF", (X_BSDF, 0))
    output = builder.helper("ShaderNodeOutputMaterial", "Material Output", (X_OUTPUT, 0))
    builder.links.new(bsdf.outputs["BSDF"], output.inputs["Surface"])
    _base_color(builder, bsdf.inputs["Base Color"])
    _data_map(builder, "roughness", bsdf.inputs["Roughness"])
    _data_map(builder, "metallic", bsdf.inputs["Metallic"])
    normal = _height(builder, _normal(builder), output.inputs["Displacement"])
    if normal is not None:
        builder.links.new(normal, bsdf.inputs["Normal"])
    return material


def _coordinates(builder: _Builder):
    """The Mapping node's output: the UV map repeated texture_scale times, or object space with one tile per
    texture_scale world units for box projection."""
    options, nodes, frame = builder.options, builder.nodes, builder.textures_frame
    if options.projection == "UV":
        coords = node(nodes, "ShaderNodeUVMap", "UV Map", (X_COORDS, 0), frame)
        coords.uv_map = builder.uv_name
        coords_out, scale = coords.outputs["UV"], options.texture_scale
    else:
        coords = node(nodes, "ShaderNodeTexCoord", "Texture Coordinate", (X_COORDS, 0), frame)
        coords_out, scale = coords.outputs["Object"], 1.0 / options.texture_scale
    mapping = node(nodes, "ShaderNodeMapping", "Mapping", (X_MAPPING, 0), frame)
    mapping.inputs["Scale"].default_value = (scale, scale, scale)
    builder.links.new(coords_out, mapping.inputs["Vector"])
    return mapping.outputs["Vector"]


def _image_textures(builder: _Builder, images: dict, vector, sources: dict[str, str]) -> None:
    """One Image Texture per map, stacked in the Textures frame: named for its kind, labelled with its source."""
    present = [kind for kind in MAP_KINDS if kind in images]
    for row, kind in enumerate(present):
        location = (X_TEXTURES, row * ROW)
        texture = node(builder.nodes, "ShaderNodeTexImage", MAP_LABELS[kind], location, builder.textures_frame)
        texture.label = texture_label(kind, sources.get(kind, ""))
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
        socket_of(multiply.inputs, "Factor_Float").default_value = 1.0
        builder.links.new(color, socket_of(multiply.inputs, "A_Color"))
        builder.links.new(builder.textures["ao"].outputs["Color"], socket_of(multiply.inputs, "B_Color"))
        color = socket_of(multiply.outputs, "Result_Color")
    builder.links.new(color, socket)


def _data_map(builder: _Builder, kind: str, socket) -> None:
    """A grey data map (roughness, metallic) straight into its BSDF socket."""
    if kind in builder.textures:
        builder.links.new(builder.textures[kind].outputs["Color"], socket)


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


def node(nodes, node_type: str, label: str, location: tuple[float, float], parent=None):
    new = nodes.new(node_type)
    new.name = new.label = label  # the name lets scripts write nodes["Albedo"]
    new.location = location
    if parent is not None:
        new.parent = parent  # keeps the absolute location given above on every version
    return new


def socket_of(sockets, identifier: str):
    """A socket by identifier: the Mix node has several sockets named "A", one per data type."""
    return next(socket for socket in sockets if socket.identifier == identifier)
