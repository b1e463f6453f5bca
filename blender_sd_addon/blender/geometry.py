"""Blender data -> the `project` task's arrays: evaluated triangles in world space with their UVs, and
camera matrices (the scene camera, the 3D viewport, or orbit views round the selection).

Blender's own API, no operators except Smart UV Project for meshes without UVs (in a new UV map: the
user's maps are never replaced). Buffers are stdlib `array`s filled with foreach_get (Debian's Blender
has no numpy).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field

import bmesh
import bpy

from .. import coverage, projection
from . import coverage_views

UV_MAP_NAME = "SD Projection"  # the UV map made for objects without one (or when asked for a fresh one)
UV_MAPS = ("ACTIVE", "NEW")  # use the active UV map (unwrap when there is none), or always a fresh unwrap
VIEWPORT_SENSOR = 72.0  # mm: the 3D viewport's lens is relative to this sensor width


class GeometryError(ValueError):
    """Objects or cameras that cannot be projected onto; the message says which and why."""


@dataclass
class Geometry:
    """What the worker needs of the objects: flat float32/int32 buffers, one record per triangle."""

    objects: list  # the textured objects, in object_index order
    uv_maps: list[str]  # the UV map baked into, per object
    made: list[tuple] = field(default_factory=list)  # (object, UV map) unwrapped for this request
    triangles: array = field(default_factory=lambda: array("f"))  # 9 floats per triangle (world space)
    uvs: array = field(default_factory=lambda: array("f"))  # 6 floats per triangle
    object_index: array = field(default_factory=lambda: array("i"))  # per triangle; -1 for occluders
    warnings: list[str] = field(default_factory=list)
    views_note: str = ""  # how views chosen by coverage did (coverage.describe)

    @property
    def count(self) -> int:
        return len(self.object_index)

    def undo_unwraps(self) -> None:
        """Remove the UV maps this request made (it failed: nothing stays applied)."""
        for obj, name in self.made:
            layer = obj.data.uv_layers.get(name)
            if layer is not None:
                obj.data.uv_layers.remove(layer)
        self.made.clear()

    def arrays(self) -> dict[str, tuple[bytes, str, list[int]]]:
        """name -> (bytes, dtype, shape) for the upload: the triangle list folded under the protocol's size
        limit, padded with zero-area triangles that belong to no object."""
        shape, padded = projection.wire_shape(self.count, [])
        extra = padded - self.count
        triangles = self.triangles + array("f", [0.0]) * (9 * extra)
        uvs = self.uvs + array("f", [0.0]) * (6 * extra)
        index = self.object_index + array("i", [-1]) * extra
        return {
            "triangles": (triangles.tobytes(), "float32", [*shape, 3, 3]),
            "uvs": (uvs.tobytes(), "float32", [*shape, 3, 2]),
            "object_index": (index.tobytes(), "int32", shape),
        }


def check_objects(objects) -> list:
    """The mesh objects among `objects`, each with faces; GeometryError naming any that is not."""
    objects = list(objects or ())
    if not objects:
        raise GeometryError("Select one or more mesh objects to texture")
    for obj in objects:
        if obj.type != "MESH":
            raise GeometryError(f"{obj.name} is a {obj.type.lower()}, not a mesh: only meshes can be textured")
        if not obj.data.polygons:
            raise GeometryError(f"{obj.name} has no faces to paint")
    return objects


def projection_uv_map(obj, mode: str = "ACTIVE") -> str:
    """The UV map `obj` is baked into: its active one, or (none, or mode "NEW") a new Smart UV Project map."""
    mesh = obj.data
    if mode == "ACTIVE" and mesh.uv_layers:
        return (mesh.uv_layers.active or mesh.uv_layers[0]).name
    return smart_unwrap(obj)


def smart_unwrap(obj) -> str:
    """A new UV map on `obj` unwrapped by Smart UV Project (no overlapping islands); the active map stays."""
    mesh = obj.data
    previous = mesh.uv_layers.active_index if mesh.uv_layers else -1
    layer = mesh.uv_layers.new(name=UV_MAP_NAME)
    if layer is None:
        raise GeometryError(f"{obj.name} cannot take another UV map (Blender allows 8)")
    name = layer.name
    mesh.uv_layers.active = layer
    mode = obj.mode
    view_layer = bpy.context.view_layer
    with bpy.context.temp_override(
        active_object=obj, object=obj, selected_objects=[obj], selected_editable_objects=[obj]
    ):
        active = view_layer.objects.active
        view_layer.objects.active = obj
        try:
            if mode != "EDIT":
                bpy.ops.object.mode_set(mode="EDIT")
            edit = bmesh.from_edit_mesh(mesh)
            selected = [face.select for face in edit.faces]
            bpy.ops.mesh.select_all(action="SELECT")
            bpy.ops.uv.smart_project(island_margin=0.01)
            for face, was in zip(bmesh.from_edit_mesh(mesh).faces, selected, strict=True):
                face.select = was
            if mode != "EDIT":
                bpy.ops.object.mode_set(mode=mode)
        finally:
            view_layer.objects.active = active
    if previous >= 0:
        mesh.uv_layers.active_index = previous
    return name


def collect(objects, occluders=(), uv_map: str = "ACTIVE", depsgraph=None) -> Geometry:
    """Evaluated triangles (modifiers applied) of the objects, textured, and the occluders (only occluding),
    in world space; GeometryError for anything that cannot be textured."""
    if uv_map not in UV_MAPS:
        raise GeometryError(f"uv_map must be one of {', '.join(UV_MAPS)}; got {uv_map!r}")
    objects = check_objects(objects)
    geometry = Geometry(objects, [])
    try:
        for obj in objects:
            had = {layer.name for layer in obj.data.uv_layers}
            geometry.uv_maps.append(projection_uv_map(obj, uv_map))
            if geometry.uv_maps[-1] not in had:
                geometry.made.append((obj, geometry.uv_maps[-1]))
        depsgraph = depsgraph or bpy.context.evaluated_depsgraph_get()
        depsgraph.update()
        for index, (obj, name) in enumerate(zip(objects, geometry.uv_maps, strict=True)):
            _add(geometry, obj, depsgraph, index, name)
        for obj in occluders:
            if obj.type == "MESH" and obj not in objects:
                _add(geometry, obj, depsgraph, -1, None)
    except GeometryError:
        geometry.undo_unwraps()
        raise
    return geometry


def _add(geometry: Geometry, obj, depsgraph, index: int, uv_name: str | None) -> None:
    evaluated = obj.evaluated_get(depsgraph)
    mesh = evaluated.to_mesh()
    try:
        mesh.calc_loop_triangles()
        count = len(mesh.loop_triangles)
        if index >= 0 and count == 0:
            raise GeometryError(f"{obj.name} has no faces after its modifiers")
        loops = array("i", [0]) * (3 * count)
        mesh.loop_triangles.foreach_get("loops", loops)
        corners = array("i", [0]) * len(mesh.loops)
        mesh.loops.foreach_get("vertex_index", corners)
        co = array("f", [0.0]) * (3 * len(mesh.vertices))
        mesh.vertices.foreach_get("co", co)
        m = obj.matrix_world
        rows = [tuple(m[i]) for i in range(3)]
        world = array("f", [0.0]) * len(co)
        for v in range(0, len(co), 3):
            x, y, z = co[v], co[v + 1], co[v + 2]
            for i, (a, b, c, d) in enumerate(rows):
                world[v + i] = a * x + b * y + c * z + d
        for loop in loops:
            vertex = 3 * corners[loop]
            geometry.triangles.extend(world[vertex : vertex + 3])
        if uv_name is not None:
            layer = mesh.uv_layers.get(uv_name)
            if layer is None:  # a modifier dropped it
                raise GeometryError(f"{obj.name}'s UV map {uv_name!r} is gone after its modifiers")
            uv = array("f", [0.0]) * (2 * len(mesh.loops))
            layer.data.foreach_get("uv", uv)
            for loop in loops:
                geometry.uvs.extend(uv[2 * loop : 2 * loop + 2])
        else:
            geometry.uvs.extend(array("f", [0.0]) * (6 * count))
        geometry.object_index.extend(array("i", [index]) * count)
    finally:
        evaluated.to_mesh_clear()


# --- cameras ---------------------------------------------------------------------------------------------


def _rows(matrix) -> list[list[float]]:
    return [[float(matrix[i][j]) for j in range(4)] for i in range(4)]


def scene_camera(scene, width: int, height: int, camera=None) -> tuple[list, list]:
    """(view, projection) of the scene's camera (or `camera`) for a width x height image: Blender's own
    projection (lens, sensor fit, shift, clipping)."""
    camera = camera or scene.camera
    if camera is None or camera.type != "CAMERA":
        raise GeometryError("The scene has no camera: add one, or use the viewport or orbit views")
    depsgraph = bpy.context.evaluated_depsgraph_get()
    projection_matrix = camera.calc_matrix_camera(depsgraph, x=width, y=height)
    return _rows(camera.matrix_world.inverted()), _rows(projection_matrix)


def viewport_camera(region_3d, lens: float, width: int, height: int, clip_start: float, clip_end: float):
    """(view, projection) of a perspective 3D viewport at its lens, framed to width x height."""
    fov = 2.0 * math.atan(VIEWPORT_SENSOR / 2.0 / lens)
    return _rows(region_3d.view_matrix), projection.perspective(fov, width / height, clip_start, clip_end)


def bounding_sphere(geometry: Geometry) -> tuple[list[float], float]:
    """Centre and radius of the textured objects' triangles (box centre, farthest corner)."""
    points = geometry.triangles
    textured = [i for i, o in enumerate(geometry.object_index) if o >= 0]
    xs = [points[9 * t + k] for t in textured for k in (0, 3, 6)]
    ys = [points[9 * t + k] for t in textured for k in (1, 4, 7)]
    zs = [points[9 * t + k] for t in textured for k in (2, 5, 8)]
    centre = [(min(a) + max(a)) / 2.0 for a in (xs, ys, zs)]
    radius = max(math.dist(centre, p) for p in zip(xs, ys, zs, strict=True))
    return centre, max(radius, 1e-6)


