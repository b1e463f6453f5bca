"""Scene settings of the panel (Scene.sdtex) and the generation history saved in the .blend.

Limits, defaults and choices come from protocol.py and materials.py: nothing is written twice.
"""

from __future__ import annotations

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from .. import protocol
from ..history import PBR_SETTINGS
from ..history import SETTINGS as HISTORY_SETTINGS
from . import materials

# The panel's names of materials.ApplyOptions' fields (texture_scale included).
APPLY_SETTINGS = ("shared_material", "slot", "projection", "texture_scale", "displacement", "ao_multiply", "pack")
INT32_MAX = 2**31 - 1  # Blender's IntProperty is 32-bit signed
LABELS = {
    "none": "Off",
    "x": "X",
    "y": "Y",
    "xy": "Both",
    "euler_a": "Euler Ancestral",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "unipc": "UniPC",
    "lcm": "LCM",
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "pndm": "PNDM",
    "auto": "Auto",
    "opengl": "OpenGL (Blender)",
    "directx": "DirectX",
    "cuda": "CUDA",
    "mps": "Apple (MPS)",
    "cpu": "CPU",
    "fp16": "FP16",
    "bf16": "BF16",
    "fp32": "FP32",
    "NEW": "New Slot",
    "REPLACE": "Replace Active",
    "UV": "UV",
    "BOX": "Box",
    "BUMP": "Bump",
    "DISPLACEMENT": "Displacement",
}


def enum_items(choices: tuple[str, ...]) -> list[tuple[str, str, str]]:
    return [(c, LABELS.get(c, c.replace("_", " ").title()), "") for c in choices]


def param_property(param_name: str, task: str = "txt2img", **extra):
    """A Blender property for one parameter of `task`, with its default, limits and help from protocol.py."""
    spec = protocol.param(param_name, task)
    kwargs = {"name": param_name.replace("_", " ").title(), "description": spec.help, **extra}
    if spec.choices:
        return EnumProperty(items=enum_items(spec.choices), default=spec.default, **kwargs)
    if spec.kind is bool:
        return BoolProperty(default=spec.default, **kwargs)
    if spec.kind is str:
        return StringProperty(default=spec.default, **kwargs)
    low, high = spec.range.low, spec.range.high
    if spec.kind is int:
        high = min(int(high), INT32_MAX)
        step = {"step": spec.range.multiple} if spec.range.multiple else {}
        return IntProperty(default=spec.default or 0, min=int(low), max=high, **step, **kwargs)
    return FloatProperty(default=spec.default, min=low, max=high, **kwargs)


class SDTEX_PG_history_entry(bpy.types.PropertyGroup):
    """One finished generation (history.HistoryRecord.to_fields)."""

    prompt: StringProperty(name="Prompt")
    negative_prompt: StringProperty(name="Negative Prompt")
    seed: StringProperty(name="Seed")  # text: seeds go beyond a 32-bit IntProperty; empty when none was sampled
    steps: IntProperty(name="Steps")
    guidance_scale: FloatProperty(name="Guidance Scale")
    width: IntProperty(name="Width")
    height: IntProperty(name="Height")
    scheduler: StringProperty(name="Scheduler")
    seamless: StringProperty(name="Seamless")
    pbr: BoolProperty(name="PBR Maps")
    normal_format: StringProperty(name="Normal Format", default="opengl")
    # Entries saved before these existed read the defaults.
    normal_strength: FloatProperty(name="Normal Strength", default=protocol.param("normal_strength").default)
    height_contrast: FloatProperty(name="Height Contrast", default=protocol.param("height_contrast").default)
    roughness_contrast: FloatProperty(name="Roughness Contrast", default=protocol.param("roughness_contrast").default)
    ao_strength: FloatProperty(name="AO Strength", default=protocol.param("ao_strength").default)
    model: StringProperty(name="Model")
    files: StringProperty(name="Files")  # JSON list of {path, seed, maps}
    created: StringProperty(name="Created")
    task: StringProperty(name="Task", default="txt2img")
    source: StringProperty(name="Source Image")  # the pbr task's source image (its name in the .blend)


class SDTEX_PG_scene(bpy.types.PropertyGroup):
    prompt: param_property("prompt")
    negative_prompt: param_property("negative_prompt")
    seed: param_property("seed")
    random_seed: BoolProperty(name="Random Seed", description="Pick a new seed for every generation", default=True)
    steps: param_property("steps")
    guidance_scale: param_property("guidance_scale")
    width: param_property("width")
    height: param_property("height")
    scheduler: param_property("scheduler")
    batch_size: param_property("batch_size", name="Batch")
    seamless: param_property("seamless")
    pbr: param_property("pbr", name="PBR Maps")
    normal_format: param_property("normal_format")
    normal_strength: param_property("normal_strength")
    height_contrast: param_property("height_contrast")
    roughness_contrast: param_property("roughness_contrast")
    ao_strength: param_property("ao_strength", name="AO Strength")
    model: StringProperty(name="Model", description="Model for this scene; empty uses the add-on preferences")
    # The pbr task's own choice: whether the image given tiles is not whether the next generation should.
    pbr_seamless: param_property("seamless", task="pbr", name="Image Tiles")

    apply: BoolProperty(name="Apply to Selection", description="Put the result on the selected meshes", default=True)
    shared_material: BoolProperty(
        name="Shared Material", description="One material for all selected objects, else one per object", default=True
    )
    slot: EnumProperty(name="Slot", items=enum_items(materials.SLOT_MODES), default="NEW")
    projection: EnumProperty(
        name="Projection",
        items=enum_items(materials.PROJECTIONS),
        description="UV: the object's UV map (made when missing); Box: triplanar, no UVs needed",
        default="UV",
    )
    texture_scale: FloatProperty(
        name="Texture Scale",
        description="UV repeats, or world units per tile with Box projection",
        default=1.0,
        min=materials.TEXTURE_SCALE_MIN,
        max=materials.TEXTURE_SCALE_MAX,
    )
    displacement: EnumProperty(
        name="Height",
        items=enum_items(materials.DISPLACEMENTS),
        description="Bump: shading only; Displacement: moves the surface too (Cycles; subdivide the mesh)",
        default="BUMP",
    )
    ao_multiply: BoolProperty(
        name="Multiply AO", description="Darken the base colour with the ambient occlusion map", default=False
    )
    pack: BoolProperty(
        name="Pack Images",
        description="Store the images and maps the add-on writes inside the .blend (your own images stay as they are)",
        default=False,
    )

    history: CollectionProperty(type=SDTEX_PG_history_entry)
    history_index: IntProperty(name="History Entry", default=0)

    def generate_settings(self, seed: int | None) -> dict:
        """The panel's generate parameters, as api.generate_params takes them."""
        return {name: getattr(self, name) for name in (*HISTORY_SETTINGS, "batch_size")} | {"seed": seed}

    def pbr_settings(self) -> dict:
        """The panel's pbr task parameters (all but the image), as api.pbr_params takes them."""
        return {name: getattr(self, name) for name in PBR_SETTINGS} | {"seamless": self.pbr_seamless}

    def apply_settings(self) -> dict:
        """How to build and assign materials, as api.apply_options takes them."""
        return {name: getattr(self, name) for name in APPLY_SETTINGS}


classes = (SDTEX_PG_history_entry, SDTEX_PG_scene)


def register() -> None:
    bpy.types.Scene.sdtex = PointerProperty(type=SDTEX_PG_scene)


def unregister() -> None:
    del bpy.types.Scene.sdtex
