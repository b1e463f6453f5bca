"""Views chosen by coverage (the views item "COVERAGE"): the Blender half of ..coverage. It sees the request's
world-space triangles (geometry.Geometry's buffers: occluders, object index -1, block; only the textured ones
count) with Blender's own ray casts (mathutils.bvhtree), one per triangle centre and candidate.
"""

from __future__ import annotations

import math

from mathutils import Vector
from mathutils.bvhtree import BVHTree

from .. import coverage


def facing_table(
    triangles, object_index, radius: float, eyes: list[list[float]]
) -> tuple[list[float], list[list[float]]]:
    """The textured triangles' areas, and per eye the |cosine| at which it sees each one's centre (0 where another
    triangle is in the way). Either side of a triangle counts: a texel is painted from whichever side it is seen.
    triangles: 9 floats per triangle, world space; radius: the objects' bounding sphere's."""
    corners = [Vector(triangles[3 * i : 3 * i + 3]) for i in range(len(triangles) // 3)]
    tree = BVHTree.FromPolygons(corners, [(3 * t, 3 * t + 1, 3 * t + 2) for t in range(len(corners) // 3)])
    clearance = 1e-4 * radius  # a ray that ends this short of the centre must not hit the triangle itself
    areas, centres, normals = [], [], []
    for t, obj in enumerate(object_index):
        if obj < 0:
            continue
        a, b, c = corners[3 * t : 3 * t + 3]
        cross = (b - a).cross(c - a)
        areas.append(cross.length / 2.0)
        centres.append((a + b + c) / 3.0)
        normals.append(cross.normalized() if cross.length > 0.0 else Vector((0.0, 0.0, 0.0)))
    facing = []
    for eye in map(Vector, eyes):
        row = []
        for centre, normal in zip(centres, normals, strict=True):
            towards = eye - centre
            distance = towards.length
            cosine = abs(normal.dot(towards)) / distance
            if cosine < coverage.GRAZING:
                row.append(0.0)
                continue
            hit, *_ = tree.ray_cast(eye, -towards / distance, distance - clearance)
            row.append(0.0 if hit is not None else cosine)
        facing.append(row)
    return areas, facing


def coverage_views(
    triangles, object_index, centre: list[float], radius: float, aspect: float, *, fov: float,
    target: float = coverage.TARGET, budget: int = coverage.BUDGET, candidates: int = coverage.CANDIDATES,
) -> tuple[list[tuple[list, list]], coverage.Choice]:  # fmt: skip
    """The chosen (view, projection) pairs, framing the objects' bounding sphere (`centre`, `radius`) as orbit
    views do (`fov` degrees across the wider side), and the choice (views used, coverage reached)."""
    views = coverage.candidate_views(centre, radius, candidates, fov=math.radians(fov), aspect=aspect)
    eyes = [coverage.camera_eye(view) for view, _ in views]
    areas, facing = facing_table(triangles, object_index, radius, eyes)
    choice = coverage.choose(areas, facing, target=target, budget=budget)
    return [views[i] for i in choice.views], choice
