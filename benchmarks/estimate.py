"""Measurement: a Marigold estimate, ours (backend.estimators.Estimators.estimate) against diffusers' bare pipeline.

One process builds a random-weight Marigold model offline in a temporary folder ("sd2": Stable Diffusion 2's
real sizes, about 1.3 B parameters; "tiny" for the smoke test), loads it once through Estimators, and builds
diffusers' own pipeline of the same class on the same loaded weights (from_pipe), so both sides run the same
modules. They take turns, rotating who goes first each round, after one warm-up each; the result is the
minimum of the repeats per side and the ratio ours / bare (target <= 1.02). Both must give the same maps.

`python -m benchmarks.estimate` (1024 x 1024 input, processing resolution 1024, steps 1, ensemble 1);
`--size`, `--resolution`, `--repeats`, `--architecture tiny` make it small and fast.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RATIO_TARGET = 1.02


# The suite's settings (`python -m benchmarks --only estimate_sd2`): the issue's 1024 x 1024 on SD 2's sizes.
SUITE = {"tiny": {"size": 256, "repeats": 10}, "sd2": {"size": 1024, "repeats": 2}}


def measure(scenarios, architecture: str) -> dict:
    """The suite's entry (benchmarks/__main__.py): this module's command in a fresh process, its JSON as table rows."""
    from benchmarks.common import PYTHON, REPO, target

    settings, out = SUITE[architecture], scenarios.scratch / f"estimate-{architecture}.json"
    command = [PYTHON, "-m", "benchmarks.estimate", "--architecture", architecture, "--out", str(out),
               "--size", str(settings["size"]), "--repeats", str(settings["repeats"])]  # fmt: skip
    print(f"starting estimate_{architecture} ...", file=sys.stderr, flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    result["targets"] = [target(f"Marigold estimate vs diffusers' <= {RATIO_TARGET}", result["ratio"], RATIO_TARGET)]
    result["rows"] = [
        {"metric": f"normals {result['size']} px estimate, min s", "bare": result["bare_s"],
         "backend": result["ours_s"], "ratio": result["ratio"]},
        {"metric": "  CPU time ratio; same maps", "backend": str(result["same_maps"]), "ratio": result["cpu_ratio"]},
    ]  # fmt: skip
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.estimate", description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="normals", choices=("depth", "normals", "intrinsics"))
    parser.add_argument("--architecture", default="sd2", choices=("sd2", "tiny"))
    parser.add_argument("--size", type=int, default=1024, help="input image side, pixels")
    parser.add_argument("--resolution", type=int, default=None, help="processing resolution (default: --size)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side, after one warm-up each")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="", help="an existing model folder (default: build one)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    return parser.parse_args(argv)


def picture(size: int):
    """A picture with structure (not noise)."""
    import numpy as np
    import PIL.Image

    y, x = np.mgrid[0:size, 0:size]
    channels = [128 + 100 * np.sin(x / 9), 128 + 100 * np.cos(y / 7), (x + y) % 256]
    return PIL.Image.fromarray(np.stack(channels, -1).astype(np.uint8))


def take_turns(sides: dict, repeats: int) -> tuple[dict, dict[str, list[float]], dict[str, list[float]]]:
    """One warm-up per side (left out), then `repeats` rounds rotating who goes first; each side's last output,
    wall times and this process's CPU times (on a shared machine the CPU time is less disturbed by other loads)."""
    outputs = {}
    for name, side in sides.items():
        start = time.perf_counter()
        outputs[name] = side()
        print(f"warm-up {name}: {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for i in range(repeats):
        print(f"estimate round {i + 1}/{repeats} ...", file=sys.stderr, flush=True)
        for name in order[i % 2 :] + order[: i % 2]:
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[name] = sides[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            print(f"  {name}: {times[name][-1]:.2f} s ({cpu[name][-1]:.2f} s CPU)", file=sys.stderr, flush=True)
    return outputs, times, cpu


def same_maps(ours, bare) -> bool:
    import numpy as np

    fields = ("depth", "normals", "albedo", "roughness", "metallic")
    return all(np.array_equal(getattr(ours, f), getattr(bare, f)) for f in fields if getattr(bare, f) is not None)


def time_sides(args: argparse.Namespace, folder: str) -> dict:
    import torch

    from backend.estimators import PIPELINES, EstimateSettings, Estimators, to_estimate

    resolution = args.size if args.resolution is None else args.resolution
    settings = EstimateSettings(steps=1, ensemble_size=1, processing_resolution=resolution)
    image = picture(args.size)
    estimators = Estimators()
    start = time.perf_counter()
    pipe, _ = estimators.pipeline(args.kind, folder, device=args.device)
    load_s = time.perf_counter() - start
    # diffusers' own, on the same weights (from_pipe would cast them to fp32 unless told their dtype)
    bare = PIPELINES[args.kind].from_pipe(pipe, dtype=pipe.dtype)
    bare.set_progress_bar_config(disable=True)

    def ours():
        return estimators.estimate(args.kind, folder, image, settings, device=args.device)

    def theirs():
        prediction = bare(
            image,
            num_inference_steps=1,
            ensemble_size=1,
            processing_resolution=resolution,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
        ).prediction
        return to_estimate(args.kind, bare, prediction)

    sides = {"ours": ours, "bare": theirs}
    outputs, times, cpu = take_turns(sides, args.repeats)
    same = same_maps(outputs["ours"], outputs["bare"])
    ours_s, bare_s = min(times["ours"]), min(times["bare"])
    return {
        "kind": args.kind,
        "architecture": args.architecture,
        "size": args.size,
        "processing_resolution": resolution,
        "steps": 1,
        "ensemble_size": 1,
        "repeats": args.repeats,
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "load_s": round(load_s, 3),
        "ours_s": round(ours_s, 4),
        "bare_s": round(bare_s, 4),
        "ratio": round(ours_s / bare_s, 4),
        "target": RATIO_TARGET,
        "met": ours_s / bare_s <= RATIO_TARGET,
        "same_maps": same,
        "cpu_ratio": round(min(cpu["ours"]) / min(cpu["bare"]), 4),
        "samples_s": {name: [round(t, 4) for t in values] for name, values in times.items()},
        "cpu_samples_s": {name: [round(t, 4) for t in values] for name, values in cpu.items()},
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="marigold-bench-") as scratch:
        folder = args.model
        if not folder:
            from backend.tiny_marigold import make_test_estimator

            print(f"building a {args.architecture} {args.kind} model in {scratch} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            folder = str(make_test_estimator(Path(scratch) / "model", args.kind, architecture=args.architecture))
            print(f"built in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        result = time_sides(args, folder)
    print(
        f"estimate {result['kind']} {result['architecture']} {result['size']} px "
        f"(processing {result['processing_resolution']}, steps 1, ensemble 1) on {result['device']}:\n"
        f"  ours {result['ours_s']:.3f} s   bare diffusers {result['bare_s']:.3f} s   "
        f"ratio {result['ratio']:.4f} (target <= {RATIO_TARGET}: {'met' if result['met'] else 'missed'}; "
        f"CPU time ratio {result['cpu_ratio']:.4f})   "
        f"same maps: {result['same_maps']}"
    )
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
