"""SD Textures: text prompts to textures and materials, with Stable Diffusion in a separate worker.

This file stays importable without bpy, so that the add-on's Blender-free modules (client, jobs, installer, ...) run
and are tested outside Blender. Everything that needs Blender is imported inside register().
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
    from . import api, blender

    blender.register(api)  # api is handed in for the public-name alias: the Blender side never imports it


def unregister() -> None:
    from . import api, blender

    blender.unregister(api)
