"""SD Textures: text prompts to textures and materials, with Stable Diffusion in a separate worker.

This file stays importable without bpy: the backend worker imports `blender_sd_addon.protocol`, which
runs this package's __init__. Everything that needs Blender is imported inside register().
"""

bl_info = {
    "name": "SD Textures",
    "author": "SD Textures contributors",
    "version": (0, 1, 0),
    "blender": (3, 4, 0),
    "location": "3D Viewport > Sidebar > SD Textures",
    "description": "Generate textures and PBR materials from text prompts with Stable Diffusion",
    "doc_url": "",
    "category": "Material",
}


def register() -> None:
    from . import blender

    blender.register()


def unregister() -> None:
    from . import blender

    blender.unregister()
