"""The history list's operators: Apply Again, Use These Settings, Tile Preview.

Every task leaves a record: images (txt2img, image tasks, pbr, travel), baked textures (project: Apply Again
puts each back on its object) and LoRAs (train_lora: Apply Again enables it in the LoRA list)."""

from __future__ import annotations

import bpy
from bpy.props import StringProperty

from ..client import SDTexError
from ..history import IMAGE_TASKS, HistoryRecord
from . import materials, projecting, session, tasks
from .operator_base import SDTexOperator
from .properties import INT32_MAX, SCENE_CONTROLS
from .results import apply_record
from .train import use_lora


def active_record(context) -> HistoryRecord:
    settings = context.scene.sdtex
    if not 0 <= settings.history_index < len(settings.history):
        raise SDTexError("Pick an entry in the history first")
    return HistoryRecord.from_fields(settings.history[settings.history_index])


class SDTEX_OT_apply_history(SDTexOperator, bpy.types.Operator):
    """Put the selected history entry's image on the selected meshes again"""

    bl_idname = "sdtex.apply_history"
    bl_label = "Apply Again"
    bl_options = {"REGISTER", "UNDO"}

    def run(self, context, props: dict) -> None:
        record = active_record(context)
        options = tasks.apply_options(**context.scene.sdtex.apply_settings())
        if record.task == "train_lora":
            use_lora(context.scene, record.images()[0].path)
        elif record.task == projecting.TASK:  # on the objects it was baked for, not the selection
            projecting.apply_project_record(record, tasks.apply_options(shared_material=False, slot=options.slot))
        else:
            apply_record(record, tasks.mesh_objects(context.selected_objects), options)


def restore_settings(settings, record: HistoryRecord) -> None:
    """Copy a record's prompt, seed and settings into the panel: an image task's own settings to its section, the
    rest (prompt, seed...) to the main panel; the preferences' device and memory options are left alone."""
    # A pbr record's seamless says whether its image tiles: the pbr section's own choice.
    panel_names = {"seamless": "pbr_seamless"} if record.task == "pbr" else {}
    if record.task == "train_lora":  # the Train panel's settings, not the main panel's
        restore_into(settings.id_data.sdtex_train, record.params)
        return
    if record.task == projecting.TASK:
        restore_into(settings.id_data.sdtex_project, record.params)
    values = settings.restore_image_task(record) if record.task in IMAGE_TASKS else record.settings()
    for name, value in values.items():
        if name == "seed" and value is None:  # a job that sampled nothing (strength 0)
            continue
        if panel_names.get(name, name) not in SCENE_CONTROLS:
            continue
        if name == "seed":
            settings.random_seed = value > INT32_MAX
            settings.seed = value if value <= INT32_MAX else settings.seed
        elif name == "model":  # keep following the preferences when the entry used their model
            settings.model = "" if value == session.load_model_params()["model"] else value
        else:
            setattr(settings, panel_names.get(name, name), value)


def restore_into(group, values: dict) -> None:
    """Set the group's properties that `values` names (a sub-panel's own settings); others are left alone."""
    properties = group.bl_rna.properties
    for name, value in values.items():
        if name in properties and not properties[name].is_readonly and properties[name].type != "POINTER":
            try:
                setattr(group, name, value)
            except (TypeError, ValueError):  # a value the panel cannot hold (out of its range): keep the panel's
                continue


class SDTEX_OT_use_history_settings(SDTexOperator, bpy.types.Operator):
    """Copy the selected history entry's prompt, seed and settings into the panel"""

    bl_idname = "sdtex.use_history_settings"
    bl_label = "Use These Settings"
    bl_options = {"REGISTER", "UNDO"}

    def run(self, context, props: dict) -> None:
        record = active_record(context)
        restore_settings(context.scene.sdtex, record)
        if record.seed is not None and record.seed > INT32_MAX:
            self.report({"WARNING"}, f"Seed {record.seed} is above the panel's limit {INT32_MAX}: left random")


class SDTEX_OT_tile_preview(SDTexOperator, bpy.types.Operator):
    """Show the image repeated 2x2 in the Image Editor, to check that it tiles"""

    bl_idname = "sdtex.tile_preview"
    bl_label = "Tile Preview"
    errors = (SDTexError, ValueError)

    filepath: StringProperty(
        name="Image", description="Image file; empty uses the selected history entry", subtype="FILE_PATH"
    )

    def run(self, context, props: dict) -> None:
        record = None if props["filepath"] else active_record(context)
        if record is not None and record.task == "train_lora":
            raise SDTexError("This entry is a LoRA, not an image: Apply Again enables it in the LoRA list")
        path = props["filepath"] or record.images()[0].path
        if not path:
            raise SDTexError("This entry's image is not a file (its maps were made from an unsaved image)")
        materials.show_tile_preview(bpy.path.abspath(path))


classes = (SDTEX_OT_apply_history, SDTEX_OT_use_history_settings, SDTEX_OT_tile_preview)
