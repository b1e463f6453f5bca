"""Measurement: large textures decoded whole or in exact tiles (backend/vae_tiles.py), SD-1.5's VAE (random weights).

For each size (default 1024 and 2048 px) and each way (whole: diffusers' vae.decode; tiled: our exact tiled decode,
256-pixel tiles), a fresh process builds the SD-1.5 VAE from backend/configs/sd15/vae (seeded random weights: time
and memory do not depend on the values), makes a seeded latent, and decodes it once with seamless "xy" (the texture
case). It reports the seconds and the peak resident memory the decode added (VmHWM reset before the decode, minus
the resident memory before it: the model and the latent are not counted). The parent compares the two pictures
(max abs difference, target <= 1e-3) and reports tiled / whole for time and memory. On a GPU the tiled decode keeps
the whole tensors in host memory, so the device's saving is larger than the CPU's shown here.

`--dtype bfloat16` runs the VAE and the latent in bfloat16, as on a GPU in half precision: the whole tensors take
half the memory (4096 px fits this 24 GiB machine only so), and `--ways tiled` skips the whole decode where it
cannot fit; the difference is then reported only where both ran.

`python -m benchmarks.vae_tiles [--sizes 1024 2048] [--dtype float32|bfloat16] [--ways whole tiled] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ERROR_TARGET = 1e-3
WAYS = ("whole", "tiled")
SUITE = {"sd15": {"sizes": (1024, 2048)}}


def measure(scenarios, architecture: str) -> dict:
    """The suite's entry (benchmarks/__main__.py): this module's command in a fresh process, its JSON as table rows."""
    from benchmarks.common import PYTHON, REPO, target

    out = scenarios.scratch / f"vae-tiles-{architecture}.json"
    sizes = [str(size) for size in SUITE[architecture]["sizes"]]
    print(f"starting vae_tiles_{architecture} ...", file=sys.stderr, flush=True)
    subprocess.run([PYTHON, "-m", "benchmarks.vae_tiles", "--out", str(out), "--sizes", *sizes], cwd=REPO, check=True)
    result = json.loads(out.read_text())
    result["targets"], result["rows"] = [], []
    for size, row in result["by_size"].items():
        result["targets"].append(target(f"tiled - whole at {size} px, max abs <= {ERROR_TARGET}", row["max_abs"],
                                        ERROR_TARGET))  # fmt: skip
        result["rows"] += [
            {"metric": f"{size} px decode s (whole / tiled)", "bare": row["whole"]["seconds"],
             "backend": row["tiled"]["seconds"], "ratio": row["time_ratio"]},
            {"metric": "  peak added memory GiB (whole / tiled)", "bare": row["whole"]["peak_gib"],
             "backend": row["tiled"]["peak_gib"], "ratio": row["memory_ratio"]},
        ]  # fmt: skip
    return result


def decode_once(size: int, way: str, dtype: str, picture: Path) -> dict:
    """One decode in this process; the picture is saved for the parent's comparison."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from backend import vae_tiles
    from backend.seamless import seamless
    from backend.single_file import CONFIG_ROOT

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_ROOT / "sd15" / "vae")).eval()
    vae.to(getattr(torch, dtype))
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1)).to(vae.dtype)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    start = time.perf_counter()
    with torch.no_grad(), seamless([vae], "xy"):
        image = vae_tiles.tiled_decode(vae, latents) if way == "tiled" else vae.decode(latents).sample
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") - before
    np.save(picture, image.float().numpy())
    return {"seconds": round(seconds, 2), "peak_gib": round(peak / 2**20, 2)}


def _status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def run(sizes: list[int], dtype: str = "float32", ways: tuple[str, ...] = WAYS) -> dict:
    by_size = {}
    with tempfile.TemporaryDirectory(prefix="vae-tiles-") as scratch:
        for size in sizes:
            row = {}
            for way in ways:  # each in a fresh process: one peak per decode
                picture = Path(scratch) / f"{size}-{way}.npy"
                command = [sys.executable, "-m", "benchmarks.vae_tiles", "--one", str(size), way, dtype, str(picture)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                row[way] = json.loads(output.strip().splitlines()[-1])
                print(f"{size} px {way} {dtype}: {row[way]}", file=sys.stderr, flush=True)
            if set(WAYS) <= set(ways):
                row.update(_compare(Path(scratch), size, row))
            by_size[str(size)] = row
    return {"sizes": sizes, "dtype": dtype, "by_size": by_size}


def _compare(scratch: Path, size: int, row: dict) -> dict:
    """The two pictures' largest difference (also relative to the picture's largest value) and the ratios."""
    import numpy as np

    whole, tiled = np.load(scratch / f"{size}-whole.npy"), np.load(scratch / f"{size}-tiled.npy")
    max_abs = float(np.abs(tiled - whole).max())
    return {
        "max_abs": max_abs,
        "max_abs_relative": max_abs / float(np.abs(whole).max()),
        "time_ratio": round(row["tiled"]["seconds"] / row["whole"]["seconds"], 3),
        "memory_ratio": round(row["tiled"]["peak_gib"] / max(row["whole"]["peak_gib"], 1e-9), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vae_tiles", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="texture sides, pixels")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the VAE's dtype")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS), help="which decodes to run")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--one", nargs=4, metavar=("SIZE", "WAY", "DTYPE", "PICTURE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        size, way, dtype, picture = args.one
        print(json.dumps(decode_once(int(size), way, dtype, Path(picture))))
        return 0
    if any(size < 64 or size % 8 for size in args.sizes):
        parser.error("--sizes: each must be a multiple of 8, at least 64")
    result = run(args.sizes, args.dtype, tuple(args.ways))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
