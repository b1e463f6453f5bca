"""Blender-free camera math and wire layout for projection texturing (the `project` task). Stdlib only.

Matrices are row-major nested lists (4 rows of 4) acting on column vectors, like Blender's mathutils:
clip = projection @ view @ (x, y, z, 1). Cameras are Blender's: they look down their local -Z with +Y up;
projections are OpenGL's (NDC x right, y up, -1..1), as `Object.calc_matrix_camera` returns them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Matrix = list[list[float]]
Vector = Sequence[float]

# protocol.check_reference: every size of an array's shape is at most this.
SHAPE_MAX = 65536
ELEVATION_LIMIT = 85.0  # degrees: orbit views stop short of the poles, where "up" is undefined


def _sub(a: Vector, b: Vector) -> list[float]:
    return [a[i] - b[i] for i in range(3)]


def _cross(a: Vector, b: Vector) -> list[float]:
    return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]


def _normalized(a: Vector) -> list[float]:
    length = math.sqrt(sum(c * c for c in a))
    if length == 0.0:
        raise ValueError("a zero-length direction")
    return [c / length for c in a]


def look_at(eye: Vector, target: Vector, up: Vector = (0.0, 0.0, 1.0)) -> Matrix:
    """World -> camera for a camera at `eye` looking at `target` (camera -Z towards it, +Y as close to `up`
    as it can be)."""
    back = _normalized(_sub(eye, target))  # camera +Z points away from what it sees
    right = _normalized(_cross(up, back))
    true_up = _cross(back, right)
    rows = [right, true_up, back]
    return [[*row, -sum(row[i] * eye[i] for i in range(3))] for row in rows] + [[0.0, 0.0, 0.0, 1.0]]


def perspective(fov: float, aspect: float, near: float, far: float) -> Matrix:
    """OpenGL perspective projection. fov (radians) spans the wider side of the image, as Blender's sensor
    fit AUTO does; aspect = width / height."""
    if not (0.0 < fov < math.pi and aspect > 0.0 and 0.0 < near < far):
        raise ValueError(f"bad perspective fov={fov!r} aspect={aspect!r} near={near!r} far={far!r}")
    half = math.tan(fov / 2.0)
    sx, sy = (1.0 / half, aspect / half) if aspect >= 1.0 else (1.0 / (half * aspect), 1.0 / half)
    return [
        [sx, 0.0, 0.0, 0.0],
        [0.0, sy, 0.0, 0.0],
        [0.0, 0.0, (far + near) / (near - far), 2.0 * far * near / (near - far)],
        [0.0, 0.0, -1.0, 0.0],
    ]


def orbit_views(
    center: Vector,
    radius: float,
    *,
    per_ring: int = 8,
    elevations: Sequence[float] = (15.0,),
    fov: float = math.radians(40.0),
    aspect: float = 1.0,
    margin: float = 1.1,
) -> list[tuple[Matrix, Matrix]]:
    """(view, projection) pairs on rings around a bounding sphere, ring by ring in the order of
    `elevations` (degrees; clamped to +-85), `per_ring` views per ring starting in front (-Y, Blender's
    front view) and going round counter-clockwise seen from above. Each view frames the whole sphere with
    `margin` to spare; the depth range is the sphere's."""
    if radius <= 0.0 or per_ring < 1 or not elevations:
        raise ValueError("orbit views need a positive radius, at least one view per ring and one elevation")
    half = math.tan(fov / 2.0)
    narrow_half = math.atan(half / aspect if aspect >= 1.0 else half * aspect)  # fov spans the wider side
    distance = margin * radius / math.sin(narrow_half)
    near, far = max(distance - radius * margin, distance * 1e-3), distance + radius * margin
    projection = perspective(fov, aspect, near, far)
    views = []
    for elevation in elevations:
        tilt = math.radians(max(-ELEVATION_LIMIT, min(ELEVATION_LIMIT, elevation)))
        for k in range(per_ring):
            azimuth = -math.pi / 2.0 + 2.0 * math.pi * k / per_ring
            direction = (math.cos(tilt) * math.cos(azimuth), math.cos(tilt) * math.sin(azimuth), math.sin(tilt))
            eye = [center[i] + distance * direction[i] for i in range(3)]
            views.append((look_at(eye, center), [row[:] for row in projection]))
    return views


def wire_shape(count: int, inner: Sequence[int]) -> tuple[list[int], int]:
    """The shape of an array of `count` records of shape `inner` on the wire, and how many records it holds
    (padding included): the protocol caps every size at 65536, so longer lists fold into rows."""
    if count <= SHAPE_MAX:
        return [max(count, 1), *inner], max(count, 1)
    rows = -(-count // SHAPE_MAX)
    columns = -(-count // rows)
    return [rows, columns, *inner], rows * columns
