"""Cameras chosen by coverage, Blender-free: candidates on the sphere, the greedy choice on facing tables whose
best answer is known."""

from __future__ import annotations

import math
import re

import pytest

from blender_sd_addon import coverage
from blender_sd_addon.projection import look_at


def test_fibonacci_directions_are_unit_and_spread_evenly():
    directions = coverage.fibonacci_directions(200)
    assert all(math.isclose(math.hypot(*d), 1.0) for d in directions)
    assert abs(sum(d[2] for d in directions)) < 1e-9  # as many above the horizon as below
    octants = {}
    for x, y, z in directions:
        octants[(x > 0, y > 0, z > 0)] = octants.get((x > 0, y > 0, z > 0), 0) + 1
    assert len(octants) == 8 and max(octants.values()) - min(octants.values()) <= 6  # 25 each, give or take
    nearest = [max(sum(a * b for a, b in zip(d, e, strict=True)) for e in directions if e is not d) for d in directions]
    assert max(nearest) < math.cos(math.radians(8))  # no two closer than 8 degrees (the lattice spacing is ~14)


def test_camera_eye_inverts_look_at():
    eye = [3.0, -4.0, 2.5]
    assert coverage.camera_eye(look_at(eye, [0.5, 0.2, -1.0])) == pytest.approx(eye)


def test_candidate_views_sit_on_the_orbit_distance_and_look_at_the_centre():
    centre, radius = [1.0, 2.0, 3.0], 2.0
    views = coverage.candidate_views(centre, radius, 10)
    distances = {round(math.dist(coverage.camera_eye(view), centre), 9) for view, _ in views}
    assert len(views) == 10 and len(distances) == 1 and distances.pop() > radius
    for view, _ in views:  # the centre is straight ahead: camera space (0, 0, -d)
        x, y, _z = (sum(row[i] * (*centre, 1.0)[i] for i in range(4)) for row in view[:3])
        assert (x, y) == pytest.approx((0.0, 0.0), abs=1e-9)


def test_the_greedy_choice_takes_the_view_that_newly_covers_most_and_stops_at_the_target():
    areas = [1.0, 1.0, 1.0, 1.0, 2.0]
    facing = [
        [0.9, 0.9, 0.0, 0.0, 0.0],  # 2 of area at 0.9: 1.8
        [0.0, 0.0, 0.0, 0.0, 0.85],  # 2 of area at 0.85: 1.7
        [0.5, 0.5, 0.5, 0.5, 0.0],  # 4 of area at 0.5: 2.0, the best first pick
        [0.0, 0.0, 0.0, 0.0, 0.05],  # below GRAZING: covers nothing
    ]
    whole = coverage.choose(areas, facing, target=1.0)
    assert whole.views == [2, 1] and whole.coverage == pytest.approx(1.0) and whole.reachable == pytest.approx(1.0)
    assert coverage.choose(areas, facing, target=0.6).views == [2]  # 4 of 6 is enough
    assert coverage.choose(areas, facing, target=1.0, budget=1).coverage == pytest.approx(4 / 6)


def test_what_no_candidate_sees_does_not_hold_the_choice_back():
    areas, facing = [1.0, 1.0, 8.0], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]  # the big one is never seen
    choice = coverage.choose(areas, facing)
    assert choice.views in ([0, 1], [1, 0]) and choice.reachable == pytest.approx(0.2)
    assert "2 views saw 20% of the surface (100% of what any view can see)" in coverage.describe(choice)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: coverage.fibonacci_directions(0), "candidates must be at least 1"),
        (lambda: coverage.choose([1.0], [[1.0]], target=0.0), "coverage target must be in (0, 1]"),
        (lambda: coverage.choose([1.0], [[1.0]], budget=0), "view budget must be at least 1"),
        (lambda: coverage.coverage([0.0], [[1.0]], [0]), "the surface has no area"),
    ],
)
def test_bad_settings_are_refused_by_name(call, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        call()
