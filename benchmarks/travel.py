"""Measurement: latent travel's frames per second against calling txt2img once per frame, same run.

One fresh process loads the model as the worker does (ModelManager) and takes turns, rotating who goes
first each round, between two sides on the same warm weights, both whole jobs that write their PNGs:
- travel: the travel task's `run` making every frame of a 2-keyframe travel (a fresh folder each round,
  so nothing is skipped);
- txt2img: the txt2img task's `run` once per frame (prompt encoded every time), the same frame count.
The first run of each side is a warm-up and is left out. Target: travel fps / txt2img fps >= 1.0 (the
prompt is encoded once per keyframe instead of once per frame; the rest is the same work). The keyframe
frames must equal txt2img's pixels.

`python -m benchmarks --only travel_sd15` (or travel_tiny); the parent spawns
`python -m benchmarks.travel CONFIG OUT` and reads its JSON (the parent never imports torch).
"""

from __future__ import annotations

import json
import sys
import time

from benchmarks.common import (
    REQUEST,
    RUNS_FACTOR,
    SETTINGS,
    Scenarios,
    measuring_process,
    median,
    median_error,
    model_dir,
    now,
    scenario_args,
    target,
)

RATIO_TARGET = 1.0  # travel fps / txt2img fps, at least
FRAMES = {"tiny": 4, "sd15": 2}  # per transition: 2 keyframes give FRAMES + 1 frames
KEYFRAMES = [
    {"prompt": REQUEST["prompt"], "seed": REQUEST["seed"]},
    {"prompt": "cracked grey concrete, rust stains", "seed": REQUEST["seed"] + 1},
]


def measure(scenarios: Scenarios, architecture: str) -> dict:
    config = {
        "architecture": architecture,
        "model": str(model_dir(architecture)),
        "runs": scenarios.runs * RUNS_FACTOR[architecture],
        "scratch": str(scenarios.scratch / f"travel-{architecture}"),
    }
    return summarise(measuring_process(["benchmarks.travel"], config, scenarios.scratch, f"travel-{architecture}"))


def summarise(raw: dict) -> dict:
    frames = raw["frames"]
    travel = [frames / r["wall"] for r in raw["travel"]]
    txt2img = [frames / r["wall"] for r in raw["txt2img"]]
    paired = [a / b for a, b in zip(travel, txt2img, strict=True)]  # one round: both sides back to back
    # The target as times (lower is better, as target() checks): travel's time over txt2img's, per round.
    time_ratios = [1 / ratio for ratio in paired]
    encode = median([r["encode"] for r in raw["travel"]])
    # CPU seconds of the process: the work done, less disturbed than wall time when other processes compete
    cpu_ratios = [a["cpu"] / b["cpu"] for a, b in zip(raw["travel"], raw["txt2img"], strict=True)]
    result = {
        "runs": len(travel),
        "settings": {k: raw[k] for k in ("width", "height", "steps", "frames", "scheduler")},
        "travel_fps": round(median(travel), 4),
        "txt2img_fps": round(median(txt2img), 4),
        "ratio": round(median(travel) / median(txt2img), 4),
        "paired_ratio": round(median(paired), 4),
        "paired_band": round(2 * median_error(paired), 4),
        "travel_encode_ms": round(1000 * encode, 2),
        "txt2img_encode_ms_per_frame": round(1000 * median([r["encode"] for r in raw["txt2img"]]) / frames, 2),
        "cpu_travel_vs_txt2img": round(median(cpu_ratios), 4),
        "cpu_band": round(2 * median_error(cpu_ratios), 4),
        "keyframes_equal_txt2img": raw["keyframes_equal_txt2img"],
        "samples_s": {side: [round(r["wall"], 4) for r in raw[side]] for side in ("travel", "txt2img")},
    }
    result["travel_time_vs_txt2img"] = round(median(time_ratios), 4)
    result["travel_time_band"] = round(2 * median_error(time_ratios), 4)
    result["targets"] = [
        target(f"travel time / txt2img time per frame <= 1/{RATIO_TARGET} (paired)",
               result["travel_time_vs_txt2img"], 1 / RATIO_TARGET, result["travel_time_band"]),
    ]  # fmt: skip
    result["rows"] = [
        {"metric": f"frames per second ({frames} frames)", "bare": result["txt2img_fps"],
         "backend": result["travel_fps"], "ratio": result["ratio"]},
        {"metric": "  median of per-round ratios (+- ~95%)", "backend": f"+- {result['paired_band']}",
         "ratio": result["paired_ratio"]},
        {"metric": "  prompt encoding ms: travel job / per frame", "bare": result["txt2img_encode_ms_per_frame"],
         "backend": result["travel_encode_ms"]},
        {"metric": "  CPU seconds: travel / txt2img (paired)", "backend": f"+- {result['cpu_band']}",
         "ratio": result["cpu_travel_vs_txt2img"]},
        {"metric": "keyframes = txt2img pixels", "backend": str(result["keyframes_equal_txt2img"])},
    ]  # fmt: skip
    return result


