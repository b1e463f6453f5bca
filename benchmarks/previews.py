"""Measurement: what a step preview costs against the step it previews, on the SD-1.5 architecture (random weights).

One process loads the SD-1.5 U-Net (benchmarks/common.py model_dir("sd15")) and a TAESD preview decoder of the real
size (backend/configs/taesd/config.json, seeded random weights: the time does not depend on the values), and at
256 and 512 px takes turns, after one warm-up each: one U-Net step on a CFG batch (2 latents, 77 prompt tokens),
one TAESD preview and one latent-approximation preview, each through backend.previews.Previewer.event as a job
sends it (the first image, TAESD at half the side, backend.previews.POOL; uint8, base64). The result is the median
per side and the preview's share of the step (target <= 5 %). For comparison, a full-size TAESD decode of the same
latents (what a preview cost before previews were pooled; not sent).

`python -m benchmarks.previews [--sizes 256 512] [--repeats 5] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARE_TARGET = 0.05
SUITE = {"sd15": {"sizes": (256, 512), "repeats": 5}}


def measure(scenarios, architecture: str) -> dict:
    """The suite's entry (benchmarks/__main__.py): this module's command in a fresh process, its JSON as table rows."""
    from benchmarks.common import PYTHON, REPO, target

    settings, out = SUITE[architecture], scenarios.scratch / f"previews-{architecture}.json"
    command = [PYTHON, "-m", "benchmarks.previews", "--out", str(out), "--repeats", str(settings["repeats"]),
               "--sizes", *map(str, settings["sizes"])]  # fmt: skip
    print(f"starting preview_{architecture} ...", file=sys.stderr, flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    result["targets"], result["rows"] = [], []
    for size in result["sizes"]:
        row = result["by_size"][str(size)]
        name = f"TAESD preview / U-Net step at {size} px <= {SHARE_TARGET}"
        result["targets"].append(target(name, row["taesd_share"], SHARE_TARGET))
        result["rows"] += [
            {"metric": f"{size} px CFG U-Net step, median ms", "backend": row["step_ms"]},
            {"metric": "  TAESD preview ms; share of step", "backend": row["taesd_ms"], "ratio": row["taesd_share"]},
            {"metric": "  approximation ms; share", "backend": row["approx_ms"], "ratio": row["approx_share"]},
            {"metric": "  full-size TAESD decode ms; share (not sent)", "backend": row["full_ms"],
             "ratio": row["full_share"]},
        ]  # fmt: skip
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.previews", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides, pixels")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per size, after one warm-up")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    return parser.parse_args(argv)


def load():
    """The SD-1.5 U-Net and a real-size TAESD with seeded random weights, fp32 on the CPU, in eval mode."""
    import torch
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    from benchmarks.common import REPO, model_dir

    unet = UNet2DConditionModel.from_pretrained(model_dir("sd15") / "unet").eval()
    torch.manual_seed(0)
    config = AutoencoderTiny.load_config(REPO / "backend" / "configs" / "taesd")
    return unet, AutoencoderTiny.from_config(config).eval()


def time_size(unet, decoder, size: int, repeats: int) -> dict:
    """Median wall times (ms) of a CFG U-Net step and of each preview at `size` px, taking turns."""
    import torch

    from backend.families import SD
    from backend.previews import Previewer, decode_to_rgb

    generator = torch.Generator().manual_seed(size)
    latents = torch.randn((2, 4, size // 8, size // 8), generator=generator)
    prompt = torch.randn((2, 77, unet.config.cross_attention_dim), generator=generator)
    taesd, approx = Previewer(SD.preview_factors, decoder, "taesd"), Previewer(SD.preview_factors)
    sides = {
        "step": lambda: unet(latents, 500, encoder_hidden_states=prompt, return_dict=False),
        "taesd": lambda: taesd.event(1, latents),
        "approx": lambda: approx.event(1, latents),
        "full": lambda: decode_to_rgb(decoder, latents[0]),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    with torch.no_grad():
        for round_ in range(repeats + 1):  # round 0: the warm-up, left out
            for name, side in sides.items():
                start = time.perf_counter()
                side()
                if round_:
                    times[name].append(time.perf_counter() - start)
            print(f"{size} px round {round_}/{repeats}", file=sys.stderr, flush=True)
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    sent = taesd.event(1, latents)
    return {
        "step_ms": round(ms["step"], 2),
        "taesd_ms": round(ms["taesd"], 2),
        "approx_ms": round(ms["approx"], 3),
        "taesd_share": round(ms["taesd"] / ms["step"], 4),
        "approx_share": round(ms["approx"] / ms["step"], 6),
        "full_ms": round(ms["full"], 2),
        "full_share": round(ms["full"] / ms["step"], 4),
        "preview_size": [sent.width, sent.height],
        "samples_ms": {name: [round(1000 * t, 2) for t in values] for name, values in times.items()},
    }


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    unet, decoder = load()
    by_size = {str(size): time_size(unet, decoder, size, args.repeats) for size in args.sizes}
    result = {
        "architecture": "sd15",
        "sizes": args.sizes,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "target": SHARE_TARGET,
        "met": all(row["taesd_share"] <= SHARE_TARGET for row in by_size.values()),
        "by_size": by_size,
    }
    for size, row in by_size.items():
        print(f"{size} px: CFG U-Net step {row['step_ms']:.0f} ms, TAESD preview {row['taesd_ms']:.1f} ms "
              f"({100 * row['taesd_share']:.2f} %; full size {100 * row['full_share']:.2f} %), "
              f"approximation {row['approx_ms']:.2f} ms")  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
