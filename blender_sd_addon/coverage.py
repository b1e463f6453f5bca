"""Cameras chosen by coverage ("cover the selection"): candidates spread evenly on a sphere round the objects,
chosen greedily by the surface each newly sees, weighted by how squarely it sees it. Stdlib only.

The surface is sample points with their areas (bpy adapter: blender/coverage_views.py). `facing[c][p]` is the
cosine between point p's normal and its direction to candidate c when c sees p (in front, unoccluded), else 0. A
point counts as covered once some chosen view sees it at a cosine of at least GRAZING: a view that only skims a
surface paints it smeared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .projection import Matrix, Vector, look_at, orbit_views

GRAZING = 0.1  # cos 84 degrees
CANDIDATES = 128  # Suzanne: 0.16 s of ray casts, and no fewer views than with 256
TARGET = 0.99  # of what the candidates can see at all (the hidden backs of Suzanne's eyes cannot be painted)
BUDGET = 16


@dataclass(frozen=True)
class Choice:
    views: list[int]  # indices into the candidates, in the order chosen (the order they are painted in)
    coverage: float  # the covered share of the surface's area, 0..1
    reachable: float  # what all the candidates together would cover


def fibonacci_directions(count: int) -> list[tuple[float, float, float]]:
    """`count` unit vectors spread evenly over the sphere (the Fibonacci lattice), from the top down; none is
    exactly a pole, where a camera's "up" is undefined."""
    if count < 1:
        raise ValueError(f"candidates must be at least 1, got {count}")
    golden = math.pi * (3.0 - math.sqrt(5.0))
    directions = []
    for i in range(count):
        z = 1.0 - (2 * i + 1) / count
        ring = math.sqrt(1.0 - z * z)
        directions.append((ring * math.cos(golden * i), ring * math.sin(golden * i), z))
    return directions


def candidate_views(center: Vector, radius: float, count: int = CANDIDATES, **orbit) -> list[tuple[Matrix, Matrix]]:
    """(view, projection) pairs from the Fibonacci directions, each framing the bounding sphere as an orbit view
    does (same distance, field of view and depth range: `orbit` takes orbit_views' fov, aspect and margin)."""
    (reference, projection), *_ = orbit_views(center, radius, per_ring=1, **orbit)
    distance = math.dist(camera_eye(reference), center)
    views = []
    for direction in fibonacci_directions(count):
        eye = [center[i] + distance * direction[i] for i in range(3)]
        views.append((look_at(eye, center), [row[:] for row in projection]))
    return views


def camera_eye(view: Matrix) -> list[float]:
    """Where a world -> camera matrix (rotation rows, translation column) puts the camera: -R^T t."""
    return [-sum(view[row][axis] * view[row][3] for row in range(3)) for axis in range(3)]


def coverage(areas: Sequence[float], facing: Sequence[Sequence[float]], views: Sequence[int]) -> float:
    """The share of the area that some view of `views` sees at a cosine of at least GRAZING."""
    total = sum(areas)
    if total <= 0.0:
        raise ValueError("the surface has no area")
    covered = sum(area for p, area in enumerate(areas) if any(facing[c][p] >= GRAZING for c in views))
    return covered / total


def choose(
    areas: Sequence[float], facing: Sequence[Sequence[float]], *, target: float = TARGET, budget: int = BUDGET
) -> Choice:
    """Candidates one at a time, each the one that newly covers the most area x cosine, until the covered share
    reaches `target` of what all candidates reach (a point no candidate sees cannot be painted), `budget` views, or
    no candidate adds any."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"coverage target must be in (0, 1], got {target}")
    if budget < 1:
        raise ValueError(f"view budget must be at least 1, got {budget}")
    candidates = range(len(facing))
    reachable = coverage(areas, facing, candidates)
    best = [0.0] * len(areas)  # the best cosine a chosen view sees each point at: covered from GRAZING on
    chosen: list[int] = []
    while len(chosen) < budget and coverage(areas, facing, chosen) < target * reachable:
        gains = {c: _gain(areas, best, facing[c]) for c in candidates if c not in chosen}
        pick = max(gains, key=gains.get, default=None)
        if pick is None or gains[pick] <= 0.0:
            break
        chosen.append(pick)
        best = [max(b, f) for b, f in zip(best, facing[pick], strict=True)]
    return Choice(chosen, coverage(areas, facing, chosen), reachable)


def _gain(areas: Sequence[float], best: Sequence[float], facing: Sequence[float]) -> float:
    return sum(area * f for area, b, f in zip(areas, best, facing, strict=True) if b < GRAZING <= f)


def describe(choice: Choice) -> str:
    """For the artist: "Cover Selection: 7 views saw 96% of the surface (99% of what any view can see)"."""
    count = len(choice.views)
    reached = choice.coverage / choice.reachable if choice.reachable else 0.0
    return (f"Cover Selection: {count} view{'' if count == 1 else 's'} saw {choice.coverage:.0%} of the surface "
            f"({reached:.0%} of what any view can see)")  # fmt: skip
