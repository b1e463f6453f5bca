"""The main job: headless Blender textures a small scene from prompts, renders it, saves the .blend.

    make demo                                    # = .venv/bin/python examples/texture_scene.py
    blender -b -P examples/texture_scene.py -- --model stable-diffusion-v1-5/stable-diffusion-v1-5

Options after `--`: --model ID_OR_PATH, --controlnet ID_OR_PATH (a depth ControlNet for the model),
--out DIR (default ./demo_output), --steps N, --size PX.
Four objects get generated textures; a fifth (the Statue) is textured by projection (depth-guided views
baked into its UV map). Without a usable model (no weights in the local Hugging Face cache and no hub
access) it falls back to a tiny random model and a tiny ControlNet built offline, says so plainly, and
still runs the real pipeline end to end: the textures are then noise, but every step (backend, materials,
PBR maps, projection, render, export, save) is real. The textured objects are exported for game engines
too: demo_output/scene.glb and a texture set per material (<material>_BaseColor/_Normal/_ORM/_Height.png),
checked by the Khronos glTF validator when Node.js is there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import bpy

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # running from a checkout, not an installed add-on
    sys.path.insert(0, str(REPO))

from blender_sd_addon import api, paths  # noqa: E402

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_CONTROLNET = "lllyasviel/control_v11f1p_sd15_depth"

# (object name, prompt, texture options)
JOBS = [
    ("Floor", "seamless cobblestone floor, top-down photo, even lighting",
     dict(seamless="xy", pbr=True, projection="BOX", texture_scale=2.0)),
    ("Crate", "weathered wooden crate planks, texture", dict(pbr=True)),
    ("Ball", "polished green marble with white veins", dict()),
    ("Pillar", "mossy sandstone bricks, seamless texture", dict(seamless="x", pbr=True)),
]
# (object name, prompt): textured by projection, from a ring of views above the floor (one below would see
# only the floor's underside); a fresh unwrap, as Suzanne's own UV islands overlap.
PROJECTED = ("Statue", "weathered bronze statue of a monkey head, green patina")
PROJECTION = dict(views_per_ring=4, elevations=(25.0,), uv_map="NEW")


def parse_args() -> argparse.Namespace:
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    parser = argparse.ArgumentParser(prog="texture_scene.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, diffusers folder or .safetensors file")
    parser.add_argument("--controlnet", default=None, help=f"depth ControlNet (default: {DEFAULT_CONTROLNET}, "
                        "or a tiny one built offline with the tiny model)")
    parser.add_argument("--out", default="demo_output", help="folder for textures, render and .blend")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 25, tiny model 8)")
    parser.add_argument("--size", type=int, default=None, help="texture size in px (default: 512, tiny model 128)")
    return parser.parse_args(argv)


def build_scene() -> dict[str, bpy.types.Object]:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    add = {
        "Floor": lambda: bpy.ops.mesh.primitive_plane_add(size=8),
        "Crate": lambda: bpy.ops.mesh.primitive_cube_add(size=1.2, location=(-1.4, 0.3, 0.6)),
        "Ball": lambda: bpy.ops.mesh.primitive_uv_sphere_add(radius=0.7, location=(0.9, -0.6, 0.7)),
        "Pillar": lambda: bpy.ops.mesh.primitive_cylinder_add(radius=0.45, depth=2.2, location=(1.2, 1.8, 1.1)),
        "Statue": lambda: bpy.ops.mesh.primitive_monkey_add(
            size=1.1, location=(-0.2, -2.3, 0.75), rotation=(math.radians(-10), 0, math.radians(30))
        ),
    }
    objects = {}
    for name, make in add.items():
        make()
        objects[name] = bpy.context.object
        objects[name].name = name

    bpy.ops.object.camera_add(location=(6.5, -6.5, 4.8), rotation=(math.radians(63), 0, math.radians(45)))
    bpy.context.scene.camera = bpy.context.object
    bpy.ops.object.light_add(type="SUN", rotation=(math.radians(40), math.radians(15), math.radians(30)))
    bpy.context.object.data.energy = 3.0
    world = bpy.data.worlds.new("World")
    world.color = (0.4, 0.45, 0.5)
    bpy.context.scene.world = world
    return objects


def make_test_model(folder: Path, marker: str, *flags: str) -> str:
    """A tiny random model (or with --controlnet-for, a ControlNet) built offline by the backend's CLI."""
    if not (folder / marker).exists():
        python = paths.find_backend_python(os.environ.get(paths.ENV_PYTHON, ""))
        subprocess.run([str(python), "-m", "backend", "make-test-model", str(folder), *flags], check=True, cwd=REPO)
    return str(folder)


