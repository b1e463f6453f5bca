"""Batch Texture Selected Objects: one txt2img job per selected mesh, each result applied to its object.

The prompt of an object is its custom property `sdtex_prompt` when it has one, else the template with
{name} replaced by the object's name; every other setting is the panel's. The batch writes into
<output folder>/batch-<time>/: its manifest (jobs.jsonl, the format of `python -m backend batch`) and, per
job, <key>/ with the images and result.json. Here each entry is a job on the warm worker, a row on the UI's
job board (background mode: run one after another); "On Ray" runs the manifest with `python -m backend batch
--ray` as a separate process instead (seeds derived from each job, see backend/batch.py): one row on the board
(entries done of all), applied when it ends, cancelled or not (what was done is applied).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import bpy
from bpy.props import BoolProperty, StringProperty

from .. import paths
from ..client import SDTexError
from ..contract import protocol
from ..jobs import ProcessJob
from . import materials, panels, session, tasks, ui_jobs
from .operator_base import SDTexOperator
from .results import material_name
from .ui_state import Target

PROMPT_PROPERTY = "sdtex_prompt"
RAY = "ray_batch"  # the Ray batch's target kind: its finisher (ui_jobs.FINISHERS)
STATE: dict = {"job": None, "message": ""}  # the Ray batch running now (one at a time), the last outcome
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
        params = tasks.generate_params(settings | {"prompt": prompt})
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
        materials.apply_images([obj], maps, options, material_name(record["params"]["prompt"]))
        applied += 1
    return applied, problems


@dataclass
class Batch:
    """A batch on the warm worker: where its files go and how many of its jobs were applied."""

    out: Path
    total: int
    applied: int = 0
    problems: list[str] = field(default_factory=list)

    def say(self) -> None:
        STATE["message"] = f"Batch: {self.applied} of {self.total} applied" + (
            f"; {self.problems[0]}" if self.problems else ""
        )


def queue_on_worker(batch: Batch, jobs: dict[str, dict], meshes: list) -> None:
    """One txt2img job per manifest entry on the warm worker (rows on the UI's job board); background mode runs
    them one after another."""
    for line, ((key, entry), obj) in enumerate(zip(jobs.items(), meshes, strict=True), start=1):
        params = {k: v for k, v in entry.items() if k not in ("task", "id")} | {"output_dir": str(batch.out / key)}
        target = Target((obj.name,), materials.ApplyOptions(), True, kind="batch", request=(batch, key, line))
        if bpy.app.background:  # no timers tick: run it here
            try:
                job = tasks.run_job(params, "txt2img")
            except SDTexError as exc:
                batch.problems.append(f"{obj.name}: {exc}")
                continue
            _finished(job, target)
        else:
            ui_jobs.submit_ui("txt2img", params, target)
    batch.say()


def _finished(job, target: Target) -> None:
    """A batch job ended: its result.json (as `python -m backend batch` writes it), then applied as any job."""
    batch, key, line = target.request
    if job.state == protocol.DONE and job.result is not None:
        folder = batch.out / key
        files = [path for i in job.result.images for path in (i.path, *i.maps.values())]
        digests = {os.path.relpath(p, folder): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in files}
        params = {k: v for k, v in job.result.params.items() if k != "output_dir"}
        record = {"line": line, "params": params, "files": digests, "result": job.data}
        (folder / "result.json").write_text(json.dumps(record, indent=1))
    ui_jobs.finish_texture_job(job, target)
    if job.state == protocol.DONE:
        batch.applied += 1
    else:
        batch.problems.append(f"{target.object_names[0]}: {job.status_text}")
    batch.say()


ui_jobs.FINISHERS["batch"] = _finished


def _ray_finished(job: ProcessJob, target: Target) -> None:
    """The Ray batch ended (done, failed or cancelled): apply every entry that finished."""
    out, targets = target.request
    STATE["job"] = None
    applied, problems = apply_results(out, targets)
    ended = "" if job.state == protocol.DONE else f" ({job.status_text})"
    STATE["message"] = f"Batch: {applied} of {len(targets)} applied{ended}" + (f"; {problems[0]}" if problems else "")


ui_jobs.FINISHERS[RAY] = _ray_finished


def start_on_ray(manifest: Path, out: Path, targets: dict[str, str], address: str) -> ProcessJob:
    """`python -m backend batch --ray` on the manifest: a row on the UI's board (background mode: waited for)."""
    backend_python = bpy.path.abspath(session.preferences().backend_python)
    python = paths.find_backend_python(backend_python, session.user_data_dir())
    command = [*paths.worker_command(python)[:-1], "batch", str(manifest), "--out", str(out), "--ray", address]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    log = out / "batch.log"
    with open(log, "w") as file:
        process = subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT, env=env)
    outputs = [str(out / key / "result.json") for key in targets]  # each written last, when its entry is done
    job = ProcessJob(None, f"batch-{process.pid}", "batch", process=process, outputs=outputs, log=str(log))
    target = Target(tuple(targets.values()), materials.ApplyOptions(), True, kind=RAY, request=(out, targets))
    STATE["job"], STATE["message"] = (
        job,
        f"Batch: {len(targets)} job{'' if len(targets) == 1 else 's'} on Ray, log {log}",
    )
    if bpy.app.background:  # no timers tick: wait here
        process.wait()
        job.check_every = 0.0
        job.poll()
        _ray_finished(job, target)
    else:
        ui_jobs.add_ui(job, target)
    return job


class SDTEX_OT_batch_texture(SDTexOperator, bpy.types.Operator):
    """Texture every selected mesh with its own prompt in one batch (on the warm worker, or Ray), then apply"""

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

    def run(self, context, props: dict) -> str | None:
        if STATE["job"] is not None and not STATE["job"].finished:
            raise SDTexError("A batch is running on Ray already")
        meshes = [obj for obj in context.selected_objects if obj.type == "MESH"]
        if not meshes:
            raise SDTexError("Select one or more mesh objects")
        scene = context.scene.sdtex
        settings = {name: getattr(scene, name) for name in _SETTINGS if hasattr(scene, name)}
        if scene.random_seed:
            settings["seed"] = None
        jobs = manifest_lines(meshes, props["template"], settings)
        out = Path(session.output_folder(None)) / time.strftime("batch-%Y%m%d-%H%M%S")
        out.mkdir(parents=True, exist_ok=True)
        manifest = out / "jobs.jsonl"
        manifest.write_text("".join(json.dumps(job) + "\n" for job in jobs.values()))
        if not props["use_ray"]:
            queue_on_worker(Batch(out, len(jobs)), jobs, meshes)
            return STATE["message"] if bpy.app.background else None
        targets = {key: obj.name for key, obj in zip(jobs, meshes, strict=True)}
        start_on_ray(manifest, out, targets, props["ray_address"])
        return STATE["message"] if bpy.app.background else None


class BatchPanel(panels.SidebarPanel):
    bl_label = "Batch"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        self.layout.operator(SDTEX_OT_batch_texture.bl_idname, icon="RENDER_ANIMATION")
        if STATE["message"]:
            self.layout.label(text=STATE["message"])


def unregister() -> None:
    STATE["job"], STATE["message"] = None, ""


classes = (SDTEX_OT_batch_texture, *panels._for_each_space(BatchPanel, parent="mainpanel"))
