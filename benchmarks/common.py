"""What every benchmark scenario shares: the models, the request, timing and memory readings.

Stdlib only: the Blender scenario imports this before measuring Blender's footprint, so it must not
pull in torch.
"""

from __future__ import annotations

import json
import math
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
# Warm runs per side are --runs times this: a tiny run takes ~0.15 s and its differences are a few ms,
# so it needs more samples than an sd15 run of ~12 s.
RUNS_FACTOR = {"tiny": 4, "sd15": 1}
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


def measuring_process(args: list[str], config: dict, scratch: Path, name: str) -> dict:
    """Run `python -m benchmarks.<args...> CONFIG OUT`, one scenario's measuring process (a fresh interpreter:
    no warm caches of the runner), and return the JSON it wrote; its stderr is kept in <name>.log."""
    out, log = scratch / f"{name}.json", scratch / f"{name}.log"
    print(f"starting {name} ...", file=sys.stderr, flush=True)
    with open(log, "w+") as stderr:
        code = subprocess.run(
            [PYTHON, "-m", *args, json.dumps(config), str(out)],
            cwd=REPO,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        ).returncode
        if code != 0 or not out.is_file():
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(args)} failed (exit {code}):\n{stderr.read()[-4000:]}")
    return json.loads(out.read_text())


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


def median_error(values: list[float]) -> float:
    """Standard error of the median, from the median absolute deviation (robust to the odd slow run)."""
    if len(values) < 2:
        return math.inf
    mad = median([abs(v - median(values)) for v in values])
    return 1.2533 * 1.4826 * mad / math.sqrt(len(values))


def difference_band(a: list[float], b: list[float]) -> float:
    """Half-width of a ~95% band around median(b) - median(a) for independent samples."""
    return 2 * math.hypot(median_error(a), median_error(b))


def target(name: str, value: float, limit: float, band: float | None = None) -> dict:
    """A target check. With a noise band the verdict is "inconclusive" when value +- band straddles the limit."""
    verdict = "met" if value <= limit else "missed"
    if band is not None and value - band <= limit < value + band:
        verdict = "inconclusive"
    return {"target": name, "value": value, "limit": limit, "band": None if band is None else round(band, 4),
            "met": value <= limit, "verdict": verdict}


def scenario_args(argv: list[str] | None = None) -> tuple[dict, Path]:
    """A scenario's input (JSON in argv[1]) and where to write its output (argv[2])."""
    argv = sys.argv[1:] if argv is None else argv
    return json.loads(argv[0]), Path(argv[1])


# Lockstep between the parent and the scenario processes: stdout lines starting with MARK (other output,
# such as Blender's reports, is ignored), and one command per line on stdin.
MARK = "@bench "


def signal(word: str) -> None:
    """Child: tell the parent "ready" (set up, waiting for turns) or "done" (one run finished)."""
    print(MARK + word, flush=True)


def next_turn() -> bool:
    """Child: wait for the parent; True means run once more, False means finish up."""
    return sys.stdin.readline().strip() == "go"


class ScenarioProcess:
    """Parent side of one scenario: `python -m benchmarks.<module>` in a fresh process, run in turns.

    `spawned_at` is taken just before the spawn, so the child's timestamps can be measured from it.
    """

    def __init__(self, module: str, config: dict, scratch: Path):
        self.module = module
        self.out = scratch / f"{module}-{config['architecture']}.json"
        self.stderr = open(scratch / f"{module}-{config['architecture']}.log", "w+")  # noqa: SIM115 - closed in finish
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        self.spawned_at = now()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", f"benchmarks.{module}", json.dumps(config), str(self.out)],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )

    def expect(self, word: str) -> None:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                if line[len(MARK):].strip() == word:
                    return
                break
        self.proc.kill()
        raise RuntimeError(f"benchmarks.{self.module} stopped before {word!r}:\n{self.log_tail()}")

    def turn(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.expect("done")

    def finish(self, timeout: float = 1800) -> dict:
        self.proc.communicate("finish\n", timeout=timeout)  # reads stdout to the end: a chatty child never blocks
        code = self.proc.returncode
        if code != 0 or not self.out.is_file():
            raise RuntimeError(f"benchmarks.{self.module} failed (exit {code}):\n{self.log_tail()}")
        self.stderr.close()
        return {**json.loads(self.out.read_text()), "spawned_at": self.spawned_at}

    def log_tail(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read()[-4000:]


class Scenarios:
    """Runs the three sides of one architecture once; the measurements share the results.

    The sides start one after the other (each cold start has the CPU to itself), then take their warm
    runs in turns, rotating who goes first, so a change in background load hits every side alike.
    """

    SIDES = ("bare", "client", "addon")

    def __init__(self, scratch: Path, runs: int):
        self.scratch = scratch
        self.runs = runs
        self._done: dict[str, dict[str, dict]] = {}

    def get(self, module: str, architecture: str) -> dict:
        if architecture not in self._done:
            self._done[architecture] = self._run(architecture)
        return self._done[architecture][module]

    def _run(self, architecture: str) -> dict[str, dict]:
        model = model_dir(architecture)
        sides = {}
        for module in self.SIDES:
            output_dir = self.scratch / f"{module}-{architecture}"
            output_dir.mkdir(parents=True, exist_ok=True)
            config = {
                "architecture": architecture,
                "model": str(model),
                "output_dir": str(output_dir),
                "params": generate_params(architecture, model, output_dir),
            }
            print(f"starting {module} ({architecture}) ...", file=sys.stderr, flush=True)
            sides[module] = ScenarioProcess(module, config, self.scratch)
            sides[module].expect("ready")
        order = list(sides.values())
        runs = self.runs * RUNS_FACTOR[architecture]
        for i in range(runs):
            print(f"warm run {i + 1}/{runs} ({architecture}) ...", file=sys.stderr, flush=True)
            first = i % len(order)
            for side in order[first:] + order[:first]:
                side.turn()
        return {module: side.finish() for module, side in sides.items()}
