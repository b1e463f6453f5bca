"""Scene settings of the panel (Scene.sdtex) and the generation history saved in the .blend.

Limits, defaults and choices come from protocol.py and materials.py: nothing is written twice. Each image
task (img2img, inpaint, make_seamless, upscale) gets a PropertyGroup generated from its protocol table
(Scene.sdtex.<task>), so a parameter added to or renamed in the table needs no edit here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

from ..contract import drafts, protocol
from ..history import ESTIMATOR_MODELS, IMAGE_TASKS, PBR_METHOD_SETTINGS, PBR_SETTINGS, HistoryRecord
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
    "tcd": "TCD",
    "ddim_trailing": "DDIM Trailing",
    "euler_a_trailing": "Euler Ancestral Trailing",
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
    "REUSE": "Reuse Its Slot",
    "NEW": "New Slot",
    "REPLACE": "Replace Active",
    "UV": "UV",
    "BOX": "Box",
    "BUMP": "Bump",
    "DISPLACEMENT": "Displacement",
    "rect": "Rectangle",
    "classical": "Classical",
    "model": "Model",
}
SLOT_HELP = {
    "REUSE": "Replace the texture in the slot the add-on filled before (a new slot the first time): trying again "
    "adds no slots, and your own materials stay",
    "NEW": "Add a slot for every result: earlier results and your own materials stay in theirs",
    "REPLACE": "Put the result in the active slot (the material taken out is kept in the file)",
}

SLOT_ITEMS = [(mode, LABELS[mode], SLOT_HELP[mode]) for mode in materials.SLOT_MODES]


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


# --- image tasks: one PropertyGroup per task, from its table -------------------------------------------

# Parameters no image task control shows: the task, the preferences' model, device and memory options,
# the image the Image Editor shows, where files go, the live preview (and its decoder) and the preferences' estimator
# models.
UI_FILLED = (
    frozenset(("task", "image", "vae_tiling", "preview_every", "preview_decoder", "output_dir", "filename_prefix"))
    | {p.name for p in protocol.MODEL_PARAMS}
    | set(ESTIMATOR_MODELS)
)
# The txt2img parameters the scene holds: the main panel's controls (the seed with its Random toggle), the maps'
# methods among them.
SCENE_PARAMS = (*HISTORY_SETTINGS, *PBR_METHOD_SETTINGS, "batch_size", "seed")


def scene_params(task: str) -> tuple[str, ...]:
    """The task's parameters that come from the main panel (prompt, seed, steps, size, PBR maps...): those
    the scene holds with the same type, choices and limits. Others with those names (seamless with Auto)
    are the task's own."""
    return tuple(
        p.name
        for p in protocol.TASK_PARAMS[task]
        if p.name in SCENE_PARAMS and p.name not in UI_FILLED and _same_control(p, protocol.param(p.name, "txt2img"))
    )


def own_params(task: str) -> tuple[protocol.Param, ...]:
    """The task's own controls, in table order: every parameter neither filled in by the UI nor taken from
    the main panel. An image input among them (the mask) is a pointer to a Blender image."""
    shared = scene_params(task)
    return tuple(p for p in protocol.TASK_PARAMS[task] if p.name not in UI_FILLED and p.name not in shared)


def _same_control(a: protocol.Param, b: protocol.Param) -> bool:
    return (a.kind, a.choices, a.range) == (b.kind, b.choices, b.range)


def task_property(p: protocol.Param, task: str):
    if p.kind is protocol.ImageInput:
        return PointerProperty(type=bpy.types.Image, name=p.name.replace("_", " ").title(), description=p.help)
    path = {"subtype": "FILE_PATH"} if p.kind is str and p.max_length == protocol.PATH_MAX else {}
    return param_property(p.name, task, **path)


def task_group(task: str) -> type:
    """A PropertyGroup holding `task`'s own controls (own_params), named after its parameters."""
    annotations = {p.name: task_property(p, task) for p in own_params(task)}
    doc = f"The {task} task's own settings (protocol.TASK_PARAMS[{task!r}])."
    return type(f"SDTEX_PG_{task}", (bpy.types.PropertyGroup,), {"__annotations__": annotations, "__doc__": doc})


TASK_GROUPS = {task: task_group(task) for task in IMAGE_TASKS}


@dataclass(frozen=True)
class ImageMode:
    """A choice of the Image Editor panel: a task, some of its parameters fixed or left at their defaults."""

    label: str
    task: str
    description: str
    fixed: dict = field(default_factory=dict)  # sent as given, not shown
    hidden: tuple[str, ...] = ()  # not shown, not sent (the worker's defaults)


