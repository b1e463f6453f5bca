"""Blender images as job inputs (blender/images.py) in real Blender (the bpy module), no worker: a file is sent
by path, anything else as bytes that decode (with Pillow) to exactly the pixels Blender holds, top row first.
The worker's side (same maps by path and by bytes) is in test_pbr_maps.py."""

import hashlib
import io
import os

import numpy as np
import pytest
from PIL import Image

bpy = pytest.importorskip("bpy")
from blender_sd_addon.blender.images import image_reference  # noqa: E402


class Uploads:
    """Stands in for BackendClient.upload: keeps the bytes, answers their sha256."""

    def __init__(self):
        self.data: list[bytes] = []

    def upload(self, data: bytes) -> str:
        self.data.append(data)
        return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def empty_file():
    bpy.ops.wm.read_factory_settings(use_empty=True)


@pytest.fixture
def png_file(tmp_path) -> str:
    """A 5 x 3 RGB PNG whose rows all differ, so a flipped image cannot pass."""
    path = tmp_path / "tile.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (3, 5, 3), dtype=np.uint8), "RGB").save(path)
    return str(path)


def blender_pixels(image) -> np.ndarray:
    """What Blender holds, as 8-bit RGBA rows top to bottom (Blender stores them bottom to top)."""
    width, height = image.size
    values = np.empty(width * height * 4, dtype=np.float32)
    image.pixels.foreach_get(values)
    return np.flipud(np.round(values.reshape(height, width, 4) * 255).astype(np.uint8))


def sent(image) -> tuple[dict, bytes | None]:
    uploads = Uploads()
    reference = image_reference(image, uploads)
    assert len(uploads.data) == ("sha256" in reference)
    if uploads.data:
        assert reference == {"sha256": hashlib.sha256(uploads.data[0]).hexdigest()}
    return reference, uploads.data[0] if uploads.data else None


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as picture:
        return np.asarray(picture.convert("RGBA"))


def test_an_unchanged_file_is_sent_by_path(png_file):
    image = bpy.data.images.load(png_file)
    assert sent(image) == ({"path": png_file}, None)


def test_a_generated_unsaved_image_is_sent_as_its_pixels():
    image = bpy.data.images.new("Unsaved", 5, 3, alpha=True)
    image.pixels.foreach_set(np.random.default_rng(1).integers(0, 256, 5 * 3 * 4).astype(np.float32) / 255)
    reference, data = sent(image)
    assert data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(decoded(data), blender_pixels(image))
    assert image.is_dirty and image.packed_file is None and image.filepath == ""  # never saved or packed


def test_a_painted_file_image_sends_the_paint_and_leaves_file_and_image_alone(png_file):
    image = bpy.data.images.load(png_file)
    on_disk = open(png_file, "rb").read()
    image.pixels[0:4] = (1.0, 0.0, 0.5, 1.0)  # bottom-left pixel: the last row of the PNG
    assert image.is_dirty

    _, data = sent(image)
    pixels = decoded(data)
    np.testing.assert_array_equal(pixels, blender_pixels(image))
    assert tuple(pixels[-1, 0]) == (255, 0, 128, 255)
    assert open(png_file, "rb").read() == on_disk
    assert image.is_dirty and image.packed_file is None


def test_a_packed_image_sends_its_packed_bytes(png_file):
    image = bpy.data.images.load(png_file)
    image.pack()
    os.remove(png_file)  # packed: the .blend has it, the disk need not
    _, data = sent(image)
    assert data == image.packed_file.data
    np.testing.assert_array_equal(decoded(data), blender_pixels(image))


def test_a_packed_image_in_a_format_the_worker_cannot_read_sends_its_pixels(tmp_path):
    made = bpy.data.images.new("Iris", 4, 2)
    made.pixels.foreach_set(np.linspace(0, 1, 4 * 2 * 4, dtype=np.float32))
    made.filepath_raw, made.file_format = str(tmp_path / "iris.rgb"), "IRIS"
    made.save()
    image = bpy.data.images.load(str(tmp_path / "iris.rgb"))
    image.pack()
    _, data = sent(image)
    assert data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(decoded(data), blender_pixels(image))


def test_a_float_image_is_divided_by_alpha_and_turned_into_srgb():
    image = bpy.data.images.new("Linear", 3, 2, alpha=True, float_buffer=True)
    # Scene-linear, premultiplied, bottom row first (as Blender holds them); 2.0 is brighter than white.
    pixels = np.array(
        [[[0.0, 0.001, 0.05, 1.0], [0.2, 0.5, 1.0, 1.0], [2.0, 0.18, 0.9, 1.0]],
         [[0.1, 0.1, 0.1, 0.5], [0.3, 0.7, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]],
        dtype=np.float32,
    )
    image.pixels.foreach_set(pixels.ravel())
    _, data = sent(image)

    alpha = pixels[..., 3:].astype(np.float64)
    straight = np.clip(np.divide(pixels[..., :3], alpha, out=np.zeros((2, 3, 3)), where=alpha > 0), 0.0, 1.0)
    srgb = np.where(straight <= 0.0031308, straight * 12.92, 1.055 * straight ** (1 / 2.4) - 0.055)
    expected = np.flipud(np.round(np.concatenate([srgb, alpha], axis=2) * 255))
    np.testing.assert_allclose(decoded(data), expected, atol=1)  # float32 against float64 rounding
    assert tuple(decoded(data)[0, 0]) == (124, 124, 124, 128)  # top-left: 0.1 / 0.5 = 0.2 linear, half alpha


def test_a_sixteen_bit_file_loads_as_float_and_is_sent_as_pixels_not_by_path(tmp_path):
    path = tmp_path / "height16.png"
    Image.fromarray((np.arange(12, dtype=np.uint16) * 5000).reshape(3, 4)).save(path)
    image = bpy.data.images.load(str(path))
    assert image.is_float
    reference, data = sent(image)
    assert "sha256" in reference and data.startswith(b"\x89PNG")


def test_images_without_pixels_are_refused_by_name(tmp_path):
    missing = bpy.data.images.new("Missing", 4, 4)
    missing.source, missing.filepath = "FILE", str(tmp_path / "gone.png")
    with pytest.raises(ValueError, match="image 'Missing' has no pixels: its file is missing"):
        image_reference(missing, Uploads())
    sequence = bpy.data.images.new("Frames", 4, 4)
    sequence.source = "SEQUENCE"
    with pytest.raises(ValueError, match="image 'Frames' is a sequence image; accepted: a file, packed"):
        image_reference(sequence, Uploads())