# --- the measuring process ------------------------------------------------------------------------------


def main() -> None:
    config, out = scenario_args()
    from pathlib import Path

    import numpy as np
    import PIL.Image
    import torch

    from backend.context import JobContext
    from backend.models import ModelManager
    from backend.tasks import travel, txt2img
    from sdtex_contract import protocol

    settings = SETTINGS[config["architecture"]]
    frames = FRAMES[config["architecture"]]
    scratch = Path(config["scratch"])
    common = {"model": config["model"], **settings, "scheduler": REQUEST["scheduler"],
              "guidance_scale": REQUEST["guidance_scale"]}  # fmt: skip
    models = ModelManager()
    ctx = JobContext("bench", models, None)
    plan = travel.frame_plan(len(KEYFRAMES), frames, loop=False)
    rounds = iter(range(10**6))

    def run_travel() -> dict:
        folder = scratch / f"travel-{next(rounds)}"  # fresh: no frame is found on disk and skipped
        params = protocol.TravelParams.from_dict(
            {**common, "keyframes": KEYFRAMES, "frames": frames, "output_dir": str(folder)}
        )
        start, cpu = now(), time.process_time()
        result = travel.run(ctx, params)
        wall, cpu = now() - start, time.process_time() - cpu
        return {"wall": wall, "cpu": cpu, "encode": result.timings["encode"], "paths": [i.path for i in result.images]}

    def run_txt2img() -> dict:
        folder = scratch / f"txt2img-{next(rounds)}"
        wall, cpu, encode, paths = 0.0, 0.0, 0.0, []
        for frame in plan:  # one plain generation per frame, the frame's start keyframe as its prompt
            params = protocol.GenerateParams.from_dict({**common, **KEYFRAMES[frame.start], "output_dir": str(folder)})
            start, cpu_start = now(), time.process_time()
            result = txt2img.run(ctx, params)
            wall, cpu = wall + now() - start, cpu + time.process_time() - cpu_start
            encode += result.timings["encode"]
            paths.append(result.images[0].path)
        return {"wall": wall, "cpu": cpu, "encode": encode, "paths": paths}

    def pixels(path: str) -> np.ndarray:
        return np.asarray(PIL.Image.open(path))

    sides = {"travel": run_travel, "txt2img": run_txt2img}
    warm = {name: side() for name, side in sides.items()}  # warm-up, left out; also the pixel check
    keyframes = [i for i, frame in enumerate(plan) if frame.is_keyframe]
    made = {name: [pixels(warm[name]["paths"][i]) for i in keyframes] for name in sides}
    same = all(np.array_equal(a, b) for a, b in zip(made["travel"], made["txt2img"], strict=True))
    runs = {name: [] for name in sides}
    order = list(sides)
    for i in range(config["runs"]):
        print(f"travel round {i + 1}/{config['runs']} ...", file=sys.stderr, flush=True)
        for name in order[i % 2 :] + order[: i % 2]:
            runs[name].append({k: v for k, v in sides[name]().items() if k != "paths"})
    out.write_text(
        json.dumps(
            {
                **runs,
                **settings,
                "frames": len(plan),
                "scheduler": REQUEST["scheduler"],
                "keyframes_equal_txt2img": same,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