_INPAINT = [p.name for p in protocol.TASK_PARAMS["inpaint"]]
OUTPAINT_PARAMS = tuple(n for n in _INPAINT if n.startswith(("extend_", "outpaint_")))
MASK_PARAMS = tuple(n for n in _INPAINT if n.startswith("mask"))
IMAGE_MODES = {
    "VARIATIONS": ImageMode("Variations", "img2img", protocol.TASK_HELP["img2img"]),
    "INPAINT": ImageMode("Inpaint", "inpaint", "Repaint the masked part of the image", hidden=OUTPAINT_PARAMS),
    "OUTPAINT": ImageMode(
        "Outpaint", "inpaint", "Extend the canvas on chosen sides and paint the new area",
        fixed={"mask_from": "none"}, hidden=MASK_PARAMS,
    ),
    "UPSCALE": ImageMode("Upscale", "upscale", protocol.TASK_HELP["upscale"]),
    "MAKE_SEAMLESS": ImageMode("Make Seamless", "make_seamless", protocol.TASK_HELP["make_seamless"]),
}  # fmt: skip
for _task in IMAGE_TASKS:  # a task added to the protocol is reachable before it gets a label of its own
    if not any(mode.task == _task for mode in IMAGE_MODES.values()):
        IMAGE_MODES[_task.upper()] = ImageMode(_task.replace("_", " ").title(), _task, protocol.TASK_HELP[_task])
# Controls that only matter for one choice of another (mask_from's "image" or "rect").
SHOWN_WHEN = {
    "mask": ("mask_from", "image"),
    **{name: ("mask_from", "rect") for name in ("mask_x", "mask_y", "mask_width", "mask_height")},
}


def shown_params(mode: ImageMode, group) -> list[protocol.Param]:
    """The controls the panel shows for `mode`, in table order (one that depends on another right after it),
    and so the values it sends: what you see is what is sent."""
    table = [p for p in own_params(mode.task) if p.name not in mode.hidden and p.name not in mode.fixed]
    order = [p.name for p in table]

    def position(p: protocol.Param) -> float:
        controller = SHOWN_WHEN.get(p.name, ("",))[0]
        return order.index(controller) + 0.5 if controller in order else order.index(p.name)

    return sorted(
        (
            p
            for p in table
            if p.name not in SHOWN_WHEN or getattr(group, SHOWN_WHEN[p.name][0], None) in (None, SHOWN_WHEN[p.name][1])
        ),
        key=position,
    )


