"""Colour matching between projection views (backend/color_match.py): a picture whose colours were moved in
Lab by a known shift and scale comes back, fitted on part of it, everywhere."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from backend.color_match import MIN_OVERLAP, from_lab, match_colors, to_lab


def smooth_picture(size: int = 64) -> PIL.Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([0.3 + 0.4 * x, 0.5 + 0.3 * np.sin(6 * y), 0.2 + 0.5 * x * y], -1)
    return PIL.Image.fromarray(np.rint(rgb * 255).astype(np.uint8))


def error(a: PIL.Image.Image, b: PIL.Image.Image, where=np.s_[:, :]) -> float:
    """Mean absolute difference in 0..255."""
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float))[where].mean())


def drifted(picture: PIL.Image.Image) -> PIL.Image.Image:
    """A view's colour drift: lighter, greener-yellower, its contrast changed, per Lab channel."""
    lab = to_lab(picture)
    return from_lab(np.clip((lab - 128) * np.array([0.8, 1.2, 0.9]) + 128 + np.array([20.0, -12.0, 15.0]), 0, 255))


def test_lab_round_trip_is_within_a_byte():
    picture = smooth_picture()
    assert error(from_lab(to_lab(picture)), picture) < 1.0


def test_a_drifted_view_fitted_on_its_overlap_is_matched_everywhere():
    reference = smooth_picture()
    view = drifted(reference)
    overlap = np.zeros((64, 64), dtype=bool)
    overlap[:, :32] = True  # fitted on the left half only
    matched = match_colors(view, reference, overlap)
    assert error(view, reference) > 15  # the drift is large...
    assert error(matched, reference, np.s_[:, 32:]) < 1.5  # ...and gone where the fit never looked
    assert error(matched, reference) < 1.5


def test_too_small_an_overlap_leaves_the_view_as_it_is():
    reference = smooth_picture()
    view = drifted(reference)
    overlap = np.zeros((64, 64), dtype=bool)
    overlap.flat[: MIN_OVERLAP - 1] = True
    assert error(match_colors(view, reference, overlap), view) == 0


def test_sizes_must_agree():
    with pytest.raises(ValueError, match="sizes differ"):
        match_colors(smooth_picture(64), smooth_picture(32), np.ones((64, 64), dtype=bool))
