"""Measurement: cached U-Net steps (Speed fast / faster, backend/deepcache.py) against bare diffusers.

One process loads the SD-1.5 architecture with random weights (benchmarks/common.py model_dir("sd15")) once;
diffusers' own StableDiffusionPipeline call (Euler Ancestral, CFG 7.5, 256 px, seed 1234) is the baseline, and
our txt2img task runs the same request on the same loaded modules with speed "off", "fast" and "faster", at
20 and 50 steps, one after the other. Reported per step count: seconds per side, bare / ours ratios (target:
fast >= 1.8x at 50 steps), whether "off" equals bare bit for bit, and each speed's mean absolute image
difference to "off" (0..1). Random weights exaggerate that difference: an untrained U-Net's deep features
change more from step to step than a trained one's, so a real model's images differ less.

`python -m benchmarks.deepcache [--steps 20 50] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FAST_TARGET = 1.8  # bare / fast at the most steps
SPEEDS = ("off", "fast", "faster")


def measure(scenarios, architecture: str) -> dict:
    """The suite's entry (benchmarks/__main__.py): this module's command in a fresh process, its JSON as table rows."""
    from benchmarks.common import PYTHON, REPO, target

    out = scenarios.scratch / f"deepcache-{architecture}.json"
    print(f"starting deepcache_{architecture} ...", file=sys.stderr, flush=True)
    subprocess.run([PYTHON, "-m", "benchmarks.deepcache", "--out", str(out)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    result = json.loads(out.read_text())
    most = result["by_steps"][str(max(result["steps"]))]
    result["targets"] = [target(f"speed fast / bare at {max(result['steps'])} steps <= 1/{FAST_TARGET}",
                                round(most["fast_s"] / most["bare_s"], 4), round(1 / FAST_TARGET, 4))]  # fmt: skip
    result["rows"] = []
    for steps in result["steps"]:
        row = result["by_steps"][str(steps)]
        result["rows"] += [
            {"metric": f"{steps} steps s, off (bare / ours; same: {row['off_equals_bare']})", "bare": row["bare_s"],
             "backend": row["off_s"], "ratio": row["ratio_off"]},
            *({"metric": f"  speed {speed} s (bare / ours); mean abs diff to off {row[f'diff_{speed}']}",
               "backend": row[f"{speed}_s"], "ratio": row[f"ratio_{speed}"]} for speed in SPEEDS[1:]),
        ]  # fmt: skip
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deepcache", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50], help="step counts to measure")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    return parser.parse_args(argv)


def time_steps(pipe, folder: Path, steps: int) -> dict:
    """Bare diffusers, then ours at each speed, for one step count: seconds, ratios, image differences."""
    import numpy as np
    import torch
    from diffusers import EulerAncestralDiscreteScheduler

    from backend.tasks.txt2img import run_txt2img
    from benchmarks.common import REQUEST
    from sdtex_contract.protocol import GenerateParams

    request = dict(prompt=REQUEST["prompt"], seed=REQUEST["seed"], guidance_scale=REQUEST["guidance_scale"],
                   scheduler=REQUEST["scheduler"], steps=steps, width=256, height=256)  # fmt: skip
    images, seconds = {}, {}
    original = pipe.scheduler
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(original.config)
    start = time.perf_counter()
    images["bare"] = pipe(
        request["prompt"], num_inference_steps=steps, guidance_scale=request["guidance_scale"], height=256,
        width=256, generator=torch.Generator("cpu").manual_seed(request["seed"]),
    ).images[0]  # fmt: skip
    seconds["bare"] = time.perf_counter() - start
    pipe.scheduler = original
    for speed in SPEEDS:
        params = GenerateParams(model=str(folder), output_dir="/unused", speed=speed, **request)
        start = time.perf_counter()
        images[speed] = run_txt2img(pipe, params).images[0]
        seconds[speed] = time.perf_counter() - start
        print(f"{steps} steps {speed}: {seconds[speed]:.1f} s (bare {seconds['bare']:.1f} s)", file=sys.stderr)
    images = {side: np.asarray(image, dtype=np.float32) / 255 for side, image in images.items()}
    row = {f"{side}_s": round(s, 3) for side, s in seconds.items()}
    row |= {f"ratio_{speed}": round(seconds["bare"] / seconds[speed], 3) for speed in SPEEDS}
    row |= {f"diff_{speed}": round(float(np.abs(images[speed] - images["off"]).mean()), 4) for speed in SPEEDS[1:]}
    row["off_equals_bare"] = bool(np.array_equal(images["off"], images["bare"]))
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from diffusers import StableDiffusionPipeline

    from backend.deepcache import SCHEDULES as SETTINGS
    from benchmarks.common import model_dir

    folder = model_dir("sd15")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    by_steps = {str(steps): time_steps(pipe, folder, steps) for steps in args.steps}
    most = by_steps[str(max(args.steps))]
    result = {
        "architecture": "sd15", "size": 256, "steps": args.steps, "guidance_scale": 7.5, "scheduler": "euler_a",
        "settings": {speed: SETTINGS[speed] for speed in SPEEDS[1:]}, "torch_threads": torch.get_num_threads(),
        "by_steps": by_steps, "target": FAST_TARGET, "met": most["ratio_fast"] >= FAST_TARGET,
        "note": "random weights exaggerate the image difference to off",
    }  # fmt: skip
    for steps, row in by_steps.items():
        print(f"{steps} steps: bare {row['bare_s']:.1f} s; off {row['off_s']:.1f} s (equal: {row['off_equals_bare']}); "
              f"fast {row['fast_s']:.1f} s = {row['ratio_fast']:.2f}x (diff {row['diff_fast']}); "
              f"faster {row['faster_s']:.1f} s = {row['ratio_faster']:.2f}x (diff {row['diff_faster']})")  # fmt: skip
    print(f"target bare / fast >= {FAST_TARGET} at {max(args.steps)} steps: {'met' if result['met'] else 'missed'}"
          " (random weights exaggerate the image differences)")  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