def mode_of(record: HistoryRecord) -> str:
    """The panel's choice that repeats an image task's record: the mode of its task whose fixed values it
    has, the most specific one first (an inpaint record with mask_from none is an Outpaint)."""
    params = record.settings()
    modes = [key for key, mode in IMAGE_MODES.items() if mode.task == record.task]
    matching = [key for key in modes if all(params.get(k) == v for k, v in IMAGE_MODES[key].fixed.items())]
    return max(matching or modes, key=lambda key: len(IMAGE_MODES[key].fixed))


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
    speed: StringProperty(name="Speed", default="off")
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
    source: StringProperty(name="Source Image")  # the pbr or image task's source image (its name in the .blend)
    mask: StringProperty(name="Mask Image")  # an inpaint job's mask image (its name in the .blend)
    params: StringProperty(name="Parameters")  # image tasks: JSON of the job's parameters, images left out


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
    speed: param_property("speed")
    batch_size: param_property("batch_size", name="Batch")
    draft_preset: EnumProperty(
        name="Draft",
        description="What Draft runs before the final: a few-step preset (the LoRA ones take theirs from Preferences)",
        items=[(name, preset.label, preset.help) for name, preset in drafts.DRAFT_PRESETS.items()],
        default="steps",
    )
    seamless: param_property("seamless")
    pbr: param_property("pbr", name="PBR Maps")
    normal_format: param_property("normal_format")
    normal_strength: param_property("normal_strength")
    height_contrast: param_property("height_contrast")
    roughness_contrast: param_property("roughness_contrast")
    ao_strength: param_property("ao_strength", name="AO Strength")
    # Each map's method, the delight switch and the estimators' sampling (their models are the preferences').
    normal_method: param_property("normal_method", name="Normal")
    height_method: param_property("height_method", name="Height")
    roughness_method: param_property("roughness_method", name="Roughness")
    metallic_method: param_property("metallic_method", name="Metallic")
    delight: param_property("delight", name="Delight Albedo")
    estimate_steps: param_property("estimate_steps", name="Estimator Steps")
    ensemble_size: param_property("ensemble_size")
    processing_resolution: param_property("processing_resolution")
    model: StringProperty(name="Model", description="Model for this scene; empty uses the add-on preferences")
    # The pbr task's own choice: whether the image given tiles is not whether the next generation should.
    pbr_seamless: param_property("seamless", task="pbr", name="Image Tiles")
    # The Image Editor's image tasks: which one, and each task's own settings (Scene.sdtex.<task>, added below).
    image_task: EnumProperty(
        name="Task",
        items=[(key, mode.label, mode.description) for key, mode in IMAGE_MODES.items()],
        default="VARIATIONS",
    )

    apply: BoolProperty(name="Apply to Selection", description="Put the result on the selected meshes", default=True)
    shared_material: BoolProperty(
        name="Shared Material", description="One material for all selected objects, else one per object", default=True
    )
    slot: EnumProperty(name="Slot", items=SLOT_ITEMS, default="REUSE")
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
        """The panel's generate parameters, as tasks.generate_params takes them."""
        names = (*HISTORY_SETTINGS, *PBR_METHOD_SETTINGS, "batch_size")
        return {name: getattr(self, name) for name in names} | {"seed": seed}

    def pbr_settings(self) -> dict:
        """The panel's pbr task parameters (all but the image), as tasks.pbr_params takes them."""
        return {name: getattr(self, name) for name in PBR_SETTINGS} | {"seamless": self.pbr_seamless}

    def apply_settings(self) -> dict:
        """How to build and assign materials, as tasks.apply_options takes them."""
        return {name: getattr(self, name) for name in APPLY_SETTINGS}

    def image_task_settings(self, seed: int | None) -> tuple[str, dict, dict]:
        """The chosen image task, its parameters but the images (as tasks.task_params takes them), and
        its image inputs besides the Image Editor's image (the mask: a bpy Image, or None)."""
        mode = IMAGE_MODES[self.image_task]
        group = getattr(self, mode.task)
        values = {name: getattr(self, name) for name in scene_params(mode.task)}
        if "seed" in values:
            values["seed"] = seed
        inputs = {}
        for p in shown_params(mode, group):
            (inputs if p.kind is protocol.ImageInput else values)[p.name] = getattr(group, p.name)
        # FloatProperty is 32-bit: send 0.6, not 0.6000000238418579 (the files' metadata shows it).
        values = {name: round(v, 6) if isinstance(v, float) else v for name, v in values.items()}
        return mode.task, values | mode.fixed, inputs

    def restore_image_task(self, record: HistoryRecord) -> dict:
        """Choose `record`'s task and set its own controls (its mask image too, while it exists); return its
        settings that the main panel holds (prompt, seed, steps..., model) for the caller to set."""
        self.image_task = mode_of(record)
        mode = IMAGE_MODES[self.image_task]
        group = getattr(self, record.task)
        settings = record.settings()
        for p in own_params(record.task):
            if p.kind is protocol.ImageInput:
                if p.name == "mask" and record.mask in bpy.data.images:
                    setattr(group, p.name, bpy.data.images[record.mask])
            elif p.name in settings and p.name not in mode.fixed:
                setattr(group, p.name, settings[p.name])
        shared = set(scene_params(record.task)) | {"seed", "model"}
        return {name: value for name, value in settings.items() if name in shared}


for _task, _group in TASK_GROUPS.items():  # Scene.sdtex.img2img, .inpaint...: generated, so added here
    SDTEX_PG_scene.__annotations__[_task] = PointerProperty(type=_group)

# What "Use these settings" may set: the scene's controls that are task parameters (from the tables, so a
# parameter added to both can't be forgotten), the pbr section's own seamless, and the model.
SCENE_CONTROLS = frozenset(
    name
    for name in SDTEX_PG_scene.__annotations__
    if name in ("pbr_seamless", "model") or any(name == p.name for p in protocol.TASK_PARAMS["txt2img"])
)
classes = (SDTEX_PG_history_entry, *TASK_GROUPS.values(), SDTEX_PG_scene)


def register() -> None:
    bpy.types.Scene.sdtex = PointerProperty(type=SDTEX_PG_scene)


def unregister() -> None:
    del bpy.types.Scene.sdtex
