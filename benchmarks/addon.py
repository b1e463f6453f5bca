"""Scenario: the add-on's operator in a fresh Blender process (bpy as a module, background mode).

1. Blender's RSS with bpy imported, before the add-on is enabled.
2. Enable the add-on; point its preferences at the model and a scratch folder; set the scene's settings
   to the shared request (fixed seed).
3. A first `bpy.ops.sdtex.generate()` starts the worker and loads the model (warm-up, timed apart).
4. One timed operator call per turn, each generating and applying a new material to the default Cube.
   tasks.run (the request) and ui_jobs.finish (load the image, apply, record history) are wrapped with
   timers, and the worker's own total is kept, so each layer's share can be told apart.
5. Blender's RSS again, and whether torch ever entered Blender's process.
"""

from __future__ import annotations

import json
import sys

from benchmarks.common import PYTHON, REQUEST, SETTINGS, next_turn, now, proc_status_kib, scenario_args, signal


def timed(function, log: list):
    """Wrap function so each call appends {"wall": seconds, "worker": the worker's total if it returned one}."""

    def wrapper(*args, **kwargs):
        start = now()
        value = function(*args, **kwargs)
        timings = getattr(value, "timings", None)  # tasks.run returns the GenerateResult
        log.append({"wall": now() - start, "worker": timings["total"] if timings else None})
        return value

    return wrapper


def main() -> None:
    config, out = scenario_args()
    # 1. Blender alone
    import bpy

    rss_before = proc_status_kib("self", "VmRSS")

    # 2. Enable and configure the add-on
    import addon_utils  # Blender's own module, importable once bpy is

    if addon_utils.enable("blender_sd_addon", default_set=True) is None:
        raise SystemExit("could not enable the add-on (traceback above)")
    from blender_sd_addon import api
    from blender_sd_addon.blender import session, tasks, ui_jobs

    rss_enabled = proc_status_kib("self", "VmRSS")
    prefs = session.preferences()
    prefs.backend_python = PYTHON
    prefs.model = config["model"]
    prefs.output_folder = config["output_dir"]
    scene = bpy.context.scene.sdtex
    scene.prompt = REQUEST["prompt"]
    scene.random_seed = False
    scene.seed = REQUEST["seed"]
    scene.guidance_scale = REQUEST["guidance_scale"]
    scene.scheduler = REQUEST["scheduler"]
    for name, value in SETTINGS[config["architecture"]].items():
        setattr(scene, name, value)
    cube = bpy.data.objects["Cube"]
    assert bpy.context.selected_objects == [cube], "the default scene should have the Cube selected"

    run_times: list[dict] = []
    finish_times: list[dict] = []
    tasks.run = timed(tasks.run, run_times)
    ui_jobs.finish = timed(ui_jobs.finish, finish_times)

    # 3. Warm-up: starts the worker and loads the model
    start = now()
    assert bpy.ops.sdtex.generate() == {"FINISHED"}
    warmup = now() - start

    # 4. Timed runs, backend warm
    signal("ready")
    walls = []
    while next_turn():
        start = now()
        assert bpy.ops.sdtex.generate() == {"FINISHED"}
        walls.append(now() - start)
        signal("done")
    material = cube.active_material
    applied = material is not None and any(
        node.type == "TEX_IMAGE" and node.image is not None for node in material.node_tree.nodes
    )

    # 5. Footprint
    rss_after = proc_status_kib("self", "VmRSS")
    client = session.current_client()
    worker_hwm = proc_status_kib(client.pid, "VmHWM")
    out.write_text(json.dumps({
        "warmup": warmup,
        "walls": walls,
        "run": run_times[1:],
        "finish": finish_times[1:],
        "applied": applied,
        "materials": len(bpy.data.materials),
        "rss_before_kib": rss_before,
        "rss_enabled_kib": rss_enabled,
        "rss_after_kib": rss_after,
        "hwm_kib": proc_status_kib("self", "VmHWM"),
        "torch_loaded": "torch" in sys.modules,
        "diffusers_loaded": "diffusers" in sys.modules,
        "worker_vm_hwm_kib": worker_hwm,
    }))
    api.shutdown_backend()


if __name__ == "__main__":
    main()
