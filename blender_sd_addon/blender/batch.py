"""Batch Texture Selected Objects: one txt2img job per selected mesh, run by `python -m backend batch` (here,
or on a Ray cluster), each result applied to its object when the batch ends.

The prompt of an object is its custom property `sdtex_prompt` when it has one, else the template with
{name} replaced by the object's name; every other setting is the panel's (seed: the panel's when not
random, else one derived from each job, see backend/batch.py). The batch runs as a separate process
with the backend's interpreter, writing into <output folder>/batch-<time>/; Blender stays responsive (a
timer watches the process) except in background mode, where the operator waits.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import bpy
from bpy.props import BoolProperty, StringProperty

from .. import api, paths, protocol
from ..client import SDTexError
from . import materials, panels

PROMPT_PROPERTY = "sdtex_prompt"
POLL_SECONDS = 1.0
STATE: dict = {"process": None, "message": ""}  # the batch running now (one at a time)
_SETTINGS = [p.name for p in protocol.TASK_PARAMS["txt2img"] if p.name not in ("task", "model", "output_dir")]


def job_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "object"


def manifest_lines(objects, template: str, settings: dict) -> dict[str, dict]:
    """key -> the job's manifest entry (with "id" = key), one per object."""
    jobs = {}
    for obj in objects:
        prompt = str(obj.get(PROMPT_PROPERTY) or template.replace("{name}", obj.name))
        key = job_key(obj.name)
        while key in jobs:
            key += "_"
        params = api.generate_params(settings | {"prompt": prompt})
        del params["output_dir"]  # the batch chooses: <out>/<key>/
        jobs[key] = {"task": "txt2img", "id": key, **params}
    return jobs


def apply_results(out: Path, targets: dict[str, str]) -> tuple[int, list[str]]:
    """Put each finished job's image (and maps) on its object; (applied, problems)."""
    applied, problems = 0, []
    for key, object_name in targets.items():
        obj = bpy.data.objects.get(object_name)
        try:
            record = json.loads((out / key / "result.json").read_text())
        except (OSError, ValueError):
            problems.append(f"{object_name}: no result (see {out / 'batch-report.jsonl'})")
            continue
        if obj is None:
            problems.append(f"{object_name}: the object is gone")
            continue
        image = record["result"]["images"][0]
        maps = {"albedo": image["path"], **image.get("maps", {})}
        options = materials.ApplyOptions(normal_directx=record["params"].get("normal_format") == "directx")
        materials.apply_images([obj], maps, options, api.material_name(record["params"]["prompt"]))
        applied += 1
    return applied, problems


def _watch() -> float | None:
    process, out, targets = STATE["process"]
    if process.poll() is None:
        return POLL_SECONDS
    STATE["process"] = None
    applied, problems = apply_results(out, targets)
    STATE["message"] = f"Batch: {applied} of {len(targets)} applied" + (f"; {problems[0]}" if problems else "")
    return None


class SDTEX_OT_batch_texture(bpy.types.Operator):
    """Texture every selected mesh with its own prompt in one batch (python -m backend batch), then apply"""

    bl_idname = "sdtex.batch_texture"
    bl_label = "Batch Texture Selected Objects"
    bl_options = {"REGISTER"}

    template: StringProperty(
        name="Prompt", default="{name}", description="Prompt of objects without an sdtex_prompt property"
    )
    use_ray: BoolProperty(name="On Ray", description="Run on a Ray cluster instead of here")
    ray_address: StringProperty(name="Ray Address", default="auto", description="'auto', or ray://HOST:10001")

    def invoke(self, context, event):
        self.template = f"{{name}}, {context.scene.sdtex.prompt}" if context.scene.sdtex.prompt else "{name}"
        return context.window_manager.invoke_props_dialog(self)

    def execute(self, context):
        if STATE["process"] is not None:
            self.report({"ERROR"}, "A batch is running already")
            return {"CANCELLED"}
        meshes = [obj for obj in context.selected_objects if obj.type == "MESH"]
        if not meshes:
            self.report({"ERROR"}, "Select one or more mesh objects")
            return {"CANCELLED"}
        scene = context.scene.sdtex
        settings = {name: getattr(scene, name) for name in _SETTINGS if hasattr(scene, name)}
        if scene.random_seed:
            settings["seed"] = None
        try:
            jobs = manifest_lines(meshes, self.template, settings)
            python = paths.find_backend_python(bpy.path.abspath(api.preferences().backend_python), api.user_data_dir())
        except SDTexError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        out = Path(api.output_folder(None)) / time.strftime("batch-%Y%m%d-%H%M%S")
        out.mkdir(parents=True, exist_ok=True)
        manifest = out / "jobs.jsonl"
        manifest.write_text("".join(json.dumps(job) + "\n" for job in jobs.values()))
        command = [*paths.worker_command(python)[:-1], "batch", str(manifest), "--out", str(out)]
        if self.use_ray:
            command += ["--ray", self.ray_address]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        with open(out / "batch.log", "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        targets = {key: obj.name for key, obj in zip(jobs, meshes, strict=True)}
        STATE["process"] = (process, out, targets)
        STATE["message"] = f"Batch: {len(jobs)} job(s) running, log {out / 'batch.log'}"
        if bpy.app.background:  # no timers tick: wait here
            process.wait()
            _watch()
            self.report({"INFO"}, STATE["message"])
        else:
            bpy.app.timers.register(_watch, first_interval=POLL_SECONDS)
        return {"FINISHED"}


class BatchPanel(panels.SidebarPanel):
    bl_label = "Batch"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        self.layout.operator(SDTEX_OT_batch_texture.bl_idname, icon="RENDER_ANIMATION")
        if STATE["message"]:
            self.layout.label(text=STATE["message"])


def unregister() -> None:
    if bpy.app.timers.is_registered(_watch):
        bpy.app.timers.unregister(_watch)


classes = (SDTEX_OT_batch_texture, *panels._for_each_space(BatchPanel, parent="mainpanel"))
