"""Export for game engines, the Blender-free part: engine presets, texture sizes, texture-set file names, the 16-bit
height PNG and the result of an export.

A texture set is one material's maps as engines import them: `<material>_BaseColor.png` (sRGB), `<material>_Normal.png`
(the engine's normal convention), `<material>_ORM.png` (R = ambient occlusion, G = roughness, B = metallic, the glTF
and Unreal packing) and `<material>_Height.png` (16-bit grey, when the material has a height map). The bpy side is
blender/export.py; stdlib only, so it is tested without Blender.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from array import array
from dataclasses import dataclass, field

from .png import COMPRESSION, SIGNATURE, _chunk


@dataclass(frozen=True)
class EnginePreset:
    """What an engine expects of a texture set."""

    label: str
    directx_normals: bool  # green down (DirectX, Unreal) instead of green up (OpenGL: glTF, Unity, Godot, Blender)


ENGINES = {
    "gltf": EnginePreset("glTF 2.0", directx_normals=False),
    "unreal": EnginePreset("Unreal Engine", directx_normals=True),
    "unity": EnginePreset("Unity", directx_normals=False),
    "godot": EnginePreset("Godot", directx_normals=False),
}
SIZES = (0, 512, 1024, 2048, 4096)  # the longest side of every texture; 0 keeps each map's own size
SUFFIXES = {"base_color": "BaseColor", "normal": "Normal", "orm": "ORM", "height": "Height"}
GLB_NAME = "scene"  # <folder>/scene.glb
DEFAULT_NAME = "Material"  # a material name with nothing left after sanitising


@dataclass
class TextureSet:
    """One material's files: kind ("base_color", "normal", "orm", "height") -> path."""

    material: str
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class ExportResult:
    """What export_for_engines wrote: the GLB (empty when not asked for), one texture set per generated material,
    and the objects in the GLB."""

    engine: str
    folder: str
    glb: str
    texture_sets: list[TextureSet]
    objects: list[str]

    def message(self) -> str:
        """A line such as "Exported 2 objects, 1 texture set to /out/scene.glb" (the folder without a GLB)."""
        objects = _count(len(self.objects), "object")
        sets = _count(len(self.texture_sets), "texture set")
        return f"Exported {objects}, {sets} to {self.glb or self.folder}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def check_options(engine: str, size: int, folder: str, name: str = GLB_NAME) -> None:
    """Raise ValueError naming the parameter when engine, size, folder or the GLB's name cannot be exported to."""
    if not isinstance(name, str) or sanitise(name) != name:
        raise ValueError(f"name must be a file name of letters, digits, '_' and '-' (no extension); got {name!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if isinstance(size, bool) or size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(map(str, SIZES))} (0 = as is); got {size!r}")
    if not isinstance(folder, str) or not folder.strip():
        raise ValueError("folder must be a folder path to write the textures and the GLB into; got none")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"folder is a file, not a folder: {folder}")
    existing = _existing_parent(os.path.abspath(folder))
    if not os.path.isdir(existing):
        raise ValueError(f"folder cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"folder cannot be written: {existing} is not writable")


def _existing_parent(path: str) -> str:
    """The folder itself, or its nearest parent that exists (where it would be made)."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def sanitise(name: str) -> str:
    """A material name as a file name stem every engine and file system accepts: letters, digits, "_" and "-"."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return cleaned or DEFAULT_NAME


def texture_set_stems(material_names: list[str]) -> dict[str, str]:
    """Material name -> file stem, unique among the names given ("Wood.001" and "Wood 001" would share a stem:
    the second one becomes "Wood_001_2")."""
    stems: dict[str, str] = {}
    taken: set[str] = set()
    for name in material_names:
        stem, number = sanitise(name), 2
        base = stem
        while stem.lower() in taken:  # case-insensitive file systems (Windows, macOS)
            stem, number = f"{base}_{number}", number + 1
        taken.add(stem.lower())
        stems[name] = stem
    return stems


def file_name(stem: str, kind: str) -> str:
    """`<stem>_<suffix>.png` for a texture kind of SUFFIXES."""
    return f"{stem}_{SUFFIXES[kind]}.png"


def scaled_size(width: int, height: int, size: int) -> tuple[int, int]:
    """A map's size in the export: as is (size 0), else the longest side `size` and the aspect ratio kept."""
    if size == 0 or max(width, height) == size:
        return width, height
    if width >= height:
        return size, max(1, round(height * size / width))
    return max(1, round(width * size / height)), size


def flips_green(source_directx: bool, engine: str) -> bool:
    """Whether a normal map drawn in one convention must have its green flipped for the engine."""
    return source_directx != ENGINES[engine].directx_normals


def encode_gray16(width: int, height: int, values: array, bottom_up: bool = False) -> bytes:
    """A 16-bit greyscale PNG of `values` (floats in [0, 1], one per pixel, rows top to bottom, or bottom to top as
    Blender stores them when bottom_up is set): height maps keep their steps finer than 8 bits."""
    if width < 1 or height < 1 or len(values) != width * height:
        raise ValueError(f"values must hold width * height = {width * height} numbers, got {len(values)}")
    if values and (min(values) < 0.0 or max(values) > 1.0):  # clamping per value costs 3x: only when needed
        values = array("f", [min(1.0, max(0.0, v)) for v in values])
    samples = array("H", [int(v * 65535.0 + 0.5) for v in values])
    if samples.itemsize != 2:
        raise RuntimeError("array('H') is not 16-bit on this platform")
    if struct.pack("=H", 1) == struct.pack("<H", 1):
        samples.byteswap()  # PNG is big-endian
    raw = samples.tobytes()
    row = width * 2
    rows = reversed(range(height)) if bottom_up else range(height)
    data = b"".join(b"\x00" + raw[y * row : (y + 1) * row] for y in rows)
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # 16-bit, colour type 0 (grey)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(data, COMPRESSION)) + _chunk(b"IEND")
