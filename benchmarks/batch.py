"""Measurement: batch throughput on Ray with 1 and 2 actors, against the same jobs run one by one here.

One process (`python -m benchmarks.batch CONFIG OUT`, spawned so the parent never imports torch or ray)
writes a manifest of tiny-model txt2img jobs (different seeds) and runs it into fresh folders, one torch
thread per worker so that a worker is one core:
- sequential: `run_batch` without Ray (one warm worker in this process), once;
- ray x1, ray x2: `run_batch` on a local Ray cluster (`ray.init(num_cpus=2)`) with 1 and 2 actors, taking
  turns for ROUNDS rounds (who goes first rotates) so that a load that changes affects both alike.
Measured: the wall time of each batch, its start-up (until the first result: actor start, imports, model
load, first job), its steady throughput (jobs per second after each actor's first result), and the
scheduling overhead per job (the driver's time per job minus the worker's own `timings.total`). All three
runs must give the same pixels. Target: 2 actors' steady throughput >= 1.6x one actor's (two cores).
"""

from __future__ import annotations

import json
import sys

from benchmarks.common import (
    REQUEST,
    SETTINGS,
    Scenarios,
    measuring_process,
    median,
    model_dir,
    scenario_args,
    target,
)

SPEEDUP_TARGET = 1.6
JOBS = {"tiny": 24, "sd15": 4}
ROUNDS = 3


def measure(scenarios: Scenarios, architecture: str) -> dict:
    config = {
        "architecture": architecture,
        "model": str(model_dir(architecture)),
        "jobs": JOBS[architecture],
        "scratch": str(scenarios.scratch / f"batch-{architecture}"),
    }
    return summarise(measuring_process(["benchmarks.batch"], config, scenarios.scratch, f"batch-{architecture}"))


def summarise(raw: dict) -> dict:
    runs = raw["runs"]
    result = {"jobs": raw["jobs"], "ray_init_s": round(raw["ray_init_s"], 3), "same_pixels": raw["same_pixels"]}
    for name, run in runs.items():
        result[name] = {key: round(value, 3) for key, value in run.items()}
    speedup = runs["ray_x2"]["steady_jobs_per_s"] / runs["ray_x1"]["steady_jobs_per_s"]
    result["speedup_x2_over_x1"] = round(speedup, 3)
    result["targets"] = [
        target(f"ray x1 / x2 steady time per job <= 1/{SPEEDUP_TARGET}", round(1 / speedup, 4), 1 / SPEEDUP_TARGET)
    ]
    rows = []
    for metric, key in (
        ("batch wall s", "wall_s"),
        ("  start-up s (until the first result)", "startup_s"),
        ("  steady jobs per second", "steady_jobs_per_s"),
        ("  scheduling overhead ms per job", "overhead_ms"),
        ("  worker compute ms per job", "worker_ms"),
    ):
        rows.append({"metric": metric, "bare": result["sequential"][key], "backend": result["ray_x1"][key],
                     "addon": result["ray_x2"][key]})  # fmt: skip
    rows[2]["ratio"] = result["speedup_x2_over_x1"]
    rows.append({"metric": "(columns: sequential / ray x1 / ray x2)"})
    rows.append({"metric": "same pixels", "backend": str(raw["same_pixels"])})
    result["rows"] = rows
    return result


# --- the measuring process ------------------------------------------------------------------------------


def main() -> None:
    config, out = scenario_args()
    import time
    from pathlib import Path

    import numpy as np
    import PIL.Image
    import ray

    from backend.batch import Progress, run_batch

    scratch = Path(config["scratch"])
    scratch.mkdir(parents=True, exist_ok=True)
    base = {"task": "txt2img", "model": config["model"], **SETTINGS[config["architecture"]], **REQUEST}
    manifest = scratch / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(base | {"seed": REQUEST["seed"] + i}) + "\n" for i in range(config["jobs"])))

    def one_batch(name: str, **options) -> tuple[dict, list]:
        stamps: list[float] = []
        start = time.perf_counter()
        outcomes = run_batch(manifest, scratch / name, threads=1, progress=Progress(
            config["jobs"], None, on_outcome=lambda outcome: stamps.append(time.perf_counter() - start)), **options)
        wall = time.perf_counter() - start
        assert all(o.state == "done" for o in outcomes), [o.error for o in outcomes]
        actors = options.get("actors", 1)
        steady = (len(stamps) - actors) / (stamps[-1] - stamps[actors - 1])
        worker = [json.loads((scratch / name / o.key / "result.json").read_text())["result"]["timings"]["total"]
                  for o in outcomes]  # fmt: skip
        overhead = [o.seconds - w for o, w in zip(outcomes, worker, strict=True)]
        run = {"wall_s": wall, "startup_s": stamps[0], "steady_jobs_per_s": steady,
               "overhead_ms": 1000 * median(overhead), "worker_ms": 1000 * median(worker)}  # fmt: skip
        print(f"{name}: {run}", file=sys.stderr, flush=True)
        return run, [np.asarray(PIL.Image.open(o.files[0])) for o in outcomes]

    runs, images = {}, {}
    runs["sequential"], images["sequential"] = one_batch("sequential")
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_init = time.perf_counter() - start
    rounds: dict[str, list[dict]] = {"ray_x1": [], "ray_x2": []}
    for i in range(ROUNDS):
        for actors in (1, 2)[i % 2 :] + (1, 2)[: i % 2]:
            name = f"ray_x{actors}"
            run, images[name] = one_batch(f"{name}-{i}", ray_address="local", actors=actors)
            rounds[name].append(run)
    ray.shutdown()
    for name, done in rounds.items():  # the median of each figure over the rounds
        runs[name] = {key: median([run[key] for run in done]) for key in done[0]}
    pairs = [pair for name in ("ray_x1", "ray_x2") for pair in zip(images["sequential"], images[name], strict=True)]
    same = all(np.array_equal(a, b) for a, b in pairs)
    out.write_text(json.dumps({"jobs": config["jobs"], "runs": runs, "ray_init_s": ray_init, "same_pixels": same}))


if __name__ == "__main__":
    main()
