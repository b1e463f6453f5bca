"""`python -m benchmarks [--quick] [--only NAME ...] [--runs N] [--out FILE]`, or `python -m benchmarks --gpu ...`

Runs the measurements side by side, prints a table and writes JSON with the date, machine, versions
and exact command: benchmarks/results/<YYYY-MM-DD>.json for a full run; a --quick run (tiny model only,
2 runs) goes to benchmarks/.cache/ unless --out says otherwise, so it never replaces committed results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from benchmarks import (
    batch,
    cold,
    deepcache,
    estimate,
    footprint,
    img2img,
    overhead,
    previews,
    project,
    remote,
    speed,
    train,
    travel,
    vae_tiles,
)
from benchmarks.common import CACHE, REPO, RESULTS, RUNS_FACTOR, Scenarios

# name -> (module, architecture); the order is the order of the table.
MEASUREMENTS = {
    "warm_tiny": (overhead, "tiny"),
    "warm_sd15": (overhead, "sd15"),
    "speed_sd15": (speed, "sd15"),
    "cold_tiny": (cold, "tiny"),
    "cold_sd15": (cold, "sd15"),
    "footprint": (footprint, "tiny"),
    "img2img_tiny": (img2img, "tiny"),
    "img2img_sd15": (img2img, "sd15"),
    "travel_tiny": (travel, "tiny"),
    "travel_sd15": (travel, "sd15"),
    "project_tiny": (project, "tiny"),
    "project_sd15": (project, "sd15"),
    "train_tiny": (train, "tiny"),
    "train_sd15": (train, "sd15"),
    "remote_tiny": (remote, "tiny"),
    "remote_sd15": (remote, "sd15"),
    "batch_tiny": (batch, "tiny"),
    "estimate_tiny": (estimate, "tiny"),
    "estimate_sd2": (estimate, "sd2"),
    "preview_sd15": (previews, "sd15"),
    "deepcache_sd15": (deepcache, "sd15"),
    "vae_tiles_sd15": (vae_tiles, "sd15"),
}
QUICK = ("warm_tiny", "cold_tiny", "footprint", "img2img_tiny")
COLUMNS = ("bare", "backend", "addon", "ratio")


def python_name() -> str:
    """The interpreter as the user typed it from the repository: .venv/bin/python."""
    path = Path(sys.executable)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def machine() -> dict:
    meminfo = Path("/proc/meminfo").read_text().split()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    pytest_processes = subprocess.run(["pgrep", "-c", "-f", "pytest"], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "ram_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1),
        "cpu": cpu,
        "os": platform.platform(),
        "gpu": "none",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "pytest_processes_at_start": int(pytest_processes or 0),
    }


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "pillow", "bpy", "sd-textures"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def print_table(results: dict) -> None:
    header = f"{'measurement':<11} {'metric':<42}" + "".join(f"{c:>14}" for c in COLUMNS)
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        for row in result["rows"]:
            cells = "".join(f"{'' if row.get(c) is None else row[c]!s:>14}" for c in COLUMNS)
            print(f"{name:<11} {row['metric']:<42}{cells}")
    print()
    for name, result in results.items():
        for target in result["targets"]:
            band = "" if target["band"] is None else f" +- {target['band']:g}"
            print(f"{target['verdict'].upper():<12} {name}: {target['target']} (got {target['value']}{band})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--gpu" in argv:  # its own options (benchmarks/gpu.py): --only takes a model there; --gpu below is for --help
        from benchmarks import gpu

        return gpu.main([arg for arg in argv if arg != "--gpu"])
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("--gpu", action="store_true", help="the CUDA benchmark instead (benchmarks/gpu.py): "
                        "python -m benchmarks --gpu [--only sd15|sdxl] [--steps N] [--compile] [--out FILE]")
    parser.add_argument("--quick", action="store_true", help=f"tiny model only ({', '.join(QUICK)}), 2 runs")
    parser.add_argument("--only", action="append", choices=MEASUREMENTS, metavar="NAME",
                        help=f"run only this measurement (repeatable): {', '.join(MEASUREMENTS)}")
    parser.add_argument("--runs", type=int, help="warm runs per side (default 5, quick 2; the tiny model gets "
                        f"{RUNS_FACTOR['tiny']}x as many)")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    names = args.only or list(QUICK if args.quick else MEASUREMENTS)
    runs = args.runs or (2 if args.quick else 5)
    if runs < 1:
        parser.error("--runs must be at least 1")
    date = time.strftime("%Y-%m-%d", time.gmtime())
    out = args.out or (CACHE / f"quick-{date}.json" if args.quick else RESULTS / f"{date}.json")

    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join([python_name(), "-m", "benchmarks", *argv]),
        "quick": args.quick,
        "runs": runs,
        "machine": machine(),
        "versions": versions(),
        "results": {},
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="scratch-") as scratch:
        scenarios = Scenarios(Path(scratch), runs)
        for name in MEASUREMENTS:
            if name in names:
                module, architecture = MEASUREMENTS[name]
                report["results"][name] = module.measure(scenarios, architecture)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    print_table(report["results"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
