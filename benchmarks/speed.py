"""Measurement 2: denoising step time and peak memory, bare diffusers against the backend.

A step is the time between two step-end callbacks (step 1 also holds the set-up, so it is left out):
bare stamps them in its callback, the worker reports `elapsed` in its progress events (measured in
the worker; the client's receive times are reported too). Peak RSS: ru_maxrss of the bare process,
VmHWM of the worker (read from /proc while it is alive).
"""

from __future__ import annotations

from benchmarks.common import Scenarios, difference_band, median, target
from benchmarks.overhead import spread_pct

STEP_RATIO_TARGET = 1.01


def step_intervals(stamps: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(stamps[:-1], stamps[1:], strict=True)]


def measure(scenarios: Scenarios, architecture: str) -> dict:
    bare = scenarios.get("bare", architecture)
    client = scenarios.get("client", architecture)
    addon = scenarios.get("addon", architecture)
    bare_steps = [s for r in bare["runs"][1:] for s in step_intervals(r["step_times"])]
    worker_steps = [s for r in client["warm"] for s in step_intervals([e["elapsed"] for e in r["progress"]])]
    received_steps = [s for r in client["warm"] for s in step_intervals([e["received_at"] for e in r["progress"]])]
    bare_ms, worker_ms = 1000 * median(bare_steps), 1000 * median(worker_steps)
    ratio = worker_ms / bare_ms
    mb = 1024 / 1e6  # KiB -> MB
    result = {
        "step_samples": len(worker_steps),
        "bare_step_ms": round(bare_ms, 2),
        "backend_step_ms": round(worker_ms, 2),
        "backend_step_received_ms": round(1000 * median(received_steps), 2),
        "step_ratio": round(ratio, 4),
        "bare_peak_rss_mb": round(bare["peak_rss_kib"] * mb, 1),
        "worker_peak_rss_mb": round(client["worker_vm_hwm_kib"] * mb, 1),
        "addon_worker_peak_rss_mb": round(addon["worker_vm_hwm_kib"] * mb, 1),
        "torch_threads": bare["torch_threads"],
        "spread_pct": {"bare": spread_pct(bare_steps), "backend": spread_pct(worker_steps)},
        "samples_ms": {
            "bare": [round(1000 * s, 2) for s in bare_steps],
            "backend": [round(1000 * s, 2) for s in worker_steps],
        },
    }
    result["step_noise_band_ms"] = round(1000 * difference_band(bare_steps, worker_steps), 2)
    result["targets"] = [
        target(f"step time ratio <= {STEP_RATIO_TARGET}", result["step_ratio"], STEP_RATIO_TARGET,
               result["step_noise_band_ms"] / bare_ms)
    ]
    result["rows"] = [
        {"metric": "step, median ms", "bare": result["bare_step_ms"], "backend": result["backend_step_ms"],
         "ratio": result["step_ratio"]},
        {"metric": "spread of steps (max-min)/median %", **result["spread_pct"]},
        {"metric": "  noise: +- ms (~95%, from step spread)", "backend": result["step_noise_band_ms"]},
        {"metric": "step as received by client ms", "backend": result["backend_step_received_ms"]},
        {"metric": "peak RSS MB", "bare": result["bare_peak_rss_mb"], "backend": result["worker_peak_rss_mb"],
         "addon": result["addon_worker_peak_rss_mb"]},
    ]
    return result