def texture(objects: dict, model: str, out: Path, steps: int, size: int) -> list[str]:
    files = []
    for name, prompt, options in JOBS:
        result = api.generate_texture(
            [objects[name]], prompt, model=model, steps=steps, width=size, height=size, seed=1234,
            output_dir=str(out / "textures"), **options,
        )
        files += result.files
        print(f"[demo] {name}: {', '.join(m.name for m in result.materials)} <- {result.files[0]}")
    return files


def project(objects: dict, model: str, controlnet: str, out: Path, steps: int, size: int) -> list[str]:
    name, prompt = PROJECTED
    result = api.project_texture(
        [objects[name]], prompt, controlnet=controlnet, model=model, steps=steps, width=size, height=size,
        seed=1234, texture_size=2 * size, output_dir=str(out / "textures"), **PROJECTION,
    )  # fmt: skip
    seen = ", ".join(f"{share:.0%}" for share in result.coverage.values())
    seconds = result.result.timings["total"]
    print(f"[demo] {name}: projected from {len(result.result.views)} views in {seconds:.0f} s (saw {seen}) "
          f"<- {result.files[0]}")  # fmt: skip
    for warning in result.warnings:
        print(f"[demo] {name}: warning: {warning}")
    return result.files


def render(out: Path) -> Path:
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 16
    scene.render.resolution_x, scene.render.resolution_y = 480, 320
    scene.render.filepath = str(out / "render.png")
    bpy.ops.render.render(write_still=True)
    return Path(scene.render.filepath)


def export_for_engines(objects: dict, out: Path) -> None:
    """The textured objects as demo_output/scene.glb with a texture set per material, checked by the Khronos glTF
    validator when Node.js and tools/gltf (npm ci --prefix tools/gltf; make demo installs it) are there."""
    result = api.export_for_engines(list(objects.values()), str(out))
    print(f"[demo] {result.message()}")
    validator = REPO / "tools" / "gltf"
    if shutil.which("node") is None or not (validator / "node_modules" / "gltf-validator").is_dir():
        print("[demo] glTF validator not run: needs node and `npm ci --prefix tools/gltf`")
        return
    done = subprocess.run(["node", str(validator / "validate.mjs"), result.glb], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"[demo] glTF validator failed: {done.stderr.strip()}")
        return
    issues = json.loads(done.stdout)["issues"]
    counts = ", ".join(f"{issues[key]} {word}" for key, word in
                       (("numErrors", "errors"), ("numWarnings", "warnings"), ("numInfos", "infos")))  # fmt: skip
    print(f"[demo] glTF validator: {counts}")
    for message in issues["messages"][:10]:
        print(f"[demo]   {message['code']} at {message['pointer']}: {message['message']}")


def main() -> None:
    args = parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import addon_utils  # importable once bpy is (Blender as a Python module)

    objects = build_scene()  # factory settings first: they would disable the add-on again
    if addon_utils.enable("blender_sd_addon", default_set=True) is None:
        sys.exit("could not enable the blender_sd_addon add-on (see the messages above)")
    try:
        model, steps, size = args.model, args.steps or 25, args.size or 512
        controlnet = args.controlnet or DEFAULT_CONTROLNET
        try:
            api.load_model(model)
        except api.BackendError as exc:
            print(
                "\n" + "!" * 78 + f"\nWARNING: model {model!r} is not usable here:\n  {exc}\n"
                "Falling back to a TINY RANDOM model (and ControlNet) built offline: the textures will be noise,\n"
                "but the whole pipeline (backend, materials, PBR maps, render) runs for real.\n"
                "Pass --model with a hub id you have downloaded, a diffusers folder or a .safetensors file.\n"
                + "!" * 78 + "\n",
                file=sys.stderr,
            )
            model = make_test_model(out / "tiny-model", "model_index.json")
            steps, size = args.steps or 8, args.size or 128
            controlnet = args.controlnet or make_test_model(
                out / "tiny-controlnet", "config.json", "--controlnet-for", model
            )
        files = texture(objects, model, out, steps, size)
        files += project(objects, model, controlnet, out, steps, size)
        image = render(out)
        export_for_engines(objects, out)
        blend = out / "scene.blend"
        bpy.ops.wm.save_as_mainfile(filepath=str(blend))
        print(f"[demo] {len(files)} files in {out / 'textures'}\n[demo] render: {image}\n[demo] scene: {blend}")
    finally:
        api.shutdown_backend()
        addon_utils.disable("blender_sd_addon")


if __name__ == "__main__":
    main()
