"""The Export for Game Engines operator and its sidebar panel (3D Viewport > SD Textures > Export for Engines).

Thin, after glTF-Blender-IO: the operator's properties become a dict, blender/export.py does the work, and an
SDTexError (nothing selected, no generated material, a folder that cannot be written) becomes an ERROR report.
"""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, StringProperty

from ..engine_export import ENGINES, SIZES
from . import export, panels, session
from .operator_base import SDTexOperator

DEFAULT_SUBFOLDER = "game_export"  # in the output folder, when no folder is given
ENGINE_ITEMS = [
    (key, preset.label, f"{preset.label}: {'DirectX' if preset.directx_normals else 'OpenGL'} normal map")
    for key, preset in ENGINES.items()
]
SIZE_ITEMS = [(str(size), f"{size} px" if size else "As Is", "") for size in SIZES]


def export_folder(folder: str) -> str:
    """The folder to write into: the one given ("//" = next to the .blend), else <output folder>/game_export."""
    if folder.strip():
        return bpy.path.abspath(folder)
    return bpy.path.native_pathsep(f"{session.output_folder(None)}/{DEFAULT_SUBFOLDER}")


class SDTEX_OT_export_for_engines(SDTexOperator, bpy.types.Operator):
    """Write a texture set (BaseColor, Normal, ORM, Height PNGs) per generated material on the selected objects, \
and a GLB of them"""

    bl_idname = "sdtex.export_for_engines"
    bl_label = "Export for Game Engines"
    bl_options = {"REGISTER"}

    folder: StringProperty(
        name="Folder", subtype="DIR_PATH", description="Where the files go; empty: game_export in the output folder"
    )
    engine: EnumProperty(name="Engine", items=ENGINE_ITEMS, default="gltf", description="The engine's conventions")
    size: EnumProperty(name="Size", items=SIZE_ITEMS, default="0", description="Longest side of every texture")
    glb: BoolProperty(name="GLB", default=True, description="Also write scene.glb of the selected objects")

    @classmethod
    def poll(cls, context):
        return bool(context.selected_objects)

    def invoke(self, context, event):
        return context.window_manager.invoke_props_dialog(self)

    def run(self, context, props: dict) -> str:
        result = export.export_for_engines(
            context.selected_objects,
            export_folder(props["folder"]),
            engine=props["engine"],
            size=int(props["size"]),
            glb=props["glb"],
        )
        return result.message()


class SDTEX_PT_export_for_engines(panels.SidebarPanel, bpy.types.Panel):
    bl_space_type = "VIEW_3D"  # objects are selected there
    bl_idname = "SDTEX_PT_export_for_engines"
    bl_label = "Export for Engines"
    bl_options = {"DEFAULT_CLOSED"}
    bl_order = panels.MainPanel.bl_order + 1  # its own panel, below Generate and its sub-panels

    def draw(self, context):
        layout = self.layout
        layout.operator(SDTEX_OT_export_for_engines.bl_idname, icon="EXPORT")
        if not context.selected_objects:
            layout.label(text="Select the textured objects first", icon="INFO")


classes = (SDTEX_OT_export_for_engines, SDTEX_PT_export_for_engines)
