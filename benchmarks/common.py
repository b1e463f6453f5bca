"""What every benchmark scenario shares: the models, the request, timing and memory readings.

Stdlib only: the Blender scenario imports this before measuring Blender's footprint, so it must not
pull in torch.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache"  # gitignored: model folders, scratch outputs, quick results
RESULTS = REPO / "benchmarks" / "results"
PYTHON = sys.executable

# One request, the same on every side: model, prompt, seed, steps, size, scheduler and guidance.
SETTINGS = {
    "tiny": {"width": 64, "height": 64, "steps": 2},
    "sd15": {"width": 256, "height": 256, "steps": 2},
}
REQUEST = {
    "prompt": "weathered red brick wall, moss in the joints",
    "seed": 1234,
    "guidance_scale": 7.5,
    "scheduler": "euler_a",  # the backend's default; the bare side builds EulerAncestralDiscreteScheduler
}


def generate_params(architecture: str, model: str | Path, output_dir: str | Path) -> dict:
    """The generate request's params for one architecture."""
    return {"model": str(model), "output_dir": str(output_dir), **REQUEST, **SETTINGS[architecture]}


def model_dir(architecture: str) -> Path:
    """The cached random-weight model folder, built once (sd15 is ~3.4 GB of fp32 safetensors)."""
    folder = CACHE / f"model-{architecture}"
    done = folder / ".complete"  # written last, so an interrupted build is rebuilt
    if not done.is_file():
        print(f"building the {architecture} test model in {folder} ...", file=sys.stderr, flush=True)
        subprocess.run(
            [PYTHON, "-m", "backend", "make-test-model", str(folder), "--architecture", architecture],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        done.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return folder


def now() -> float:
    """CLOCK_MONOTONIC: one clock for every process on the machine, so a parent can time a child."""
    return time.monotonic()


def proc_status_kib(pid: int | str, field: str) -> int:
    """A memory field (VmRSS, VmHWM, ...) of /proc/<pid>/status in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def median(values: list[float]) -> float:
    return statistics.median(values)


def scenario_args(argv: list[str] | None = None) -> tuple[dict, Path]:
    """A scenario's input (JSON in argv[1]) and where to write its output (argv[2])."""
    argv = sys.argv[1:] if argv is None else argv
    return json.loads(argv[0]), Path(argv[1])


def run_scenario(module: str, config: dict, scratch: Path, timeout: float = 1800) -> dict:
    """Run `python -m benchmarks.<module>` in a fresh process; its JSON output plus `spawned_at`."""
    out = scratch / f"{module}-{config.get('architecture', '')}-{time.monotonic_ns()}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    spawned_at = now()
    proc = subprocess.run(
        [PYTHON, "-m", f"benchmarks.{module}", json.dumps(config), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"benchmarks.{module} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(out.read_text()), "spawned_at": spawned_at}


class Scenarios:
    """Runs each scenario process once per architecture; measurements share the results."""

    def __init__(self, scratch: Path, runs: int):
        self.scratch = scratch
        self.runs = runs
        self._done: dict[tuple[str, str], dict] = {}

    def get(self, module: str, architecture: str) -> dict:
        key = (module, architecture)
        if key not in self._done:
            model = model_dir(architecture)
            output_dir = self.scratch / f"{module}-{architecture}"
            output_dir.mkdir(parents=True, exist_ok=True)
            config = {
                "architecture": architecture,
                "model": str(model),
                "output_dir": str(output_dir),
                "params": generate_params(architecture, model, output_dir),
                "runs": self.runs,
            }
            print(f"running {module} ({architecture}, {self.runs} runs) ...", file=sys.stderr, flush=True)
            self._done[key] = run_scenario(module, config, self.scratch)
        return self._done[key]
