"""PBR maps: tileable albedos give tileable maps, normals follow the OpenGL/DirectX conventions."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from scipy import ndimage

from backend.pbr import derive_maps

H, W = 48, 64  # not square, so swapped axes cannot pass
MAPS = ("height", "normal", "roughness", "ao")


def tileable_albedo(seed: int = 0) -> PIL.Image.Image:
    """Sinusoids with whole periods across the image plus a smoothed random field: tiles by construction."""
    y, x = np.mgrid[0:H, 0:W] / np.array([H, W])[:, None, None]
    waves = [np.sin(2 * np.pi * (2 * x + y)), np.cos(2 * np.pi * 3 * y), np.sin(2 * np.pi * (x - 2 * y))]
    noise = np.random.default_rng(seed).normal(size=(H, W, 3))
    field = ndimage.gaussian_filter(noise, (1, 1, 0), mode="wrap") * 2
    rgb = 0.5 + 0.15 * np.stack(waves, axis=-1) + 0.15 * field
    return PIL.Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def arrays(maps: dict[str, PIL.Image.Image]) -> dict[str, np.ndarray]:
    return {name: np.asarray(image).astype(np.int64) for name, image in maps.items()}


def roll_mismatch(wrap_x: bool, wrap_y: bool, shift: tuple[int, int]) -> dict[str, int]:
    """Per map: max level difference between the maps of the rolled albedo and the rolled maps."""
    albedo = tileable_albedo()
    rolled_albedo = PIL.Image.fromarray(np.roll(np.asarray(albedo), shift, axis=(0, 1)))
    maps = arrays(derive_maps(albedo, wrap_x=wrap_x, wrap_y=wrap_y))
    maps_of_rolled = arrays(derive_maps(rolled_albedo, wrap_x=wrap_x, wrap_y=wrap_y))
    return {n: int(np.abs(maps_of_rolled[n] - np.roll(maps[n], shift, axis=(0, 1))).max()) for n in MAPS}


def decode_normal(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.float64) / 255 * 2 - 1


def ramp(direction: str) -> PIL.Image.Image:
    """Grey ramp getting brighter (so higher) towards the top ("up") or the right ("right")."""
    rows, cols = np.mgrid[0:H, 0:W]
    value = (H - 1 - rows) / (H - 1) if direction == "up" else cols / (W - 1)
    return PIL.Image.fromarray(np.round(value * 200 + 20).astype(np.uint8)).convert("RGB")


@pytest.mark.parametrize("shift", [(0, 5), (0, 37), (7, 0), (29, 0), (13, 21), (47, 63)])
def test_maps_of_a_rolled_tileable_albedo_are_the_rolled_maps(shift):
    mismatch = roll_mismatch(True, True, shift)
    assert max(mismatch.values()) <= 1, mismatch


@pytest.mark.parametrize("shift", [(0, 5), (13, 0), (13, 21)])
def test_without_wrapping_the_maps_grow_seams(shift):
    mismatch = roll_mismatch(False, False, shift)
    assert mismatch["normal"] > 5 and mismatch["height"] > 1, mismatch


@pytest.mark.parametrize("wrap_x, wrap_y", [(True, False), (False, True)])
def test_each_axis_wraps_on_its_own(wrap_x, wrap_y):
    along_x, along_y = roll_mismatch(wrap_x, wrap_y, (0, 21)), roll_mismatch(wrap_x, wrap_y, (13, 0))
    tiled, untiled = (along_x, along_y) if wrap_x else (along_y, along_x)
    assert max(tiled.values()) <= 1, tiled
    assert untiled["normal"] > 5, untiled


def test_modes_and_sizes():
    maps = derive_maps(tileable_albedo(), wrap_x=True, wrap_y=True)
    assert {n: (m.mode, m.size) for n, m in maps.items()} == {
        "height": ("I;16", (W, H)),
        "normal": ("RGB", (W, H)),
        "roughness": ("L", (W, H)),
        "ao": ("L", (W, H)),
    }


@pytest.mark.parametrize("strength", [1.0, 5.0, 10.0])
def test_normals_are_unit_length(strength):
    normal = decode_normal(derive_maps(tileable_albedo(), wrap_x=True, wrap_y=True, strength=strength)["normal"])
    length = np.linalg.norm(normal, axis=-1)
    assert length.min() >= 0.98 and length.max() <= 1.02
    assert normal[..., 2].min() < 0.99  # the relief actually tilts some normals


def test_opengl_normals_point_away_from_the_slope():
    # OpenGL tangent space (Blender's): +X right, +Y up the image. A surface rising towards the top faces
    # down, so n.y < 0 (green below 128); one rising towards the right faces left, so n.x < 0 (red below 128).
    inner = (slice(3, -3), slice(3, -3))  # away from the borders, where reflection flattens the ramp
    up = decode_normal(derive_maps(ramp("up"), wrap_x=False, wrap_y=False, strength=5)["normal"])[inner]
    right = decode_normal(derive_maps(ramp("right"), wrap_x=False, wrap_y=False, strength=5)["normal"])[inner]
    assert up[..., 1].max() < -0.05 and np.abs(up[..., 0]).max() < 0.01
    assert right[..., 0].max() < -0.05 and np.abs(right[..., 1]).max() < 0.01


def test_directx_flips_only_green():
    albedo = tileable_albedo()
    opengl, directx = (
        np.asarray(derive_maps(albedo, wrap_x=True, wrap_y=True, strength=3, normal_format=f)["normal"]).astype(int)
        for f in ("opengl", "directx")
    )
    assert np.array_equal(opengl[..., [0, 2]], directx[..., [0, 2]])
    assert np.abs(directx[..., 1] - (255 - opengl[..., 1])).max() <= 1  # 8-bit rounding of -g
    assert np.abs(directx[..., 1] - opengl[..., 1]).max() > 20


def test_zero_controls_flatten_their_own_map_only():
    albedo = tileable_albedo()
    flat_normal = arrays(derive_maps(albedo, wrap_x=True, wrap_y=True, strength=0.0))
    assert (flat_normal["normal"] == [128, 128, 255]).all()
    assert flat_normal["ao"].min() < 250  # AO has its own control
    no_ao = arrays(derive_maps(albedo, wrap_x=True, wrap_y=True, ao_strength=0.0))
    assert (no_ao["ao"] == 255).all() and no_ao["normal"][..., 0].std() > 1
    uniform = arrays(derive_maps(albedo, wrap_x=True, wrap_y=True, roughness_contrast=0.0))
    assert uniform["roughness"].min() == uniform["roughness"].max()
    flat_height = arrays(derive_maps(albedo, wrap_x=True, wrap_y=True, height_contrast=0.0))
    assert (flat_height["height"] == round(0.5 * 65535)).all()


def test_contrast_controls_widen_the_spread():
    albedo = tileable_albedo()
    soft, hard = (arrays(derive_maps(albedo, wrap_x=True, wrap_y=True, roughness_contrast=c)) for c in (0.5, 2.0))
    assert hard["roughness"].astype(float).std() > 1.5 * soft["roughness"].astype(float).std()


def test_stronger_relief_tilts_normals_more():
    albedo = tileable_albedo()
    tilt = [
        decode_normal(derive_maps(albedo, wrap_x=True, wrap_y=True, strength=s)["normal"])[..., 2].mean()
        for s in (1.0, 4.0)
    ]
    assert tilt[1] < tilt[0] - 0.01


def test_brightness_drives_height_roughness_and_ao():
    # A dark pit in a bright field: the pit is low, rough and occluded; the far field is high, smooth, open.
    grey = np.full((H, W), 200, np.uint8)
    grey[20:28, 28:36] = 40
    maps = arrays(derive_maps(PIL.Image.fromarray(grey).convert("RGB"), wrap_x=True, wrap_y=True))
    pit, field = (24, 32), (4, 4)
    assert maps["height"][pit] < maps["height"][field]
    assert maps["roughness"][pit] > maps["roughness"][field]
    assert maps["ao"][pit] < maps["ao"][field] == 255


def test_flat_albedo_gives_neutral_maps():
    maps = arrays(derive_maps(PIL.Image.new("RGB", (W, H), (90, 120, 60)), wrap_x=False, wrap_y=False))
    assert (maps["height"] == 32768).all()  # 0.5: Blender's displacement midlevel
    assert (maps["normal"] == [128, 128, 255]).all()
    assert (maps["ao"] == 255).all()
    assert np.unique(maps["roughness"]).size == 1


def test_deterministic():
    albedo = tileable_albedo(seed=3)
    first, second = (arrays(derive_maps(albedo, wrap_x=True, wrap_y=False, strength=2.5)) for _ in range(2))
    assert all(np.array_equal(first[n], second[n]) for n in MAPS)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"normal_format": "vulkan"}, "normal_format must be one of opengl, directx"),
        ({"strength": -1.0}, "strength must be a finite number >= 0"),
        ({"strength": float("nan")}, "strength must be a finite number >= 0"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        derive_maps(tileable_albedo(), wrap_x=True, wrap_y=True, **kwargs)