def cameras_bytes(views: list[tuple[list, list]]) -> tuple[bytes, str, list[int]]:
    """(bytes, dtype, shape) of the cameras array [views, 2, 4, 4]."""
    values = array("f", [x for view, proj in views for matrix in (view, proj) for row in matrix for x in row])
    return values.tobytes(), "float32", [len(views), 2, 4, 4]


def views_for(
    items, scene, geometry: Geometry, width: int, height: int, *, per_ring: int, elevations, fov: float, context=None
) -> list[tuple[list, list]]:
    """The (view, projection) pairs of `items`, in order: "ORBIT" (rings round the objects' bounding
    sphere), "COVERAGE" (views chosen to cover the objects, geometry.views_note says how well), "CAMERA" (the
    scene camera), "VIEWPORT" (the 3D view of `context`) or a camera object."""
    views = []
    for item in items:
        if item == "ORBIT":
            centre, radius = bounding_sphere(geometry)
            views += projection.orbit_views(
                centre, radius, per_ring=per_ring, elevations=elevations, fov=math.radians(fov), aspect=width / height
            )
        elif item == "COVERAGE":
            centre, radius = bounding_sphere(geometry)
            chosen, choice = coverage_views.coverage_views(
                geometry.triangles, geometry.object_index, centre, radius, width / height, fov=fov
            )
            if not chosen:
                raise GeometryError("Cover Selection: no view round the objects sees them (are they inside another?)")
            views += chosen
            geometry.views_note = coverage.describe(choice)
        elif item == "CAMERA":
            views.append(scene_camera(scene, width, height))
        elif item == "VIEWPORT":
            space = getattr(context, "space_data", None)
            if space is None or space.type != "VIEW_3D" or not space.region_3d.is_perspective:
                raise GeometryError("VIEWPORT views need a perspective 3D viewport (run it from the 3D view)")
            views.append(viewport_camera(space.region_3d, space.lens, width, height, space.clip_start, space.clip_end))
        elif getattr(item, "type", None) == "CAMERA":
            views.append(scene_camera(scene, width, height, camera=item))
        else:
            raise GeometryError(
                f"views must hold 'ORBIT', 'COVERAGE', 'CAMERA', 'VIEWPORT' or camera objects; got {item!r}"
            )
    if not views:
        raise GeometryError("No views: give at least one camera, or orbit views")
    return views
