"""Scenario: bare diffusers in a fresh process, the yardstick for everything else.

Imports torch and diffusers, loads the model, makes a first image (cold start), then one more each
time the parent gives it a turn (warm). Each run is `pipe(...)` with the backend's scheduler, seed,
steps, size and guidance, then a plain `image.save(png)`; both are timed apart. A step callback
stamps the time of every step. Timestamps are CLOCK_MONOTONIC, so the parent can measure from before
it spawned this process.
"""

from __future__ import annotations

import hashlib
import json
import resource
from pathlib import Path

from benchmarks.common import REQUEST, SETTINGS, next_turn, now, proc_status_kib, scenario_args, signal


def main() -> None:
    config, out = scenario_args()
    started_at = now()
    # 1. Import and load, as a user script would
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    imported_at = now()
    pipe = StableDiffusionPipeline.from_pretrained(
        config["model"], dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    loaded_at = now()

    # 2. The first image (cold start), then warm runs when the parent says so
    settings = SETTINGS[config["architecture"]]
    output_dir = Path(config["output_dir"])

    def run(index: int) -> dict:
        step_times: list[float] = []

        def on_step(pipeline, step, timestep, tensors):
            step_times.append(now())
            return tensors

        start = now()
        image = pipe(
            REQUEST["prompt"],
            num_inference_steps=settings["steps"],
            guidance_scale=REQUEST["guidance_scale"],
            width=settings["width"],
            height=settings["height"],
            generator=torch.Generator("cpu").manual_seed(REQUEST["seed"]),
            output_type="pil",
            callback_on_step_end=on_step,
        ).images[0]
        piped = now()
        image.save(output_dir / f"bare_{index}.png")
        saved = now()
        return {
            "start": start,
            "pipe": piped - start,
            "save": saved - piped,
            "step_times": step_times,
            "pixels_sha256": hashlib.sha256(image.tobytes()).hexdigest(),
        }

    runs = [run(0)]
    signal("ready")
    while next_turn():
        runs.append(run(len(runs)))
        signal("done")

    out.write_text(json.dumps({
        "started_at": started_at,
        "imported_at": imported_at,
        "loaded_at": loaded_at,
        "first_image_at": runs[0]["start"] + runs[0]["pipe"] + runs[0]["save"],
        "runs": runs,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # KiB on Linux
        "vm_hwm_kib": proc_status_kib("self", "VmHWM"),
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
