"""Generate a texture from a prompt and put it on the selected meshes (or a new cube), without the UI.

    blender -b scene.blend -P examples/headless_api.py -- --prompt "rusty metal plate" --seamless xy
    .venv/bin/python examples/headless_api.py --prompt "rusty metal plate" --save /tmp/rust.blend

Blender itself needs no torch: the add-on runs the backend in its own Python (Preferences > Install
backend, or this repository's .venv). --model takes a hub id, a diffusers folder or a .safetensors file;
without it the add-on preferences decide.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import bpy


def parse_args() -> argparse.Namespace:
    argv = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else sys.argv[1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="weathered red brick wall, photo texture")
    parser.add_argument("--model", default=None)
    parser.add_argument("--seamless", default="xy", choices=("none", "x", "y", "xy"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512, help="width and height in pixels")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--pbr", action="store_true", help="also make normal, height, roughness and AO maps")
    parser.add_argument("--output", default=None, help="folder for the images (default: the preferences')")
    parser.add_argument("--save", default=None, help="save the .blend here afterwards")
    return parser.parse_args(argv)


def main() -> int:
    import addon_utils  # importable once bpy is (Blender as a Python module)

    args = parse_args()
    if importlib.util.find_spec("blender_sd_addon") is None:  # not installed: run from a source checkout
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if addon_utils.enable("blender_sd_addon", default_set=True) is None:
        print("Could not enable the SD Textures add-on (see the error above)")
        return 1
    from blender_sd_addon.api import SDTexError, generate_texture, shutdown_backend

    objects = [obj for obj in bpy.context.selected_objects if obj.type == "MESH"]
    if not objects:
        bpy.ops.mesh.primitive_cube_add()
        objects = [bpy.context.active_object]
    try:
        result = generate_texture(
            objects,
            args.prompt,
            model=args.model,
            seed=args.seed,
            steps=args.steps,
            width=args.size,
            height=args.size,
            seamless=args.seamless,
            pbr=args.pbr,
            output_dir=args.output,
        )
    except SDTexError as exc:
        print(f"SD Textures: {exc}")
        return 1
    finally:
        shutdown_backend()
    print(f"seed {result.seed}; files:")
    for path in result.files:
        print(f"  {path}")
    for material in result.materials:
        print(f"material {material.name!r} on {', '.join(obj.name for obj in objects)}")
    if args.save:
        bpy.ops.wm.save_as_mainfile(filepath=args.save)
    return 0


if __name__ == "__main__":
    status = main()
    if status:
        sys.exit(status)
